"""Capturing a run's span tree from the callbacks LangGraph and LangChain emit.

One `RunTracer` per run, passed in the graph config's `callbacks`. The callbacks run on
the request path (inline, between tokens and tool calls), so they only note timestamps
and keep references to the objects they are handed; everything that costs something —
turning messages into JSON, truncating, counting tokens — happens when a batch of
finished spans is flushed or at `close`, in a worker thread of its own (never on the
database thread, which every run's queries share); only the INSERTs go to the database.

Span ids are LangChain's own run ids (already UUIDs, unique per step), so nothing is
generated per callback and a step seen in LangChain's tooling has the same id here.
"""

import asyncio
import logging
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any
from uuid import UUID

from channels.db import database_sync_to_async
from django.conf import settings
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.messages import AIMessage, BaseMessage, ToolMessage, message_chunk_to_message
from langchain_core.outputs import ChatGeneration, LLMResult

from agentsite.logging import span_id_var
from agentsite.text import text_storable

from . import export, metrics, services
from .models import Span, Trace
from .services import CallUsage

logger = logging.getLogger(__name__)

RUN = Span.Kind.RUN.value
NODE = Span.Kind.NODE.value
LLM = Span.Kind.LLM.value
TOOL = Span.Kind.TOOL.value
OK = Span.Status.OK.value
ERROR = Span.Status.ERROR.value
CANCELLED = Span.Status.CANCELLED.value

_STOPPED_MESSAGE = "Stopped before it finished."

# LangGraph marks its plumbing (channel writes, branch routing) with this tag.
_HIDDEN_TAG = "langsmith:hidden"


class SpanRecord:
    """A span as the callbacks see it: timestamps and raw references, nothing computed."""

    __slots__ = (
        "end",
        "error",
        "first_token",
        "id",
        "inputs",
        "kind",
        "meta",
        "name",
        "output",
        "parent_id",
        "start",
        "status",
    )

    def __init__(
        self,
        span_id: UUID,
        parent_id: UUID | None,
        kind: str,
        name: str,
        start: float,
        inputs: Any = None,
        meta: Any = None,
    ) -> None:
        self.id = span_id
        self.parent_id = parent_id
        self.kind = kind
        self.name = name
        self.start = start
        self.end = 0.0
        self.status = OK
        self.error: BaseException | tuple[str, str] | None = None
        self.first_token = 0.0
        self.inputs = inputs
        self.meta = meta
        self.output: Any = None


