"""How long the trace page takes to generate for 100, 1,000 and 10,000 spans.

Standalone: a temporary SQLite database, migrated from scratch, one user, one chat run
and one trace per size with a realistic tree (run → agent/tools nodes → LLM calls with
prompts and completions, tool calls with arguments and results). Each page is fetched
through django.test.Client (the full request path: middleware, session, auth, the two
queries, the template) and timed.

    .venv/bin/python benchmarks/trace_page.py [--requests 20] [--debug]

DEBUG is off by default (as in production: no template debug info, no query log).
"""

import argparse
import os
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ["DJANGO_SETTINGS_MODULE"] = "agentsite.test_settings"

import django
from django.conf import settings

TOOL_NAMES = ("search", "calculator", "fetch_url")


def configure(debug: bool) -> None:
    database = Path(tempfile.mkdtemp(prefix="agentsite-bench-")) / "bench.sqlite3"
    settings.DATABASES["default"]["NAME"] = str(database)
    settings.DEBUG = debug
    settings.ALLOWED_HOSTS = [*settings.ALLOWED_HOSTS, "testserver"]
    engine: dict[str, Any] = settings.TEMPLATES[0]
    engine.setdefault("OPTIONS", {})["debug"] = debug
    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0)


def build_trace(user, span_count: int):  # type: ignore[no-untyped-def]
    """A trace shaped like a long agent run: each step is an `agent` node with one LLM
    call, then (until the end) a `tools` node with one to three tool calls."""
    from chat.models import Conversation, Run
    from tracing.models import Span, Trace

    started = datetime(2025, 3, 14, 9, 0, tzinfo=UTC)
    conversation = Conversation.objects.create(owner=user, title=f"{span_count} spans")
    run = Run.objects.create(conversation=conversation, model="gpt-4o-mini", status="completed")
    trace = Trace.objects.create(
        run=run, user=user, status="ok", model="gpt-4o-mini", started_at=started
    )

    def at(ms: float) -> datetime:
        return started + timedelta(milliseconds=ms)

    root = Span(
        trace=trace,
        kind="run",
        name="run",
        started_at=started,
        ended_at=started,
        duration_ms=0,
        attributes={"provider": "openai", "model": "gpt-4o-mini"},
    )
    spans, clock, step = [root], 0.0, 0
    history: list[dict[str, Any]] = []
    history.append({"role": "system", "content": "You are a helpful research assistant. " * 8})
    history.append(
        {
            "role": "human",
            "content": "Compare the populations of the ten largest "
            "cities in Europe and compute their total.",
        }
    )
    while len(spans) < span_count:
        step += 1
        llm_ms = 400 + (step * 37) % 900
        node = Span(
            trace=trace,
            parent=root,
            kind="node",
            name="agent",
            started_at=at(clock),
            ended_at=at(clock + llm_ms + 2),
            duration_ms=llm_ms + 2,
            attributes={"langgraph.step": step, "langgraph.triggers": ["branch:to:agent"]},
        )
        calls: list[dict[str, Any]] = [
            {
                "id": f"call_{step}_{i}",
                "name": TOOL_NAMES[(step + i) % 3],
                "args": {"query": f"population of city #{step + i}", "limit": 5},
            }
            for i in range(1 + step % 3)
        ]
        completion = {"role": "ai", "content": "", "tool_calls": calls}
        llm = Span(
            trace=trace,
            parent=node,
            kind="llm",
            name="chat gpt-4o-mini",
            started_at=at(clock + 1),
            ended_at=at(clock + 1 + llm_ms),
            duration_ms=llm_ms,
            input_tokens=800 + step * 120,
            output_tokens=40 + step % 50,
            cached_tokens=512,
            attributes={
                "provider": "openai",
                "model": "gpt-4o-mini",
                "request": {"temperature": 0.2, "max_tokens": 1024, "tools": list(TOOL_NAMES)},
                "latency_ms": llm_ms,
                "time_to_first_token_ms": llm_ms / 3,
                # Capture keeps the prompt to a bounded size; so does this benchmark.
                "prompt": history if len(history) <= 8 else history[:2] + history[-6:],
                "completion": completion,
                "finish_reason": "tool_calls",
            },
        )
        spans += [node, llm]
        clock += llm_ms + 3
        history.append(completion)
        if len(spans) >= span_count:
            break
        tools = Span(
            trace=trace,
            parent=root,
            kind="node",
            name="tools",
            started_at=at(clock),
            ended_at=at(clock),
            duration_ms=0,
            attributes={"langgraph.step": step, "langgraph.triggers": ["agent"]},
        )
        spans.append(tools)
        tool_clock = clock
        for call in calls[: span_count - len(spans)]:
            tool_ms = 50 + (step * 53) % 400
            result = f"City #{step}: about {1_000_000 + step * 7919} inhabitants (2023 census)."
            spans.append(
                Span(
                    trace=trace,
                    parent=tools,
                    kind="tool",
                    name=call["name"],
                    started_at=at(tool_clock),
                    ended_at=at(tool_clock + tool_ms),
                    duration_ms=tool_ms,
                    status="error" if step % 17 == 0 else "ok",
                    error_type="TimeoutError" if step % 17 == 0 else "",
                    attributes={
                        "tool": call["name"],
                        "arguments": call["args"],
                        "tool_call_id": call["id"],
                        "result": result,
                    },
                )
            )
            history.append({"role": "tool", "content": result, "tool_call_id": call["id"]})
            tool_clock += tool_ms
        tools.ended_at, tools.duration_ms = at(tool_clock), tool_clock - clock
        clock = tool_clock + 1
    root.ended_at, root.duration_ms = at(clock), clock
    Span.objects.bulk_create(spans, batch_size=500)
    Trace.objects.filter(pk=trace.pk).update(
        status="ok",
        ended_at=at(clock),
        duration_ms=clock,
        span_count=len(spans),
        input_tokens=sum(s.input_tokens for s in spans),
        output_tokens=sum(s.output_tokens for s in spans),
    )
    return trace


