"""Run events: numbered, logged for replay, and broadcast to the conversation's sockets.

Each run has exactly one writer (its executor), which numbers the events; the log keeps
them for AGENT_EVENT_TTL seconds so a client that drops can resume from the last `seq`
it saw. The log lives in process memory by default and in Redis streams when
AGENT_REDIS_URL is set, so that every instance sees every run.
"""

import asyncio
import json
import logging
import time
import weakref
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol
from uuid import UUID

from channels.layers import get_channel_layer
from django.conf import settings

if TYPE_CHECKING:
    import redis.asyncio as aioredis

logger = logging.getLogger(__name__)

Event = dict[str, Any]


def conversation_group(conversation_id: UUID | str) -> str:
    return f"conversation.{conversation_id}"


class EventLog(Protocol):
    async def append(self, run_id: UUID, event: Event) -> None: ...

    async def after(self, run_id: UUID, seq: int) -> list[Event]: ...


class MemoryEventLog:
    """For the single-process monolith."""

    def __init__(self, ttl: float) -> None:
        self._ttl = ttl
        self._runs: dict[UUID, tuple[float, list[Event]]] = {}

    async def append(self, run_id: UUID, event: Event) -> None:
        now = time.monotonic()
        _, events = self._runs.get(run_id, (now, []))
        events.append(event)
        self._runs[run_id] = (now, events)
        if event["seq"] == 1:
            self._forget_expired(now)

    async def after(self, run_id: UUID, seq: int) -> list[Event]:
        _, events = self._runs.get(run_id, (0.0, []))
        return [event for event in events if event["seq"] > seq]

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

    async def append(self, run_id: UUID, event: Event) -> None:
        key = self._key(run_id)
        async with self._client().pipeline(transaction=False) as pipe:
            pipe.xadd(key, {"e": json.dumps(event)}, id=f"0-{event['seq']}")
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
    """Append a run's event to its log and send it to the conversation's sockets. A
    failure of either (Redis restarting, say) is logged and returns False, never raises:
    the run goes on, and its outcome still reaches clients, rebuilt from the database
    when they resume (`chat.lifecycle.final_event_missing`)."""
    delivered = True
    try:
        await event_log().append(UUID(event["run"]), event)
    except Exception as error:
        delivered = False
        if warn:
            logger.warning("run %s: event %s not logged: %r", event["run"], event["seq"], error)
    channel_layer = get_channel_layer()
    assert channel_layer is not None
    try:
        await channel_layer.group_send(
            conversation_group(conversation_id), {"type": "run.event", "event": event}
        )
    except Exception as error:
        delivered = False
        if warn:
            logger.warning("run %s: event %s not sent: %r", event["run"], event["seq"], error)
    return delivered


class RunEventStream:
    """The single writer of one run's events.

    `ceiling`: the highest seq the run may use before `reserve(seq)` raises it (see
    `Run.event_seq`); 0 for no ceiling. While events cannot be published (Redis is
    down) the run goes on; that is logged once, not per token."""

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

    async def emit(self, event_type: str, **data: Any) -> Event:
        if self.ceiling and self.seq + 1 > self.ceiling and self._reserve is not None:
            self.ceiling = await self._reserve(self.seq)
        self.seq += 1
        event: Event = {"type": event_type, "run": str(self.run_id), "seq": self.seq, **data}
        await self._publish(event)
        return event

    async def publish(self, event: Event) -> None:
        """Publish an event numbered elsewhere (the final one, numbered when it was
        recorded); later events follow it."""
        self.seq = event["seq"]
        await self._publish(event)

    async def _publish(self, event: Event) -> None:
        # Quiet while an outage lasts: one warning for it, not one per token.
        delivered = await event_publish(self.conversation_id, event, warn=not self._failing)
        if delivered and self._failing:
            logger.warning("run %s: events published again from seq %d", self.run_id, self.seq)
        self._failing = not delivered