class RunTracer(BaseCallbackHandler):
    """Builds the span tree of one run: run → graph node → LLM call / tool call → …"""

    # Plain methods called inline, in both LangChain's async and sync callback managers.
    # The callbacks never wait on anything, so they need not be coroutines; and an
    # AsyncCallbackHandler costs far more: its coroutines are gathered per event, and a
    # sync step (a routing function) runs them on a fresh event loop in a thread —
    # measured, ~1.2 ms per run against ~0.15 ms for the whole of this handler.
    run_inline = True
    raise_error = False

    def __init__(
        self,
        *,
        run_id: UUID,
        user_id: int,
        conversation_id: UUID | None = None,
        model: str = "",
        provider: str = "",
        batch_size: int | None = None,
        max_payload_chars: int | None = None,
        max_prompt_messages: int | None = None,
    ) -> None:
        self.run_id = run_id
        self.user_id = user_id
        self.conversation_id = conversation_id
        self.model = model
        self.provider = provider
        self.batch_size = batch_size or settings.TRACING_FLUSH_BATCH
        self.max_payload_chars = max_payload_chars or settings.TRACING_MAX_PAYLOAD_CHARS
        self.max_prompt_messages = (
            settings.TRACING_MAX_PROMPT_MESSAGES
            if max_prompt_messages is None
            else max_prompt_messages
        )
        # A run still going after this many seconds gets its trace row written, so it
        # is listed while it runs; shorter runs write it with their spans at the end.
        self.visible_after = settings.TRACING_RUNNING_VISIBLE_AFTER
        # The root span's id is the run's: whoever closes a trace this tracer never
        # finished (its process died) can write the root the flushed spans hang from.
        self.root = SpanRecord(run_id, None, RUN, "run", time.time())
        # LangChain run id -> the span that stands for it (itself, or for a skipped
        # wrapper the nearest recorded ancestor).
        self._alias: dict[UUID, UUID] = {}
        self._open: dict[UUID, SpanRecord] = {}
        self._done: list[SpanRecord] = []
        # Spans stopped by a CancelledError. It stands for a cancel, the run's deadline
        # or a sibling's failure alike, so their status waits for the run's outcome.
        self._interrupted: list[SpanRecord] = []
        self._flushes: list[asyncio.Task[None]] = []
        # Rows already built (and written), kept for the totals and the export.
        self._rows: list[Span] = []
        # Built by `close`, written by `store`.
        self._closing: list[Span] = []
        self._error = ("", "")
        self._cost_usd: Decimal | None = None
        self._finished = False
        self._started: asyncio.Future[Trace] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._start_timer: asyncio.TimerHandle | None = None
        # For a resumed run (see `resume`): how many times it was resumed.
        self._recoveries = 0

    # --- Lifecycle ------------------------------------------------------------------

    def resume(self, *, started_at: datetime, recoveries: int) -> None:
        """Before `start`: this run was resumed after its process died or handed it back
        (`recoveries` times so far), and continues its trace. The Trace row and the spans
        flushed before stay; a span named "interrupted" covers the gap (see
        `services.trace_resume`); the root span covers the whole run."""
        self.root.start = started_at.timestamp()
        self._recoveries = recoveries

    def start(self) -> None:
        """Arrange for the Trace row to exist while the run is going, so a running run is
        listed. Most runs of a fast model end sooner than `visible_after`, and
        for them the row is written with the spans at `store` instead: one write, none
        on the request path. The run never waits for this insert; span writes do. A
        resumed run's row is taken over at once (it may hold spans already).

        Also makes the root span the current span id of the caller's context, so the
        run's own log lines carry it."""
        span_id_var.set(str(self.root.id))
        self._loop = asyncio.get_running_loop()
        if self._recoveries:
            self._started = asyncio.ensure_future(self._resume_trace())
        else:
            self._start_timer = self._loop.call_later(self.visible_after, self._write_start)

    def _write_start(self) -> None:
        if self._started is None and not self._finished:
            self._started = asyncio.ensure_future(
                database_sync_to_async(services.trace_start)(
                    run_id=self.run_id,
                    user_id=self.user_id,
                    model=self.model,
                    started_at=_dt(self.root.start),
                )
            )

    async def _resume_trace(self) -> Trace:
        trace, earlier = await database_sync_to_async(services.trace_resume)(
            run_id=self.run_id,
            user_id=self.user_id,
            model=self.model,
            started_at=_dt(self.root.start),
            recoveries=self._recoveries,
        )
        # Kept with this execution's for the totals, the ledger's corrections and the
        # export: one trace of the whole run.
        self._rows = earlier + self._rows
        return trace

    async def suspend(self) -> None:
        """For a run handed back (it is resumed elsewhere, and its trace with it): write
        the spans finished so far, and stop; the trace stays running."""
        if self._finished:
            return
        self.flush()
        self._finished = True
        if self._start_timer is not None:
            self._start_timer.cancel()
        if self._flushes:
            await asyncio.gather(*self._flushes, return_exceptions=True)

    async def close(self, *, status: str, error_type: str = "", error_message: str = "") -> None:
        """Close what is still open and build the rows of every span not written yet (in
        a worker thread); `store` then writes them. In three steps so that the run's
        finish writes the trace in its own transaction, with the ledger's numbers.

        `status` is the trace's final status (see `trace_status_for`). Spans still open,
        and spans a CancelledError stopped, are closed by it: `cancelled` for a
        cancelled run, otherwise `error` with the run's error type and message (a run
        stopped by its deadline or a limit, a failure that cancelled its siblings). In a
        run that succeeded, a step the graph itself cancelled stays `cancelled`."""
        if self._finished:
            return
        self._finished = True
        error_message = text_storable(error_message)
        self._error = (error_type, error_message)
        now = time.time()
        stopped = CANCELLED if status == CANCELLED else ERROR
        stopped_error = (error_type or stopped, error_message or _STOPPED_MESSAGE)
        for record in self._interrupted:
            if status == OK:
                record.status, record.error = CANCELLED, (CANCELLED, _STOPPED_MESSAGE)
            else:
                record.status, record.error = stopped, stopped_error
        for record in self._open.values():
            record.end = now
            record.status = stopped
            record.error = stopped_error
        self._done += self._interrupted
        self._done += self._open.values()
        self._interrupted = []
        self._open.clear()
        root = self.root
        root.end = now
        root.status = status
        if error_type:
            root.error = (error_type, error_message)
        root.meta = {"provider": self.provider, "model": self.model}
        self._done.append(root)
        if self._start_timer is not None:
            self._start_timer.cancel()
        if self._started is not None:
            await self._started  # if the trace row could not be written, neither can spans
        if self._flushes:
            await asyncio.gather(*self._flushes, return_exceptions=True)
        batch, self._done = self._done, []
        self._closing = await asyncio.to_thread(self._build_rows, batch)

    def store(
        self,
        *,
        span_costs: Mapping[UUID, Decimal | None] | None = None,
        span_usage: Mapping[UUID, CallUsage] | None = None,
        cost_usd: Decimal | None = None,
    ) -> None:
        """Write the spans `close` left and finalize the Trace (sync: call it on the
        database thread, after `close`, in the caller's transaction if it has one).

        `span_costs` (LLM span id → USD, None if unpriced), `span_usage` (LLM span id →
        tokens) and `cost_usd` (the run's total) come from the ledger (billing); tracing
        only stores them. The ledger is the one truth about a call's tokens: a call cut
        short reports no usage to the callbacks, yet is billed for what it streamed."""
        new_rows, self._closing = self._closing, []
        costs, usage = span_costs or {}, span_usage or {}
        # Spans of earlier batches are written already: those the ledger corrects are
        # updated, the new ones written with the ledger's numbers.
        corrected = services.span_ledger_apply(spans=self._rows, span_costs=costs, span_usage=usage)
        services.span_ledger_apply(spans=new_rows, span_costs=costs, span_usage=usage)
        if self._recoveries:
            new_rows += self._lost_calls(new_rows, costs, usage)
        root = self.root
        services.trace_finish(
            create=self._started is None,
            user_id=self.user_id,
            model=self.model,
            started_at=_dt(root.start),
            run_id=self.run_id,
            spans=new_rows,
            corrected_spans=corrected,
            status=str(root.status),
            ended_at=_dt(root.end),
            duration_ms=(root.end - root.start) * 1000,
            all_spans=[*self._rows, *new_rows],
            error_type=self._error[0],
            error_message=self._error[1],
            cost_usd=cost_usd,
        )
        self._rows += new_rows
        self._cost_usd = cost_usd

    def _lost_calls(
        self,
        new_rows: list[Span],
        costs: Mapping[UUID, Decimal | None],
        usage: Mapping[UUID, CallUsage],
    ) -> list[Span]:
        """The LLM calls of a resumed run's earlier executions whose spans died with their
        process (above all the call each was making, cut short): the ledger billed them,
        so the trace shows them, with its numbers, at the first interruption."""
        known = {span.id for span in [*self._rows, *new_rows]}
        gaps = [span for span in self._rows if span.name == services.INTERRUPTED_SPAN]
        at = min((gap.started_at for gap in gaps), default=_dt(self.root.start))
        return [
            Span(
                id=call_id,
                trace_id=self.run_id,
                parent_id=self.run_id,
                kind=LLM,
                name=self.model[:200] or "llm",
                status=ERROR,
                started_at=at,
                ended_at=at,
                duration_ms=0.0,
                error_type="run_interrupted",
                error_message="Its span was lost with the process executing the run, which "
                "stopped during or soon after it; its tokens and cost are the ledger's.",
                input_tokens=counts.input_tokens,
                output_tokens=counts.output_tokens,
                cached_tokens=counts.cached_tokens,
                cost_usd=costs.get(call_id),
                attributes={"provider": self.provider, "model": self.model},
            )
            for call_id, counts in usage.items()
            if call_id not in known
        ]

    def report(self) -> None:
        """After `store` committed: the trace's metrics, and its export (not waited for)."""
        metrics.observe_llm_spans(self._rows)
        if export.enabled():
            export.schedule(
                trace_id=self.run_id,
                spans=self._rows,
                conversation_id=self.conversation_id,
                user_id=self.user_id,
                cost_usd=self._cost_usd,
            )

    # --- Buffering ------------------------------------------------------------------

    def _close(self, record: SpanRecord) -> None:
        self._done.append(record)
        if len(self._done) >= self.batch_size and not self._finished and self._loop:
            batch, self._done = self._done, []
            # Callbacks of sync steps arrive on a worker thread: hand over to the loop.
            self._loop.call_soon_threadsafe(self._schedule_flush, batch)

    def flush(self) -> None:
        """Write the spans finished so far (and the trace row), so a process that dies
        loses only the spans since the last call: the run's lease keeper calls it on
        every renewal. Call it on the run's event loop."""
        if self._finished or self._loop is None:
            return
        batch, self._done = self._done, []
        if batch:
            self._schedule_flush(batch)
        else:
            self._write_start()

    def _schedule_flush(self, batch: list[SpanRecord]) -> None:
        self._write_start()  # spans need their trace row
        self._flushes.append(asyncio.ensure_future(self._flush(batch)))

    async def _flush(self, batch: list[SpanRecord]) -> None:
        try:
            if self._started is not None:
                await self._started
            rows = await asyncio.to_thread(self._build_rows, batch)
            await database_sync_to_async(services.span_bulk_create)(spans=rows)
            self._rows += rows
        except Exception:
            logger.exception("run %s: could not write %d spans", self.run_id, len(batch))

    def _parent(self, parent_run_id: UUID | None) -> UUID:
        if parent_run_id is None:
            return self.root.id
        return self._alias.get(parent_run_id, self.root.id)

    def _open_span(
        self,
        run_id: UUID,
        parent_run_id: UUID | None,
        kind: str,
        name: str,
        inputs: Any = None,
        meta: Any = None,
    ) -> SpanRecord:
        record = SpanRecord(
            run_id, self._parent(parent_run_id), kind, name, time.time(), inputs, meta
        )
        self._alias[run_id] = run_id
        self._open[run_id] = record
        span_id_var.set(str(run_id))
        return record

    def _end_span(
        self, run_id: UUID, output: Any = None, error: BaseException | None = None
    ) -> None:
        record = self._open.pop(run_id, None)
        if record is None:
            return
        record.end = time.time()
        record.output = output
        span_id_var.set(str(record.parent_id))
        if isinstance(error, asyncio.CancelledError):
            # Its status is decided at `finish`, from the run's outcome; never flushed
            # before that. Few: only the steps open when the run was stopped.
            self._interrupted.append(record)
            return
        if error is not None:
            record.error = error
            record.status = ERROR
        self._close(record)

    # --- Callbacks (the request path: keep them cheap) -----------------------------

    def on_chain_start(
        self,
        serialized: dict[str, Any],
        inputs: dict[str, Any],
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        tags: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        name = kwargs.get("name")
        node = metadata.get("langgraph_node") if metadata else None
        # A graph node's own chain carries its node name as both name and metadata;
        # routing functions, writers and the graph itself are folded into their parent.
        if node is not None and node == name and not (tags and _HIDDEN_TAG in tags):
            self._open_span(
                run_id,
                parent_run_id,
                NODE,
                node,
                meta=(metadata.get("langgraph_step"), metadata.get("langgraph_triggers"))
                if metadata
                else None,
            )
        else:
            self._alias[run_id] = self._parent(parent_run_id)

    def on_chain_end(self, outputs: Any, *, run_id: UUID, **kwargs: Any) -> None:
        self._end_span(run_id)

    def on_chain_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        self._end_span(run_id, error=error)

    def on_chat_model_start(
        self,
        serialized: dict[str, Any],
        messages: list[list[BaseMessage]],
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        tags: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        name = (metadata or {}).get("ls_model_name") or self.model or "llm"
        self._open_span(
            run_id,
            parent_run_id,
            LLM,
            name,
            inputs=messages,
            meta=(metadata, kwargs.get("invocation_params")),
        )

    def on_llm_new_token(self, token: Any, *, run_id: UUID, **kwargs: Any) -> None:
        record = self._open.get(run_id)
        if record is not None and not record.first_token:
            record.first_token = time.time()

    def on_llm_end(self, response: LLMResult, *, run_id: UUID, **kwargs: Any) -> None:
        self._end_span(run_id, output=response)

    def on_llm_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        self._end_span(run_id, error=error)

    def on_tool_start(
        self,
        serialized: dict[str, Any],
        input_str: str,
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        tags: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
        inputs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        name = serialized.get("name") or kwargs.get("name") or "tool"
        self._open_span(
            run_id,
            parent_run_id,
            TOOL,
            name,
            inputs=inputs if inputs is not None else input_str,
            meta=kwargs.get("tool_call_id"),
        )

    def on_tool_end(self, output: Any, *, run_id: UUID, **kwargs: Any) -> None:
        self._end_span(run_id, output=output)

    def on_tool_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        self._end_span(run_id, error=error)

    # --- Turning records into rows (off the request path, in a worker thread) --------

    def _build_rows(self, batch: list[SpanRecord]) -> list[Span]:
        return [self._row(record) for record in batch]

    def _row(self, record: SpanRecord) -> Span:
        error_type, error_message = _error(record.error)
        span = Span(
            id=record.id,
            trace_id=self.run_id,
            parent_id=record.parent_id,
            kind=record.kind,
            name=record.name[:200],
            status=record.status,
            started_at=_dt(record.start),
            ended_at=_dt(record.end),
            duration_ms=round((record.end - record.start) * 1000, 3),
            error_type=error_type[:200],
            error_message=self._cut(error_message),
        )
        if record.kind == LLM:
            self._llm_attributes(span, record)
        elif record.kind == TOOL:
            self._tool_attributes(span, record)
        elif record.kind == NODE and record.meta:
            step, triggers = record.meta
            span.attributes = {"langgraph.step": step, "langgraph.triggers": list(triggers or [])}
        elif record.kind == RUN:
            span.attributes = {k: v for k, v in (record.meta or {}).items() if v}
        return span

    def _llm_attributes(self, span: Span, record: SpanRecord) -> None:
        raw_metadata, raw_params = record.meta or (None, None)
        metadata: dict[str, Any] = raw_metadata or {}
        params: dict[str, Any] = raw_params or {}
        attributes: dict[str, Any] = {
            "provider": metadata.get("ls_provider") or self.provider,
            "model": self._llm_model(record),
            "request": {
                key: value
                for key, value in (
                    ("temperature", _first(params, metadata, "temperature", "ls_temperature")),
                    ("max_tokens", _first(params, metadata, "max_tokens", "ls_max_tokens")),
                    ("tools", [_tool_name(t) for t in params.get("tools") or []] or None),
                )
                if value is not None
            },
            "latency_ms": span.duration_ms,
        }
        # The output cap the budget granted the call, and what it asked for.
        if metadata.get("max_output_tokens"):
            attributes["max_output_tokens"] = metadata["max_output_tokens"]
        if record.first_token:
            attributes["time_to_first_token_ms"] = round(
                (record.first_token - record.start) * 1000, 3
            )
        prompts = record.inputs or [[]]
        kept, omitted = _prompt_kept(prompts[0], self.max_prompt_messages)
        attributes["prompt"] = [self._message(m) for m in kept]
        if omitted:
            attributes["prompt_omitted"] = omitted
        message = _generated_message(record.output)
        if message is not None:
            attributes["completion"] = self._message(message)
            finish = message.response_metadata.get(
                "finish_reason"
            ) or message.response_metadata.get("stop_reason")
            if finish:
                attributes["finish_reason"] = finish
            model_name = message.response_metadata.get("model_name")
            if model_name:
                attributes["response_model"] = model_name
        span.input_tokens, span.output_tokens, span.cached_tokens = _usage(record.output)
        span.attributes = attributes

    def _llm_model(self, record: SpanRecord) -> str:
        raw_metadata, raw_params = record.meta or (None, None)
        metadata: dict[str, Any] = raw_metadata or {}
        params: dict[str, Any] = raw_params or {}
        return str(
            metadata.get("ls_model_name")
            or params.get("model")
            or params.get("model_name")
            or self.model
        )

    def _tool_attributes(self, span: Span, record: SpanRecord) -> None:
        attributes: dict[str, Any] = {
            "tool": record.name,
            "arguments": self._jsonable(record.inputs),
        }
        if record.meta:
            attributes["tool_call_id"] = record.meta
        output = record.output
        if isinstance(output, ToolMessage):
            attributes["result"] = self._cut(output.text)
            if output.status == "error":
                attributes["is_error"] = True
        elif output is not None:
            attributes["result"] = self._cut(str(getattr(output, "content", output)))
        span.attributes = attributes

    def _message(self, message: BaseMessage) -> dict[str, Any]:
        # A streamed reply arrives as a chunk, whose type ("AIMessageChunk") is no role.
        message = message_chunk_to_message(message)
        out: dict[str, Any] = {"role": message.type, "content": self._cut(message.text)}
        tool_calls = getattr(message, "tool_calls", None)
        if tool_calls:
            out["tool_calls"] = [
                {"id": c.get("id"), "name": c["name"], "args": self._jsonable(c["args"])}
                for c in tool_calls
            ]
        if isinstance(message, ToolMessage):
            out["tool_call_id"] = message.tool_call_id
        return out

    def _jsonable(self, value: Any) -> Any:
        if isinstance(value, str):
            return self._cut(value)
        if isinstance(value, dict):
            return {str(k): self._jsonable(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self._jsonable(v) for v in value]
        if value is None or isinstance(value, bool | int | float):
            return value
        return self._cut(repr(value))

    def _cut(self, text: str) -> str:
        # Every payload's text passes here: none may carry what PostgreSQL refuses.
        text = text_storable(text)
        limit = self.max_payload_chars
        if len(text) <= limit:
            return text
        return f"{text[:limit]}… [{len(text) - limit} more characters]"


def _prompt_kept(prompt: list[BaseMessage], limit: int) -> tuple[list[BaseMessage], int]:
    """The messages of a prompt a span records, and how many it leaves out: its leading
    system messages and its last `limit` others (0: all of them). Every call's prompt
    holds the conversation so far, so recording it whole made each turn's trace cost
    (CPU and rows) grow with the conversation; what the call answers is at the end."""
    system = 0
    while system < len(prompt) and prompt[system].type == "system":
        system += 1
    omitted = len(prompt) - system - limit
    if limit <= 0 or omitted <= 0:
        return prompt, 0
    return [*prompt[:system], *prompt[system + omitted :]], omitted


def _dt(timestamp: float) -> datetime:
    return datetime.fromtimestamp(timestamp, UTC)


def _first(params: dict[str, Any], metadata: dict[str, Any], key: str, ls_key: str) -> Any:
    value = params.get(key)
    return value if value is not None else metadata.get(ls_key)


def _tool_name(tool: Any) -> str:
    if isinstance(tool, dict):
        return str(tool.get("function", {}).get("name") or tool.get("name") or "?")
    return str(getattr(tool, "name", tool))


def _generated_message(response: Any) -> BaseMessage | None:
    if not isinstance(response, LLMResult) or not response.generations:
        return None
    generations = response.generations[0]
    if generations and isinstance(generations[0], ChatGeneration):
        return generations[0].message
    return None


def message_tokens(message: AIMessage) -> tuple[int, int, int]:
    """The input, output and cached input tokens a reply's usage reports (zeros if it
    reports none). Chat's budget reads replies through it too, so the ledger and the
    spans count a reply the same way."""
    usage = message.usage_metadata
    if not usage:
        return 0, 0, 0
    cached = (usage.get("input_token_details") or {}).get("cache_read") or 0
    return usage["input_tokens"], usage["output_tokens"], cached


def _usage(response: Any) -> tuple[int, int, int]:
    message = _generated_message(response)
    if not isinstance(message, AIMessage):
        return 0, 0, 0
    return message_tokens(message)


def _error(error: BaseException | tuple[str, str] | None) -> tuple[str, str]:
    if error is None:
        return "", ""
    if isinstance(error, tuple):
        return error
    code = getattr(error, "code", None)
    return (code if isinstance(code, str) else type(error).__name__), str(error)


def trace_status_for(run_status: str) -> str:
    """The trace status for a run's final status."""
    if run_status == "completed":
        return Trace.Status.OK.value
    if run_status == "cancelled":
        return Trace.Status.CANCELLED.value
    return Trace.Status.ERROR.value
