"""Writes. Services own transactions; side effects (starting or cancelling a run,
forgetting agent memory) happen on commit."""

import re
from uuid import UUID

from django.conf import settings
from django.contrib.auth.models import User
from django.db import transaction
from django.utils import timezone

from agentsite.errors import ApplicationError
from billing.budget import account_lock, budget_release_stale, runs_admit
from billing.services import account_for_user
from tracing.services import trace_close_interrupted

from .agent.checkpointer import delete_thread
from .agent.executor import get_executor
from .agent.models import model_info
from .models import Conversation, Message, Run
from .run_outcome import RunOutcome

TITLE_MAX_CHARS = 200
DEFAULT_TITLE = "New conversation"
# Characters no database here can store: PostgreSQL text refuses NUL, and no UTF-8
# database takes a lone surrogate (JSON can carry one escaped, as "\ud800").
_UNSTORABLE = re.compile(r"[\x00\ud800-\udfff]")


def conversation_create(*, owner: User, title: str = "") -> Conversation:
    return Conversation.objects.create(owner=owner, title=_clean_title(title or DEFAULT_TITLE))


def conversation_rename(*, conversation: Conversation, title: str) -> Conversation:
    conversation.title = _clean_title(title)
    conversation.save(update_fields=["title", "updated_at"])
    return conversation


def conversation_delete(*, conversation: Conversation) -> None:
    thread_id = str(conversation.id)
    active = [run.id for run in conversation.runs.filter(status__in=Run.ACTIVE_STATUSES)]
    with transaction.atomic():
        conversation.delete()
        transaction.on_commit(lambda: _stop_and_forget(active, thread_id))


def _stop_and_forget(run_ids: list[UUID], thread_id: str) -> None:
    for run_id in run_ids:
        get_executor().cancel(run_id)
    delete_thread(thread_id)


def _clean_title(title: str) -> str:
    title = " ".join(title.split())
    if not title:
        raise ApplicationError("invalid_title", "A conversation title cannot be empty.")
    if _UNSTORABLE.search(title):
        raise ApplicationError("invalid_title", _unstorable_message("title"))
    if len(title) > TITLE_MAX_CHARS:
        raise ApplicationError(
            "invalid_title", f"A conversation title is at most {TITLE_MAX_CHARS} characters."
        )
    return title


def _clean_message(content: object) -> str:
    if not isinstance(content, str):
        raise ApplicationError("invalid_message", "The message must be text.")
    content = content.strip()
    if not content:
        raise ApplicationError("empty_message", "The message is empty: type something first.")
    limit = settings.AGENT_MAX_MESSAGE_CHARS
    if len(content) > limit:
        raise ApplicationError(
            "message_too_long",
            f"The message has {len(content)} characters; the limit is {limit}. "
            "Shorten it or split it into several messages.",
        )
    if _UNSTORABLE.search(content):
        raise ApplicationError("invalid_message", _unstorable_message("message"))
    return content


def _unstorable_message(what: str) -> str:
    return (
        f"The {what} contains a character that cannot be stored (a NUL character or an "
        "unpaired UTF-16 surrogate); remove it and try again."
    )


def run_create(*, conversation: Conversation, content: object) -> Run:
    """Record the user's message and queue a run to answer it; the run starts on commit."""
    text = _clean_message(content)
    account = account_for_user(user_id=conversation.owner_id)
    with transaction.atomic():
        # The account first, as every writer of its budget does (no deadlocks); then the
        # conversation, so two tabs cannot start two runs at once.
        account_lock(account_id=account.pk)
        conversation = Conversation.objects.select_for_update().get(id=conversation.id)
        _expire_interrupted_runs(conversation)
        budget_release_stale(account_id=account.pk)
        if conversation.runs.filter(status__in=Run.ACTIVE_STATUSES).exists():
            raise ApplicationError(
                "run_active",
                "The agent is still answering the previous message; wait or press stop.",
                http_status=409,
            )
        runs_admit(account=account)
        if conversation.title == DEFAULT_TITLE:
            conversation.title = _clean_title(text[:60])
        conversation.save(update_fields=["title", "updated_at"])
        run = Run.objects.create(conversation=conversation, model=model_info().name)
        Message.objects.create(
            conversation=conversation, run=run, role=Message.Role.USER, content=text
        )
        transaction.on_commit(lambda: get_executor().submit(run.id))
    return run


