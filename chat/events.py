"""Run events: numbered, logged for replay, and broadcast to the conversation's sockets.

Each run has exactly one writer (its executor), which numbers the events; the log keeps
them for AGENT_EVENT_TTL seconds so a client that drops can resume from the last `seq`
it saw. The log lives in process memory by default and in Redis streams when
AGENT_REDIS_URL is set, so that every instance sees every run.

Tokens travel in small batches (see `RunEventStream`): each stays one event with its own
`seq`, but a batch is one log append and one channel-layer message, not one per token.
Each event is encoded to JSON once, for the log and every socket alike.
"""

import asyncio
import json
import logging
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol
from uuid import UUID

from channels.layers import get_channel_layer
from django.conf import settings

if TYPE_CHECKING:
    import redis.asyncio as aioredis

logger = logging.getLogger(__name__)

Event = dict[str, Any]


class Frame(NamedTuple):
    """An event as its socket frame: the JSON text, encoded once, and its `seq`."""

    seq: int
    text: str


def frames_of(events: Sequence[Event]) -> list[Frame]:
    return [Frame(event["seq"], json.dumps(event)) for event in events]


def conversation_group(conversation_id: UUID | str) -> str:
    return f"conversation.{conversation_id}"


class EventLog(Protocol):
    async def append(self, run_id: UUID, frames: Sequence[Frame]) -> None:
        """Frames of one run, in `seq` order."""

    async def after(self, run_id: UUID, seq: int) -> list[Event]: ...


class MemoryEventLog:
    """For the single-process monolith."""

    def __init__(self, ttl: float) -> None:
        self._ttl = ttl
        self._runs: dict[UUID, tuple[float, list[Frame]]] = {}

    async def append(self, run_id: UUID, frames: Sequence[Frame]) -> None:
        now = time.monotonic()
        _, logged = self._runs.get(run_id, (now, []))
        logged.extend(frames)
        self._runs[run_id] = (now, logged)
        if frames and frames[0].seq == 1:
            self._forget_expired(now)

    async def after(self, run_id: UUID, seq: int) -> list[Event]:
        _, logged = self._runs.get(run_id, (0.0, []))
        return [json.loads(frame.text) for frame in logged if frame.seq > seq]

    def _forget_expired(self, now: float) -> None:
        expired = [rid for rid, (touched, _) in self._runs.items() if now - touched > self._ttl]
        for run_id in expired:
            del self._runs[run_id]


class RedisEventLog:
    """One Redis stream per run; entry ids are `0-<seq>` so a resume is one XRANGE."""

    def __init__(self, url: str, ttl: int) -> None:
        self._url = url
        self._ttl = ttl
        # redis.asyncio connections belong to the event loop that opened them.
        self._clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, aioredis.Redis] = (
            weakref.WeakKeyDictionary()
        )

    def _client(self) -> "aioredis.Redis":
        loop = asyncio.get_running_loop()
        if loop not in self._clients:
            # Imported here: redis-py takes about 7 MiB that the in-memory log never needs.
            import redis.asyncio as aioredis

            self._clients[loop] = aioredis.Redis.from_url(
                self._url, **settings.REDIS_CLIENT_OPTIONS
            )
        return self._clients[loop]

    @staticmethod
    def _key(run_id: UUID) -> str:
        return f"agentsite:run-events:{run_id}"

    async def append(self, run_id: UUID, frames: Sequence[Frame]) -> None:
        # One round trip for the whole batch.
        key = self._key(run_id)
        async with self._client().pipeline(transaction=False) as pipe:
            for frame in frames:
                pipe.xadd(key, {"e": frame.text}, id=f"0-{frame.seq}")
            pipe.expire(key, self._ttl)
            await pipe.execute()

    async def after(self, run_id: UUID, seq: int) -> list[Event]:
        entries = await self._client().xrange(self._key(run_id), min=f"0-{seq + 1}", max="+")
        # redis-py types the reply as optional throughout; XRANGE always gives a list.
        return [json.loads(fields[b"e"]) for _, fields in entries or [] if fields]


_log: EventLog | None = None


def event_log() -> EventLog:
    global _log
    if _log is None:
        if settings.REDIS_URL:
            _log = RedisEventLog(settings.REDIS_URL, settings.AGENT_EVENT_TTL)
        else:
            _log = MemoryEventLog(settings.AGENT_EVENT_TTL)
    return _log


async def event_publish(conversation_id: UUID | str, event: Event, *, warn: bool = True) -> bool:
    """`events_publish` for one event."""
    return await events_publish(conversation_id, [event], warn=warn)


