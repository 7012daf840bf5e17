"""The browser chat pages. Thin: parse, call a service or selector, render."""

import json
from typing import Any
from uuid import UUID

from django.conf import settings
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import Http404, HttpResponse
from django.shortcuts import redirect, render
from django.views.decorators.http import require_POST

from agentsite.errors import ApplicationError
from agentsite.http import AuthenticatedHttpRequest

from . import selectors, services
from .models import Conversation, Message
from .rendering import render_markdown


def _owned(request: AuthenticatedHttpRequest, conversation_id: UUID) -> Conversation:
    try:
        return selectors.conversation_get(user=request.user, conversation_id=conversation_id)
    except ApplicationError as error:
        # Another user's conversation is as invisible as a missing one.
        raise Http404(error.message) from error


@login_required
def index(request: AuthenticatedHttpRequest) -> HttpResponse:
    latest = selectors.conversation_list(owner=request.user).first()
    if latest is None:
        latest = services.conversation_create(owner=request.user)
    return redirect("chat:conversation", conversation_id=latest.id)


@login_required
@require_POST
def conversation_new(request: AuthenticatedHttpRequest) -> HttpResponse:
    conversation = services.conversation_create(owner=request.user)
    return redirect("chat:conversation", conversation_id=conversation.id)


@login_required
def conversation_detail(request: AuthenticatedHttpRequest, conversation_id: UUID) -> HttpResponse:
    conversation = _owned(request, conversation_id)
    history = _history_items(
        list(selectors.message_list(conversation=conversation).select_related("run"))
    )
    active = selectors.run_get_active(conversation=conversation)
    return render(
        request,
        "chat/conversation.html",
        {
            "conversation": conversation,
            "conversations": selectors.conversation_list(owner=request.user),
            "history": history,
            "active_run": active,
            "max_message_chars": settings.AGENT_MAX_MESSAGE_CHARS,
            "tracing_enabled": settings.TRACING_ENABLED,
            "budget": selectors.budget_line(user_id=request.user.pk),
        },
    )


def _history_items(history: list[Message]) -> list[dict[str, Any]]:
    """Each message with its safe HTML; the last message of a finished run also carries
    the run's footer (tokens, and the error if it failed)."""
    items = []
    for index, message in enumerate(history):
        following = history[index + 1] if index + 1 < len(history) else None
        run = message.run
        ends_run = (
            run is not None
            and not run.is_active
            and (following is None or following.run_id != message.run_id)
        )
        tool = None
        if message.tool:
            args = message.tool.get("args")
            # A string: the arguments of a call that never ran, as the model sent them.
            args_json = args if isinstance(args, str) else json.dumps(args, indent=2)
            tool = {**message.tool, "args_json": args_json}
        items.append(
            {
                "message": message,
                "html": render_markdown(message.content),
                "tool": tool,
                "run_footer": ends_run,
            }
        )
    return items


@login_required
@require_POST
def conversation_rename_view(
    request: AuthenticatedHttpRequest, conversation_id: UUID
) -> HttpResponse:
    conversation = _owned(request, conversation_id)
    try:
        services.conversation_rename(conversation=conversation, title=request.POST.get("title", ""))
    except ApplicationError as error:
        messages.error(request, error.message)
    return redirect("chat:conversation", conversation_id=conversation.id)


@login_required
@require_POST
def conversation_delete_view(
    request: AuthenticatedHttpRequest, conversation_id: UUID
) -> HttpResponse:
    services.conversation_delete(conversation=_owned(request, conversation_id))
    return redirect("chat:index")
