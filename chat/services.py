"""Writes. Services own transactions; side effects (starting or cancelling a run,
forgetting agent memory) happen on commit."""

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal
from uuid import UUID

from asgiref.sync import async_to_sync
from channels.db import database_sync_to_async
from django.conf import settings
from django.contrib.auth.models import AnonymousUser, User
from django.db import connection, transaction
from django.utils import timezone

from agentsite.auth import Principal, owned_or_404
from agentsite.errors import ApplicationError
from agentsite.idempotency.services import (
    IdempotentRequest,
    StoredResponse,
    idempotency_claim,
    idempotency_record,
    stored_response,
)
from agentsite.text import UNSTORABLE
from billing.budget import account_lock, budget_release_stale, runs_admit
from billing.ratelimit import rate_limit_hit_for_user
from billing.services import account_quotas_for_user

from . import admission_sql, lifecycle, selectors
from .agent.checkpointer import delete_thread
from .agent.executor import get_executor
from .agent.models import model_info
from .models import Conversation, Message, Run

logger = logging.getLogger(__name__)

TITLE_MAX_CHARS = 200
DEFAULT_TITLE = "New conversation"


def conversation_create(
    *,
    owner: User,
    title: str | None = None,
    source: Conversation.Source = Conversation.Source.BROWSER,
) -> Conversation:
    """A new conversation; without a title, a placeholder that the first message
    replaces. A title given is held to `_clean_title`'s rules, an empty one too."""
    return Conversation.objects.create(
        owner=owner,
        title=_clean_title(DEFAULT_TITLE if title is None else title),
        source=source,
    )


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
    if UNSTORABLE.search(title):
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
    if UNSTORABLE.search(content):
        raise ApplicationError("invalid_message", _unstorable_message("message"))
    return content


def _clean_part(content: object, **where: Any) -> str:
    """`_clean_message` for a part of a run's input other than its message, its error
    saying `where` (a turn of history, the instructions)."""
    try:
        return _clean_message(content)
    except ApplicationError as error:
        raise ApplicationError(
            error.code, error.message, error.http_status, **error.extra, **where
        ) from error


def _unstorable_message(what: str) -> str:
    return (
        f"The {what} contains a character that cannot be stored (a NUL character or an "
        "unpaired UTF-16 surrogate); remove it and try again."
    )


@dataclass(frozen=True)
class ConversationJoined:
    conversation: Conversation
    # The run under way, if any.
    active_run: Run | None
    # Runs whose process died past their recoveries limit, closed now: their final
    # events are the caller's to publish.
    closed: list[lifecycle.ClosedRun]


def conversation_join(
    *, user: User | AnonymousUser, conversation_id: UUID | str
) -> ConversationJoined:
    """What a socket needs when it opens, in one call (one thread hop, two queries
    nearly always): the conversation if `user` may see it (else `not_found`), its runs
    whose process died resumed now rather than at the next reaper tick (a user who
    reloads sees the run continue), and the run still under way."""
    conversation = selectors.conversation_get(user=user, conversation_id=conversation_id)
    active = selectors.run_get_active(conversation=conversation)
    closed: list[lifecycle.ClosedRun] = []
    # A run whose process died is recovered by us now, or by a reaper (this process's
    # keeper runs on its own thread) in the meantime; read it again.
    if active is not None and active.lease_lapsed():
        closed = lifecycle.runs_recover_lapsed(
            executor=get_executor(), conversation_id=conversation.id
        ).closed
        active = selectors.run_get_active(conversation=conversation)
    return ConversationJoined(conversation=conversation, active_run=active, closed=closed)


@dataclass(frozen=True)
class Turn:
    """A turn of earlier conversation a caller brings with its message (an OpenAI client
    sends the whole history with every request)."""

    role: Literal["user", "assistant"]
    content: object


