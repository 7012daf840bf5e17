from typing import Annotated

from langchain_core.messages import AnyMessage
from langgraph.graph.message import add_messages
from typing_extensions import TypedDict


class State(TypedDict, total=False):
    messages: Annotated[list[AnyMessage], add_messages]
    # Model calls made in the current run; each run's input resets it to 0.
    steps: int
    # The caller's own instructions (`Run.instructions`), after the system prompt.
    instructions: str
