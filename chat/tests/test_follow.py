"""`follow`: every event of a run after a seq, once and in order, replayed from the log
then live, ending with the final event, rebuilt from the database if the log lost it."""

import asyncio
import threading
import uuid
from datetime import timedelta
from typing import Any

import pytest
from channels.db import database_sync_to_async
from django.utils import timezone

from chat import events, lifecycle, services
from chat.events import Frame, MemoryEventLog, RedisEventLog, follow, frames_of
from chat.models import Run
from tests.drills import RedisServer, redis_server_available
from tests.servers import REDIS_URL, redis_available

pytestmark = pytest.mark.django_db(transaction=True)

needs_redis = pytest.mark.skipif(
    not redis_available(),
    reason="Redis is NOT reachable on 127.0.0.1:6379: following the Redis log untested",
)


@pytest.fixture(params=["memory", pytest.param("redis", marks=needs_redis)])
def log(request, monkeypatch) -> Any:
    log: Any = MemoryEventLog(ttl=60) if request.param == "memory" else RedisEventLog(REDIS_URL, 60)
    monkeypatch.setattr(events, "_log", log)
    return log


@pytest.fixture
def quick_checks(monkeypatch) -> None:
    """The database asked often, and a final event rebuilt as soon as it is missing."""
    monkeypatch.setattr(events, "FOLLOW_CHECK_INTERVAL", 0.05)
    monkeypatch.setattr(events, "FOLLOW_FINAL_GRACE", 0.0)
    monkeypatch.setattr(events, "FOLLOW_RETRY_MAX", 0.1)


def a_run(make_user, **fields: Any) -> Run:
    user = make_user(username=f"u{uuid.uuid4().hex[:8]}")
    conversation = services.conversation_create(owner=user)
    fields = {"status": Run.Status.RUNNING, "event_seq": lifecycle.SEQ_BLOCK, **fields}
    return Run.objects.create(conversation=conversation, model="offline", **fields)


def run_over(run: Run, *, final_seq: int, ago: float = 60) -> None:
    Run.objects.filter(id=run.id).update(
        status=Run.Status.COMPLETED,
        event_seq=final_seq,
        finished_at=timezone.now() - timedelta(seconds=ago),
    )


def token(run_id: uuid.UUID, seq: int) -> Frame:
    return frames_of([{"type": "token", "run": str(run_id), "seq": seq, "text": f"t{seq}"}])[0]


def final(run_id: uuid.UUID, seq: int) -> Frame:
    return frames_of([{"type": "run.completed", "run": str(run_id), "seq": seq}])[0]


class Follower:
    """`follow` in a task, what it yields recorded."""

    def __init__(self, run_id: uuid.UUID, after_seq: int = 0, **options: Any) -> None:
        self.got: list[Frame | None] = []
        self.task = asyncio.create_task(self._follow(run_id, after_seq, options))

    async def _follow(self, run_id: uuid.UUID, after_seq: int, options: Any) -> None:
        async for frame in follow(run_id, after_seq, **options):
            self.got.append(frame)

    async def has(self, count: int) -> None:
        """Until it has yielded `count` frames (bounded only against a hang)."""
        async with asyncio.timeout(30):
            while len(self.got) < count:
                assert not self.task.done() or self.task.exception() is None
                await asyncio.sleep(0.01)

    async def done(self) -> list[int]:
        await asyncio.wait_for(self.task, timeout=30)
        return [frame.seq for frame in self.got if frame is not None]


async def test_replay_then_live_each_event_once_ending_with_the_final_one(log, make_user):
    run = await database_sync_to_async(a_run)(make_user)
    await log.append(run.id, [token(run.id, seq) for seq in (1, 2, 3)])
    follower = Follower(run.id)
    await follower.has(3)
    await log.append(run.id, [token(run.id, 4), token(run.id, 5)])
    await follower.has(5)
    await log.append(run.id, [final(run.id, 6)])

    assert await follower.done() == [1, 2, 3, 4, 5, 6]
    assert follower.got[-1] is not None and follower.got[-1].event()["type"] == "run.completed"


async def test_events_logged_while_the_replay_is_read_come_once(log, make_user, monkeypatch):
    run = await database_sync_to_async(a_run)(make_user)
    await log.append(run.id, [token(run.id, seq) for seq in (1, 2, 3)])
    read, appended = log.after, False

    async def after_with_appends_in_flight(run_id: uuid.UUID, seq: int) -> list[Frame]:
        nonlocal appended
        frames = await read(run_id, seq)
        if not appended:  # between the replay's read and its end, the run goes on
            appended = True
            await log.append(run.id, [token(run.id, 4), token(run.id, 5)])
        return frames

    monkeypatch.setattr(log, "after", after_with_appends_in_flight)
    follower = Follower(run.id)
    await follower.has(5)
    await log.append(run.id, [token(run.id, 6), final(run.id, 7)])

    assert await follower.done() == [1, 2, 3, 4, 5, 6, 7]


