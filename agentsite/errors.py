"""The one error type the services raise; the API and the WebSocket translate it."""


class ApplicationError(Exception):
    """A failure a person can act on: a stable machine `code` and a human `message`."""

    def __init__(self, code: str, message: str, http_status: int = 400) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.http_status = http_status

    def as_dict(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message}
