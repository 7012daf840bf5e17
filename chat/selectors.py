from uuid import UUID

from django.conf import settings
from django.contrib.auth.models import AnonymousUser, User
from django.core.exceptions import ValidationError
from django.db.models import QuerySet

from agentsite.auth import user_owned_or_404
from agentsite.errors import ApplicationError
from agentsite.pagination import Page, PageParams, paginate
from billing.display import BudgetDisplay, BudgetLeft, budget_display, budget_left_for_user

from .agent.models import model_info
from .models import Conversation, Message, Run


def conversation_list(*, owner: User) -> QuerySet[Conversation]:
    return Conversation.objects.filter(owner=owner)


def conversation_page(*, owner: User, params: PageParams) -> Page[Conversation]:
    """The owner's conversations, newest first by creation: a conversation that gets a
    message does not move, so walking the pages never skips or repeats one."""
    return paginate(
        conversation_list(owner=owner),
        ordering=("-created_at", "-id"),
        params=params,
        salt="chat.conversations",
    )


def conversation_get(*, user: User | AnonymousUser, conversation_id: UUID | str) -> Conversation:
    """The conversation, if `user` owns it; else 404 `not_found`, as the JSON API's
    (agentsite.auth: another's conversation is not found, exactly like a missing one)."""
    return user_owned_or_404(
        Conversation.objects.all(), user_id=user.pk, name="conversation", id=conversation_id
    )


def message_list(*, conversation: Conversation) -> QuerySet[Message]:
    return conversation.messages.all()


def message_page(*, conversation: Conversation, params: PageParams) -> Page[Message]:
    """The conversation's messages in the order it reads (oldest first)."""
    return paginate(
        message_list(conversation=conversation),
        ordering=("created_at", "id"),
        params=params,
        salt=f"chat.messages:{conversation.id}",
    )


def run_get_active(*, conversation: Conversation) -> Run | None:
    return conversation.runs.filter(status__in=Run.ACTIVE_STATUSES).first()


def run_get(*, conversation: Conversation, run_id: UUID | str) -> Run:
    """A run of a conversation the caller was already allowed (its owner's, by
    `conversation_get`): membership, not ownership, with the WebSocket's own code."""
    try:
        return conversation.runs.get(id=run_id)
    except (Run.DoesNotExist, ValidationError, ValueError) as error:
        raise ApplicationError(
            "run_not_found", "There is no such run in this conversation.", http_status=404
        ) from error


def budget_left(*, user_id: int) -> BudgetLeft | None:
    """What is left of the user's account budget, for answers by the configured model;
    None if the account has no limits."""
    return budget_left_for_user(
        user_id=user_id, model=model_info().name, max_output_tokens=settings.AGENT_MAX_TOKENS
    )


def budget_line(*, user_id: int) -> BudgetDisplay | None:
    """`budget_left`, as the chat page shows it."""
    left = budget_left(user_id=user_id)
    return budget_display(left) if left is not None else None