def measure(client, url: str, requests: int) -> dict[str, float]:  # type: ignore[no-untyped-def]
    client.get(url)  # warm up: template compilation, first-query caches
    timings = []
    for _ in range(requests):
        start = time.perf_counter()
        response = client.get(url)
        timings.append((time.perf_counter() - start) * 1000)
        assert response.status_code == 200, response.status_code
    timings.sort()
    return {
        "min": timings[0],
        "median": statistics.median(timings),
        "p95": timings[min(len(timings) - 1, round(0.95 * (len(timings) - 1)))],
        "kib": len(response.content) / 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--debug", action="store_true", help="render with DEBUG on")
    args = parser.parse_args()
    configure(args.debug)

    from django.contrib.auth import get_user_model
    from django.db import connection
    from django.test import Client
    from django.test.utils import CaptureQueriesContext
    from django.urls import reverse

    user = get_user_model().objects.create_user("bench", password="x")
    client = Client()
    client.force_login(user)
    print(f"trace page generation via django.test.Client, DEBUG={'on' if args.debug else 'off'}")
    print(
        f"{'spans':>7} {'requests':>8} {'min ms':>9} {'median ms':>10} {'p95 ms':>9} "
        f"{'queries':>8} {'HTML KiB':>9}"
    )
    for span_count in (100, 1_000, 10_000):
        trace = build_trace(user, span_count)
        url = reverse("tracing:detail", args=[trace.run_id])
        # The 10,000-span baseline is slow by nature; fewer samples keep the run short.
        requests = args.requests if span_count <= 1_000 else max(3, args.requests // 4)
        with CaptureQueriesContext(connection) as queries:
            client.get(url)
        query_count = len(queries)
        stats = measure(client, url, requests)
        print(
            f"{span_count:>7} {requests:>8} {stats['min']:>9.1f} {stats['median']:>10.1f} "
            f"{stats['p95']:>9.1f} {query_count:>8} {stats['kib']:>9.0f}"
        )


if __name__ == "__main__":
    main()
