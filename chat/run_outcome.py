from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from .models import Run


@dataclass
class RunOutcome:
    """What a run produced, in the order the user saw it: text parts and tool steps."""

    status: Run.Status = Run.Status.COMPLETED
    parts: list[dict[str, Any]] = field(default_factory=list)
    steps: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    # Part of input_tokens served from the provider's prompt cache (billed cheaper).
    cached_tokens: int = 0
    # What the ledger says its calls cost; None: unpriced, or not recorded.
    cost_usd: Decimal | None = None
    error_code: str = ""
    error_message: str = ""
    # Chunks streamed by a model call that has not reported its usage yet; if the run
    # stops mid-call they are the best estimate of the output it was charged for.
    unreported_output_tokens: int = 0

    def add_streamed_text(self, text: str) -> None:
        self.unreported_output_tokens += 1
        self.add_text(text)

    def add_usage(self, *, input_tokens: int, output_tokens: int, cached_tokens: int = 0) -> None:
        self.input_tokens += input_tokens
        self.output_tokens += output_tokens
        self.cached_tokens += cached_tokens
        self.unreported_output_tokens = 0

    def add_text(self, text: str) -> None:
        if self.parts and self.parts[-1]["kind"] == "text":
            self.parts[-1]["text"] += text
        else:
            self.parts.append({"kind": "text", "text": text})

    def add_tool_call(self, *, tool_call_id: str, name: str, args: dict[str, Any] | str) -> None:
        """`args`: the call's arguments, or for a call that never ran because they were
        unusable, the text the model sent."""
        self.parts.append(
            {
                "kind": "tool",
                "tool_call_id": tool_call_id,
                "name": name,
                "args": args,
                "result": None,
                "is_error": False,
            }
        )

    def add_tool_result(self, *, tool_call_id: str, result: str, is_error: bool) -> None:
        for part in self.parts:
            if part["kind"] == "tool" and part["tool_call_id"] == tool_call_id:
                part["result"] = result
                part["is_error"] = is_error

    def fail(self, status: Run.Status, code: str, message: str) -> None:
        self.output_tokens += self.unreported_output_tokens
        self.unreported_output_tokens = 0
        self.status = status
        self.error_code = code
        self.error_message = message