async def test_following_from_a_seq_in_the_middle(log, make_user):
    run = await database_sync_to_async(a_run)(make_user)
    await log.append(run.id, [token(run.id, seq) for seq in range(1, 6)])
    await log.append(run.id, [final(run.id, 6)])

    assert await Follower(run.id, after_seq=3).done() == [4, 5, 6]


async def test_a_run_over_with_nothing_logged_ends_with_its_final_event_rebuilt(log, make_user):
    run = await database_sync_to_async(a_run)(make_user)
    await database_sync_to_async(run_over)(run, final_seq=7)

    follower = Follower(run.id, after_seq=2)
    assert await follower.done() == [7]
    assert follower.got[0] is not None and follower.got[0].type == "run.completed"
    assert follower.got[0].event()["status"] == "completed"


async def test_a_run_ending_while_followed_without_logging_its_final_event(
    log, make_user, quick_checks
):
    run = await database_sync_to_async(a_run)(make_user)
    await log.append(run.id, [token(run.id, 1)])
    follower = Follower(run.id)
    await follower.has(1)
    await database_sync_to_async(run_over)(run, final_seq=2)  # publishing it failed

    assert await follower.done() == [1, 2]


async def test_a_final_event_on_its_way_to_the_log_is_waited_for(log, make_user, monkeypatch):
    """A run is recorded as over just before its last events are published: a follower
    checking then gets them from the log, not a rebuilt final event before them."""
    monkeypatch.setattr(events, "FOLLOW_FINAL_GRACE", 3600)
    run = await database_sync_to_async(a_run)(make_user)
    await database_sync_to_async(run_over)(run, final_seq=3, ago=0)
    follower = Follower(run.id)
    await asyncio.sleep(0.1)  # it checks the database meanwhile (not needed to pass)
    await log.append(run.id, [token(run.id, 1), token(run.id, 2), final(run.id, 3)])

    assert await follower.done() == [1, 2, 3]


async def test_idle_yields_none_while_nothing_happens(log, make_user):
    run = await database_sync_to_async(a_run)(make_user)
    follower = Follower(run.id, idle=0.01)
    await follower.has(2)
    assert follower.got[:2] == [None, None]
    await log.append(run.id, [final(run.id, 1)])
    assert await follower.done() == [1]


async def test_a_memory_log_appended_from_another_thread_wakes_its_follower(monkeypatch, make_user):
    log = MemoryEventLog(ttl=60)
    monkeypatch.setattr(events, "_log", log)
    run = await database_sync_to_async(a_run)(make_user)
    follower = Follower(run.id)
    await asyncio.sleep(0.05)  # waiting by now, most likely (not needed to pass)

    thread = threading.Thread(target=asyncio.run, args=(log.append(run.id, [final(run.id, 1)]),))
    thread.start()
    await asyncio.to_thread(thread.join)

    assert await follower.done() == [1]


async def test_the_memory_log_forgets_finished_runs_before_runs_under_way() -> None:
    log = MemoryEventLog(ttl=60, max_events=5)
    live, over, new = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    await log.append(live, [token(live, 1), token(live, 2)])
    await log.append(over, [token(over, 1), final(over, 2)])
    await log.append(new, [token(new, 1), token(new, 2)])  # past the cap

    assert [frame.seq for frame in await log.after(live, 0)] == [1, 2]
    assert await log.after(over, 0) == []
    assert [frame.seq for frame in await log.after(new, 0)] == [1, 2]


async def test_a_follower_of_a_run_the_log_lost_events_of_ends_with_its_final_event(
    log, make_user, quick_checks, caplog
):
    """Events missing from the log (a run under way forgotten past the memory log's cap,
    batches Redis never got) are not skipped silently: the follower warns, yields
    nothing after the gap, and ends with the run's final event, rebuilt from the
    database if the log does not have it."""
    run = await database_sync_to_async(a_run)(make_user)
    await log.append(run.id, [token(run.id, 1), token(run.id, 2)])
    follower = Follower(run.id)
    await follower.has(2)
    if isinstance(log, MemoryEventLog):
        log._forget(run.id)  # as past its cap
    await log.append(run.id, [token(run.id, 5), token(run.id, 6)])  # 3 and 4 are lost
    async with asyncio.timeout(30):
        while "events 3-4 missing from the log" not in caplog.text:
            assert not follower.task.done()
            await asyncio.sleep(0.01)
    await database_sync_to_async(run_over)(run, final_seq=7)  # and its final event

    assert await follower.done() == [1, 2, 7]
    assert follower.got[-1] is not None and follower.got[-1].event()["status"] == "completed"


