"""What does the requests-per-minute check add to each request? In memory and in Redis.

    .venv/bin/python benchmarks/rate_limit_check.py [--iterations N] [--redis URL]

Uses agentsite.test_settings against a fresh temporary SQLite database, and Redis at
--redis (default redis://127.0.0.1:6379/15; its rate-limit keys are deleted before and
after). Each operation runs N times on a warm limiter (after 200 untimed calls), with
limits high enough that every call is allowed, which is the common and the slower path
(an allowed hit writes a timestamp). Rows:

- Redis PING: one bare round trip, the floor for anything kept in Redis.
- limiter.hit: one limit counted (what a session request without a key pays).
- rate_limit_hit: the service an API-key request calls: the account's limits resolved
  (plan and overrides, already loaded) and two limits counted, the key's and the
  account's.
- rate_limit_hit_for_user: what a signed-in request pays: the account looked up in the
  database, then one limit counted.

The operations run interleaved, call by call, so a busy machine weighs on every row
alike; compare a row's p99 with the PING row's before blaming the check for it.

Target: rate_limit_hit under 0.5 ms (mean and p50) on Redis.
"""

import argparse
import functools
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "agentsite.test_settings")
os.environ["LOG_LEVEL"] = "WARNING"

TARGET_US = 500.0
WARMUP = 200


def setup_django(workdir: str) -> None:
    import django
    from django.conf import settings

    settings.DATABASES["default"]["NAME"] = os.path.join(workdir, "bench.sqlite3")
    settings.AGENT_CHECKPOINT_SQLITE_PATH = os.path.join(workdir, "checkpoints.sqlite3")
    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0)


def timings_us(
    operations: dict[str, Callable[[], object]], iterations: int
) -> dict[str, list[float]]:
    """Each operation's times, interleaved call by call, so that the machine's other work
    (this is often a shared box) weighs on every row alike."""
    for operation in operations.values():
        for _ in range(WARMUP):
            operation()
    times: dict[str, list[float]] = {label: [] for label in operations}
    for _ in range(iterations):
        for label, operation in operations.items():
            began = time.perf_counter()
            operation()
            times[label].append((time.perf_counter() - began) * 1e6)
    return times


def redis_reachable(url: str) -> bool:
    import redis

    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=2).ping())
    except redis.RedisError:
        return False


def main(iterations: int, redis_url: str) -> None:
    import redis
    from django.conf import settings
    from django.contrib.auth import get_user_model
    from limits import RateLimitItemPerMinute

    from billing.models import Account
    from billing.ratelimit import (
        get_limiter,
        limiter_build,
        rate_limit_hit,
        rate_limit_hit_for_user,
    )
    from billing.services import account_for_user, api_key_create

    # Every call allowed: more room than warm-up and timed calls together (the account
    # limit is shared by two rows). Windows this long overstate a real limit's cost.
    allowance = 2 * (WARMUP + iterations) + 10
    user = get_user_model().objects.create_user(username="bench")
    Account.objects.filter(pk=account_for_user(user_id=user.id).pk).update(
        requests_per_minute_per_account=allowance, requests_per_minute_per_key=allowance
    )
    account = account_for_user(user_id=user.id)
    api_key, _ = api_key_create(account=account, created_by=user, name="bench", scopes=["traces"])
    item = RateLimitItemPerMinute(allowance, namespace="bench")

    storages = ["memory://"]
    if redis_reachable(redis_url):
        storages.append(redis_url)
    else:
        print(f"Redis NOT reachable at {redis_url}: memory only")

    rows: dict[str, dict[str, list[float]]] = {}
    for uri in storages:
        column = "memory" if uri == "memory://" else "redis"
        settings.REDIS_URL = "" if column == "memory" else uri
        limiter = get_limiter()
        limiter.storage.reset()
        operations: dict[str, Callable[[], object]] = {}
        if column == "redis":
            operations["Redis PING (baseline)"] = redis.Redis.from_url(uri).ping
        operations["limiter.hit (1 limit)"] = functools.partial(limiter.hit, item, "bench")
        operations["rate_limit_hit (key + account)"] = functools.partial(
            rate_limit_hit, account=account, api_key=api_key
        )
        operations["rate_limit_hit_for_user (+ DB)"] = functools.partial(
            rate_limit_hit_for_user, user_id=user.id
        )
        for label, times in timings_us(operations, iterations).items():
            rows.setdefault(label, {})[column] = times
        limiter_build(uri).storage.reset()

    print(f"rate-limit check: {iterations} calls each, warm limiter; µs per call")
    header = f"{'':32}"
    for column in ("memory", "redis"):
        header += f"{column + ' mean':>13}{'p50':>8}{'p99':>8}"
    print(header)
    labels = sorted(rows, key=lambda label: not label.startswith("Redis PING"))
    for label in labels:
        columns = rows[label]
        line = f"{label:32}"
        for column in ("memory", "redis"):
            if column in columns:
                times = sorted(columns[column])
                p99 = times[int(len(times) * 0.99) - 1]
                line += f"{statistics.mean(times):13.1f}{statistics.median(times):8.1f}{p99:8.1f}"
            else:
                line += f"{'-':>13}{'-':>8}{'-':>8}"
        print(line)
    if "redis" in rows["rate_limit_hit (key + account)"]:
        times = rows["rate_limit_hit (key + account)"]["redis"]
        mean, p50 = statistics.mean(times), statistics.median(times)
        verdict = "met" if max(mean, p50) <= TARGET_US else "NOT met"
        print(
            f"target (rate_limit_hit on Redis <= {TARGET_US:g} µs): "
            f"mean {mean:.1f}, p50 {p50:.1f} -> {verdict}"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=5000, help="calls each (default 5000)")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/15", help="Redis URL")
    arguments = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="agentsite-bench-") as workdir:
        setup_django(workdir)
        main(arguments.iterations, arguments.redis)
