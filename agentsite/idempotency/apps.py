from django.apps import AppConfig


class IdempotencyConfig(AppConfig):
    name = "agentsite.idempotency"
    label = "idempotency"
    default_auto_field = "django.db.models.BigAutoField"
