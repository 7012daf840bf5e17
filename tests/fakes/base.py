"""The machinery shared by the fake LLM servers: a real HTTP/1.1 server on 127.0.0.1 in a
background thread, answering each request with the next reply of a per-test script and
recording every request it receives.

Replies are objects with a `send(exchange)` method; the protocol modules define the ones
that speak their API (a streamed completion, an API error body) on the bases here
(`Answer`, `APIError`), and name them to `FakeLLMServer`, whose scripting methods (`text`,
`error`, `stream_error`, `malformed`, `slow`) enqueue them; the replies here speak no API in
particular (raw bytes, a delay).
"""

from __future__ import annotations

import contextlib
import json
import re
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar, Protocol, Self

# How long a stalled or slow reply waits at most; any client timeout in a test is far
# shorter, and stopping the server releases the wait at once.
FOREVER = 60.0

_TOKEN = re.compile(r"\s*\w+|\s*[^\w\s]|\s+$")


class Reply(Protocol):
    def send(self, exchange: Exchange) -> None: ...


@dataclass
class RecordedRequest:
    """One request as the server received it."""

    method: str
    path: str
    headers: dict[str, str]  # lower-cased names
    raw_body: bytes
    json: Any = None  # the decoded body, None when it is not JSON

    @property
    def body(self) -> dict[str, Any]:
        return self.json if isinstance(self.json, dict) else {}

    @property
    def stream(self) -> bool:
        return bool(self.body.get("stream"))

    @property
    def messages(self) -> list[dict[str, Any]]:
        return list(self.body.get("messages") or [])

    @property
    def tool_names(self) -> list[str]:
        """Names of the tools offered to the model (OpenAI's and Anthropic's shapes)."""
        names = []
        for tool in self.body.get("tools") or []:
            function = tool.get("function") if isinstance(tool.get("function"), dict) else tool
            names.append(function.get("name"))
        return names

    @property
    def retry_count(self) -> int:
        """The SDKs (Stainless-generated) number their retries in this header."""
        return int(self.headers.get("x-stainless-retry-count", "0"))


class Exchange:
    """One request and the means to answer it, handed to `Reply.send`."""

    def __init__(self, handler: _Handler, request: RecordedRequest, number: int) -> None:
        self._handler = handler
        self.request = request
        self.number = number  # 1-based, over the server's life
        self._chunked = False

    @property
    def server(self) -> FakeLLMServer:
        return self._handler.server.fake  # type: ignore[attr-defined,no-any-return]

    def send_bytes(
        self,
        status: int,
        body: bytes,
        *,
        content_type: str = "application/json",
        headers: dict[str, str] | None = None,
    ) -> None:
        handler = self._handler
        handler.send_response(status)
        handler.send_header("Content-Type", content_type)
        handler.send_header("Content-Length", str(len(body)))
        self._common_headers(headers)
        handler.end_headers()
        handler.wfile.write(body)

    def send_json(self, status: int, body: Any, *, headers: dict[str, str] | None = None) -> None:
        self.send_bytes(status, json.dumps(body).encode(), headers=headers)

    def start_stream(self, *, headers: dict[str, str] | None = None) -> None:
        """Start a `text/event-stream` body in chunked transfer encoding, as the real APIs
        send it: a body cut short (`abort`) is then detectable by the client."""
        handler = self._handler
        handler.send_response(200)
        handler.send_header("Content-Type", "text/event-stream; charset=utf-8")
        handler.send_header("Cache-Control", "no-cache")
        handler.send_header("Transfer-Encoding", "chunked")
        self._common_headers(headers)
        handler.end_headers()
        self._chunked = True

    def event(self, data: Any, *, event: str | None = None) -> None:
        """One server-sent event; `data` is JSON-encoded unless it is already a string."""
        text = data if isinstance(data, str) else json.dumps(data)
        frame = f"event: {event}\n" if event else ""
        self.write(f"{frame}data: {text}\n\n".encode())

    def write(self, data: bytes) -> None:
        assert self._chunked, "start_stream() first"
        self._handler.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self._handler.wfile.flush()

    def keep_alive(self, interval: float = 0.05) -> None:
        """Send SSE comments (no content) until the client leaves or the server stops, as
        providers do while a model thinks."""
        while not self.wait(interval):
            self.write(b": keep-alive\n\n")

    def end_stream(self) -> None:
        self._handler.wfile.write(b"0\r\n\r\n")
        self._handler.wfile.flush()

    def abort(self) -> None:
        """Drop the connection without finishing the body (a crash or a network cut)."""
        self._handler.close_connection = True
        self._handler.connection.shutdown(2)

    def wait(self, seconds: float) -> bool:
        """Sleep, but wake up when the server stops; True if it stopped meanwhile."""
        return self.server._stopping.wait(seconds)

    def _common_headers(self, headers: dict[str, str] | None) -> None:
        handler = self._handler
        handler.send_header("Connection", "close")
        handler.send_header("x-request-id", f"req_fake_{self.number}")
        for name, value in (headers or {}).items():
            handler.send_header(name, value)


