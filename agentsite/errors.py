"""The one error type the services raise; the API and the WebSocket translate it."""

from typing import Any


class ApplicationError(Exception):
    """A failure a person can act on: a stable machine `code` and a human `message`.

    `extra` fields (e.g. `retry_after`) join the code and message in `as_dict()`, so the
    JSON error body and the WebSocket error frame both carry them."""

    def __init__(self, code: str, message: str, http_status: int = 400, **extra: Any) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.http_status = http_status
        self.extra = extra

    def as_dict(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, **self.extra}
