"""The run event log that lets a client resume (in memory by default, Redis when scaled)
and the stream that numbers a run's events and sends them in batches."""

import asyncio
import uuid
from typing import Any

import pytest
import redis
from channels.layers import get_channel_layer
from channels_redis.core import RedisChannelLayer

from chat import events
from chat.events import (
    MemoryEventLog,
    RedisEventLog,
    RunEventStream,
    conversation_group,
    frames_of,
)
from tests.servers import REDIS_URL, redis_available

needs_redis = pytest.mark.skipif(
    not redis_available(),
    reason="Redis is NOT reachable on 127.0.0.1:6379: Redis event log untested",
)
LOGS = [
    pytest.param(lambda: MemoryEventLog(ttl=60), id="memory"),
    pytest.param(lambda: RedisEventLog(REDIS_URL, ttl=60), id="redis", marks=needs_redis),
]


def token(run_id: uuid.UUID, seq: int, text: str = "x") -> dict[str, Any]:
    return {"type": "token", "run": str(run_id), "seq": seq, "text": text}


@pytest.mark.parametrize("make_log", LOGS)
async def test_resume_returns_exactly_the_events_after_a_seq(make_log) -> None:
    log = make_log()
    run_id, other_run = uuid.uuid4(), uuid.uuid4()
    await log.append(run_id, frames_of([token(run_id, 1, "é")]))
    await log.append(run_id, frames_of([token(run_id, seq, "é") for seq in range(2, 6)]))
    await log.append(other_run, frames_of([token(other_run, 1)]))

    assert [f.seq for f in await log.after(run_id, 0)] == [1, 2, 3, 4, 5]
    assert [f.seq for f in await log.after(run_id, 3)] == [4, 5]
    assert await log.after(run_id, 5) == []
    assert (await log.after(run_id, 4))[0].event() == token(run_id, 5, "é")
    assert await log.after(uuid.uuid4(), 0) == []


async def test_memory_log_forgets_runs_after_the_ttl() -> None:
    log = MemoryEventLog(ttl=0)
    old, new = uuid.uuid4(), uuid.uuid4()
    await log.append(old, frames_of([token(old, 1)]))
    await log.append(new, frames_of([token(new, 1)]))  # a new run sweeps expired ones
    assert await log.after(old, 0) == []


@needs_redis
async def test_redis_log_expires_with_the_ttl() -> None:
    run_id = uuid.uuid4()
    await RedisEventLog(REDIS_URL, ttl=30).append(run_id, frames_of([token(run_id, 1)]))
    ttl = redis.Redis.from_url(REDIS_URL).ttl(f"agentsite:run-events:{run_id}")
    assert 0 < ttl <= 30


class Wire:
    """The event log and channel layer a stream publishes to, each call recorded, and a
    channel in the conversation's group that receives what the sockets would."""

    def __init__(self, conversation_id: uuid.UUID) -> None:
        self.group = conversation_group(conversation_id)
        self.layer: Any = get_channel_layer()
        self.sent: list[list[int]] = []  # the seqs of each channel-layer message
        self.logged: list[list[int]] = []  # the seqs of each log append
        self.channel = ""

    async def announced(self, count: int) -> list[list[int]]:
        """The seqs of the next `count` announcements the group's channel receives."""
        announced: list[list[int]] = []
        while len(announced) < count:
            message = await asyncio.wait_for(self.layer.receive(self.channel), timeout=10)
            assert message["type"] == "run.events"
            announced.append(message["seqs"])
        return announced


async def followed(run_id: uuid.UUID, last_seq: int) -> list[int]:
    """The seqs a follower of the run gets (from the log), up to `last_seq`."""
    seqs: list[int] = []

    async def read() -> None:
        async for frame in events.follow(run_id, 0):
            assert frame is not None
            seqs.append(frame.seq)
            if frame.seq >= last_seq:
                return

    await asyncio.wait_for(read(), timeout=10)
    return seqs


@pytest.fixture(params=["memory", pytest.param("redis", marks=needs_redis)])
async def wire(request, settings, monkeypatch):
    # These tests are of the transport: their events are abbreviated, not schema-true.
    settings.AGENT_CHECK_EVENTS = False
    if request.param == "redis":
        settings.CHANNEL_LAYERS = {
            "default": {
                "BACKEND": "channels_redis.core.RedisChannelLayer",
                "CONFIG": {"hosts": [REDIS_URL], "prefix": f"test-stream-{uuid.uuid4().hex}"},
            }
        }
        log: Any = RedisEventLog(REDIS_URL, ttl=60)
    else:
        log = MemoryEventLog(ttl=60)
    monkeypatch.setattr(events, "_log", log)
    conversation_id = uuid.uuid4()
    wire = Wire(conversation_id)
    group_send, append = wire.layer.group_send, log.append

    async def group_send_recorded(group: str, message: dict[str, Any]) -> None:
        wire.sent.append(message["seqs"])
        await group_send(group, message)

    async def append_recorded(run_id: uuid.UUID, frames: list[events.Frame]) -> None:
        wire.logged.append([frame.seq for frame in frames])
        await append(run_id, frames)

    monkeypatch.setattr(wire.layer, "group_send", group_send_recorded)
    monkeypatch.setattr(log, "append", append_recorded)
    wire.channel = await wire.layer.new_channel()
    await wire.layer.group_add(wire.group, wire.channel)
    yield wire, RunEventStream(uuid.uuid4(), conversation_id)
    await wire.layer.group_discard(wire.group, wire.channel)
    if request.param == "redis":
        await wire.layer.close_pools()


