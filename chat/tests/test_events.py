"""The run event log that lets a client resume: in memory by default, Redis when scaled."""

import uuid

import pytest
import redis

from chat.events import MemoryEventLog, RedisEventLog
from tests.servers import REDIS_URL, redis_available

LOGS = [
    pytest.param(lambda: MemoryEventLog(ttl=60), id="memory"),
    pytest.param(
        lambda: RedisEventLog(REDIS_URL, ttl=60),
        id="redis",
        marks=pytest.mark.skipif(
            not redis_available(),
            reason="Redis is NOT reachable on 127.0.0.1:6379: Redis event log untested",
        ),
    ),
]


@pytest.mark.parametrize("make_log", LOGS)
async def test_resume_returns_exactly_the_events_after_a_seq(make_log) -> None:
    log = make_log()
    run_id, other_run = uuid.uuid4(), uuid.uuid4()
    for seq in range(1, 6):
        await log.append(run_id, {"type": "token", "run": str(run_id), "seq": seq, "text": "é"})
    await log.append(other_run, {"type": "token", "run": str(other_run), "seq": 1})

    assert [e["seq"] for e in await log.after(run_id, 0)] == [1, 2, 3, 4, 5]
    assert [e["seq"] for e in await log.after(run_id, 3)] == [4, 5]
    assert await log.after(run_id, 5) == []
    assert (await log.after(run_id, 4))[0]["text"] == "é"
    assert await log.after(uuid.uuid4(), 0) == []


async def test_memory_log_forgets_runs_after_the_ttl() -> None:
    log = MemoryEventLog(ttl=0)
    old = uuid.uuid4()
    await log.append(old, {"seq": 1})
    await log.append(uuid.uuid4(), {"seq": 1})  # a new run sweeps expired ones
    assert await log.after(old, 0) == []


@pytest.mark.skipif(not redis_available(), reason="Redis is NOT reachable: TTL untested")
async def test_redis_log_expires_with_the_ttl() -> None:
    run_id = uuid.uuid4()
    await RedisEventLog(REDIS_URL, ttl=30).append(run_id, {"seq": 1})
    ttl = redis.Redis.from_url(REDIS_URL).ttl(f"agentsite:run-events:{run_id}")
    assert 0 < ttl <= 30
