"""The trace list's filters, validated from the query string."""

from datetime import date, datetime, time, timedelta
from decimal import Decimal
from typing import Any

from django import forms
from django.utils import timezone

from .models import Trace


class TraceFilterForm(forms.Form):
    """Filters as a person types them (calendar days, seconds, dollars), turned by
    `selector_kwargs` into the arguments `selectors.trace_list` takes."""

    status = forms.ChoiceField(choices=[("", "Any status"), *Trace.Status.choices], required=False)
    model = forms.CharField(max_length=200, required=False)
    started_after = forms.DateField(
        required=False, label="From", widget=forms.DateInput(attrs={"type": "date"})
    )
    started_before = forms.DateField(
        required=False, label="To", widget=forms.DateInput(attrs={"type": "date"})
    )
    min_duration = forms.FloatField(
        required=False,
        min_value=0,
        label="Min duration (s)",
        widget=forms.NumberInput(attrs={"step": "any", "placeholder": "e.g. 2.5"}),
    )
    min_cost = forms.DecimalField(
        required=False,
        min_value=Decimal(0),
        max_digits=14,
        decimal_places=8,
        label="Min cost ($)",
        widget=forms.NumberInput(attrs={"step": "any", "placeholder": "e.g. 0.01"}),
    )

    def clean(self) -> dict[str, Any]:
        cleaned = super().clean() or {}
        after, before = cleaned.get("started_after"), cleaned.get("started_before")
        if after and before and after > before:
            raise forms.ValidationError("The “From” date must not be after the “To” date.")
        return cleaned

    def selector_kwargs(self) -> dict[str, Any]:
        """Only valid after `is_valid()`. Dates are whole days in the active time zone,
        and "To" includes its own day."""
        data = self.cleaned_data
        kwargs: dict[str, Any] = {
            "status": data.get("status") or None,
            "model": (data.get("model") or "").strip() or None,
        }
        if data.get("started_after"):
            kwargs["started_after"] = _start_of(data["started_after"])
        if data.get("started_before"):
            kwargs["started_before"] = _start_of(data["started_before"] + timedelta(days=1))
        if data.get("min_duration") is not None:
            kwargs["min_duration_ms"] = data["min_duration"] * 1000
        if data.get("min_cost") is not None:
            kwargs["min_cost_usd"] = data["min_cost"]
        return kwargs

    @property
    def is_filtering(self) -> bool:
        return any(value not in (None, "") for value in self.cleaned_data.values())


def _start_of(day: date) -> datetime:
    return timezone.make_aware(datetime.combine(day, time.min))