async def events_publish(
    conversation_id: UUID | str, events: Sequence[Event], *, warn: bool = True
) -> bool:
    """Append events of one run (in `seq` order) to its log and send them to the
    conversation's sockets as one "run.events" message. A failure of either (Redis
    restarting, say) is logged and returns False, never raises: the run goes on, and its
    outcome still reaches clients, rebuilt from the database when they resume
    (`chat.lifecycle.final_event_missing`)."""
    run = events[0]["run"]
    frames = frames_of(events)
    seqs = f"{frames[0].seq}-{frames[-1].seq}"
    delivered = True
    try:
        await event_log().append(UUID(run), frames)
    except Exception as error:
        delivered = False
        if warn:
            logger.warning("run %s: events %s not logged: %r", run, seqs, error)
    channel_layer = get_channel_layer()
    assert channel_layer is not None
    try:
        await channel_layer.group_send(
            conversation_group(conversation_id),
            {
                "type": "run.events",
                "run": run,
                "seqs": [frame.seq for frame in frames],
                "types": [event["type"] for event in events],
                "frames": [frame.text for frame in frames],
            },
        )
    except Exception as error:
        delivered = False
        if warn:
            logger.warning("run %s: events %s not sent: %r", run, seqs, error)
    return delivered


class RunEventStream:
    """The single writer of one run's events.

    Tokens are batched: a token goes out at once when nothing went out for `window`
    seconds, else with the tokens that follow it within the window (at most `batch_max`
    of them), so a fast stream costs one log append and one channel-layer message per
    batch while a slow one is not delayed at all. Every other event (run.started, tool.*,
    usage, the final event) goes out at once, with the tokens before it. Batches go out
    one at a time, in `seq` order; a cancelled run still sends every event it emitted.

    `ceiling`: the highest seq the run may use before `reserve(seq)` raises it (see
    `Run.event_seq`); 0 for no ceiling. While events cannot be published (Redis is
    down) the run goes on; that is logged once, not per token."""

    window = 0.005
    batch_max = 32

    def __init__(
        self,
        run_id: UUID,
        conversation_id: UUID,
        *,
        ceiling: int = 0,
        reserve: Callable[[int], Awaitable[int]] | None = None,
    ) -> None:
        self.run_id = run_id
        self.conversation_id = conversation_id
        self.seq = 0
        self.ceiling = ceiling
        self._reserve = reserve
        self._failing = False
        self._pending: list[Event] = []
        self._sending = asyncio.Lock()
        self._sent_at = float("-inf")
        self._timer: asyncio.Task[None] | None = None

    async def emit(self, event_type: str, **data: Any) -> Event:
        if self.ceiling and self.seq + 1 > self.ceiling and self._reserve is not None:
            self.ceiling = await self._reserve(self.seq)
        self.seq += 1
        event: Event = {"type": event_type, "run": str(self.run_id), "seq": self.seq, **data}
        self._pending.append(event)
        if event_type != "token" or len(self._pending) >= self.batch_max:
            await self.flush()
        elif self._timer is None:
            wait = self._sent_at + self.window - time.monotonic()
            if wait <= 0:
                await self.flush()
            else:
                self._timer = asyncio.create_task(self._flush_after(wait))
        return event

    async def publish(self, event: Event) -> None:
        """Publish an event numbered elsewhere (the final one, numbered when it was
        recorded), after those emitted before it; later events follow it."""
        self.seq = event["seq"]
        self._pending.append(event)
        await self.flush()

    async def flush(self) -> None:
        """Send what was emitted. Shielded: a cancel of the run does not cut a batch
        short, and the final event, published next, waits for it."""
        await asyncio.shield(self._send_pending())

    async def _flush_after(self, wait: float) -> None:
        await asyncio.sleep(wait)
        self._timer = None
        await self._send_pending()

    async def _send_pending(self) -> None:
        async with self._sending:
            batch, self._pending = self._pending, []
            if self._timer is not None:  # what it was set for goes out now
                self._timer.cancel()
                self._timer = None
            if not batch:
                return
            self._sent_at = time.monotonic()
            # Quiet while an outage lasts: one warning for it, not one per batch.
            delivered = await events_publish(self.conversation_id, batch, warn=not self._failing)
            if delivered and self._failing:
                logger.warning(
                    "run %s: events published again from seq %d", self.run_id, batch[0]["seq"]
                )
            self._failing = not delivered


# TEMPORARY (branch openai): a stand-in for the "events" branch's `follow`, with its
# signature, so the OpenAI-compatible endpoint can be built and tested before that lands;
# replaced by it when main is merged. Polls the log; no rebuilt final event.
async def follow(
    run_id: UUID, after_seq: int = 0, *, idle: float | None = None
) -> AsyncIterator["Frame | None"]:
    final = {"run.completed", "run.failed", "run.cancelled", "run.limit_reached"}
    final |= {"run.budget_exceeded", "run.interrupted"}
    waited = 0.0
    while True:
        events = await event_log().after(run_id, after_seq)
        for event in events:
            after_seq = event["seq"]
            waited = 0.0
            yield Frame(event["seq"], json.dumps(event))
            if event["type"] in final:
                return
        await asyncio.sleep(0.02)
        waited += 0.02
        if idle is not None and waited >= idle:
            waited = 0.0
            yield None
