"""What does budget enforcement add to each LLM call? Reserve and settle, PostgreSQL and SQLite.

    .venv/bin/python benchmarks/budget_reservation.py [--database sqlite|postgres|both]
        [--iterations N] [--debug]

Each database runs in its own subprocess of this script (settings are read once per
process), configured from the environment like a deployment, with agentsite.settings:
PostgreSQL at 127.0.0.1:5432 (user postgres, trust auth) in a fresh database
`agentsite_bench_<random>` that is dropped at the end, and SQLite in a temporary file
(WAL, IMMEDIATE transactions, as the settings make it). Each child migrates, makes one
user and account with every money and token limit set far above what the benchmark
spends (so every check runs its queries and none refuses), and prints its results as
JSON; the parent prints them side by side.

Rows, each N times after 200 untimed warm-up rounds, interleaved call by call so a busy
machine weighs on every row alike (compare a row's p99 with the baseline's before
blaming the code for it):

- SELECT 1: one bare round trip through Django's connection, the floor for any query.
- atomic + SELECT 1: an otherwise empty `transaction.atomic()`, i.e. BEGIN and COMMIT
  added to that round trip; the floor for anything that must be atomic.
- budget_reserve: the quota check and reservation made before each LLM call (model
  "gpt-4.1-mini", seeded price; a new run every 8 calls, a new call id each).
- budget_settle: the same reservation settled with the call's usage.
- reserve + settle: both, back to back: the whole per-call cost.

Then, on a further sample of calls, the queries each makes (CaptureQueriesContext) and
the time each query takes (an execute wrapper with a µs clock; Django's own query log
keeps only milliseconds), and the COMMIT's. The query count is what the capture
records, which includes a transaction's BEGIN and COMMIT. On PostgreSQL psycopg sends
the BEGIN inside a transaction's first query's execute, so its round trip is in that
query's time; on SQLite it is the BEGIN IMMEDIATE listed. What the sample's total
leaves over is Python: the ORM building queries and model instances. price_for_model,
which both call, is also timed alone.

On PostgreSQL, one more line: 8 threads reserving and settling at once against the same
account for about 2 s (reservations serialize on the account's row lock; the threads
share one interpreter, so the Python of the calls does not run in parallel): calls per
second and the latency of each reserve + settle. A transaction PostgreSQL aborts as a
deadlock is counted and retried, as a caller would have to (the detection waits
deadlock_timeout, 1 s by default); the calls in flight when the 2 s are up finish.

DEBUG is off by default (a 50-character SECRET_KEY, ALLOWED_HOSTS=localhost), as in
production; --debug measures with it on, where Django logs every query through its
debug cursor (a little more per query, within the noise here).

Target (the issue): the quota check and reservation under 1 ms per LLM call on
PostgreSQL (mean and p50 of budget_reserve).
"""

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

POSTGRES_SERVER = "postgresql://postgres@127.0.0.1:5432"
MODEL = "gpt-4.1-mini"
PROMPT_TOKENS = 1_200
MAX_OUTPUT_TOKENS = 1_024
CALLS_PER_RUN = 8
WARMUP = 200
QUERY_SAMPLE = 200
THREADS = 8
CONCURRENT_SECONDS = 2.0
TARGET_US = 1_000.0
ROWS = ("SELECT 1", "atomic + SELECT 1", "budget_reserve", "budget_settle", "reserve + settle")


# --- child: one database, one process ------------------------------------------------


def setup_django() -> None:
    os.environ["DJANGO_SETTINGS_MODULE"] = "agentsite.settings"
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0)


def make_account() -> tuple[int, int]:
    """A user and their account, every limit budget_reserve checks set high."""
    from decimal import Decimal

    from django.contrib.auth import get_user_model

    from billing.services import account_for_user

    user = get_user_model().objects.create_user("bench")
    account = account_for_user(user_id=user.pk)
    account.money_per_day_usd = Decimal("9999999")
    account.money_per_month_usd = Decimal("99999999")
    account.money_per_run_usd = Decimal("9999999")
    account.tokens_per_day = 10**15
    account.save()
    return account.pk, user.pk


