"""Run events: numbered, logged, and followed by whoever reads them.

Each run has exactly one writer (its executor), which numbers the events; the log keeps
them for AGENT_EVENT_TTL seconds so a client that drops can resume from the last `seq`
it saw. The log lives in process memory by default and in Redis streams when
AGENT_REDIS_URL is set, so that every instance sees every run.

Tokens travel in small batches (see `RunEventStream`): each stays one event with its own
`seq`, but a batch is one log append and one channel-layer message, not one per token.
Each event is encoded to JSON once, for the log and every socket alike.

Every reader of a run's events (a socket, a Server-Sent Events stream, a client waiting
for the answer) reads them through `follow`: what the log holds after a seq, then each
new event as it is logged, ending with the run's final event.
"""

import asyncio
import json
import logging
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol
from uuid import UUID

from channels.db import database_sync_to_async
from channels.layers import get_channel_layer
from django.conf import settings

from .event_schemas import FINAL_EVENT_TYPES, RESUMED_EVENT_TYPE, run_event_adapter

if TYPE_CHECKING:
    import redis.asyncio as aioredis

logger = logging.getLogger(__name__)

Event = dict[str, Any]


class Frame(NamedTuple):
    """An event as it is logged and sent: its JSON text, encoded once, with its `seq` and
    `type` beside it so that routing it never decodes it."""

    seq: int
    type: str
    text: str

    def event(self) -> Event:
        """The event, decoded (a new dict each time)."""
        decoded: Event = json.loads(self.text)
        return decoded


def frames_of(events: Sequence[Event]) -> list[Frame]:
    return [Frame(event["seq"], event["type"], json.dumps(event)) for event in events]


def frames_checked(events: Sequence[Event]) -> list[Frame]:
    """`frames_of` for the events a run publishes. With AGENT_CHECK_EVENTS (development,
    the tests) each is first held to its schema, `RunEvent`, as a client decodes it:
    emitters build plain dicts, and this is where one that drifts from the documented
    schema fails, in its own run (at `emit` for most events; for a batched token, in
    the batch's flush, its seqs missing after). Here rather than at each emitter: every
    event published passes here, the closed runs' and rebuilt final events too. Not in
    production: validating every token would cost more than encoding it, for what the
    tests already hold."""
    frames = frames_of(events)
    if settings.AGENT_CHECK_EVENTS:
        for frame in frames:
            run_event_adapter.validate_json(frame.text, strict=True)
    return frames


def conversation_group(conversation_id: UUID | str) -> str:
    return f"conversation.{conversation_id}"


class EventLog(Protocol):
    async def append(self, run_id: UUID, frames: Sequence[Frame]) -> None:
        """Frames of one run, in `seq` order."""

    async def after(self, run_id: UUID, seq: int) -> list[Frame]:
        """The run's logged frames after `seq`, in order."""

    async def wait(self, run_id: UUID, seq: int, within: float) -> list[Frame]:
        """`after`, but if there are none, the first ones logged within `within`
        seconds ([] if none are)."""


