import uuid
from datetime import datetime, timedelta

from django.conf import settings
from django.db import models
from django.utils import timezone


class Conversation(models.Model):
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="conversations"
    )
    title = models.CharField(max_length=200, default="New conversation")
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-updated_at"]
        indexes = [models.Index(fields=["owner", "-updated_at"])]

    def __str__(self) -> str:
        return self.title


def run_lost_before() -> datetime:
    """Runs created before this and still "active" lost their process: no run outlives
    AGENT_RUN_TIMEOUT, so past it (and a minute's grace) nobody is executing them."""
    return timezone.now() - timedelta(seconds=settings.AGENT_RUN_TIMEOUT + 60)


class RunQuerySet(models.QuerySet["Run"]):
    def alive(self) -> "RunQuerySet":
        """Active runs some process may still be executing."""
        return self.filter(status__in=Run.ACTIVE_STATUSES, created_at__gte=run_lost_before())

    def lost(self) -> "RunQuerySet":
        """Active runs whose process died (see `run_lost_before`)."""
        return self.filter(status__in=Run.ACTIVE_STATUSES, created_at__lt=run_lost_before())


class Run(models.Model):
    """One agent turn: from a user message to an answer (or a failure), detached from
    whichever connection started it."""

    class Status(models.TextChoices):
        QUEUED = "queued"
        RUNNING = "running"
        COMPLETED = "completed"
        FAILED = "failed"
        CANCELLED = "cancelled"
        LIMIT_REACHED = "limit_reached"
        BUDGET_EXCEEDED = "budget_exceeded"

    ACTIVE_STATUSES = (Status.QUEUED, Status.RUNNING)

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    conversation = models.ForeignKey(Conversation, on_delete=models.CASCADE, related_name="runs")
    status = models.CharField(max_length=20, choices=Status.choices, default=Status.QUEUED)
    model = models.CharField(max_length=200)
    created_at = models.DateTimeField(auto_now_add=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    steps = models.PositiveIntegerField(default=0)
    input_tokens = models.PositiveIntegerField(default=0)
    output_tokens = models.PositiveIntegerField(default=0)
    # What its LLM calls cost, summed from the usage ledger when it finishes; null when
    # a call was unpriced (or the run predates pricing).
    cost_usd = models.DecimalField(max_digits=14, decimal_places=8, null=True, blank=True)
    error_code = models.CharField(max_length=64, blank=True)
    error_message = models.TextField(blank=True)

    objects = RunQuerySet.as_manager()

    class Meta:
        ordering = ["-created_at"]
        indexes = [models.Index(fields=["conversation", "status"])]

    def __str__(self) -> str:
        return f"Run {self.id} ({self.status})"

    @property
    def is_active(self) -> bool:
        return self.status in self.ACTIVE_STATUSES

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens


class Message(models.Model):
    """What the chat shows. The agent's own memory is the LangGraph checkpoint; this is
    the human-readable record, including partial answers of cancelled runs."""

    class Role(models.TextChoices):
        USER = "user"
        ASSISTANT = "assistant"
        TOOL = "tool"

    conversation = models.ForeignKey(
        Conversation, on_delete=models.CASCADE, related_name="messages"
    )
    run = models.ForeignKey(
        Run, on_delete=models.SET_NULL, null=True, blank=True, related_name="messages"
    )
    role = models.CharField(max_length=16, choices=Role.choices)
    content = models.TextField(blank=True)
    # Tool messages: {"tool_call_id", "name", "args", "result", "is_error"}.
    tool = models.JSONField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["created_at", "id"]
        indexes = [models.Index(fields=["conversation", "created_at"])]

    def __str__(self) -> str:
        return f"{self.role}: {self.content[:60]}"