class Caller:
    """Reserves and settles like a run does: a new run id every CALLS_PER_RUN calls."""

    def __init__(self, account_id: int, user_id: int) -> None:
        from billing.budget import Usage

        self.account_id = account_id
        self.user_id = user_id
        self.usage = Usage(input_tokens=PROMPT_TOKENS, output_tokens=300)
        self.calls = 0
        self.run_id = uuid.uuid4()

    def reserve(self) -> Any:
        from billing.budget import budget_reserve

        if self.calls % CALLS_PER_RUN == 0:
            self.run_id = uuid.uuid4()
        self.calls += 1
        return budget_reserve(
            account_id=self.account_id,
            user_id=self.user_id,
            run_id=self.run_id,
            call_id=uuid.uuid4(),
            model=MODEL,
            prompt_tokens=PROMPT_TOKENS,
            max_output_tokens=MAX_OUTPUT_TOKENS,
        )

    def settle(self, reservation: Any) -> None:
        from billing.budget import budget_settle

        assert budget_settle(reservation=reservation, usage=self.usage)

    def reserve_and_settle(self) -> None:
        self.settle(self.reserve())


def stats_us(times: list[float]) -> dict[str, float]:
    ordered = sorted(times)

    def pct(p: float) -> float:
        return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]

    return {"mean": statistics.mean(ordered), "p50": pct(50), "p95": pct(95), "p99": pct(99)}


def timings_us(caller: Caller, iterations: int) -> dict[str, list[float]]:
    """Every row's times, interleaved call by call."""
    times: dict[str, list[float]] = {row: [] for row in ROWS}
    clock = time.perf_counter
    for index in range(WARMUP + iterations):
        t0 = clock()
        select_1()
        t1 = clock()
        atomic_select_1()
        t2 = clock()
        reservation = caller.reserve()
        t3 = clock()
        caller.settle(reservation)
        t4 = clock()
        caller.reserve_and_settle()
        t5 = clock()
        if index >= WARMUP:
            for row, began, ended in zip(
                ROWS, (t0, t1, t2, t3, t4), (t1, t2, t3, t4, t5), strict=True
            ):
                times[row].append((ended - began) * 1e6)
    return times


def select_1() -> None:
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
        cursor.fetchone()


def atomic_select_1() -> None:
    from django.db import connection, transaction

    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute("SELECT 1")
        cursor.fetchone()


def query_label(sql: str) -> str:
    """'SELECT billing_account FOR UPDATE', 'UPDATE billing_dailyspend', …"""
    words = sql.replace('"', "").split()
    verb = words[0].upper()
    marker = {"SELECT": "FROM", "INSERT": "INTO", "DELETE": "FROM", "UPDATE": "UPDATE"}
    table = "?"
    if verb in marker:
        upper = [w.upper() for w in words]
        if marker[verb] in upper:
            table = words[upper.index(marker[verb]) + 1]
    if verb not in marker:
        return sql  # BEGIN IMMEDIATE (SQLite), COMMIT
    label = f"{verb} {table}"
    if verb == "SELECT" and ("SUM(" in sql.upper()):
        label += " (sums)"
    for lock in ("FOR UPDATE", "FOR NO KEY UPDATE"):
        if lock in sql.upper():
            label += f" {lock}"
    return label


