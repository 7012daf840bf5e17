import asyncio
import uuid

import pytest
from channels.db import database_sync_to_async
from channels.layers import get_channel_layer

from agentsite.asgi import application
from billing.services import account_quotas_for_user
from chat import services
from chat.agent import runner
from chat.agent.history import TOOL_SKIPPED_MESSAGE
from chat.events import RunEventStream, conversation_group, event_log, frames_of
from chat.lifecycle import LeaseKeeper
from chat.models import Message, Run
from conftest import open_socket, receive_until, session_cookie, wait_for_runs

pytestmark = pytest.mark.django_db(transaction=True)


async def start(user, make_conversation=True):
    conversation = await database_sync_to_async(services.conversation_create)(owner=user)
    socket = await open_socket(f"/ws/chat/{conversation.id}/", user)
    session = await socket.receive_json_from()
    assert session == {"type": "session", "conversation": str(conversation.id), "active_run": None}
    return conversation, socket


async def test_message_streams_tool_steps_and_answer_in_seq_order(make_user):
    user = await database_sync_to_async(make_user)()
    conversation, socket = await start(user)

    await socket.send_json_to({"type": "message", "content": "What is 17 * 23?"})
    frames = await receive_until(socket, "run.completed")

    types = [f["type"] for f in frames]
    assert types[0] == "run.started"
    assert types.index("tool.started") < types.index("tool.finished") < types.index("token")
    assert [f["seq"] for f in frames] == list(range(1, len(frames) + 1))
    started = frames[types.index("tool.started")]
    assert started["name"] == "calculator" and started["args"] == {"expression": "17 * 23"}
    assert frames[types.index("tool.finished")]["result"] == "391"
    answer = "".join(f["text"] for f in frames if f["type"] == "token")
    assert "391" in answer
    completed = frames[-1]
    assert completed["usage"]["total_tokens"] > 0
    assert "<strong>391</strong>" in completed["messages"][0]["html"]
    await socket.disconnect()

    run = await Run.objects.aget(conversation=conversation)
    assert (
        run.status == Run.Status.COMPLETED
        and run.total_tokens == completed["usage"]["total_tokens"]
    )
    roles = [m.role async for m in Message.objects.filter(conversation=conversation)]
    assert roles == ["user", "tool", "assistant"]


async def test_refuses_a_visitor_who_is_not_logged_in(make_user):
    user = await database_sync_to_async(make_user)()
    conversation = await database_sync_to_async(services.conversation_create)(owner=user)
    socket = await open_socket(f"/ws/chat/{conversation.id}/")
    assert await socket.receive_output() == {"type": "websocket.close", "code": 4401}


async def test_refuses_another_users_conversation_as_if_it_did_not_exist(make_user):
    alice = await database_sync_to_async(make_user)("alice")
    mallory = await database_sync_to_async(make_user)("mallory")
    conversation = await database_sync_to_async(services.conversation_create)(owner=alice)
    socket = await open_socket(f"/ws/chat/{conversation.id}/", mallory)
    # 4404, as for a missing id: a stranger must not learn that the id exists.
    assert await socket.receive_output() == {"type": "websocket.close", "code": 4404}


