import pytest
from django.urls import reverse

from chat import services
from chat.models import Conversation, Message

pytestmark = pytest.mark.django_db


def test_pages_need_a_login(client):
    response = client.get(reverse("chat:index"))
    assert response.status_code == 302 and response.url.startswith("/login/")


def test_first_visit_opens_a_new_conversation(client, make_user):
    user = make_user()
    client.force_login(user)
    response = client.get(reverse("chat:index"), follow=True)
    conversation = Conversation.objects.get(owner=user)
    assert response.redirect_chain[-1][0] == reverse("chat:conversation", args=[conversation.id])
    assert b"Offline demo model" in response.content


def test_new_rename_and_delete(client, make_user):
    user = make_user()
    client.force_login(user)
    client.post(reverse("chat:conversation_new"))
    conversation = Conversation.objects.get(owner=user)

    client.post(reverse("chat:rename", args=[conversation.id]), {"title": "  Trip   plans "})
    conversation.refresh_from_db()
    assert conversation.title == "Trip plans"
    response = client.post(
        reverse("chat:rename", args=[conversation.id]), {"title": " "}, follow=True
    )
    assert b"cannot be empty" in response.content

    client.post(reverse("chat:delete", args=[conversation.id]))
    assert not Conversation.objects.filter(id=conversation.id).exists()


def test_another_users_conversation_is_invisible(client, make_user):
    alice, mallory = make_user("alice"), make_user("mallory")
    conversation = services.conversation_create(owner=alice, title="Alice's secrets")
    client.force_login(mallory)

    assert client.get(reverse("chat:conversation", args=[conversation.id])).status_code == 404
    assert (
        client.post(reverse("chat:rename", args=[conversation.id]), {"title": "pwned"}).status_code
        == 404
    )
    assert client.post(reverse("chat:delete", args=[conversation.id])).status_code == 404
    conversation.refresh_from_db()
    assert conversation.title == "Alice's secrets"
    assert b"Alice&#x27;s secrets" not in client.get(reverse("chat:index"), follow=True).content


def test_history_is_rendered_safely(client, make_user):
    user = make_user()
    conversation = services.conversation_create(owner=user)
    Message.objects.create(
        conversation=conversation, role="user", content="<img src=x onerror=alert(1)> **bold**"
    )
    client.force_login(user)

    html = client.get(reverse("chat:conversation", args=[conversation.id])).content.decode()
    assert "&lt;img src=x onerror=alert(1)&gt; <strong>bold</strong>" in html
    assert "<img src=x" not in html


def test_admin_lists_conversations_runs_and_messages(admin_client, make_user):
    conversation = services.conversation_create(owner=make_user(), title="Browsable")
    Message.objects.create(conversation=conversation, role="user", content="hello admin")
    for name in ("conversation", "run", "message"):
        assert admin_client.get(reverse(f"admin:chat_{name}_changelist")).status_code == 200
    page = admin_client.get(reverse("admin:chat_conversation_change", args=[conversation.id]))
    assert b"hello admin" in page.content