def run_create(
    *,
    conversation: Conversation,
    content: object,
    history: Sequence[Turn] = (),
    instructions: str = "",
    count_request: bool = False,
    api_key_id: int | None = None,
) -> Run:
    """Record the user's message and queue a run to answer it; it starts once committed.
    `count_request`: count it against the account's requests per minute first (the chat
    socket's messages; nothing else has counted them). `api_key_id`: the key whose
    request started it (None: the browser), recorded on the run and its ledger rows.

    `history`: earlier turns the agent has not seen, stored with the run (`imported`)
    and fed to it before the message; for a conversation whose agent memory is empty
    (the caller keeps the history, not us). `instructions`: the caller's own, given to
    the model after the agent's system prompt (see `Run.instructions`). A turn that is
    not valid text is refused like the message, its error naming it (`turn`: its index;
    `instructions`: true).

    One transaction of five statements (six on PostgreSQL), nearly always: what is
    rare (a run whose process died, a hold its run left) costs more only when it is
    there. With the in-process executor the run is created started, and handed to it
    with what starting it would have read (`lifecycle.run_started_at_creation`)."""
    owner = conversation.owner_id
    quotas = (
        rate_limit_hit_for_user(user_id=owner)
        if count_request
        else account_quotas_for_user(user_id=owner)
    )
    text = _clean_message(content)
    turns = [
        (turn.role, _clean_part(turn.content, turn=index)) for index, turn in enumerate(history)
    ]
    if instructions:
        instructions = _clean_part(instructions, instructions=True)
    first = next((said for role, said in turns if role == Message.Role.USER), text)
    title = _clean_title(first[:60])
    with transaction.atomic():
        # The account first, as every writer of its budget does (no deadlocks); then the
        # conversation's row (this update locks it), so two tabs cannot start two runs
        # at once.
        account_lock(account_id=quotas.account_id)
        now = timezone.now()
        with connection.cursor() as cursor:
            titled = admission_sql.conversation_touch(
                cursor,
                conversation_id=conversation.id,
                placeholder=DEFAULT_TITLE,
                title=title,
                now=now,
            )
            if titled is None:
                raise ApplicationError(
                    "not_found", "There is no such conversation.", http_status=404
                )
            runs = admission_sql.runs_under_way(
                cursor, account_id=quotas.account_id, conversation_id=conversation.id, now=now
            )
        conversation.title = titled
        alive_here = runs.alive_here
        if runs.lost_here:
            # A run whose process died is resumed: it blocks this message as a run under
            # way does (refused below; the refusal undoes its recovery, and a reaper
            # recovers it within a tick). One past its recoveries limit is closed now,
            # before its hold could be taken for stale below, and blocks nothing.
            reaped = lifecycle.runs_recover_lapsed(
                executor=get_executor(), conversation_id=conversation.id
            )
            for closed in reaped.closed:
                transaction.on_commit(partial(async_to_sync(lifecycle.run_closed_publish), closed))
            alive_here += len(reaped.recovered)
        budget_release_stale(
            account_id=quotas.account_id,
            active_run_ids=Run.objects.filter(status__in=Run.ACTIVE_STATUSES).values_list(
                "id", flat=True
            ),
        )
        if alive_here:
            raise ApplicationError(
                "run_active",
                "The agent is still answering the previous message; wait or press stop.",
                http_status=409,
            )
        runs_admit(limits=quotas.limits, active_runs=runs.alive)
        executor = get_executor()
        run = Run.objects.create(
            conversation_id=conversation.id,
            api_key_id=api_key_id,
            model=model_info().name,
            instructions=instructions,
            **executor.new_run(),
        )
        # In this order: the conversation reads them by creation.
        messages = Message.objects.bulk_create(
            [
                *(
                    Message(
                        conversation_id=conversation.id,
                        run=run,
                        role=role,
                        content=said,
                        imported=True,
                    )
                    for role, said in turns
                ),
                Message(
                    conversation_id=conversation.id, run=run, role=Message.Role.USER, content=text
                ),
            ]
        )
        # In the transaction: the queue's job commits (or rolls back) with the run.
        executor.submit(
            run.id,
            started=lifecycle.run_started_at_creation(
                run=run, conversation=conversation, account_id=quotas.account_id, messages=messages
            )
            if run.status == Run.Status.RUNNING
            else None,
        )
    return run


def conversation_start(
    *,
    owner: User,
    source: Conversation.Source,
    content: object,
    history: Sequence[Turn] = (),
    instructions: str = "",
    api_key_id: int | None = None,
) -> Run:
    """A new conversation and the run answering its first message (see `run_create`),
    in one transaction: a run refused (a limit, bad input) leaves no empty conversation
    behind."""
    with transaction.atomic():
        conversation = conversation_create(owner=owner, source=source)
        return run_create(
            conversation=conversation,
            content=content,
            history=history,
            instructions=instructions,
            api_key_id=api_key_id,
        )


def run_cancel(*, conversation: Conversation, run_id: UUID | str | None = None) -> Run:
    runs = conversation.runs.filter(status__in=Run.ACTIVE_STATUSES)
    if run_id is not None:
        runs = runs.filter(id=run_id)
    run = runs.first()
    if run is None:
        raise ApplicationError(
            "no_active_run", "There is no answer in progress to stop.", http_status=409
        )
    transaction.on_commit(lambda: _cancel_or_close(run.id))
    return run


def _cancel_or_close(run_id: UUID) -> None:
    # A run whose process died, not resumed yet, is closed as cancelled, with its final
    # event (`run_close` claims it only if its lease lapsed): the user stopped it, and no
    # reaper must resume it. Otherwise the executor stops a run it is executing (here,
    # or in another instance); a run no executor here has, with a single instance, is
    # closed here with its final event.
    cancelled = {
        "status": Run.Status.CANCELLED,
        "error_code": "cancelled",
        "error_message": "Stopped by the user.",
    }
    if async_to_sync(lifecycle.run_close_and_publish)(run_id=run_id, **cancelled):
        return
    if not get_executor().cancel(run_id):
        async_to_sync(lifecycle.run_close_and_publish)(
            run_id=run_id, lapsed_only=False, **cancelled
        )


