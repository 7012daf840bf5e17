"""What a run produced, as typed steps (the translator makes them from the graph's
stream) and as their sum (`RunOutcome`, stored when the run finishes). The events the
run emits derive from the same steps (`chat.agent.translator.event_of`), so what a user
saw streaming and what is stored cannot disagree."""

from collections.abc import Iterable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from .models import Run


@dataclass(frozen=True, slots=True)
class TextStreamed:
    """A chunk of the model's answer, as it streamed."""

    text: str


@dataclass(frozen=True, slots=True)
class UsageReported:
    """A model call's tokens, as its provider reported them (or as estimated)."""

    input_tokens: int
    output_tokens: int
    cached_tokens: int


@dataclass(frozen=True, slots=True)
class ToolStarted:
    """`args`: the call's arguments, or for a call that never ran because they were
    unusable, the text the model sent."""

    tool_call_id: str
    name: str
    args: dict[str, Any] | str


@dataclass(frozen=True, slots=True)
class ToolFinished:
    tool_call_id: str
    name: str
    result: str
    is_error: bool


@dataclass(frozen=True, slots=True)
class StepsCounted:
    """Model calls made so far in the run."""

    steps: int


@dataclass(frozen=True, slots=True)
class StepLimitReached:
    """The run stopped at its step limit; `explanation` ends the answer."""

    explanation: str


RunStep = (
    TextStreamed | UsageReported | ToolStarted | ToolFinished | StepsCounted | StepLimitReached
)


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

    def record(self, step: RunStep) -> None:
        match step:
            case TextStreamed(text=text):
                self.unreported_output_tokens += 1
                self._add_text(text)
            case UsageReported():
                self.input_tokens += step.input_tokens
                self.output_tokens += step.output_tokens
                self.cached_tokens += step.cached_tokens
                self.unreported_output_tokens = 0
            case ToolStarted():
                self.parts.append(
                    {
                        "kind": "tool",
                        "tool_call_id": step.tool_call_id,
                        "name": step.name,
                        "args": step.args,
                        "result": None,
                        "is_error": False,
                    }
                )
            case ToolFinished():
                for part in self.parts:
                    if part["kind"] == "tool" and part["tool_call_id"] == step.tool_call_id:
                        part["result"] = step.result
                        part["is_error"] = step.is_error
            case StepsCounted(steps=steps):
                self.steps = steps
            case StepLimitReached(explanation=explanation):
                self._add_text(explanation)
                self.fail(Run.Status.LIMIT_REACHED, "max_steps", explanation)

    def restore(self, steps: Iterable[RunStep]) -> None:
        """A resumed run's output so far (rebuilt from its checkpoint): recorded as if
        streamed, but its text is not unreported output, being in the run's totals."""
        for step in steps:
            self.record(step)
        self.unreported_output_tokens = 0

    def _add_text(self, text: str) -> None:
        if self.parts and self.parts[-1]["kind"] == "text":
            self.parts[-1]["text"] += text
        else:
            self.parts.append({"kind": "text", "text": text})

    def fail(self, status: Run.Status, code: str, message: str) -> None:
        self.output_tokens += self.unreported_output_tokens
        self.unreported_output_tokens = 0
        self.status = status
        self.error_code = code
        self.error_message = message
