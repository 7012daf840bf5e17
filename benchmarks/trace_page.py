"""How long the trace page takes to generate for 100, 1,000 and 10,000 spans.

Standalone: a temporary SQLite database, migrated from scratch, one user, one chat run
and one trace per size with a realistic tree (run → agent/tools nodes → LLM calls with
prompts and completions, tool calls with arguments and results) whose attributes have
the keys, shapes and sizes capture stores under the default settings: every LLM span's
prompt is as large as the context budget (~24 KB over up to 20 messages), tool results
are cut at TRACING_MAX_PAYLOAD_CHARS. Each page is fetched through django.test.Client
(the full request path: middleware, session, auth, the queries, the template) and timed;
then the detail fragment of the largest LLM span, which the page fetches on selection.

    .venv/bin/python benchmarks/trace_page.py [--requests 20] [--debug]

DEBUG is off by default (as in production: no template debug info, no query log).
"""

import argparse
import json
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
# What capture stores under the default settings: every message's text cut at
# TRACING_MAX_PAYLOAD_CHARS, and a prompt as large as the context budget lets it be
# (AGENT_CONTEXT_TOKENS = 6,000 tokens, about 4 characters a token: ~24,000 characters).
MAX_PAYLOAD_CHARS = 4000
CONTEXT_CHARS = 6000 * 4
MAX_PROMPT_MESSAGES = 20
SYSTEM_PROMPT = (
    "You are Agentsite's assistant, a helpful and precise agent.\n\n"
    + "Use the calculator tool for any arithmetic instead of computing in your head, the "
    "search tool to find sources and fetch_url to read them. Cite every figure. " * 12
)
PROSE = (
    "The city's population has grown steadily since the 1990s, driven mostly by "
    "migration from other regions; the metropolitan area is roughly twice as large as "
    "the municipality, and estimates differ by source and by year of the census. "
)


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


def cut(text: str) -> str:
    """As capture does (RunTracer._cut)."""
    if len(text) <= MAX_PAYLOAD_CHARS:
        return text
    return f"{text[:MAX_PAYLOAD_CHARS]}… [{len(text) - MAX_PAYLOAD_CHARS} more characters]"


def tool_call(step: int, index: int) -> dict[str, Any]:
    name = TOOL_NAMES[(step + index) % 3]
    args: dict[str, Any] = {
        "search": {"query": f"population of the {step + index}th largest city in Europe"},
        "calculator": {"expression": f"{1_000_000 + step * 7919} + {2_000_000 + index * 104729}"},
        "fetch_url": {"url": f"https://en.wikipedia.org/wiki/List_of_cities_{step}_{index}"},
    }[name]
    return {"id": f"call_{step:04d}_{index}_x9Kq2LmN", "name": name, "args": args}


def tool_result(call: dict[str, Any], step: int) -> str:
    """Tool results as they come back: a page of text cut at the payload limit, a list
    of search hits, or a number."""
    if call["name"] == "calculator":
        return f"{3_000_000 + step * 7919:,}"
    if call["name"] == "search":
        hits = [
            {
                "title": f"City #{step + n} — population and demographics",
                "url": f"https://example.org/cities/{step + n}",
                "snippet": PROSE[: 180 + n * 7],
            }
            for n in range(5)
        ]
        return cut(json.dumps(hits, ensure_ascii=False))
    return cut(f"City #{step}\n\n" + PROSE * 40)  # a fetched page: ~9 KB, stored cut