@pytest.mark.parametrize("path", ["00000000-0000-0000-0000-000000000000", "not-a-uuid"])
async def test_refuses_a_conversation_that_does_not_exist(make_user, path):
    user = await database_sync_to_async(make_user)()
    socket = await open_socket(f"/ws/chat/{path}/", user)
    assert await socket.receive_output() == {"type": "websocket.close", "code": 4404}


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        ("{not json", "invalid_json"),
        ("[1, 2]", "invalid_frame"),
        ('{"content": "no type"}', "invalid_frame"),
        ('{"type": "dance"}', "unknown_type"),
        ('{"type": "message", "content": "   "}', "empty_message"),
        ('{"type": "message"}', "invalid_message"),
        ('{"type": "message", "content": 42}', "invalid_message"),
        ('{"type": "message", "content": "' + "x" * 8001 + '"}', "message_too_long"),
        ('{"type": "message", "content": "' + "x" * 60000 + '"}', "frame_too_large"),
        ('{"type": "resume", "run": "nope", "after_seq": 0}', "invalid_frame"),
        (
            '{"type": "resume", "run": "00000000-0000-0000-0000-000000000000", "after_seq": -1}',
            "invalid_frame",
        ),
        (
            '{"type": "resume", "run": "00000000-0000-0000-0000-000000000000", "after_seq": 0}',
            "run_not_found",
        ),
        ('{"type": "cancel"}', "no_active_run"),
    ],
)
async def test_bad_frames_get_an_error_and_the_socket_stays_usable(make_user, frame, code):
    user = await database_sync_to_async(make_user)()
    _, socket = await start(user)

    await socket.send_to(text_data=frame)
    error = await socket.receive_json_from()
    assert error["type"] == "error" and error["code"] == code and error["message"]

    await socket.send_json_to({"type": "message", "content": "still there?"})
    frames = await receive_until(socket, "run.completed")
    assert "still there?" in "".join(f.get("text", "") for f in frames)
    await socket.disconnect()


async def test_binary_frames_are_refused(make_user):
    user = await database_sync_to_async(make_user)()
    _, socket = await start(user)
    await socket.send_to(bytes_data=b"\x00\x01")
    assert (await socket.receive_json_from())["code"] == "invalid_frame"
    await socket.disconnect()


async def test_cancel_stops_the_run_and_keeps_what_was_said(make_user, settings):
    settings.AGENT_OFFLINE_TOKEN_DELAY = 0.05
    user = await database_sync_to_async(make_user)()
    conversation, socket = await start(user)

    await socket.send_json_to({"type": "message", "content": "Tell me something long"})
    await receive_until(socket, "token")
    await socket.send_json_to({"type": "cancel"})
    frames = await receive_until(socket, "run.cancelled")

    cancelled = frames[-1]
    assert cancelled["status"] == "cancelled"
    run = await Run.objects.aget(conversation=conversation)
    assert run.status == Run.Status.CANCELLED and run.finished_at is not None
    partial = await Message.objects.filter(run=run, role="assistant").afirst()
    assert partial is not None and 0 < len(partial.content) < 400
    # What streamed before the stop is counted, not lost.
    assert run.output_tokens > 0 and cancelled["usage"]["output_tokens"] == run.output_tokens
    # The conversation goes on after a cancel.
    await socket.send_json_to({"type": "message", "content": "What is 2 + 2?"})
    frames = await receive_until(socket, "run.completed")
    assert "4" in "".join(f.get("text", "") for f in frames)
    await socket.disconnect()


async def test_one_run_at_a_time_per_conversation(make_user, settings):
    settings.AGENT_OFFLINE_TOKEN_DELAY = 0.02
    user = await database_sync_to_async(make_user)()
    _, socket = await start(user)

    await socket.send_json_to({"type": "message", "content": "first"})
    await receive_until(socket, "run.started")
    await socket.send_json_to({"type": "message", "content": "second"})
    frames = await receive_until(socket, "error")
    assert frames[-1]["code"] == "run_active"
    await receive_until(socket, "run.completed")
    await socket.disconnect()


async def test_a_run_outlives_its_socket_and_a_new_socket_catches_up(make_user, settings):
    settings.AGENT_OFFLINE_TOKEN_DELAY = 0.01
    user = await database_sync_to_async(make_user)()
    conversation, socket = await start(user)
    await socket.send_json_to({"type": "message", "content": "remember me"})
    first = await receive_until(socket, "token")
    await socket.disconnect()  # the tab closes mid-answer

    again = await open_socket(f"/ws/chat/{conversation.id}/", user)
    session = await again.receive_json_from()
    run_id = first[0]["run"]
    assert session["active_run"] == run_id
    await again.send_json_to({"type": "resume", "run": run_id, "after_seq": first[-1]["seq"]})
    frames = await receive_until(again, "run.completed")

    # The replay continues exactly after the last event the first tab saw, without gaps.
    assert frames[0]["seq"] == first[-1]["seq"] + 1
    assert [f["seq"] for f in frames] == list(range(frames[0]["seq"], frames[-1]["seq"] + 1))
    await again.disconnect()
    answer = await Message.objects.filter(conversation=conversation, role="assistant").afirst()
    assert "remember me" in answer.content


