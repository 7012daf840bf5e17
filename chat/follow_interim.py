"""INTERIM, until the events branch lands `chat.events.follow` and `agentsite.sse`: the
same contract, by polling the event log. Deleted at the merge."""

import asyncio
import json
from collections.abc import AsyncIterator
from typing import NamedTuple
from uuid import UUID

from channels.db import database_sync_to_async

from .events import event_log
from .lifecycle import FINAL_EVENTS, final_event_missing
from .models import Run

FINAL_TYPES = set(FINAL_EVENTS.values())
POLL = 0.02


class Frame(NamedTuple):
    seq: int
    type: str
    text: str


async def follow(
    run_id: UUID, after_seq: int = 0, *, idle: float | None = None
) -> AsyncIterator[Frame | None]:
    seq = after_seq
    quiet = 0.0
    ended_polls = 0
    while True:
        events = await event_log().after(run_id, seq)
        for event in events:
            seq = event["seq"]
            quiet = 0.0
            yield Frame(event["seq"], event["type"], json.dumps(event))
            if event["type"] in FINAL_TYPES:
                return
        run = await database_sync_to_async(Run.objects.get)(id=run_id)
        if not run.is_active:
            ended_polls += 1
            if ended_polls > 100:  # the log lost it
                final = await database_sync_to_async(final_event_missing)(
                    run=run, events=[], after_seq=seq
                )
                if final is not None:
                    yield Frame(final["seq"], final["type"], json.dumps(final))
                return
        await asyncio.sleep(POLL)
        quiet += POLL
        if idle is not None and quiet >= idle:
            quiet = 0.0
            yield None


def sse_message(frame: Frame) -> str:
    return f"id: {frame.seq}\nevent: {frame.type}\ndata: {frame.text}\n\n"


HEARTBEAT = ": heartbeat\n\n"