@dataclass
class RawReply:
    """Exactly these bytes, e.g. a malformed body."""

    body: bytes
    status: int = 200
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)

    def send(self, exchange: Exchange) -> None:
        exchange.send_bytes(
            self.status, self.body, content_type=self.content_type, headers=self.headers
        )


@dataclass
class SlowReply:
    """Say nothing for `delay` seconds (longer than the client's timeout), then send `then`
    (if the client is still there) or hang up."""

    delay: float = FOREVER
    then: Reply | None = None

    def send(self, exchange: Exchange) -> None:
        if exchange.wait(self.delay) or self.then is None:
            return
        self.then.send(exchange)


@dataclass
class Answer:
    """What the protocols' answers share: text streamed token by token, and the ways the
    stream can go wrong after some tokens."""

    text: str | list[str] = ""  # a list gives the exact tokens to stream
    token_delay: float = 0.0  # seconds between events
    stall_after: int | None = None  # after this many tokens, hang (a read timeout)
    drop_after: int | None = None  # after this many tokens, cut the connection
    # after this many tokens, only keep-alive comments: bytes flow but no content does
    keepalive_after: int | None = None
    # after this many pieces (text tokens, then tool-argument pieces), the body ends
    # cleanly but early: no finish reason, no usage, no end marker (a server or proxy
    # that gave up). 0: only the stream's opening event; past the last piece: all the
    # content, none of the end.
    cut_after: int | None = None
    # False: no usage at all, even when the request asks for it (some compatible servers)
    usage_reported: bool = True

    @property
    def tokens(self) -> list[str]:
        return list(self.text) if isinstance(self.text, list) else split_tokens(self.text)

    def stream_tokens(self, exchange: Exchange, send: Callable[[str], None]) -> bool:
        """Send each token with `send`; False if a stall, drop, keep-alive or cut came in
        (the stream is then over)."""
        for sent, token in enumerate(self.tokens):
            if sent == self.stall_after:
                exchange.wait(FOREVER)
                return False
            if sent == self.drop_after:
                exchange.abort()
                return False
            if sent == self.keepalive_after:
                exchange.keep_alive()
                return False
            if not self.stream_piece(exchange, sent, lambda token=token: send(token)):
                return False
        return True

    def stream_piece(self, exchange: Exchange, number: int, send: Callable[[], None]) -> bool:
        """Send piece `number` (0-based over text and tool arguments) unless the stream is
        cut there; False (the body ended) if it is."""
        if number == self.cut_after:
            exchange.end_stream()
            return False
        send()
        return True

    def cut_at_end(self, exchange: Exchange, pieces: int) -> bool:
        """End the body after all `pieces` if `cut_after` says so; True if it did."""
        if self.cut_after is not None and self.cut_after >= pieces:
            exchange.end_stream()
            return True
        return False


@dataclass
class APIError:
    """An HTTP error with the API's error body (`body()`, defined by each protocol)."""

    status: int
    message: str | None = None
    type: str | None = None
    # For 429 and 5xx: the delay the SDK should wait before retrying (sent as
    # `retry-after-ms` and `retry-after`); None sends neither, and the SDK backs off ~0.5 s.
    retry_after: float | None = 0.01
    headers: dict[str, str] = field(default_factory=dict)

    def body(self) -> dict[str, Any]:
        raise NotImplementedError

    def send(self, exchange: Exchange) -> None:
        headers = dict(self.headers)
        if self.retry_after is not None and (self.status == 429 or self.status >= 500):
            headers.setdefault("retry-after-ms", str(max(1, round(self.retry_after * 1000))))
            headers.setdefault("retry-after", f"{self.retry_after:g}")
        exchange.send_json(self.status, self.body(), headers=headers)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:
        self._handle()

    def do_GET(self) -> None:
        self._handle()

    def _handle(self) -> None:
        self.close_connection = True
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        try:
            decoded = json.loads(raw) if raw else None
        except ValueError:
            decoded = None
        request = RecordedRequest(
            method=self.command,
            path=self.path,
            headers={name.lower(): value for name, value in self.headers.items()},
            raw_body=raw,
            json=decoded,
        )
        fake: FakeLLMServer = self.server.fake  # type: ignore[attr-defined]
        number, reply = fake._take(request)
        # OSError: the client gave up (its timeout) and hung up; nothing left to answer.
        with contextlib.suppress(OSError):
            reply.send(Exchange(self, request, number))

    def log_message(self, format: str, *args: Any) -> None:
        pass  # requests are recorded in `FakeLLMServer.requests`, not printed


class _NotScripted:
    """The answer to a request the test did not script: an error the SDK will not retry,
    and a note in `unscripted` so the test fails loudly."""

    def __init__(self, message: str, status: int = 500) -> None:
        self.message = message
        self.status = status

    def send(self, exchange: Exchange) -> None:
        exchange.send_json(
            self.status,
            {"error": {"type": "fake_server_error", "message": self.message}},
            headers={"x-should-retry": "false"},
        )


