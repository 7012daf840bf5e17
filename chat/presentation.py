"""The browser's view of run events: the one place where a run's data (text, numbers)
becomes what the chat page draws (sanitized HTML, costs and the budget line worded as
every page words them). Runs emit data only; the WebSocket consumer passes each event
through `browser_frame` as it sends it."""

from decimal import Decimal
from typing import Any

from agentsite.formatting import format_usd
from billing.display import BudgetLeft, budget_display

from .events import Event
from .lifecycle import FINAL_EVENTS
from .rendering import render_markdown

_FINAL_TYPES = frozenset(FINAL_EVENTS.values())


def presented(event_type: str) -> bool:
    """Whether the chat page's view of an event of this type differs from the event."""
    return event_type == "run.started" or event_type in _FINAL_TYPES


def browser_frame(event: Event) -> Event:
    """The frame the chat page draws for `event` (a new dict; the event is shared)."""
    if not presented(event["type"]):
        return event
    if event["type"] == "run.started" and event.get("user_message"):
        return {**event, "user_message": _message(event["user_message"])}
    if event["type"] in _FINAL_TYPES:
        cost = event["cost_usd"]
        return {
            **event,
            "messages": [_message(message) for message in event["messages"]],
            "cost_display": "price unknown" if cost is None else format_usd(Decimal(cost)),
            "budget": _budget(event.get("budget")),
        }
    return event


def _message(message: dict[str, Any]) -> dict[str, Any]:
    return {**message, "html": render_markdown(message["content"])}


def _budget(budget: dict[str, Any] | None) -> dict[str, Any] | None:
    """None: not known (the page keeps its line); no display: the account has no limits."""
    if budget is None:
        return None
    if budget["left"] is None:
        return {"display": None, "exhausted": False}
    shown = budget_display(BudgetLeft.from_data(budget["left"]))
    return {"display": shown.text, "exhausted": shown.exhausted}
