"""Span trees of runs: one Trace per run, one Span per step (run, graph node, LLM call,
tool call, ...), nested through `parent`."""

import uuid

from django.conf import settings
from django.db import models


class StepUsage(models.Model):
    """What a run or one of its steps used and how it ended, on traces and spans alike."""

    input_tokens = models.PositiveIntegerField(default=0)
    output_tokens = models.PositiveIntegerField(default=0)
    cached_tokens = models.PositiveIntegerField(default=0)
    # Filled in by billing once LLM calls are priced; null means "not priced".
    cost_usd = models.DecimalField(max_digits=14, decimal_places=8, null=True, blank=True)
    error_type = models.CharField(max_length=200, blank=True)
    error_message = models.TextField(blank=True)

    class Meta:
        abstract = True


class Trace(StepUsage):
    class Status(models.TextChoices):
        OK = "ok"
        ERROR = "error"
        CANCELLED = "cancelled"
        RUNNING = "running"

    # The trace id is the run id: events, spans and (later) ledger rows all join on it.
    run = models.OneToOneField(
        "chat.Run", on_delete=models.CASCADE, primary_key=True, related_name="trace"
    )
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="traces"
    )
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.RUNNING)
    model = models.CharField(max_length=200, blank=True)
    started_at = models.DateTimeField()
    ended_at = models.DateTimeField(null=True, blank=True)
    duration_ms = models.FloatField(null=True, blank=True)
    span_count = models.PositiveIntegerField(default=0)

    class Meta:
        ordering = ["-started_at"]
        indexes = [
            models.Index(fields=["user", "-started_at"]),
            models.Index(fields=["status", "-started_at"]),
            models.Index(fields=["model", "-started_at"]),
        ]

    def __str__(self) -> str:
        return f"Trace of run {self.run_id} ({self.status})"


class Span(StepUsage):
    class Kind(models.TextChoices):
        RUN = "run"
        NODE = "node"
        LLM = "llm"
        TOOL = "tool"

    class Status(models.TextChoices):
        OK = "ok"
        ERROR = "error"
        CANCELLED = "cancelled"

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    trace = models.ForeignKey(Trace, on_delete=models.CASCADE, related_name="spans")
    # DO_NOTHING and no constraint: spans are only ever deleted a whole trace at a time,
    # so deleting them is one DELETE instead of Django collecting each tree in memory.
    parent = models.ForeignKey(
        "self",
        on_delete=models.DO_NOTHING,
        null=True,
        blank=True,
        related_name="children",
        db_constraint=False,
    )
    kind = models.CharField(max_length=16, choices=Kind.choices)
    name = models.CharField(max_length=200)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.OK)
    started_at = models.DateTimeField()
    ended_at = models.DateTimeField()
    duration_ms = models.FloatField()
    # LLM spans: provider, model, request parameters, time to first token, finish reason,
    # prompt and completion (truncated). Tool spans: arguments and result. Nodes: name.
    attributes = models.JSONField(default=dict, blank=True)

    class Meta:
        ordering = ["started_at"]
        indexes = [models.Index(fields=["trace", "started_at"])]

    def __str__(self) -> str:
        return f"{self.kind} {self.name}"
