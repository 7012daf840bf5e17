"""Where a profile of the server spent its samples (turn_cost.py --profile writes one):

    .venv/bin/python benchmarks/profile_summary.py /work/prof/before-sqlite.txt [--top 25]

The input is py-spy's raw format: one line per distinct stack, `frame;frame;... count`,
each frame `function (file:line)`, outermost first. py-spy records busy threads only, so
the shares are of busy samples (the event loop and the database thread both count).
Prints markdown: the shares of a few named costs (a sample counts once per cost, however
many of its frames match), the top functions of the project's own code and of all code
by inclusive share, and the top files by self share (where the leaf frame is).
"""

import argparse
import re
from collections import Counter
from pathlib import Path

FRAME = re.compile(r"^(?P<function>.*) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")
PROJECT = ("chat/", "billing/", "tracing/", "agentsite/", "benchmarks/")

# Named costs: a sample belongs to a cost when any of its frames matches. They overlap
# (a commit on the database thread counts for both); each is a share of all samples.
# py-spy names files from their top-level package, so LangGraph's namespace packages
# show as pregel/, graph/, serde/, sqlite/aio.py (the SQLite saver), postgres/aio.py.
MARKERS: list[tuple[str, tuple[str, ...]]] = [
    (
        "on the database thread (database_sync_to_async: the work and its hop)",
        ("thread_handler (",),
    ),
    (
        "opening and closing Django database connections",
        (
            "get_new_connection (",
            "connect (django/db/backends",
            "close (django/db/backends",
            "close_old_connections (",
            "close_if_unusable_or_obsolete (",
        ),
    ),
    ("transaction commits (Django and the checkpointer)", ("commit (",)),
    ("Django ORM (django/db/)", ("(django/db/",)),
    (
        "LangGraph checkpointer (saver, serde, aiosqlite)",
        (
            "(sqlite/aio.py",
            "(postgres/aio.py",
            "(postgres/base.py",
            "(serde/",
            "(aiosqlite/",
        ),
    ),
    (
        "LangGraph and LangChain (graph, model, tools, callbacks)",
        (
            "(pregel/",
            "(graph/",
            "(_internal/",
            "(prebuilt/",
            "(langchain_core/",
        ),
    ),
    ("offline model", ("offline_model.py",)),
    ("billing/ (budget, ledger, rate limit, display)", ("(billing/",)),
    ("tracing/", ("(tracing/",)),
    ("event log, channel layer", ("(chat/events.py", "(channels/layers", "(channels_redis/")),
    ("WebSocket consumer (chat/consumers.py)", ("(chat/consumers.py",)),
    ("Redis client", ("(redis/",)),
    ("psycopg", ("(psycopg/", "(psycopg_pool/")),
]
# Where the sample's leaf frame is: time spent in the machinery itself.
LEAF_MARKERS: list[tuple[str, tuple[str, ...]]] = [
    (
        "hop machinery (leaf in asgiref, concurrent.futures, threading, channels/db.py)",
        ("(asgiref/", "(concurrent/futures/", "(threading.py", "(channels/db.py"),
    ),
    ("event loop machinery (leaf in asyncio, selectors)", ("(asyncio/", "(selectors.py")),
]


def parse(path: Path) -> list[tuple[list[str], int]]:
    stacks = []
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            stacks.append((stack.split(";"), int(count)))
    return stacks


def where(frame: str) -> tuple[str, str]:
    """(function, file) of a frame."""
    found = FRAME.match(frame)
    return (found["function"], found["file"]) if found else (frame, "")


def summarize(stacks: list[tuple[list[str], int]], top: int) -> str:
    total = sum(count for _, count in stacks)
    if not total:
        return "no samples"
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    leaf_files: Counter[str] = Counter()
    markers: Counter[str] = Counter()
    for frames, count in stacks:
        names = {f"{fn} ({file})" for fn, file in map(where, frames)}
        for name in names:
            inclusive[name] += count
        if any(file.startswith(PROJECT) for _, file in map(where, frames)):
            own["any project code"] += count
        leaf_files[where(frames[-1])[1] or frames[-1]] += count
        for label, needles in MARKERS:
            if any(needle in frame for frame in frames for needle in needles):
                markers[label] += count
        for label, needles in LEAF_MARKERS:
            if any(needle in frames[-1] for needle in needles):
                markers[label] += count

    def share(count: int) -> str:
        return f"{100 * count / total:5.1f} %"

    lines = [f"{total} busy samples\n", "| share | named cost (overlapping) |", "|---:|---|"]
    lines += [f"| {share(markers[label])} | {label} |" for label, _ in MARKERS + LEAF_MARKERS]
    project = [
        (n, c)
        for n, c in inclusive.most_common()
        if "(" in n and n.split("(")[-1].startswith(PROJECT)
    ]
    lines += ["", "| inclusive | project function |", "|---:|---|"]
    lines += [f"| {share(c)} | `{n}` |" for n, c in project[:top]]
    lines += ["", "| inclusive | any function (below 95 %) |", "|---:|---|"]
    lines += [f"| {share(c)} | `{n}` |" for n, c in inclusive.most_common() if c < 0.95 * total][
        :top
    ]
    lines += ["", "| self | file of the leaf frame |", "|---:|---|"]
    lines += [f"| {share(c)} | `{n}` |" for n, c in leaf_files.most_common(top)]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("profile", type=Path)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    print(summarize(parse(args.profile), args.top))


if __name__ == "__main__":
    main()