def run_response_record(*, idempotency: IdempotentRequest, response: StoredResponse) -> None:
    """The response of a run's request that is known only once the run is over (`wait`):
    stored for the key's retries, which otherwise derive it again from the run."""
    with transaction.atomic():
        idempotency_record(request=idempotency, response=response)


@dataclass(frozen=True)
class RunSubmitted:
    """A run started by `run_submit`, or the one an earlier request with the same
    Idempotency-Key started (`replayed`: nothing was created now), with the response
    if it is known (`respond`'s, or the earlier request's, stored)."""

    # None only for a replay whose run was deleted since (with its conversation).
    run: Run | None
    replayed: bool = False
    response: StoredResponse | None = None


def run_submit(
    *,
    caller: Principal,
    conversation_id: UUID,
    content: object,
    idempotency: IdempotentRequest | None = None,
    respond: Callable[[Run], StoredResponse] | None = None,
) -> RunSubmitted:
    """`run_create` in `caller`'s conversation for the JSON API, at most once per
    Idempotency-Key: the key is claimed in the transaction that creates the run, and
    stored with the run's id and `respond(run)`, the response if it is known now (a
    202): so a retry finds the run even if this request dies before it answers.

    The key is looked up before the conversation: a retry is answered from what the
    first request stored even after the conversation was deleted (a 404 only if nothing
    was stored and the run is gone)."""

    def create() -> Run:
        conversation = owned_or_404(
            Conversation.objects.all(), principal=caller, name="conversation", id=conversation_id
        )
        return run_create(conversation=conversation, content=content, api_key_id=caller.api_key_id)

    return _submitted(create=create, idempotency=idempotency, respond=respond)


def run_start(
    *,
    owner: User,
    conversation_id: UUID | str | None,
    source: Conversation.Source,
    content: object,
    history: Sequence[Turn] = (),
    instructions: str = "",
    api_key_id: int | None = None,
    idempotency: IdempotentRequest | None = None,
) -> RunSubmitted:
    """A run answering `content` for a client that keeps the conversation itself (the
    OpenAI-compatible endpoint), at most once per Idempotency-Key (see `run_submit`).
    Without `conversation_id`, in a new conversation (`conversation_start`, fed
    `history`); with it, continuing that conversation of `owner`'s (`not_found`
    otherwise), whose agent remembers the rest: `history` is not used."""

    def create() -> Run:
        if conversation_id is None:
            return conversation_start(
                owner=owner,
                source=source,
                content=content,
                history=history,
                instructions=instructions,
                api_key_id=api_key_id,
            )
        conversation = selectors.conversation_get(user=owner, conversation_id=conversation_id)
        return run_create(
            conversation=conversation,
            content=content,
            instructions=instructions,
            api_key_id=api_key_id,
        )

    return _submitted(create=create, idempotency=idempotency, respond=None)


def _submitted(
    *,
    create: Callable[[], Run],
    idempotency: IdempotentRequest | None,
    respond: Callable[[Run], StoredResponse] | None,
) -> RunSubmitted:
    with transaction.atomic():
        earlier = idempotency_claim(request=idempotency) if idempotency is not None else None
        if earlier is not None:
            run = Run.objects.filter(id=earlier.resource).first()
            response = stored_response(earlier)
            if run is None and response is None:  # deleted with its conversation since
                raise ApplicationError("run_not_found", "There is no such run.", http_status=404)
            return RunSubmitted(run=run, replayed=True, response=response)
        run = create()
        response = respond(run) if respond is not None else None
        if idempotency is not None:
            idempotency_record(request=idempotency, resource=str(run.id), response=response)
    return RunSubmitted(run=run, response=response)


def run_abandon(*, run_id: UUID) -> None:
    """Stop a run whose client left and cannot come back for its answer (the
    OpenAI-compatible endpoint without an Idempotency-Key), so it does not go on
    spending. A run that ended meanwhile, or went with its conversation, is left be."""
    run = Run.objects.select_related("conversation").filter(id=run_id).first()
    if run is None:
        return
    try:
        run_cancel(conversation=run.conversation, run_id=run_id)
    except ApplicationError:  # over already
        return
    logger.info("run %s: cancelled, its client left", run_id)


_abandoning: set["asyncio.Task[None]"] = set()


def run_abandon_in_background(*, run_id: UUID) -> None:
    """`run_abandon`, not awaited: for a request being cancelled (its client left),
    which cannot await anything any more. Call it on the event loop."""
    task = asyncio.get_running_loop().create_task(
        database_sync_to_async(run_abandon)(run_id=run_id)
    )
    # Held until done: the loop keeps only a weak reference to a task.
    _abandoning.add(task)
    task.add_done_callback(_abandoning.discard)
