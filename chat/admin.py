from django.contrib import admin

from .models import Conversation, Message, Run


class MessageInline(admin.TabularInline):
    model = Message
    fields = ("created_at", "role", "content", "tool", "run")
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
    list_display = ("title", "owner", "created_at", "updated_at")
    list_filter = ("created_at",)
    search_fields = ("title", "owner__username", "id")
    readonly_fields = ("id", "created_at", "updated_at")
    list_select_related = ("owner",)
    inlines = [RunInline, MessageInline]


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