def final_of(stream: RunEventStream) -> dict[str, Any]:
    return {"type": "run.completed", "run": str(stream.run_id), "seq": stream.seq + 1}


async def test_a_fast_run_sends_its_tokens_in_batches_each_once_and_in_order(
    wire, monkeypatch
) -> None:
    wire, stream = wire
    # A window longer than the test: only a full batch or another event sends tokens.
    monkeypatch.setattr(RunEventStream, "window", 60)
    await stream.emit("run.started")
    for _ in range(100):
        await stream.emit("token", text="x")
    await stream.publish(final_of(stream))

    # 5 log round trips for 102 events, not 102; the final event goes at once with the
    # tokens before it, not after the window.
    batches = [[1], list(range(2, 34)), list(range(34, 66)), list(range(66, 98))]
    batches.append(list(range(98, 103)))
    assert wire.logged == batches
    assert await followed(stream.run_id, 102) == list(range(1, 103))
    # The conversation's sockets hear of the run twice within its first second: its
    # first batch, and its final event (for a socket that joined in between).
    assert wire.sent == [[1], list(range(98, 103))]
    assert await wire.announced(2) == wire.sent


async def test_a_long_run_is_announced_again_every_announce_interval(wire, monkeypatch) -> None:
    wire, stream = wire
    monkeypatch.setattr(RunEventStream, "announce_every", 0.2)
    await stream.emit("run.started")
    started = asyncio.get_running_loop().time()
    while asyncio.get_running_loop().time() - started < 0.5:
        await stream.emit("token", text="x")
        await asyncio.sleep(0.02)

    # A socket that joined the conversation just after the first batch was announced
    # learns of the run at the next announcement, within the interval.
    assert 2 <= len(wire.sent) <= 4
    assert wire.sent[0] == [1]


async def test_a_token_with_nothing_after_it_is_not_held_back(wire) -> None:
    wire, stream = wire
    await stream.emit("run.started")
    await stream.emit("token", text="Hello")
    await stream.emit("token", text=" there")  # within the window of the first

    assert await followed(stream.run_id, 3) == [1, 2, 3]


async def test_a_run_cancelled_while_a_batch_is_on_its_way_still_sends_all_it_emitted(
    wire, monkeypatch
) -> None:
    wire, stream = wire
    monkeypatch.setattr(RunEventStream, "window", 60)
    slow, release = asyncio.Event(), asyncio.Event()
    log = events.event_log()
    append = log.append

    async def append_held(run_id: uuid.UUID, frames: list[events.Frame]) -> None:
        if frames[0].seq == 2:  # the first batch of tokens
            slow.set()
            await release.wait()
        await append(run_id, frames)

    monkeypatch.setattr(log, "append", append_held)

    async def run() -> None:
        await stream.emit("run.started")
        while True:
            await stream.emit("token", text="x")

    writer = asyncio.create_task(run())
    await slow.wait()
    writer.cancel()
    with pytest.raises(asyncio.CancelledError):
        await writer
    release.set()
    await stream.publish(final_of(stream))

    assert await followed(stream.run_id, stream.seq) == list(range(1, stream.seq + 1))


@needs_redis
async def test_a_burst_to_300_sockets_of_one_process_loses_nothing(settings) -> None:
    """channels-redis queues every socket's messages of one process in one Redis key,
    and drops what arrives while it is full: 300 sockets' events all get through."""
    layer = RedisChannelLayer(
        hosts=[REDIS_URL],
        prefix=f"test-burst-{uuid.uuid4().hex}",
        capacity=settings.CHANNEL_LAYER_CAPACITY,
    )
    try:
        channels = [await layer.new_channel() for _ in range(300)]
        for number, channel in enumerate(channels):
            await layer.group_add(f"conversation.{number}", channel)
        for number in range(300):  # before this process reads any
            await layer.group_send(f"conversation.{number}", {"type": "run.events", "n": number})

        for number, channel in enumerate(channels):
            message = await asyncio.wait_for(layer.receive(channel), timeout=10)
            assert message["n"] == number
    finally:
        await layer.flush()
        await layer.close_pools()