def _expire_interrupted_runs(conversation: Conversation) -> None:
    """A run still 'active' long after its wall-clock limit lost its executor (the process
    died); close it so the conversation is usable again."""
    run_ids = list(conversation.runs.lost().values_list("id", flat=True))
    if not run_ids:
        return
    message = "The server running this answer stopped before it finished."
    Run.objects.filter(id__in=run_ids).update(
        status=Run.Status.FAILED,
        finished_at=timezone.now(),
        error_code="run_interrupted",
        error_message=message,
    )
    trace_close_interrupted(run_ids=run_ids, error_type="run_interrupted", error_message=message)


def run_start(*, run_id: UUID) -> Run | None:
    """Mark a queued run running; None if it is no longer queued (cancelled meanwhile)."""
    started = Run.objects.filter(id=run_id, status=Run.Status.QUEUED).update(
        status=Run.Status.RUNNING, started_at=timezone.now()
    )
    if not started:
        return None
    return Run.objects.select_related("conversation").get(id=run_id)


def run_finish(*, run_id: UUID, outcome: RunOutcome) -> list[Message]:
    """Store what the run produced and close it. Idempotent: a run that is already
    closed (or deleted with its conversation) is left as it is."""
    with transaction.atomic():
        run = Run.objects.select_for_update().filter(id=run_id).first()
        if run is None or not run.is_active:
            return []
        run.status = outcome.status
        run.finished_at = timezone.now()
        run.steps = outcome.steps
        run.input_tokens = outcome.input_tokens
        run.output_tokens = outcome.output_tokens
        run.cost_usd = outcome.cost_usd
        run.error_code = outcome.error_code
        run.error_message = outcome.error_message
        run.save(
            update_fields=[
                "status",
                "finished_at",
                "steps",
                "input_tokens",
                "output_tokens",
                "cost_usd",
                "error_code",
                "error_message",
            ]
        )
        messages = [_message_from_part(run, part) for part in outcome.parts]
        created = Message.objects.bulk_create([m for m in messages if m is not None])
        Conversation.objects.filter(id=run.conversation_id).update(updated_at=timezone.now())
    return created


def _message_from_part(run: Run, part: dict) -> Message | None:
    if part["kind"] == "text":
        if not part["text"].strip():
            return None
        return Message(
            conversation_id=run.conversation_id,
            run=run,
            role=Message.Role.ASSISTANT,
            content=part["text"],
        )
    tool = {key: part[key] for key in ("tool_call_id", "name", "args", "result", "is_error")}
    return Message(conversation_id=run.conversation_id, run=run, role=Message.Role.TOOL, tool=tool)


def run_cancel(*, conversation: Conversation, run_id: UUID | str | None = None) -> Run:
    runs = conversation.runs.filter(status__in=Run.ACTIVE_STATUSES)
    if run_id is not None:
        runs = runs.filter(id=run_id)
    run = runs.first()
    if run is None:
        raise ApplicationError(
            "no_active_run", "There is no answer in progress to stop.", http_status=409
        )
    lost = Run.objects.lost().filter(id=run.id).exists()
    transaction.on_commit(lambda: _cancel_or_close(run.id, lost=lost))
    return run


def _cancel_or_close(run_id: UUID, *, lost: bool) -> None:
    # The executor stops a run it is executing; a run nobody executes (its process
    # died: it is past its wall-clock limit, or no executor here has it) is closed here
    # so it does not stay "running" forever. With a Redis layer the executor cannot
    # tell whether another instance has the run, so only `lost` says it is gone.
    if lost or not get_executor().cancel(run_id):
        run_finish(
            run_id=run_id,
            outcome=RunOutcome(
                status=Run.Status.CANCELLED,
                error_code="cancelled",
                error_message="Stopped by the user.",
            ),
        )