class MemoryEventLog:
    """For the single-process monolith. Runs are kept for `ttl` seconds after their last
    event, and at most `max_events` events in all: past that, runs are forgotten whole,
    so a burst of long runs cannot take the process's memory: first the runs that are
    over (their final event logged; a follower that resumes one gets its final event
    from the database, see `follow`), least recently appended to first; only when none
    is left, runs under way (their followers lose events, and end with the final event,
    see `follow`).

    Followers wait on a future per `wait` call, woken by the next append to their run,
    on the loop they wait on (appends come from the serving loop in the monolith, but
    from another thread's loop too is safe)."""

    def __init__(self, ttl: float, max_events: int = 200_000) -> None:
        self._ttl = ttl
        self._max_events = max_events
        self._events = 0
        # Runs under way, and runs over (their final event logged): each least recently
        # appended to first.
        self._live: dict[UUID, tuple[float, list[Frame]]] = {}
        self._over: dict[UUID, tuple[float, list[Frame]]] = {}
        self._waiters: dict[UUID, set[asyncio.Future[None]]] = {}

    async def append(self, run_id: UUID, frames: Sequence[Frame]) -> None:
        now = time.monotonic()
        _, logged = self._runs_of(run_id).pop(run_id, (now, []))
        logged.extend(frames)
        over = any(frame.type in FINAL_EVENT_TYPES for frame in frames)
        (self._over if over else self._live)[run_id] = (now, logged)
        self._events += len(frames)
        if frames and frames[0].seq == 1:
            self._forget_expired(now)
        self._evict(keep=run_id)
        for waiter in list(self._waiters.get(run_id, ())):
            loop = waiter.get_loop()
            if not loop.is_closed():  # a follower left behind by a loop that ended
                loop.call_soon_threadsafe(_wake, waiter)

    async def after(self, run_id: UUID, seq: int) -> list[Frame]:
        _, logged = self._runs_of(run_id).get(run_id, (0.0, []))
        return [frame for frame in logged if frame.seq > seq]

    async def wait(self, run_id: UUID, seq: int, within: float) -> list[Frame]:
        waiter = asyncio.get_running_loop().create_future()
        # Registered before reading, so an append in between wakes it.
        waiters = self._waiters.setdefault(run_id, set())
        waiters.add(waiter)
        try:
            frames = await self.after(run_id, seq)
            if frames or within <= 0:
                return frames
            try:
                await asyncio.wait_for(waiter, within)
            except TimeoutError:
                return []
            return await self.after(run_id, seq)
        finally:
            waiters.discard(waiter)
            if not waiters:
                self._waiters.pop(run_id, None)

    def _forget_expired(self, now: float) -> None:
        expired = [
            run_id
            for runs in (self._live, self._over)
            for run_id, (touched, _) in runs.items()
            if now - touched > self._ttl
        ]
        for run_id in expired:
            self._forget(run_id)

    def _evict(self, *, keep: UUID) -> None:
        """Forget runs until within the cap, but for `keep` (just appended to)."""
        while self._events > self._max_events:
            # Runs over first; `keep` is last of its dict, so this stops early.
            victim = next(
                (run_id for runs in (self._over, self._live) for run_id in runs if run_id != keep),
                None,
            )
            if victim is None:
                return
            if victim in self._live:
                logger.warning(
                    "run %s: forgotten by the event log while under way (over its cap of "
                    "%d events); its followers end with its final event",
                    victim,
                    self._max_events,
                )
            self._forget(victim)

    def _forget(self, run_id: UUID) -> None:
        _, logged = self._runs_of(run_id).pop(run_id)
        self._events -= len(logged)

    def _runs_of(self, run_id: UUID) -> dict[UUID, tuple[float, list[Frame]]]:
        return self._live if run_id in self._live else self._over


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


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
                pipe.xadd(key, {"e": frame.text, "t": frame.type}, id=f"0-{frame.seq}")
            pipe.expire(key, self._ttl)
            await pipe.execute()

    async def after(self, run_id: UUID, seq: int) -> list[Frame]:
        entries = await self._client().xrange(self._key(run_id), min=f"0-{seq + 1}", max="+")
        # redis-py types the reply as optional throughout; XRANGE always gives a list.
        return _frames_of_entries(entries or [])

    async def wait(self, run_id: UUID, seq: int, within: float) -> list[Frame]:
        """One XREAD from `0-<seq>`: what is there at once, else blocks until an append.
        Blocks for less than the client's read timeout, which would take a long block
        for a dead connection."""
        if within <= 0:
            return await self.after(run_id, seq)
        block = min(within, settings.REDIS_READ_TIMEOUT / 2)
        reply: Any = await self._client().xread(
            {self._key(run_id): f"0-{seq}"}, block=max(1, round(block * 1000))
        )
        # RESP2 (the clients' protocol): [[key, entries]], or nothing when it timed out.
        return _frames_of_entries(reply[0][1]) if reply else []


def _frames_of_entries(entries: Sequence[Any]) -> list[Frame]:
    """Frames of stream entries as redis-py gives them: (id, fields), both in bytes."""
    frames = []
    for entry_id, fields in entries:
        if not fields:
            continue
        text = fields[b"e"].decode()
        # Entries logged before the type was stored beside the event have it only inside.
        kind = fields[b"t"].decode() if b"t" in fields else json.loads(text)["type"]
        frames.append(Frame(int(entry_id.split(b"-")[1]), kind, text))
    return frames