def prompt_for(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The messages of one LLM call: the system prompt, the question, and as much of the
    recent history as fits the context budget (as chat.agent.history.fit_to_budget)."""
    head = history[:2]
    budget = CONTEXT_CHARS - sum(len(m["content"]) for m in head)
    tail: list[dict[str, Any]] = []
    for message in reversed(history[2:]):
        size = len(message["content"]) + len(json.dumps(message.get("tool_calls", "")))
        if size > budget or len(head) + len(tail) >= MAX_PROMPT_MESSAGES:
            break
        tail.append(message)
        budget -= size
    # A tool result is never sent without the call that asked for it.
    while tail and tail[-1]["role"] == "tool":
        tail.pop()
    return head + tail[::-1]


def build_trace(user, span_count: int):  # type: ignore[no-untyped-def]
    """A trace shaped like a long agent run, with the attributes capture writes: each
    step is an `agent` node with one LLM call (its prompt as large as the context),
    then (until the end) a `tools` node with one to three tool calls."""
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
    history: list[dict[str, Any]] = [
        {"role": "system", "content": SYSTEM_PROMPT},
        {
            "role": "human",
            "content": "Compare the populations of the ten largest cities in Europe, "
            "with sources, and compute their total.",
        },
    ]
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
        calls = [tool_call(step, i) for i in range(1 + step % 3)]
        completion = {
            "role": "ai",
            "content": f"Next I will look up cities {step} to {step + len(calls)}.",
            "tool_calls": calls,
        }
        prompt = prompt_for(history)
        llm = Span(
            trace=trace,
            parent=node,
            kind="llm",
            name="gpt-4o-mini",
            started_at=at(clock + 1),
            ended_at=at(clock + 1 + llm_ms),
            duration_ms=llm_ms,
            input_tokens=sum(len(m["content"]) for m in prompt) // 4,
            output_tokens=40 + step % 50,
            cached_tokens=512,
            attributes={
                "provider": "openai",
                "model": "gpt-4o-mini",
                "request": {"temperature": 0.2, "max_tokens": 1024, "tools": list(TOOL_NAMES)},
                "latency_ms": llm_ms,
                "time_to_first_token_ms": round(llm_ms / 3, 3),
                "prompt": prompt,
                "completion": completion,
                "finish_reason": "tool_calls",
                "response_model": "gpt-4o-mini-2024-07-18",
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
            failed = step % 17 == 0
            result = "Error: TimeoutError('read timed out')" if failed else tool_result(call, step)
            spans.append(
                Span(
                    trace=trace,
                    parent=tools,
                    kind="tool",
                    name=call["name"],
                    started_at=at(tool_clock),
                    ended_at=at(tool_clock + tool_ms),
                    duration_ms=tool_ms,
                    status="error" if failed else "ok",
                    error_type="TimeoutError" if failed else "",
                    error_message="read timed out" if failed else "",
                    attributes={
                        "tool": call["name"],
                        "arguments": call["args"],
                        "tool_call_id": call["id"],
                        "result": result,
                        **({"is_error": True} if failed else {}),
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


def prompt_sizes(trace) -> tuple[int, float, int]:  # type: ignore[no-untyped-def]
    """LLM spans, their mean stored prompt size (characters of JSON) and the largest."""
    from tracing.models import Span

    sizes = [
        len(json.dumps(span.attributes["prompt"], ensure_ascii=False))
        for span in Span.objects.filter(trace=trace, kind="llm").only("attributes")
    ]
    return len(sizes), statistics.mean(sizes), max(sizes)


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

    from tracing.models import Span

    user = get_user_model().objects.create_user("bench", password="x")
    client = Client()
    client.force_login(user)
    print(f"trace page generation via django.test.Client, DEBUG={'on' if args.debug else 'off'}")
    header = (
        f"{'spans':>7} {'requests':>8} {'min ms':>9} {'median ms':>10} {'p95 ms':>9} "
        f"{'queries':>8} {'HTML KiB':>9} {'LLM spans':>10} {'prompt KiB avg/max':>19}"
    )
    print(header)
    largest = None
    for span_count in (100, 1_000, 10_000):
        trace = build_trace(user, span_count)
        url = reverse("tracing:detail", args=[trace.run_id])
        # The 10,000-span page is slow by nature; fewer samples keep the run short.
        requests = args.requests if span_count <= 1_000 else max(3, args.requests // 4)
        with CaptureQueriesContext(connection) as queries:
            client.get(url)
        query_count = len(queries)
        stats = measure(client, url, requests)
        llm_spans, mean_prompt, max_prompt = prompt_sizes(trace)
        print(
            f"{span_count:>7} {requests:>8} {stats['min']:>9.1f} {stats['median']:>10.1f} "
            f"{stats['p95']:>9.1f} {query_count:>8} {stats['kib']:>9.0f} {llm_spans:>10} "
            f"{mean_prompt / 1024:>10.1f} / {max_prompt / 1024:.1f}"
        )
        if span_count == 1_000:
            largest = max(
                Span.objects.filter(trace=trace, kind="llm").only("attributes"),
                key=lambda span: len(json.dumps(span.attributes["prompt"])),
            )

    assert largest is not None
    url = reverse("tracing:span", args=[largest.trace_id, largest.id])
    stats = measure(client, url, args.requests * 5)
    print()
    print("span detail fragment (the largest LLM span of the 1,000-span trace)")
    print(f"{'requests':>8} {'min ms':>9} {'median ms':>10} {'p95 ms':>9} {'HTML KiB':>9}")
    print(
        f"{args.requests * 5:>8} {stats['min']:>9.1f} {stats['median']:>10.1f} "
        f"{stats['p95']:>9.1f} {stats['kib']:>9.1f}"
    )


if __name__ == "__main__":
    main()
