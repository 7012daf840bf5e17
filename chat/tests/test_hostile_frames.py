"""Hostile WebSocket frames: the frame parser and a live consumer, driven by generated
frames (deep nesting, unicode edge cases, wrong types, huge numbers). Every frame gets
documented replies, the socket stays open, and nothing is logged as a traceback."""

import asyncio
import json
import re
import uuid
from pathlib import Path
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from channels.db import database_sync_to_async
from channels.testing import WebsocketCommunicator
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from prometheus_client import REGISTRY

from agentsite.asgi import application
from agentsite.errors import ApplicationError
from chat import events, services
from chat.events import RedisEventLog, frames_of
from chat.frames import MAX_SEQ, ClientFrame, parse_client_frame
from conftest import open_socket, receive_until, session_cookie, wait_for_runs
from tests.servers import REDIS_URL, redis_available

ROOT = Path(__file__).resolve().parents[2]
# A fixed id: test ids must be the same in every process that collects them.
ANY_RUN = "5328c87b-4252-4157-88c0-95266edd04ad"


def documented_codes() -> set[str]:
    """The `code`s the README's WebSocket protocol section names: an error code the
    socket sends must be one of them."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("### WebSocket protocol", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"`([a-z_]+)`", section))


DOCUMENTED_CODES = documented_codes()
RUN_EVENT_TYPES = {"token", "step", "tool.started", "tool.finished", "usage"}


def assert_documented(frame: dict[str, Any]) -> None:
    kind = frame.get("type")
    if kind == "error":
        assert frame["code"] in DOCUMENTED_CODES, frame
        assert isinstance(frame["message"], str) and frame["message"], frame
    elif kind != "session":
        assert kind in RUN_EVENT_TYPES or str(kind).startswith("run."), frame
        assert isinstance(frame["seq"], int) and frame["run"], frame


# --- What a hostile client sends -------------------------------------------------------

# Every code point, surrogates included (JSON can carry a lone one, escaped), with the
# troublemakers drawn often.
characters = st.characters(exclude_categories=()) | st.sampled_from(
    ["\x00", "\ud800", "\udfff", "\ud83d", "\ufeff", "\u2028", "\U0001f600", "\\", '"']
)
texts = st.text(characters, max_size=30)
huge_numbers = st.integers(min_value=-(2**70), max_value=2**70) | st.sampled_from(
    [2**63 - 1, 2**63, 2**64, 2**64 + 1, -(2**63) - 1, 10**300]
)
scalars = (
    st.none()
    | st.booleans()
    | huge_numbers
    | st.floats()  # json.dumps writes NaN and Infinity, which JSON has not
    | texts
)
values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(texts, children, max_size=3),
    max_leaves=6,
)
frame_objects = st.fixed_dictionaries(
    {"type": st.sampled_from(["message", "cancel", "resume"]) | texts | values},
    optional={
        "content": texts | values,
        "run": st.uuids().map(str) | texts | values,
        "after_seq": huge_numbers | values,
    },
)


@st.composite
def deeply_nested(draw: st.DrawFn) -> str:
    depth = draw(st.integers(min_value=1, max_value=5000))
    opener, closer = draw(st.sampled_from([("[", "]"), ('{"a":', "}")]))
    inner = draw(st.sampled_from(["", "1", '"x"']))
    closed = draw(st.booleans())
    nested = opener * depth + inner + (closer * depth if closed else "")
    # Also inside a frame that is otherwise fine.
    return draw(st.sampled_from([nested, f'{{"type": "message", "content": {nested}}}']))


raw_frames = st.one_of(
    frame_objects.map(json.dumps),  # surrogates and NUL sent escaped
    frame_objects.map(lambda frame: json.dumps(frame, ensure_ascii=False)),
    deeply_nested(),
    st.text(characters, max_size=200),
)

# --- The parser --------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(raw_frames)
def test_the_parser_returns_a_frame_or_a_documented_error(text: str) -> None:
    try:
        frame = parse_client_frame(text)
    except ApplicationError as error:
        assert error.code in DOCUMENTED_CODES and error.message
        return
    assert isinstance(frame, ClientFrame)
    assert frame.type in ("message", "cancel", "resume")
    if frame.type == "resume":
        assert frame.run is not None and 0 <= frame.after_seq <= MAX_SEQ


@pytest.mark.parametrize(
    ("text", "code"),
    [
        ("[" * 2000, "invalid_json"),
        ('{"type": "message", "content": ' + "[" * 99_999 + "]" * 99_999 + "}", "frame_too_large"),
        ('{"type": "message", "content": ' + "[" * 5000 + "]" * 5000 + "}", "invalid_json"),
        ('{"type": "message", "content": NaN}', "invalid_json"),
        ('{"type": "resume", "run": "x", "after_seq": Infinity}', "invalid_json"),
        ('{"type": "cancel", "run": ' + "[" * 500 + "]" * 500 + "}", "invalid_frame"),
        ('{"type": "cancel", "run": 12345}', "invalid_frame"),
        (
            json.dumps({"type": "resume", "run": ANY_RUN, "after_seq": 2**64}),
            "invalid_frame",
        ),
        (
            json.dumps({"type": "resume", "run": ANY_RUN, "after_seq": MAX_SEQ + 1}),
            "invalid_frame",
        ),
    ],
)
def test_hostile_frames_are_refused_with_a_code(text: str, code: str) -> None:
    with pytest.raises(ApplicationError) as refused:
        parse_client_frame(text)
    assert refused.value.code == code


def test_the_largest_seq_storage_takes_is_accepted() -> None:
    run = str(uuid.uuid4())
    frame = parse_client_frame(json.dumps({"type": "resume", "run": run, "after_seq": MAX_SEQ}))
    assert frame.after_seq == MAX_SEQ


@pytest.mark.skipif(
    not redis_available(), reason="Redis is NOT reachable on 127.0.0.1:6379: seq bound untested"
)
async def test_the_redis_event_log_takes_the_largest_seq() -> None:
    """MAX_SEQ is what storage accepts: a resume from it asks Redis for `0-2**63`."""
    log = RedisEventLog(REDIS_URL, ttl=60)
    run_id = uuid.uuid4()
    await log.append(run_id, frames_of([{"type": "token", "seq": 1}]))
    assert await log.after(run_id, MAX_SEQ) == []
    assert [f.event() for f in await log.after(run_id, 0)] == [{"type": "token", "seq": 1}]


# --- A live consumer ---------------------------------------------------------------------


@pytest.fixture
async def conversation_socket(make_user):
    """Opens sockets to one conversation of a logged-in user (the cookie made once)."""
    user = await database_sync_to_async(make_user)()
    conversation = await database_sync_to_async(services.conversation_create)(owner=user)
    cookie = await sync_to_async(session_cookie)(user)
    opened: list[WebsocketCommunicator] = []

    async def connect() -> WebsocketCommunicator:
        socket = WebsocketCommunicator(
            application,
            f"/ws/chat/{conversation.id}/",
            headers=[
                (b"origin", b"http://localhost"),
                (b"host", b"localhost"),
                (b"cookie", f"sessionid={cookie}".encode()),
            ],
        )
        connected, _ = await socket.connect()
        assert connected
        opened.append(socket)
        session = await socket.receive_json_from()
        assert session["type"] == "session"
        return socket

    yield connect
    await wait_for_runs()
    for socket in opened:
        await socket.disconnect()


async def exchange(socket: WebsocketCommunicator, texts: list[str]) -> list[dict[str, Any]]:
    """Send `texts`, then a probe whose answer names it: every reply up to that answer.
    The probe's answer proves the socket is open and still reads frames."""
    probe = f"probe-{uuid.uuid4().hex}"
    for text in texts:
        # send_to() refuses an empty text frame, which a client may send.
        await socket.send_input({"type": "websocket.receive", "text": text})
    await socket.send_json_to({"type": probe})
    replies = []
    while True:
        # receive_json_from fails on a close; a crashed consumer raises its exception.
        reply = await socket.receive_json_from(timeout=30)
        replies.append(reply)
        if reply.get("type") == "error" and probe in reply["message"]:
            assert reply["code"] == "unknown_type"
            return replies