async def test_a_run_whose_first_event_was_lost_in_transit_is_replayed_from_the_log(
    make_user,
):
    user = await database_sync_to_async(make_user)()
    conversation, socket = await start(user)
    run_id = uuid.uuid4()
    stream = RunEventStream(run_id, conversation.id)
    # Its first two events reach the log but not this socket (a dropped delivery)...
    lost = [
        {"type": "run.started", "run": str(run_id), "seq": 1},
        {"type": "token", "run": str(run_id), "seq": 2, "text": "Hi"},
    ]
    await event_log().append(run_id, frames_of(lost))
    stream.seq = 2

    # ...so the next live one brings them along, in order.
    await stream.emit("token", text=" there")

    frames = [await socket.receive_json_from() for _ in range(3)]
    assert [(f["seq"], f["type"]) for f in frames] == [
        (1, "run.started"),
        (2, "token"),
        (3, "token"),
    ]
    await socket.disconnect()


async def test_a_run_under_way_at_connect_waits_for_resume(make_user, settings):
    settings.AGENT_OFFLINE_TOKEN_DELAY = 0.02
    user = await database_sync_to_async(make_user)()
    conversation, first = await start(user)
    await first.send_json_to({"type": "message", "content": "Tell me about yourself"})
    await receive_until(first, "token")

    late = await open_socket(f"/ws/chat/{conversation.id}/", user)
    session = await late.receive_json_from()
    # Live events of that run are held back: the client decides where to resume from.
    assert await late.receive_nothing(timeout=0.2)
    await late.send_json_to({"type": "resume", "run": session["active_run"], "after_seq": 0})
    frames = await receive_until(late, "run.completed")
    assert [f["seq"] for f in frames] == list(range(1, len(frames) + 1))
    for socket in (first, late):
        await socket.disconnect()
    await wait_for_runs()


async def test_a_finished_run_can_be_replayed_from_the_start(make_user):
    user = await database_sync_to_async(make_user)()
    conversation, socket = await start(user)
    await socket.send_json_to({"type": "message", "content": "What is 6 * 7?"})
    live = await receive_until(socket, "run.completed")

    # Already delivered on this socket, so nothing is sent twice...
    await socket.send_json_to({"type": "resume", "run": live[0]["run"], "after_seq": 0})
    assert await socket.receive_nothing(timeout=0.2)
    await socket.disconnect()

    # ...but a new socket gets the whole run again, in order.
    later = await open_socket(f"/ws/chat/{conversation.id}/", user)
    assert (await later.receive_json_from())["active_run"] is None
    await later.send_json_to({"type": "resume", "run": live[0]["run"], "after_seq": 0})
    assert await receive_until(later, "run.completed") == live
    await later.disconnect()


async def test_two_tabs_of_one_conversation_see_the_same_events(make_user):
    user = await database_sync_to_async(make_user)()
    conversation, first = await start(user)
    second = await open_socket(f"/ws/chat/{conversation.id}/", user)
    await second.receive_json_from()

    await first.send_json_to({"type": "message", "content": "What is 3 * 3?"})
    seen_first = await receive_until(first, "run.completed")
    seen_second = await receive_until(second, "run.completed")

    assert seen_first == seen_second
    assert seen_second[0]["user_message"]["content"] == "What is 3 * 3?"
    await first.disconnect()
    await second.disconnect()


async def test_a_user_cannot_resume_or_cancel_another_users_run(make_user):
    alice = await database_sync_to_async(make_user)("alice")
    mallory = await database_sync_to_async(make_user)("mallory")
    _, alice_socket = await start(alice)
    await alice_socket.send_json_to({"type": "message", "content": "secret plans"})
    frames = await receive_until(alice_socket, "run.completed")
    run_id = frames[0]["run"]

    _, mallory_socket = await start(mallory)
    await mallory_socket.send_json_to({"type": "resume", "run": run_id, "after_seq": 0})
    assert (await mallory_socket.receive_json_from())["code"] == "run_not_found"
    await mallory_socket.send_json_to({"type": "cancel", "run": run_id})
    assert (await mallory_socket.receive_json_from())["code"] == "no_active_run"
    await alice_socket.disconnect()
    await mallory_socket.disconnect()
    await wait_for_runs()


