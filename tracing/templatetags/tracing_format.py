from decimal import Decimal

from django import template

from tracing.formatting import format_count, format_duration, format_usd

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
