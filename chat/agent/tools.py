"""The agent's tools. Their docstrings are the descriptions the model sees."""

import ast
import math
import operator
import unicodedata
from collections.abc import Callable
from datetime import UTC, datetime
from functools import cache
from typing import cast
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError, available_timezones

from langchain_core.tools import BaseTool, tool


class ToolInputError(ValueError):
    """Bad input from the model: reported back to it as the tool's result, never raised
    out of the run."""


MAX_EXPRESSION_CHARS = 200
MAX_EXPONENT = 1000
MAX_MAGNITUDE = 1e100

_BINARY: dict[type[ast.operator], Callable[[float, float], float]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY: dict[type[ast.unaryop], Callable[[float], float]] = {
    ast.UAdd: operator.pos,
    ast.USub: operator.neg,
}
_FUNCTIONS: dict[str, Callable[..., float]] = {
    "sqrt": math.sqrt,
    "abs": abs,
    "round": round,
    "log": math.log,
    "sin": math.sin,
    "cos": math.cos,
    "tan": math.tan,
}
_CONSTANTS = {"pi": math.pi, "e": math.e}
_SYMBOLS = str.maketrans({"×": "*", "÷": "/", "^": "**", "−": "-"})


def evaluate_expression(expression: str) -> int | float:
    """Evaluate arithmetic by walking a parsed tree of whitelisted nodes. `eval` is never
    used: anything but numbers, operators and a few math functions is refused."""
    text = expression.strip().translate(_SYMBOLS)
    if not text:
        raise ToolInputError("The expression is empty.")
    if len(text) > MAX_EXPRESSION_CHARS:
        raise ToolInputError(f"The expression is longer than {MAX_EXPRESSION_CHARS} characters.")
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError) as error:
        raise ToolInputError(f"Not a valid arithmetic expression: {expression!r}.") from error
    return _evaluate(tree.body)


def _evaluate(node: ast.AST) -> int | float:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return cast(int | float, node.value)
    if isinstance(node, ast.Name) and node.id in _CONSTANTS:
        return _CONSTANTS[node.id]
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_evaluate(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Pow) and (abs(right) > MAX_EXPONENT or abs(left) > 1e6):
            raise ToolInputError("That power is too large to compute.")
        try:
            result = _BINARY[type(node.op)](left, right)
        except ZeroDivisionError as error:
            raise ToolInputError("Division by zero.") from error
        except OverflowError as error:
            raise ToolInputError("The result is too large.") from error
        return _checked(result)
    if (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id in _FUNCTIONS
        and not node.keywords
        and len(node.args) <= 2
    ):
        try:
            return _checked(_FUNCTIONS[node.func.id](*(_evaluate(arg) for arg in node.args)))
        except (TypeError, ValueError, OverflowError) as error:
            raise ToolInputError(f"{node.func.id}() cannot take those arguments.") from error
    raise ToolInputError(
        f"Only numbers, + - * / // % ** ( ), pi, e and {', '.join(sorted(_FUNCTIONS))} are allowed."
    )


def _checked(value: complex | float) -> int | float:
    if isinstance(value, complex):
        raise ToolInputError("The result is not a real number.")
    if isinstance(value, float) and not math.isfinite(value):
        raise ToolInputError("The result is not a finite number.")
    if abs(value) > MAX_MAGNITUDE:
        raise ToolInputError("The result is too large.")
    return value


def format_number(value: int | float) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return f"{value:.12g}" if isinstance(value, float) else str(value)


@tool
def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression exactly, e.g. "17 * 23" or "(2 + 3) ** 2 / 7".

    Supports + - * / // % ** and parentheses, the constants pi and e, and the functions
    sqrt, abs, round, log, sin, cos and tan.
    """
    return format_number(evaluate_expression(expression))


# Zone names are cities (Asia/Tokyo); these well-known places are not in them.
_PLACE_ALIASES = {
    "san francisco": "America/Los_Angeles",
    "seattle": "America/Los_Angeles",
    "san diego": "America/Los_Angeles",
    "las vegas": "America/Los_Angeles",
    "washington": "America/New_York",
    "boston": "America/New_York",
    "philadelphia": "America/New_York",
    "miami": "America/New_York",
    "atlanta": "America/New_York",
    "dallas": "America/Chicago",
    "houston": "America/Chicago",
    "montreal": "America/Toronto",
    "rio de janeiro": "America/Sao_Paulo",
    "beijing": "Asia/Shanghai",
    "shenzhen": "Asia/Shanghai",
    "guangzhou": "Asia/Shanghai",
    "delhi": "Asia/Kolkata",
    "new delhi": "Asia/Kolkata",
    "mumbai": "Asia/Kolkata",
    "bangalore": "Asia/Kolkata",
    "bengaluru": "Asia/Kolkata",
    "osaka": "Asia/Tokyo",
    "kyoto": "Asia/Tokyo",
    "munich": "Europe/Berlin",
    "frankfurt": "Europe/Berlin",
    "hamburg": "Europe/Berlin",
    "barcelona": "Europe/Madrid",
    "milan": "Europe/Rome",
    "geneva": "Europe/Zurich",
    "cape town": "Africa/Johannesburg",
}
# The areas whose zones are named after a city (not US/Pacific, Etc/GMT+1, ...).
_CITY_AREAS = (
    "Africa/",
    "America/",
    "Antarctica/",
    "Asia/",
    "Atlantic/",
    "Australia/",
    "Europe/",
    "Indian/",
    "Pacific/",
)


def _place_key(name: str) -> str:
    # "São Paulo", "sao_paulo" and "Sao Paulo" are the same place.
    plain = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode()
    return " ".join(plain.replace("_", " ").lower().split())


@cache
def _zones_by_place() -> dict[str, str]:
    zones: dict[str, str] = {}
    for zone in sorted(available_timezones()):
        if zone.startswith(_CITY_AREAS):
            zones.setdefault(_place_key(zone.rsplit("/", 1)[-1]), zone)
    return {**zones, **_PLACE_ALIASES}


def time_zone_for(place: str) -> str | None:
    """The IANA zone for an IANA name ("Asia/Tokyo") or a city ("Tokyo", "new york"),
    or None when it is neither."""
    name = place.strip()
    if name.upper() in ("UTC", "GMT"):
        return name.upper()
    if "/" in name:
        try:
            ZoneInfo(name)
        except (ZoneInfoNotFoundError, ValueError):
            return None
        return name
    return _zones_by_place().get(_place_key(name))


@tool
def current_time(timezone: str | None = None) -> str:
    """Return the current date and time, in UTC or in the given place: an IANA time
    zone (for example "Europe/Paris" or "America/New_York") or a city ("Tokyo")."""
    place = (timezone or "UTC").strip() or "UTC"
    zone_name = time_zone_for(place)
    if zone_name is None:
        raise ToolInputError(
            f"I could not find the time zone of {place!r}; name a large city (Tokyo) or "
            "an IANA time zone (Europe/Paris)."
        )
    now = datetime.now(UTC).astimezone(ZoneInfo(zone_name))
    return f"{now:%A %d %B %Y, %H:%M:%S} ({zone_name}, UTC{now:%z})"


TOOLS: list[BaseTool] = [calculator, current_time]