class FakeLLMServer:
    """Base class of the fake servers; see the protocol modules for the scripting API."""

    #: Paths (their endings) this API answers; anything else is a 404 and unscripted.
    endpoints: tuple[str, ...] = ()
    #: The protocol's replies, which the scripting methods below enqueue.
    answer: ClassVar[Callable[..., Reply]]  # an `Answer`
    api_error: ClassVar[Callable[..., Reply]]  # an `APIError`
    in_stream_error: ClassVar[Callable[..., Reply]]
    #: The body of `malformed()`.
    malformed_body: ClassVar[bytes]

    def __init__(self) -> None:
        self.requests: list[RecordedRequest] = []
        self.unscripted: list[RecordedRequest] = []
        self._script: deque[Reply] = deque()
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._httpd: ThreadingHTTPServer | None = None
        self._port: int | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> Self:
        httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        httpd.daemon_threads = True
        httpd.fake = self  # type: ignore[attr-defined]
        self._httpd = httpd
        self._port = int(httpd.server_address[1])
        self._thread = threading.Thread(
            target=httpd.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"{type(self).__name__}:{self.port}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving; replies still in flight hang up. Stopping twice is harmless."""
        self._stopping.set()  # releases slow and stalled replies
        httpd, self._httpd = self._httpd, None
        if httpd is not None:
            httpd.shutdown()
            httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        assert self._port is not None, "start() the server first"
        return self._port

    @property
    def url(self) -> str:
        """The server's root, without any API prefix."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        """What the SDK's base_url should be: the root, unless the API has a prefix the SDK
        does not add itself."""
        return self.url

    # -- scripting -------------------------------------------------------------------------

    def enqueue(self, reply: Reply, *, times: int = 1) -> Self:
        """Answer the next `times` requests with `reply` (after what is already queued)."""
        with self._lock:
            self._script.extend([reply] * times)
        return self

    def text(self, text: str | list[str] = "", *, times: int = 1, **options: Any) -> Self:
        """A streamed answer; see the protocol's `answer` for the options (usage, stalls...)."""
        return self.enqueue(self.answer(text=text, **options), times=times)

    def error(
        self, status: int, message: str | None = None, *, times: int = 1, **options: Any
    ) -> Self:
        """HTTP `status` with the API's error body; see the protocol's `api_error`."""
        return self.enqueue(self.api_error(status, message, **options), times=times)

    def stream_error(self, message: str | None = None, **options: Any) -> Self:
        """A 200 stream that begins an answer, then reports an error in-band."""
        if message is not None:
            options["message"] = message
        return self.enqueue(self.in_stream_error(**options))

    def malformed(self, *, times: int = 1) -> Self:
        """A 200 stream whose first event is not JSON (a broken proxy, a wrong server)."""
        return self.enqueue(
            RawReply(self.malformed_body, content_type="text/event-stream"), times=times
        )

    def slow(self, delay: float = FOREVER, *, times: int = 1) -> Self:
        """Say nothing for `delay` seconds: longer than the client's timeout."""
        return self.enqueue(SlowReply(delay), times=times)

    @property
    def pending(self) -> int:
        """Scripted replies not used yet."""
        with self._lock:
            return len(self._script)

    def assert_script_used(self) -> None:
        """Every scripted reply was used and no request came unscripted."""
        assert not self.unscripted, (
            f"{len(self.unscripted)} unscripted request(s) to {type(self).__name__}: "
            f"{[r.path for r in self.unscripted]}"
        )
        assert self.pending == 0, f"{self.pending} scripted reply(ies) never requested"

    # -- inspection ------------------------------------------------------------------------

    @property
    def last_request(self) -> RecordedRequest:
        assert self.requests, "the server received no request"
        return self.requests[-1]

    # -- internals -------------------------------------------------------------------------

    def _take(self, request: RecordedRequest) -> tuple[int, Reply]:
        with self._lock:
            self.requests.append(request)
            number = len(self.requests)
            path = request.path.split("?", 1)[0].rstrip("/")
            if request.method != "POST" or not path.endswith(self.endpoints):
                self.unscripted.append(request)
                return number, _NotScripted(f"fake server: no such endpoint {path}", 404)
            if not self._script:
                self.unscripted.append(request)
                return number, _NotScripted(f"fake server: no reply scripted for request {number}")
            return number, self._script.popleft()


def split_tokens(text: str) -> list[str]:
    """Split text roughly the way a BPE tokenizer streams it: words and punctuation with
    their leading whitespace ("Hello", ",", " world", "!"); joined, they give the text back."""
    return _TOKEN.findall(text)


def split_json(arguments: str, size: int = 6) -> list[str]:
    """Split a tool call's JSON arguments into pieces, the way they stream."""
    return [arguments[i : i + size] for i in range(0, len(arguments), size)] or [""]