def resumed(run_id: uuid.UUID, seq: int) -> Frame:
    event = {"type": "run.resumed", "run": str(run_id), "seq": seq, "recoveries": 1}
    return frames_of([event])[0]


async def test_a_resumed_run_continues_its_followers_stream_past_the_gap(log, make_user):
    """A recovered run's writer numbers its events past the seqs its dead process had
    reserved: the gap that ends at `run.resumed` is a continuation, not lost events."""
    run = await database_sync_to_async(a_run)(make_user)
    await log.append(run.id, [token(run.id, 1), token(run.id, 2)])
    follower = Follower(run.id)
    await follower.has(2)
    block = lifecycle.SEQ_BLOCK
    await log.append(run.id, [resumed(run.id, block + 1), token(run.id, block + 2)])
    await follower.has(4)
    await log.append(run.id, [final(run.id, block + 3)])

    assert await follower.done() == [1, 2, block + 1, block + 2, block + 3]
    # A client that reconnects after the last event it saw before the crash too.
    assert await Follower(run.id, after_seq=2).done() == [block + 1, block + 2, block + 3]


async def test_a_follower_resuming_into_a_gap_gets_the_logged_final_event(log, make_user):
    run = await database_sync_to_async(a_run)(make_user)
    await log.append(run.id, [token(run.id, 3), token(run.id, 4), final(run.id, 5)])

    assert await Follower(run.id, after_seq=1).done() == [5]


async def test_the_memory_log_forgets_the_least_recent_runs_past_its_cap() -> None:
    log = MemoryEventLog(ttl=60, max_events=5)
    old, new = uuid.uuid4(), uuid.uuid4()
    await log.append(old, [token(old, 1), token(old, 2)])
    await log.append(new, [token(new, 1), token(new, 2)])
    await log.append(old, [token(old, 3)])  # `old` is now the most recent
    await log.append(new, [token(new, 3)])

    assert await log.after(old, 0) == []
    assert [frame.seq for frame in await log.after(new, 0)] == [1, 2, 3]


@pytest.mark.skipif(not redis_server_available(), reason="no redis-server to start and kill")
async def test_a_redis_outage_does_not_break_a_follower(
    tmp_path, monkeypatch, make_user, quick_checks
):
    server = RedisServer(tmp_path)
    server.start()
    try:
        log = RedisEventLog(server.url, ttl=60)
        monkeypatch.setattr(events, "_log", log)
        run = await database_sync_to_async(a_run)(make_user)
        await log.append(run.id, [token(run.id, 1)])
        follower = Follower(run.id)
        await follower.has(1)
        server.kill()
        await asyncio.sleep(0.3)  # it reads and fails meanwhile (not needed to pass)
        await database_sync_to_async(run_over)(run, final_seq=5)

        assert await follower.done() == [1, 5]
    finally:
        server.kill()


async def test_a_deleted_run_ends_with_the_final_event_its_executor_publishes(
    log, make_user, monkeypatch
):
    run = await database_sync_to_async(a_run)(make_user)
    await database_sync_to_async(Run.objects.filter(id=run.id).delete)()
    loop, found_gone = asyncio.get_running_loop(), asyncio.Event()
    run_end_owed = lifecycle.run_end_owed

    def run_end_observed(**query: Any) -> lifecycle.RunEnd:
        end = run_end_owed(**query)
        if end.deleted:
            loop.call_soon_threadsafe(found_gone.set)
        return end

    monkeypatch.setattr(lifecycle, "run_end_owed", run_end_observed)
    follower = Follower(run.id)
    await asyncio.wait_for(found_gone.wait(), timeout=30)
    # Its executor, cancelling it as its conversation went, publishes its final event.
    await log.append(run.id, [final(run.id, 1)])

    assert await follower.done() == [1]


async def test_a_deleted_run_with_nothing_more_to_come_ends_its_followers(
    log, make_user, quick_checks
):
    run = await database_sync_to_async(a_run)(make_user)
    await log.append(run.id, [token(run.id, 1)])
    await database_sync_to_async(Run.objects.filter(id=run.id).delete)()

    assert await Follower(run.id).done() == [1]