async def test_the_step_limit_ends_the_run_with_an_explanation(make_user, settings):
    settings.AGENT_MAX_STEPS = 1
    user = await database_sync_to_async(make_user)()
    conversation, socket = await start(user)

    await socket.send_json_to({"type": "message", "content": "What is 2 + 2?"})
    frames = await receive_until(socket, "run.limit_reached")

    # The call was not run: its step ends with the error that says so, not "running…".
    [finished] = [f for f in frames if f["type"] == "tool.finished"]
    assert finished["is_error"] is True and finished["result"] == TOOL_SKIPPED_MESSAGE
    assert frames[-1]["error"]["code"] == "max_steps"
    assert "AGENT_MAX_STEPS" in frames[-1]["messages"][0]["content"]
    run = await Run.objects.aget(conversation=conversation)
    assert run.status == Run.Status.LIMIT_REACHED and run.steps == 1
    # The interrupted tool call does not poison the next turn.
    settings.AGENT_MAX_STEPS = 4
    await socket.send_json_to({"type": "message", "content": "What is 3 + 3?"})
    frames = await receive_until(socket, "run.completed")
    assert "6" in "".join(f.get("text", "") for f in frames)
    await socket.disconnect()


async def test_the_wall_clock_limit_stops_a_slow_run(make_user, settings):
    settings.AGENT_OFFLINE_TOKEN_DELAY = 0.05
    settings.AGENT_RUN_TIMEOUT = 0.3
    user = await database_sync_to_async(make_user)()
    conversation, socket = await start(user)

    await socket.send_json_to({"type": "message", "content": "a long reply please"})
    frames = await receive_until(socket, "run.limit_reached")

    assert frames[-1]["error"]["code"] == "run_timeout"
    run = await Run.objects.aget(conversation=conversation)
    assert run.status == Run.Status.LIMIT_REACHED
    partial = await Message.objects.filter(run=run, role="assistant").afirst()
    assert partial is not None and partial.content  # what streamed before the stop is kept
    await socket.disconnect()


class Hops:
    """Thread hops (sync_to_async calls, by function name) and SQL statements made while
    it counts, on any thread."""

    def __init__(self, monkeypatch) -> None:
        from asgiref.sync import SyncToAsync
        from django.db.backends.utils import CursorWrapper

        self.hops: list[str] = []
        self.queries: list[str] = []
        hop, execute = SyncToAsync.__call__, CursorWrapper._execute  # type: ignore[attr-defined]

        async def counted_hop(wrapper, *args, **kwargs):
            self.hops.append(getattr(wrapper.func, "__name__", type(wrapper.func).__name__))
            return await hop(wrapper, *args, **kwargs)

        def counted_execute(cursor, sql, *args):
            self.queries.append(sql)
            return execute(cursor, sql, *args)

        monkeypatch.setattr(SyncToAsync, "__call__", counted_hop)
        monkeypatch.setattr(CursorWrapper, "_execute", counted_execute)

        async def no_tick(keeper) -> None:  # the keeper's heartbeat is not the socket's
            return None

        monkeypatch.setattr(LeaseKeeper, "tick", no_tick)

    def reset(self) -> None:
        self.hops.clear()
        self.queries.clear()


async def test_a_socket_following_a_turn_asks_the_database_nothing(make_user, monkeypatch):
    # Its follow reads the log; the database is asked whether the run is over only when
    # the log stays silent (FOLLOW_CHECK_INTERVAL), not once per follower and run.
    user = await database_sync_to_async(make_user)()
    _, socket = await start(user)
    counted = Hops(monkeypatch)

    await socket.send_json_to({"type": "message", "content": "What is 17 * 23?"})
    await receive_until(socket, "run.completed")
    await asyncio.wait_for(wait_for_runs(), timeout=30)

    assert "run_end_owed" not in counted.hops, counted.hops
    await socket.disconnect()


