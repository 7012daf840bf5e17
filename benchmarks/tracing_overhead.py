"""How much does tracing cost a run? Same multi-step run, tracing on vs off, one process.

    .venv/bin/python benchmarks/tracing_overhead.py [--runs N]

Uses agentsite.test_settings against a fresh temporary SQLite database, the built-in
offline model with no token delay, and a message that makes the model call the
calculator three times in one step (so a run is: model → 3 tools → model). Runs are
interleaved (on, off, on, off, ...) so drift in the machine affects both sides alike.

Per run, two times, both judged against the per-run target: until the final event is
sent (what the user waits for: the last spans are written in the run's finishing
transaction, with the ledger's costs, before that event), and the whole `execute_run`
(what the process spends). Per span: the time spent inside the tracer's callbacks (on
the request path, between tokens and tool calls), divided by the spans recorded. The
callbacks are timed here, by a subclass that wraps each one, so production code carries
no instrumentation; the wrapper's own call adds a little to what it measures.
"""

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "agentsite.test_settings")
os.environ["LOG_LEVEL"] = "WARNING"

MESSAGE = "What is 2*3 and 4*5 and 6*7?"
# Every callback RunTracer implements (all of them run on the request path).
CALLBACKS = (
    "on_chain_start",
    "on_chain_end",
    "on_chain_error",
    "on_chat_model_start",
    "on_llm_new_token",
    "on_llm_end",
    "on_llm_error",
    "on_tool_start",
    "on_tool_end",
    "on_tool_error",
)
TARGET_OVERHEAD_PCT = 5.0
TARGET_SPAN_US = 25.0


def setup_django(workdir: str) -> None:
    import django
    from django.conf import settings

    settings.DATABASES["default"]["NAME"] = os.path.join(workdir, "bench.sqlite3")
    settings.AGENT_CHECKPOINT_SQLITE_PATH = os.path.join(workdir, "checkpoints.sqlite3")
    settings.AGENT_OFFLINE_TOKEN_DELAY = 0.0
    settings.OTEL_EXPORTER_OTLP_ENDPOINT = ""
    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0)


async def main(runs: int) -> None:
    from channels.db import database_sync_to_async
    from django.conf import settings
    from django.contrib.auth import get_user_model

    from chat.agent import runner
    from chat.models import Conversation, Message, Run
    from tracing.capture import RunTracer

    tracers: list[RunTracer] = []
    callback_seconds: dict[int, float] = {}

    def timed(name: str) -> Callable[..., None]:
        callback = getattr(RunTracer, name)

        def wrapper(self: RunTracer, *args: Any, **kwargs: Any) -> None:
            began = time.perf_counter()
            callback(self, *args, **kwargs)
            callback_seconds[id(self)] += time.perf_counter() - began

        return wrapper

    class TimedTracer(RunTracer):
        def __init__(self, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            callback_seconds[id(self)] = 0.0
            tracers.append(self)

    for name in CALLBACKS:
        setattr(TimedTracer, name, timed(name))

    runner.RunTracer = TimedTracer  # type: ignore[misc]
    answered: list[float] = []
    original_finish = runner.run_finish_and_publish

    async def timed_finish(**kwargs):  # type: ignore[no-untyped-def]
        finished = await original_finish(**kwargs)
        answered.append(time.perf_counter())
        return finished

    runner.run_finish_and_publish = timed_finish

    def new_run() -> Run:
        user, _ = get_user_model().objects.get_or_create(username="bench")
        conversation = Conversation.objects.create(owner=user)
        run = Run.objects.create(conversation=conversation, model="offline")
        Message.objects.create(conversation=conversation, run=run, role="user", content=MESSAGE)
        return run

    async def one(traced: bool) -> tuple[float, float]:
        settings.TRACING_ENABLED = traced
        run = await database_sync_to_async(new_run)()
        began = time.perf_counter()
        await runner.execute_run(run.id)
        ended = time.perf_counter()
        run = await Run.objects.aget(id=run.id)
        assert run.status == Run.Status.COMPLETED, (run.status, run.error_message)
        return answered[-1] - began, ended - began

    for _ in range(5):  # warm up: imports, graph compilation, SQLite caches
        await one(True)
        await one(False)
    tracers.clear()
    callback_seconds.clear()

    on: list[tuple[float, float]] = []
    off: list[tuple[float, float]] = []
    for index in range(runs):
        # Alternate which goes first, so neither side always follows the other.
        order = (True, False) if index % 2 == 0 else (False, True)
        for traced in order:
            (on if traced else off).append(await one(traced))

    spans = [len(t._rows) for t in tracers]  # every span, written at finish
    callback_us = [callback_seconds[id(t)] * 1e6 for t in tracers]
    per_span_us = sum(callback_us) / sum(spans)

    print(f"tracing overhead: {runs} runs each way, interleaved; message {MESSAGE!r}")
    print(f"{'per run, ms':34}{'tracing off':>12}{'tracing on':>12}{'overhead':>10}")
    results = {}
    for column, label in ((0, "until the answer"), (1, "whole run incl. trace write")):
        times_on = [t[column] * 1e3 for t in on]
        times_off = [t[column] * 1e3 for t in off]
        for stat, fn in (("mean", statistics.mean), ("p50", statistics.median)):
            a, b = fn(times_off), fn(times_on)
            results[(column, stat)] = (b - a) / a * 100
            print(
                f"{label + ' (' + stat + ')':34}{a:12.2f}{b:12.2f}{results[(column, stat)]:9.1f}%"
            )
    print(f"spans per run: {statistics.mean(spans):.0f}")
    print(
        f"time in tracer callbacks per run: {statistics.mean(callback_us):.1f} µs "
        f"= {per_span_us:.2f} µs per span on the request path"
    )
    print(
        f"targets (per run <= {TARGET_OVERHEAD_PCT:g}% at p50, per span <= {TARGET_SPAN_US:g} µs):"
    )
    for column, label in ((0, "until the answer"), (1, "whole run incl. trace write")):
        overhead = results[(column, "p50")]
        verdict = "met" if overhead <= TARGET_OVERHEAD_PCT else "NOT met"
        print(f"  per run, {label}: {overhead:.1f}% -> {verdict}")
    verdict = "met" if per_span_us <= TARGET_SPAN_US else "NOT met"
    print(f"  per span on the request path: {per_span_us:.2f} µs -> {verdict}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=40, help="runs each way (default 40)")
    arguments = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="agentsite-bench-") as workdir:
        setup_django(workdir)
        asyncio.run(main(arguments.runs))
