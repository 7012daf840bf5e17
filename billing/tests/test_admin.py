import pytest
from django.contrib.auth import get_user_model
from django.urls import reverse

from billing.models import Account, ModelPrice, UsageRecord
from billing.services import LlmCall, account_for_user, usage_record_run
from chat import services
from chat.models import Run


@pytest.fixture
def admin_client_with_usage(client, make_user, prices):
    user = make_user()
    conversation = services.conversation_create(owner=user)
    run = Run.objects.create(conversation=conversation, model="agentsite-offline-demo")
    usage_record_run(
        run_id=run.id,
        user_id=user.id,
        calls=[LlmCall(None, "agentsite-offline-demo", 100, 20), LlmCall(None, "mystery", 5, 5)],
    )
    admin = get_user_model().objects.create_superuser("root", "root@example.com", "pw")
    client.force_login(admin)
    return client, account_for_user(user_id=user.id)


def test_billing_admin_pages_load(admin_client_with_usage):
    client, account = admin_client_with_usage
    for name in ("account", "modelprice", "usagerecord"):
        response = client.get(reverse(f"admin:billing_{name}_changelist"))
        assert response.status_code == 200, name
    page = client.get(reverse("admin:billing_account_change", args=[account.id]))
    assert page.status_code == 200
    assert b"$0.000072" in page.content  # 100 * 0.40/M + 20 * 1.60/M: this month's spend
    record = UsageRecord.objects.first()
    price = ModelPrice.objects.first()
    for url in (
        reverse("admin:billing_usagerecord_change", args=[record.id]),
        reverse("admin:billing_modelprice_change", args=[price.id]),
    ):
        assert client.get(url).status_code == 200, url


def test_operators_can_list_unpriced_calls(admin_client_with_usage):
    client, _ = admin_client_with_usage
    response = client.get(reverse("admin:billing_usagerecord_changelist") + "?priced=no")
    assert response.status_code == 200
    assert list(response.context["cl"].queryset.values_list("model", flat=True)) == ["mystery"]


def test_the_ledger_cannot_be_edited_in_the_admin(admin_client_with_usage):
    client, _ = admin_client_with_usage
    record = UsageRecord.objects.first()
    assert client.get(reverse("admin:billing_usagerecord_add")).status_code == 403
    response = client.post(
        reverse("admin:billing_usagerecord_change", args=[record.id]), {"input_tokens": 0}
    )
    assert response.status_code == 403
    assert Account.objects.count() == 1