_log: EventLog | None = None


def event_log() -> EventLog:
    global _log
    if _log is None:
        if settings.REDIS_URL:
            _log = RedisEventLog(settings.REDIS_URL, settings.AGENT_EVENT_TTL)
        else:
            _log = MemoryEventLog(settings.AGENT_EVENT_TTL)
    return _log


# How often a follower finding nothing new asks the database whether its run is over:
# its final event may never reach the log (Redis down or restarted, the log expired).
FOLLOW_CHECK_INTERVAL = 5.0
# How long after a run is recorded as over its last events may still be on their way to
# the log (milliseconds, normally), before a follower stops waiting for them and
# rebuilds the final event: a client resuming right after a run ended waits this long
# for it when the log lost it.
FOLLOW_FINAL_GRACE = 1.0
# The longest pause between reads while the log cannot be read.
FOLLOW_RETRY_MAX = 5.0


async def follow(
    run_id: UUID, after_seq: int = 0, *, idle: float | None = None
) -> AsyncIterator[Frame | None]:
    """Every event of the run after `after_seq`, each once and in `seq` order: first those
    logged already, then each as it is logged, until the run's final event, the last
    thing yielded. With `idle`, None whenever that many seconds pass with nothing to
    yield (for heartbeats, and to notice a client gone).

    A run that ended without its final event in the log (Redis was down, the log
    expired) still ends with it, rebuilt from the database: asked at once when the log
    has nothing to give, and after FOLLOW_CHECK_INTERVAL seconds of silence once it has
    given something, so a follower never waits on a run that is over. A log that
    cannot be read is retried, with a warning and backoff, never raised. A run deleted
    meanwhile ends with the final event its executor publishes, or, if none comes by
    the next check, without one. The caller checks that the run is the client's to
    follow.

    Events the log lost (a run under way forgotten past the memory log's cap, batches
    Redis never got) are not skipped silently: at the first gap (an event other than
    the final one or `run.resumed` that is not the one after the last yielded; both
    logs return everything they hold after a seq, so what is missing then is gone) it
    warns and yields nothing more but the final event, from the log or rebuilt from the
    database as above. A final event after a gap is the run's end all the same: a run
    closed by another process numbers it past anything its writer may have used. So is
    `run.resumed` a continuation: a recovered run's writer numbers its events past the
    seqs its earlier execution reserved and never used."""
    # Imported here: lifecycle publishes its final events through this module.
    from .lifecycle import RunEnd, run_end_owed

    log = event_log()
    loop = asyncio.get_running_loop()
    seq = after_seq  # the last yielded
    read = after_seq  # the last read from the log
    lost = False  # events after `seq` are missing from the log
    quiet_since = check_at = loop.time()
    retry = 0.0
    deleted = False  # found gone at the last check
    within = 0.0  # the first read is what the log holds already
    while True:
        try:
            frames = await log.wait(run_id, read, within)
        except Exception as error:
            frames = []
            if not retry:
                logger.warning("run %s: event log unreadable, retrying: %r", run_id, error)
            retry = min(FOLLOW_RETRY_MAX, max(0.1, retry * 2))
            await asyncio.sleep(retry if idle is None else min(retry, idle))
        else:
            if retry:
                logger.warning("run %s: event log readable again", run_id)
            retry = 0.0
        yielded = False
        for frame in frames:
            read = frame.seq
            final = frame.type in FINAL_EVENT_TYPES
            resumed = frame.type == RESUMED_EVENT_TYPE
            if not final and not resumed and not lost and frame.seq != seq + 1:
                lost = True
                logger.warning(
                    "run %s: events %d-%d missing from the log; its followers get its "
                    "final event next",
                    run_id,
                    seq + 1,
                    frame.seq - 1,
                )
            if lost and not final:
                continue
            seq = frame.seq
            yield frame
            yielded = True
            if final:
                return
        if yielded:
            # Events flow: the run is not over unnoticed, and the database is asked only
            # once the log has stayed silent a while (not once per follower and run).
            quiet_since = loop.time()
            check_at = quiet_since + FOLLOW_CHECK_INTERVAL
        else:
            if idle is not None and loop.time() - quiet_since >= idle:
                yield None
                quiet_since = loop.time()
            if loop.time() >= check_at:
                try:
                    end = await database_sync_to_async(run_end_owed)(
                        run_id=run_id, after_seq=seq, grace=FOLLOW_FINAL_GRACE
                    )
                except Exception as error:  # the database is down: the log may still do
                    logger.warning("run %s: could not check whether it is over: %r", run_id, error)
                    end = RunEnd(over=False)
                if end.final is not None:
                    yield frames_checked([end.final])[0]
                    return
                if end.deleted:
                    if deleted:
                        return
                    deleted = True
                elif end.over and not end.settling:
                    return
                check_at = loop.time() + (end.settling or FOLLOW_CHECK_INTERVAL)
        deadline = check_at if idle is None else min(check_at, quiet_since + idle)
        within = max(0.01, deadline - loop.time())


