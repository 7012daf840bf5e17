from django.core.serializers.json import DjangoJSONEncoder
from django.db import models
from django.utils import timezone


class IdempotencyKey(models.Model):
    """One Idempotency-Key of one account: which request used it first (a fingerprint),
    what that request created, and its response once known (see the package)."""

    # The billing account's id: the ground floor takes ids, not billing's models.
    account_id = models.BigIntegerField()
    key = models.CharField(max_length=255)
    # SHA-256 of the method, path, caller and body of the first request.
    fingerprint = models.CharField(max_length=64)
    # What the request created (a run's or conversation's id), set with the row.
    resource = models.CharField(max_length=200, blank=True)
    # The first request's response; null while it is not known (see `resource`).
    response_status = models.PositiveSmallIntegerField(null=True, blank=True)
    # Encoded as the API encodes its responses (DjangoJSONEncoder, as ninja's), so a
    # replay is the JSON the first request answered (datetimes to the millisecond).
    response_body = models.JSONField(null=True, blank=True, encoder=DjangoJSONEncoder)
    response_headers = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["account_id", "key"], name="idempotency_one_key_per_account"
            )
        ]
        indexes = [models.Index(fields=["created_at"])]

    def __str__(self) -> str:
        return f"{self.key} (account {self.account_id})"