@pytest.mark.django_db(transaction=True)
@settings(
    max_examples=100,
    deadline=None,
    # Shrinking replays a live socket per step and can take minutes; the parser test
    # above shrinks the same frames cheaply.
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(texts=st.lists(raw_frames, min_size=1, max_size=3))
async def test_a_live_socket_answers_every_frame_and_stays_open(
    conversation_socket, caplog, texts: list[str]
) -> None:
    caplog.clear()
    socket = await conversation_socket()
    for reply in await exchange(socket, texts):
        assert_documented(reply)
    await socket.disconnect()
    assert not [record for record in caplog.records if record.exc_info], caplog.text


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(
    ("text", "code"),
    [
        ("[" * 2000, "invalid_json"),
        ('{"type": "message", "content": "\\ud800"}', "invalid_message"),
        ('{"type": "message", "content": "\ud800 raw"}', "invalid_message"),
        ('{"type": "message", "content": "a\\u0000b"}', "invalid_message"),
        ('{"type": "message", "content": NaN}', "invalid_json"),
        ('{"type": "cancel", "run": ' + "[" * 500 + "]" * 500 + "}", "invalid_frame"),
    ],
)
async def test_each_finding_gets_an_error_frame(conversation_socket, caplog, text, code):
    socket = await conversation_socket()
    replies = await exchange(socket, [text])
    assert [reply["code"] for reply in replies[:-1]] == [code]
    # Still usable for a real message.
    await socket.send_json_to({"type": "message", "content": "still there?"})
    frames = await receive_until(socket, "run.completed")
    assert "still there?" in "".join(f.get("text", "") for f in frames)
    assert not [record for record in caplog.records if record.exc_info], caplog.text


@pytest.mark.django_db(transaction=True)
@pytest.mark.skipif(
    not redis_available(), reason="Redis is NOT reachable on 127.0.0.1:6379: Redis resume untested"
)
async def test_a_resume_past_what_redis_takes_is_refused(conversation_socket, monkeypatch):
    """On the Redis event log `after_seq` >= 2**64 used to end in a Redis error (1011)."""
    monkeypatch.setattr(events, "_log", RedisEventLog(REDIS_URL, ttl=60))
    socket = await conversation_socket()
    await socket.send_json_to({"type": "message", "content": "hello"})
    run = (await receive_until(socket, "run.completed"))[0]["run"]
    for after_seq in (2**64, 2**64 + 5, MAX_SEQ + 1):
        replies = await exchange(
            socket, [json.dumps({"type": "resume", "run": run, "after_seq": after_seq})]
        )
        assert [reply["code"] for reply in replies[:-1]] == ["invalid_frame"]
    replies = await exchange(
        socket, [json.dumps({"type": "resume", "run": run, "after_seq": MAX_SEQ})]
    )
    assert len(replies) == 1  # only the probe's answer: nothing after MAX_SEQ


# --- The open-sockets gauge ----------------------------------------------------------------


def open_sockets() -> float:
    return REGISTRY.get_sample_value("agentsite_open_websockets") or 0.0


@pytest.mark.django_db(transaction=True)
async def test_the_open_sockets_gauge_survives_a_crashed_consumer(make_user, monkeypatch):
    user = await database_sync_to_async(make_user)()
    conversation = await database_sync_to_async(services.conversation_create)(owner=user)
    before = open_sockets()

    def crash(text: str | None) -> ClientFrame:
        raise RuntimeError("a bug in the consumer")

    monkeypatch.setattr("chat.consumers.parse_client_frame", crash)
    socket = await open_socket(f"/ws/chat/{conversation.id}/", user)
    await socket.receive_json_from()
    assert open_sockets() == before + 1
    await socket.send_to(text_data="{}")
    with pytest.raises(RuntimeError, match="a bug in the consumer"):
        await asyncio.wait_for(socket.future, timeout=30)
    assert open_sockets() == before

    # And the sockets refused at connect, and the ones closed by the client.
    refused = await open_socket(f"/ws/chat/{uuid.uuid4()}/", user)
    assert (await refused.receive_output())["code"] == 4404
    await refused.disconnect()
    closed = await open_socket(f"/ws/chat/{conversation.id}/", user)
    await closed.receive_json_from()
    await closed.disconnect()
    assert open_sockets() == before
