"""Daphne, with its access log in the app's log format:
`python -m agentsite.serve [daphne's options] agentsite.asgi:application`.

Daphne writes its access log itself, as NCSA text lines on stdout (or the file given by
`--access-log`), not through `logging`, so LOG_FORMAT=json does not reach it. Its hook
for this is the server's action logger, which Daphne's command line builds from its
options: the server class below swaps Daphne's text writer for one that writes each
entry as a JSON line, to the same stream, shaped like every other line (time, level,
logger, message) with the request's fields beside them.
"""

import logging
from typing import IO, Any

from daphne.access import AccessLogGenerator
from daphne.cli import CommandLineInterface
from daphne.server import Server
from django.conf import settings

from .logging import JsonFormatter

ACCESS_LOGGER = "daphne.access"
_WEBSOCKET_ACTIONS = {
    "connecting": "WSCONNECTING",
    "connected": "WSCONNECT",
    "rejected": "WSREJECT",
    "disconnected": "WSDISCONNECT",
}


class JsonAccessLog:
    """Daphne's action-logger interface (`(protocol, action, details)`), as JSON lines."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream
        self.formatter = JsonFormatter()

    def __call__(self, protocol: str, action: str, details: dict[str, Any]) -> None:
        fields: dict[str, Any] = {"client": details.get("client"), "path": details.get("path")}
        if protocol == "http" and action == "complete":
            fields.update(
                method=details.get("method"),
                status=details.get("status"),
                size=details.get("size"),
                duration_ms=round(details.get("time_taken", 0) * 1000, 3),
            )
            message = f"{fields['method']} {fields['path']} {fields['status']}"
            status = fields["status"] or 0
            # As Daphne's own `runserver` logs them.
            level = (
                logging.ERROR
                if status >= 500
                else logging.WARNING
                if status >= 400
                else logging.INFO
            )
        elif protocol == "websocket" and action in _WEBSOCKET_ACTIONS:
            fields["method"] = _WEBSOCKET_ACTIONS[action]
            message = f"{fields['method']} {fields['path']}"
            level = logging.INFO
        else:
            return
        record = logging.makeLogRecord(
            {
                "name": ACCESS_LOGGER,
                "levelno": level,
                "levelname": logging.getLevelName(level),
                "msg": message,
                **fields,
            }
        )
        self.stream.write(self.formatter.format(record) + "\n")
        self.stream.flush()


class JsonAccessLogServer(Server):
    def __init__(self, *args: Any, action_logger: Any = None, **kwargs: Any) -> None:
        # The command line has loaded the application (and so the settings) by now.
        if isinstance(action_logger, AccessLogGenerator) and settings.LOG_FORMAT == "json":
            action_logger = JsonAccessLog(action_logger.stream)
        super().__init__(*args, action_logger=action_logger, **kwargs)


class AgentsiteCommandLine(CommandLineInterface):
    server_class = JsonAccessLogServer


if __name__ == "__main__":
    AgentsiteCommandLine.entrypoint()
