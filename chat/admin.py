from typing import Any

from django.contrib import admin
from django.db.models import QuerySet
from django.http import HttpRequest

from tracing.models import Span, Trace

from . import services
from .models import Conversation, Message, Run


class MessageInline(admin.TabularInline):
    model = Message
    fields = ("created_at", "role", "imported", "content", "tool", "run")
    readonly_fields = fields
    extra = 0
    can_delete = False
    show_change_link = True


class RunInline(admin.TabularInline):
    model = Run
    fields = (
        "created_at",
        "status",
        "model",
        "steps",
        "input_tokens",
        "output_tokens",
        "error_code",
    )
    readonly_fields = fields
    extra = 0
    can_delete = False
    show_change_link = True


@admin.register(Conversation)
class ConversationAdmin(admin.ModelAdmin):
    list_display = ("title", "owner", "source", "created_at", "updated_at")
    list_filter = ("source", "created_at")
    search_fields = ("title", "owner__username", "id")
    readonly_fields = ("id", "created_at", "updated_at")
    list_select_related = ("owner",)
    inlines = [RunInline, MessageInline]

    # Through the service, like the user's own delete: it stops the conversation's runs
    # and forgets its agent memory (checkpoints), which a bare row delete leaves behind.
    def delete_model(self, request: HttpRequest, obj: Conversation) -> None:
        services.conversation_delete(conversation=obj)

    def delete_queryset(self, request: HttpRequest, queryset: QuerySet[Conversation]) -> None:
        for conversation in queryset:
            services.conversation_delete(conversation=conversation)

    def get_deleted_objects(self, objs: Any, request: HttpRequest) -> Any:
        deleted, counts, perms_needed, protected = super().get_deleted_objects(objs, request)
        # Traces are read-only in the admin, yet go with their conversation, as when its
        # owner deletes it; without this a conversation that ever ran could not be deleted.
        read_only = {Trace._meta.verbose_name, Span._meta.verbose_name}
        return deleted, counts, perms_needed - read_only, protected


@admin.register(Run)
class RunAdmin(admin.ModelAdmin):
    list_display = (
        "id",
        "conversation",
        "status",
        "model",
        "created_at",
        "steps",
        "input_tokens",
        "output_tokens",
        "recoveries",
        "error_code",
    )
    list_filter = ("status", "model", "created_at")
    search_fields = ("id", "conversation__title", "conversation__owner__username", "error_code")
    readonly_fields = [f.name for f in Run._meta.fields]
    list_select_related = ("conversation",)
    inlines = [MessageInline]


@admin.register(Message)
class MessageAdmin(admin.ModelAdmin):
    list_display = ("id", "conversation", "role", "short_content", "created_at")
    list_filter = ("role", "created_at")
    search_fields = ("content", "conversation__title")
    readonly_fields = ("created_at",)
    list_select_related = ("conversation",)

    @admin.display(description="content")
    def short_content(self, message: Message) -> str:
        return message.content[:80]
