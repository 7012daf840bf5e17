import uuid
from datetime import datetime

from django.conf import settings
from django.db import models
from django.db.models import Q
from django.utils import timezone


class Conversation(models.Model):
    class Source(models.TextChoices):
        """Where it was started: the chat page, the JSON API, or an OpenAI client
        (`chat.openai_compat`), whose conversations are created one per request unless it
        binds to one."""

        BROWSER = "browser"
        API = "api", "JSON API"
        OPENAI = "openai", "OpenAI client"

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="conversations"
    )
    title = models.CharField(max_length=200, default="New conversation")
    source = models.CharField(max_length=16, choices=Source.choices, default=Source.BROWSER)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-updated_at"]
        indexes = [models.Index(fields=["owner", "-updated_at"])]

    def __str__(self) -> str:
        return self.title


def lease_held(now: datetime) -> Q:
    """Of active runs, those a process is executing or a queue holds: their lease is
    current, or they have none because they wait in a queue."""
    return Q(lease_expires_at__isnull=True) | Q(lease_expires_at__gte=now)


def lease_lapsed(now: datetime) -> Q:
    """Of active runs, those whose process stopped renewing their lease."""
    return Q(lease_expires_at__lt=now)


class RunQuerySet(models.QuerySet["Run"]):
    """Which runs somebody is executing, by their lease (see `chat.lifecycle`)."""

    def lost(self) -> "RunQuerySet":
        return self.filter(lease_lapsed(timezone.now()), status__in=Run.ACTIVE_STATUSES)


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
        # Its process stopped (crash, kill, hang), its lease lapsed, and it could not be
        # resumed (it had been AGENT_RUN_MAX_RECOVERIES times already).
        INTERRUPTED = "interrupted"

    ACTIVE_STATUSES = (Status.QUEUED, Status.RUNNING)

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    conversation = models.ForeignKey(Conversation, on_delete=models.CASCADE, related_name="runs")
    status = models.CharField(max_length=20, choices=Status.choices, default=Status.QUEUED)
    model = models.CharField(max_length=200)
    # The API key whose request started it; null when a browser did. Its ledger rows
    # record it (as a plain id and prefix, which outlive the key); here SET_NULL is
    # enough, a run is not a money record.
    api_key = models.ForeignKey(
        "billing.ApiKey", on_delete=models.SET_NULL, null=True, blank=True, related_name="+"
    )
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
    # The caller's own instructions (an OpenAI client's system messages), given to the
    # model after the agent's system prompt, never instead of it.
    instructions = models.TextField(blank=True)
    # The lease (chat.lifecycle): which process holds the run and until when. Kept once
    # the run is over: for an interrupted run it says whose process stopped, and when.
    lease_owner = models.CharField(max_length=200, blank=True)
    lease_expires_at = models.DateTimeField(null=True, blank=True)
    # No event of the run has a higher seq: while it executes, a ceiling its writer
    # reserves ahead; once it is over, the seq of its final event. So whoever closes a
    # run, or rebuilds its final event, numbers it after anything a client saw.
    event_seq = models.PositiveBigIntegerField(default=0)
    # How many times it was resumed after its process died or handed it back (see
    # `chat.lifecycle.run_recover`): past AGENT_RUN_MAX_RECOVERIES it is closed as
    # interrupted instead, so a run that kills its process every time cannot loop.
    recoveries = models.PositiveSmallIntegerField(default=0)

    objects = RunQuerySet.as_manager()

    class Meta:
        ordering = ["-created_at"]
        indexes = [
            models.Index(fields=["conversation", "status"]),
            models.Index(fields=["status", "lease_expires_at"]),
        ]

    def __str__(self) -> str:
        return f"Run {self.id} ({self.status})"

    @property
    def is_active(self) -> bool:
        return self.status in self.ACTIVE_STATUSES

    def lease_lapsed(self) -> bool:
        """Whether the process executing it stopped renewing its lease (see `lease_lapsed`)."""
        return self.lease_expires_at is not None and self.lease_expires_at < timezone.now()

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
    # A turn of earlier conversation the caller brought with the run's message (an
    # OpenAI client sends the whole history with every request): fed to the agent
    # before it, never written by the run, even in the assistant role.
    imported = models.BooleanField(default=False)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["created_at", "id"]
        indexes = [models.Index(fields=["conversation", "created_at"])]

    def __str__(self) -> str:
        return f"{self.role}: {self.content[:60]}"
