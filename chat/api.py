"""The conversation endpoints of the JSON API.

An API key needs the `runs` scope for them: a conversation is where runs happen, and a
key that may run the agent must be able to open, read and close the conversations it
runs in (see `agentsite.auth.Scope`)."""

from typing import Any, cast
from uuid import UUID

from django.contrib.auth.models import User
from django.http import HttpRequest, HttpResponse
from ninja import Query, Router, Status

from agentsite.api_errors import errors
from agentsite.auth import Scope, owned_or_404, principal, require_scope
from agentsite.idempotency.http import idempotency_key_parameter, idempotent_response
from agentsite.idempotency.services import StoredResponse
from agentsite.pagination import DEFAULT_LIMIT, Page, PageParams

from . import selectors, services
from .models import Conversation, Message
from .schemas import (
    ConversationCreateIn,
    ConversationDetailOut,
    ConversationOut,
    ConversationPageOut,
    ConversationRenameIn,
    MessagePageOut,
)

router = Router(tags=["conversations"])


def _caller(request: HttpRequest) -> User:
    require_scope(request, Scope.RUNS)
    # The API's auth set the user (a key acts as its user).
    return cast(User, request.user)


def _owned(request: HttpRequest, conversation_id: UUID) -> Conversation:
    return owned_or_404(
        Conversation.objects.all(),
        principal=require_scope(request, Scope.RUNS),
        name="conversation",
        id=conversation_id,
    )


@router.post(
    "/conversations",
    response={201: ConversationOut, **errors(400, 401, 403, 413, 422, 429)},
    openapi_extra={"parameters": [idempotency_key_parameter()]},
)
def conversation_create(request: HttpRequest, body: ConversationCreateIn) -> HttpResponse:
    """Open a conversation. Send it messages with `POST /conversations/{id}/runs`."""
    owner = _caller(request)

    def create() -> StoredResponse:
        conversation = services.conversation_create(
            owner=owner, title=body.title, source=Conversation.Source.API
        )
        return StoredResponse(201, ConversationOut.from_orm(conversation).model_dump())

    return idempotent_response(request, caller=principal(request), create=create)


@router.get(
    "/conversations", response={200: ConversationPageOut, **errors(400, 401, 403, 422, 429)}
)
def conversation_list(request: HttpRequest, params: Query[PageParams]) -> Page[Conversation]:
    """The caller's conversations, newest first (by creation, so a conversation that gets
    a message keeps its place while you page). 400 `invalid_cursor` for a cursor this
    list did not issue."""
    return selectors.conversation_page(owner=_caller(request), params=params)


@router.get(
    "/conversations/{conversation_id}",
    response={200: ConversationDetailOut, **errors(401, 403, 404, 422, 429)},
)
def conversation_get(request: HttpRequest, conversation_id: UUID) -> dict[str, Any]:
    """The conversation and the first page of its messages (default page size)."""
    conversation = _owned(request, conversation_id)
    return {
        **{field: getattr(conversation, field) for field in ConversationOut.model_fields},
        "messages": selectors.message_page(
            conversation=conversation, params=PageParams(cursor=None, limit=DEFAULT_LIMIT)
        ),
    }


@router.get(
    "/conversations/{conversation_id}/messages",
    response={200: MessagePageOut, **errors(400, 401, 403, 404, 422, 429)},
)
def message_list(
    request: HttpRequest, conversation_id: UUID, params: Query[PageParams]
) -> Page[Message]:
    """The conversation's messages, oldest first: the user's, the agent's answers, and
    its tool calls (`role` "tool", with `tool`), each with the run it belongs to."""
    conversation = _owned(request, conversation_id)
    return selectors.message_page(conversation=conversation, params=params)


@router.patch(
    "/conversations/{conversation_id}",
    response={200: ConversationOut, **errors(400, 401, 403, 404, 413, 422, 429)},
)
def conversation_rename(
    request: HttpRequest, conversation_id: UUID, body: ConversationRenameIn
) -> Conversation:
    return services.conversation_rename(
        conversation=_owned(request, conversation_id), title=body.title
    )


@router.delete(
    "/conversations/{conversation_id}", response={204: None, **errors(401, 403, 404, 422, 429)}
)
def conversation_delete(request: HttpRequest, conversation_id: UUID) -> Status[None]:
    """Delete the conversation with its messages and runs. A run under way is stopped,
    and the agent forgets the conversation (its checkpoints)."""
    services.conversation_delete(conversation=_owned(request, conversation_id))
    return Status(204, None)