async def test_connect_is_two_thread_hops_and_three_queries(make_user, monkeypatch):
    user = await database_sync_to_async(make_user)()
    conversation = await database_sync_to_async(services.conversation_create)(owner=user)
    cookie = await database_sync_to_async(session_cookie)(user)
    counted = Hops(monkeypatch)

    socket = await open_socket_with_cookie(f"/ws/chat/{conversation.id}/", cookie)
    assert (await socket.receive_json_from())["type"] == "session"

    # The user (Channels' auth, the session from the cache), then the conversation and
    # its run under way (one hop); no query for the session, none for lapsed runs.
    assert counted.hops == ["get_user", "conversation_join"], counted.hops
    assert len(counted.queries) == 3, counted.queries
    await socket.disconnect()


async def test_a_message_is_admitted_and_its_run_started_in_one_hop(make_user, monkeypatch):
    counted = Hops(monkeypatch)
    user = await database_sync_to_async(make_user)()
    _, socket = await start(user)
    # As for every message but a user's first: the account exists, its quotas cached.
    await database_sync_to_async(account_quotas_for_user)(user_id=user.pk)
    counted.reset()
    before_graph: list[tuple[list[str], int]] = []
    graph_reached = asyncio.Event()

    async def graph(*args) -> None:  # what it took to get there; the graph is not the point
        before_graph.append((list(counted.hops), len(counted.queries)))
        graph_reached.set()

    monkeypatch.setattr(runner, "_drive_graph", graph)

    await socket.send_json_to({"type": "message", "content": "What is 17 * 23?"})
    await asyncio.wait_for(graph_reached.wait(), 10)

    # The rate limit, the account's quotas (cached), the admission, the run created
    # started and its message: one hop; BEGIN, the conversation, one count of the runs
    # under way, stale holds, the run and the message (the account's lock instead of
    # BEGIN on PostgreSQL). Starting it reads nothing again.
    [(hops, queries)] = before_graph
    assert hops == ["run_create"], hops
    assert queries <= 6, counted.queries[:queries]
    await receive_until(socket, "run.completed")
    await socket.disconnect()


async def test_run_events_reach_the_socket_without_a_thread_hop_each(make_user, monkeypatch):
    counted = Hops(monkeypatch)
    user = await database_sync_to_async(make_user)()
    _, socket = await start(user)

    await socket.send_json_to({"type": "message", "content": "What is 17 * 23?"})
    frames = await receive_until(socket, "run.completed")
    await wait_for_runs()

    # Channels' dispatch would close stale connections in a hop before each handler.
    assert len(frames) > 5
    assert not [hop for hop in counted.hops if hop in ("close_old_connections", "no_op")]
    await socket.disconnect()


async def open_socket_with_cookie(path, cookie):
    from channels.testing import WebsocketCommunicator

    headers = [(b"origin", b"http://localhost"), (b"host", b"localhost")]
    headers.append((b"cookie", f"sessionid={cookie}".encode()))
    communicator = WebsocketCommunicator(application, path, headers=headers)
    connected, _ = await communicator.connect()
    assert connected
    return communicator


async def test_a_late_announcement_of_a_finished_run_sends_nothing_again(make_user):
    """A batch announced after the socket read the run's final event (announcements and
    the log race) must not start its follow again: the client would get the run twice."""
    user = await database_sync_to_async(make_user)()
    conversation, socket = await start(user)
    await socket.send_json_to({"type": "message", "content": "What is 17 * 23?"})
    frames = await receive_until(socket, "run.completed")

    layer = get_channel_layer()
    await layer.group_send(
        conversation_group(conversation.id),
        {"type": "run.events", "run": frames[-1]["run"], "seqs": [frames[-1]["seq"]]},
    )

    assert await socket.receive_nothing(timeout=0.5)
    await socket.disconnect()
