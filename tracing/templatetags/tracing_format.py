from decimal import Decimal

from django import template

from agentsite.formatting import format_count, format_usd
from tracing.formatting import format_duration

register = template.Library()


@register.filter
def duration(ms: float | None) -> str:
    return format_duration(ms)


@register.filter
def usd(amount: Decimal | None) -> str:
    return format_usd(amount)


@register.filter
def count(number: int | None) -> str:
    return format_count(number)
