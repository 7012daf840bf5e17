import importlib
import re
from decimal import Decimal

import pytest
from django.apps import apps
from django.urls import reverse

from billing.models import DailySpend
from billing.selectors import utc_today
from chat import services
from chat.models import Conversation, Message, Run
from conftest import account_with_limits

pytestmark = pytest.mark.django_db

# The seed migration's own function (see billing/tests/conftest.py's `prices`).
_seed_prices = importlib.import_module("billing.migrations.0002_seed_model_prices")


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


def test_a_tool_call_that_never_ran_shows_its_arguments_as_sent(client, make_user):
    user = make_user()
    conversation = services.conversation_create(owner=user)
    for call_id, args in (
        ("ran", {"expression": "2 * 3"}),
        ("rejected", '{"expression": "1234 * 5'),
    ):
        Message.objects.create(
            conversation=conversation,
            role=Message.Role.TOOL,
            tool={
                "tool_call_id": call_id,
                "name": "calculator",
                "args": args,
                "result": "Error: not complete JSON" if call_id == "rejected" else "6",
                "is_error": call_id == "rejected",
            },
        )
    client.force_login(user)

    html = client.get(reverse("chat:conversation", args=[conversation.id])).content.decode()
    steps = re.findall(r'<pre class="step-args">(.*?)</pre>', html, re.S)
    assert steps == [
        "{\n  &quot;expression&quot;: &quot;2 * 3&quot;\n}",
        "{&quot;expression&quot;: &quot;1234 * 5",
    ]


def test_admin_lists_conversations_runs_and_messages(admin_client, make_user):
    conversation = services.conversation_create(owner=make_user(), title="Browsable")
    Message.objects.create(conversation=conversation, role="user", content="hello admin")
    for name in ("conversation", "run", "message"):
        assert admin_client.get(reverse(f"admin:chat_{name}_changelist")).status_code == 200
    page = admin_client.get(reverse("admin:chat_conversation_change", args=[conversation.id]))
    assert b"hello admin" in page.content


def _budget_line(html: str) -> re.Match[str]:
    found = re.search(r'<p class="budget( exhausted)?" id="budget"( hidden)?>([^<]*)</p>', html)
    assert found, "the page has no budget line"
    return found


def _page(client, user) -> str:
    client.force_login(user)
    conversation = services.conversation_create(owner=user)
    return client.get(reverse("chat:conversation", args=[conversation.id])).content.decode()


def test_the_page_shows_the_budget_left(client, make_user):
    user = make_user()
    account = account_with_limits(
        user, money_per_day_usd=Decimal("5"), money_per_month_usd=Decimal("50")
    )
    DailySpend.objects.create(account=account, day=utc_today(), spent_usd=Decimal("0.0188"))

    line = _budget_line(_page(client, user))

    assert line[3] == (
        "Budget left today: $4.9812 of $5.00 · this month: $49.9812 of $50.00 · resets 00:00 UTC"
    )
    assert line[1] is None and line[2] is None  # shown, and not as a warning


def test_the_budget_line_names_only_the_limits_that_exist(client, make_user):
    user = make_user()
    account_with_limits(user, money_per_month_usd=Decimal("20"), tokens_per_day=100_000)

    line = _budget_line(_page(client, user))

    assert line[3] == (
        "Budget left today: 100,000 of 100,000 tokens · this month: $20.0000 of $20.00 "
        "· resets 00:00 UTC"
    )


def test_an_account_without_limits_shows_no_budget(client, make_user):
    user = make_user()
    account_with_limits(user)

    line = _budget_line(_page(client, user))

    assert line[2] == " hidden" and line[3] == ""
    assert "Budget left" not in _page(client, user)


def test_a_budget_too_small_for_another_answer_is_a_warning(client, make_user):
    _seed_prices.seed(apps, None)
    user = make_user()
    # Less than one call's maximum output costs the offline model (priced like gpt-4.1-mini).
    account_with_limits(user, money_per_day_usd=Decimal("0.001"))

    line = _budget_line(_page(client, user))

    assert line[1] == " exhausted"
    assert line[3] == "Budget left today: $0.001 of $0.001 · resets 00:00 UTC"


def test_a_spent_month_says_when_it_comes_back(client, make_user):
    _seed_prices.seed(apps, None)
    user = make_user()
    account = account_with_limits(
        user, money_per_day_usd=Decimal("5"), money_per_month_usd=Decimal("10")
    )
    DailySpend.objects.create(account=account, day=utc_today(), spent_usd=Decimal("10"))

    line = _budget_line(_page(client, user))

    assert line[1] == " exhausted"
    assert line[3] == (
        "Budget left today: $0 of $5.00 · this month: $0 of $10.00 · resets on the 1st, 00:00 UTC"
    )


def test_a_run_stopped_by_the_budget_says_so_in_the_history(client, make_user):
    user = make_user()
    conversation = services.conversation_create(owner=user)
    run = Run.objects.create(
        conversation=conversation,
        model="agentsite-offline-demo",
        status=Run.Status.BUDGET_EXCEEDED,
        error_code="budget_exceeded",
        error_message="The account's daily budget of $0.00001 is used up.",
    )
    Message.objects.create(conversation=conversation, run=run, role="user", content="Hi")
    client.force_login(user)

    html = client.get(reverse("chat:conversation", args=[conversation.id])).content.decode()

    footer = html[html.index('<div class="run-footer budget_exceeded"') :]
    assert '<span class="run-status">Budget reached</span>' in footer
    assert "The account&#x27;s daily budget of $0.00001 is used up." in footer


def test_conversations_programs_started_are_marked_in_the_list(client, make_user):
    user = make_user()
    client.force_login(user)
    mine = services.conversation_create(owner=user, title="Typed here")
    services.conversation_create(
        owner=user, title="Sent by an OpenAI client", source=Conversation.Source.OPENAI
    )
    services.conversation_create(
        owner=user, title="Made over the API", source=Conversation.Source.API
    )
    page = client.get(reverse("chat:conversation", args=[mine.id])).content.decode()
    marked = re.findall(r'<span class="source">API</span> ([^<]+)</a>', page)
    assert sorted(marked) == ["Made over the API", "Sent by an OpenAI client"]