def query_profile(operation: Callable[[], Any], samples: int) -> dict[str, Any]:
    """The queries one call makes (CaptureQueriesContext) and each one's time in µs."""
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    counts: list[int] = []
    per_query: list[list[float]] = []
    labels: list[str] = []
    totals: list[float] = []
    timed: list[tuple[str, float]] = []

    def wrapper(execute, sql, params, many, context):  # type: ignore[no-untyped-def]
        began = time.perf_counter()
        try:
            return execute(sql, params, many, context)
        finally:
            timed.append((sql, (time.perf_counter() - began) * 1e6))

    # COMMIT is no query: timed here, by wrapping this connection's _commit.
    commit = connection._commit  # type: ignore[attr-defined]

    def timed_commit() -> None:
        began = time.perf_counter()
        try:
            commit()
        finally:
            timed.append(("COMMIT", (time.perf_counter() - began) * 1e6))

    connection._commit = timed_commit  # type: ignore[attr-defined]
    try:
        for _ in range(samples):
            timed.clear()
            # The capture counts by the log's length, which stops growing at its cap (9000
            # queries), reached early with DEBUG on: start each sample from an empty log.
            connection.queries_log.clear()
            with (
                connection.execute_wrapper(wrapper),
                CaptureQueriesContext(connection) as captured,
            ):
                began = time.perf_counter()
                operation()
                totals.append((time.perf_counter() - began) * 1e6)
            counts.append(len(captured.captured_queries))
            if not labels:
                labels = [query_label(sql) for sql, _ in timed]
                per_query = [[] for _ in timed]
            if len(timed) == len(labels):
                for index, (_, us) in enumerate(timed):
                    per_query[index].append(us)
    finally:
        del connection._commit  # type: ignore[attr-defined]
    queries = [
        {"label": label, "mean": statistics.mean(us), "p50": statistics.median(us)}
        for label, us in zip(labels, per_query, strict=True)
    ]
    return {
        "queries_per_call": statistics.mean(counts),
        "queries": queries,
        "total_p50": statistics.median(totals),
    }