async def event_publish(conversation_id: UUID | str, event: Event, *, warn: bool = True) -> bool:
    """`events_publish` for one event."""
    return await events_publish(conversation_id, [event], warn=warn)


async def events_publish(
    conversation_id: UUID | str,
    events: Sequence[Event],
    *,
    warn: bool = True,
    announce: bool = True,
) -> bool:
    """Append events of one run (in `seq` order) to its log and, with `announce`, tell
    the conversation's sockets, in one "run.events" message, that the run has new events
    (a socket that follows the run reads them from the log without it). A failure of
    either (Redis restarting, say) is logged and returns False, never raises: the run
    goes on, and its outcome still reaches its followers, rebuilt from the database
    (`follow`)."""
    run = events[0]["run"]
    frames = frames_checked(events)
    seqs = f"{frames[0].seq}-{frames[-1].seq}"
    delivered = True
    try:
        await event_log().append(UUID(run), frames)
    except Exception as error:
        delivered = False
        if warn:
            logger.warning("run %s: events %s not logged: %r", run, seqs, error)
    if not announce:
        return delivered
    channel_layer = get_channel_layer()
    assert channel_layer is not None
    try:
        await channel_layer.group_send(
            conversation_group(conversation_id),
            {
                # Sockets read the events themselves from the log (`follow`): this
                # tells them which run has new ones.
                "type": "run.events",
                "run": run,
                "seqs": [frame.seq for frame in frames],
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

    Sockets follow a run from the log once it is announced to its conversation, so a
    batch is announced only when it may matter: the run's first batch, its final event,
    and otherwise at most once every `announce_every` seconds, for a socket that joined
    the conversation just as the run began (between its lookup and its joining the
    group). A channel-layer message per batch cost each web process a dispatch and
    Redis a group send per token.

    `seq`: the last seq used before (a resumed run's writer numbers past the ceiling its
    earlier execution had reserved). `ceiling`: the highest seq the run may use before
    `reserve(seq)` raises it (see `Run.event_seq`); 0 for no ceiling. While events
    cannot be published (Redis is down) the run goes on; that is logged once, not per
    token."""

    window = 0.005
    batch_max = 32
    announce_every = 1.0

    def __init__(
        self,
        run_id: UUID,
        conversation_id: UUID,
        *,
        seq: int = 0,
        ceiling: int = 0,
        reserve: Callable[[int], Awaitable[int]] | None = None,
    ) -> None:
        self.run_id = run_id
        self.conversation_id = conversation_id
        self.seq = seq
        self.ceiling = ceiling
        self._reserve = reserve
        self._failing = False
        self._pending: list[Event] = []
        self._sending = asyncio.Lock()
        self._sent_at = float("-inf")
        self._announced_at = float("-inf")
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
            self._sent_at = now = time.monotonic()
            announce = (
                now - self._announced_at >= self.announce_every
                or batch[-1]["type"] in FINAL_EVENT_TYPES
            )
            if announce:
                self._announced_at = now
            # Quiet while an outage lasts: one warning for it, not one per batch.
            delivered = await events_publish(
                self.conversation_id, batch, warn=not self._failing, announce=announce
            )
            if delivered and self._failing:
                logger.warning(
                    "run %s: events published again from seq %d", self.run_id, batch[0]["seq"]
                )
            self._failing = not delivered