def concurrent(account_id: int, user_id: int) -> dict[str, float]:
    """THREADS threads reserving and settling at once against one account. A transaction
    PostgreSQL aborts as a deadlock is counted and retried, as a caller would have to;
    the retry's wait is in the call's latency."""
    from django.db import OperationalError, connection

    latencies: list[list[float]] = [[] for _ in range(THREADS)]
    deadlocks = [0] * THREADS
    errors: list[BaseException] = []
    window = [0.0, 0.0]  # start, stop: set as the barrier releases the threads

    def open_window() -> None:
        window[0] = time.perf_counter()
        window[1] = window[0] + CONCURRENT_SECONDS

    start = threading.Barrier(THREADS, action=open_window)
    warming = threading.Lock()

    def work(index: int) -> None:
        caller = Caller(account_id, user_id)

        def retrying(operation: Callable[[], Any]) -> Any:
            while True:
                try:
                    return operation()
                except OperationalError as error:
                    if "deadlock detected" not in str(error):
                        raise
                    deadlocks[index] += 1

        def call() -> None:
            reservation = retrying(caller.reserve)
            retrying(lambda: caller.settle(reservation))

        try:
            with warming:  # each thread's own connection, warm; one at a time
                for _ in range(3):
                    call()
            start.wait()
            while time.perf_counter() < window[1]:
                began = time.perf_counter()
                call()
                latencies[index].append((time.perf_counter() - began) * 1e6)
        except threading.BrokenBarrierError:
            pass  # another thread failed; its error is reported
        except BaseException as error:  # reported by the main thread
            errors.append(error)
            start.abort()
        finally:
            connection.close()

    threads = [threading.Thread(target=work, args=(i,)) for i in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - window[0]
    if errors:
        raise errors[0]
    every = [us for thread_times in latencies for us in thread_times]
    return {
        "calls": len(every),
        "calls_per_s": len(every) / elapsed,
        "seconds": elapsed,
        "deadlocks": sum(deadlocks),
        **stats_us(every),
    }


def check_books(account_id: int) -> None:
    """What was reserved was all settled, and the counters match the ledger."""
    from decimal import Decimal

    from django.db.models import Sum

    from billing.models import BudgetReservation, DailySpend, UsageRecord

    assert not BudgetReservation.objects.filter(account_id=account_id).exists()
    counters = DailySpend.objects.filter(account_id=account_id).aggregate(
        spent=Sum("spent_usd"), reserved=Sum("reserved_usd")
    )
    ledger = UsageRecord.objects.filter(account_id=account_id).aggregate(spent=Sum("cost_usd"))
    # SQLite keeps decimals as floating point: equal to the 8 decimals the ledger stores.
    assert abs(counters["reserved"]) < Decimal("0.000000005"), counters
    assert abs(counters["spent"] - ledger["spent"]) < Decimal("0.000000005"), (counters, ledger)


def one(database: str, iterations: int) -> dict[str, Any]:
    setup_django()
    from django.db import connection

    from billing.models import ModelPrice
    from billing.pricing import price_for_model

    account_id, user_id = make_account()
    caller = Caller(account_id, user_id)
    times = timings_us(caller, iterations)
    reservations: list[Any] = []
    profiles = {
        "budget_reserve": query_profile(
            lambda: reservations.append(caller.reserve()), QUERY_SAMPLE
        ),
        "budget_settle": query_profile(lambda: caller.settle(reservations.pop(0)), QUERY_SAMPLE),
        "reserve + settle": query_profile(caller.reserve_and_settle, QUERY_SAMPLE),
    }
    baselines = {"SELECT 1": select_1, "atomic + SELECT 1": atomic_select_1}
    counts = {
        row: query_profile(op, QUERY_SAMPLE)["queries_per_call"] for row, op in baselines.items()
    }
    price_us = []
    for _ in range(QUERY_SAMPLE):
        began = time.perf_counter()
        price_for_model(model=MODEL)
        price_us.append((time.perf_counter() - began) * 1e6)
    with connection.cursor() as cursor:
        cursor.execute("SELECT version()" if database == "postgres" else "SELECT sqlite_version()")
        version = cursor.fetchone()[0]
    result: dict[str, Any] = {
        "database": database,
        "version": version.split(" on ")[0] if database == "postgres" else f"SQLite {version}",
        "iterations": iterations,
        "stats": {row: stats_us(values) for row, values in times.items()},
        "queries_per_call": {
            **counts,
            **{row: p["queries_per_call"] for row, p in profiles.items()},
        },
        "profiles": {row: profiles[row] for row in ("budget_reserve", "budget_settle")},
        "price_for_model": {
            "prices": ModelPrice.objects.filter(active=True).count(),
            **stats_us(price_us),
        },
    }
    if database == "postgres":
        result["concurrent"] = concurrent(account_id, user_id)
    check_books(account_id)
    connection.close()
    return result


# --- parent: one subprocess per database, one table --------------------------------------


def run_child(database: str, url: str, iterations: int, debug: bool, workdir: str) -> dict:
    env = {
        **os.environ,
        "AGENTSITE_READ_DOTENV": "false",
        "DEBUG": "true" if debug else "false",
        "SECRET_KEY": "budget-reservation-benchmark-" + "x" * 40,
        "ALLOWED_HOSTS": "localhost",
        "LOG_LEVEL": "WARNING",
        "DATABASE_URL": url,
        "AGENT_CHECKPOINT_SQLITE_PATH": os.path.join(workdir, f"checkpoints-{database}.sqlite3"),
    }
    env.pop("AGENT_REDIS_URL", None)
    done = subprocess.run(
        [sys.executable, __file__, "--one", database, "--iterations", str(iterations)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        text=True,
        timeout=1800,
    )
    if done.returncode:
        raise SystemExit(f"the {database} run failed (exit {done.returncode})")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_postgres(iterations: int, debug: bool, workdir: str) -> dict:
    import psycopg

    name = f"agentsite_bench_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(f"{POSTGRES_SERVER}/postgres", autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {name}")
    try:
        return run_child("postgres", f"{POSTGRES_SERVER}/{name}", iterations, debug, workdir)
    finally:
        with psycopg.connect(f"{POSTGRES_SERVER}/postgres", autocommit=True) as admin:
            admin.execute(f"DROP DATABASE {name} WITH (FORCE)")


def report(results: list[dict], debug: bool) -> None:
    names = [r["database"] for r in results]
    print(
        f"budget enforcement per LLM call: {results[0]['iterations']} calls per row, interleaved, "
        f"after {WARMUP} warm-up rounds; model {MODEL}, {PROMPT_TOKENS} prompt + "
        f"{MAX_OUTPUT_TOKENS} max output tokens, a new run every {CALLS_PER_RUN} calls; "
        f"DEBUG {'on' if debug else 'off'}"
    )
    for r in results:
        print(f"  {r['database']}: {r['version']}")
    columns = ("mean", "p50", "p95", "p99")
    width = 9 * len(columns) + 8
    print()
    print(f"{'µs per call':20}" + "".join(f"{'| ' + name:{width}}" for name in names))
    print(
        f"{'':20}"
        + "".join("| " + "".join(f"{c:>9}" for c in columns) + f"{'queries':>8}" for _ in names)
    )
    for row in ROWS:
        line = f"{row:20}"
        for r in results:
            s = r["stats"][row]
            line += "| " + "".join(f"{s[c]:9.0f}" for c in columns)
            line += f"{r['queries_per_call'][row]:8.1f}"
        print(line)
    for r in results:
        print()
        print(f"{r['database']}: per query, µs (a sample of {QUERY_SAMPLE} calls of each)")
        for row, profile in r["profiles"].items():
            stats = r["stats"][row]
            in_queries = sum(q["p50"] for q in profile["queries"])
            print(f"  {row}  (p50 {stats['p50']:.0f} in the timed rows)")
            for index, query in enumerate(profile["queries"], 1):
                label = f"{index}. {query['label']}"
                print(f"    {label:53}{query['mean']:7.0f} mean{query['p50']:7.0f} p50")
            print(
                f"    {'Python (p50 of the sample, less the queries)':53}"
                f"{profile['total_p50'] - in_queries:12.0f} p50"
            )
        price = r["price_for_model"]
        print(
            f"  of which price_for_model, called by both ({price['prices']} active prices): "
            f"mean {price['mean']:.0f}, p50 {price['p50']:.0f}"
        )
    for r in results:
        if "concurrent" in r:
            c = r["concurrent"]
            serial = 1e6 / r["stats"]["reserve + settle"]["mean"]
            print()
            print(
                f"{r['database']}, {THREADS} threads reserving + settling at once on one account "
                f"for {CONCURRENT_SECONDS:g} s (the last call ended after {c['seconds']:.1f} s): "
                f"{c['calls']} calls, {c['calls_per_s']:.1f} calls/s "
                f"(one thread alone: {serial:.0f}); latency p50 {c['p50']:.0f} µs, "
                f"p99 {c['p99']:.0f} µs; deadlocks detected (and retried): {c['deadlocks']}"
            )
    print()
    print(f"target: budget_reserve under {TARGET_US / 1000:g} ms per LLM call on PostgreSQL")
    for r in results:
        s = r["stats"]["budget_reserve"]
        met = s["mean"] < TARGET_US and s["p50"] < TARGET_US
        note = "" if r["database"] == "postgres" else " (for reference)"
        print(
            f"  {r['database']}{note}: mean {s['mean']:.0f} µs, p50 {s['p50']:.0f} µs, "
            f"p99 {s['p99']:.0f} µs -> {'met' if met else 'NOT met'}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--database", choices=("sqlite", "postgres", "both"), default="both")
    parser.add_argument("--iterations", type=int, default=2000, help="calls per row (2000)")
    parser.add_argument("--debug", action="store_true", help="measure with DEBUG on")
    parser.add_argument("--one", choices=("sqlite", "postgres"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.iterations)))
        return
    # On SIGTERM (a timeout), unwind: the child is killed and the database dropped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    databases = ("postgres", "sqlite") if args.database == "both" else (args.database,)
    results = []
    with tempfile.TemporaryDirectory(prefix="agentsite-bench-") as workdir:
        for database in databases:
            if database == "postgres":
                results.append(run_postgres(args.iterations, args.debug, workdir))
            else:
                url = f"sqlite:///{os.path.join(workdir, 'bench.sqlite3')}"
                results.append(run_child("sqlite", url, args.iterations, args.debug, workdir))
    report(results, args.debug)


if __name__ == "__main__":
    main()
