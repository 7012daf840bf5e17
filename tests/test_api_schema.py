"""schemathesis fuzzes the whole JSON API from its own OpenAPI schema (/api/openapi.json):
every operation, with generated valid and invalid requests, under every check (no 5xx,
only declared statuses, bodies, headers and content types as documented, valid data
accepted and invalid data refused, auth enforced, …), once authenticated with an API key
and once with a browser session and its CSRF token.

The requests go through Django's WSGI handler, in process. Path ids are generated at
random and would only ever find nothing, so half the cases name one of the caller's own
objects instead, and the found branches are fuzzed too."""

import hashlib
import zlib
from typing import Any

import pytest
import schemathesis
from django.contrib.sessions.models import Session
from django.core.handlers.wsgi import WSGIHandler
from django.test import Client
from django.utils import timezone
from hypothesis import HealthCheck, settings
from schemathesis.config import SchemathesisConfig
from schemathesis.core.parameters import ParameterLocation

from billing.models import ApiKey
from billing.services import api_key_create
from chat import services
from chat.models import Run
from conftest import account_with_limits
from tracing import services as tracing_services

pytestmark = [
    # Committed, not rolled back: async operations (the runs API's) query on connections
    # of their own, which see only committed rows; and a request's end closes its
    # connection.
    pytest.mark.django_db(transaction=True),
    # In process, over WSGI, an event stream (text/event-stream, the runs API's) is read
    # whole before it is checked: that is the transport, not the application, and every
    # stream ends with its run.
    pytest.mark.filterwarnings("ignore:StreamingHttpResponse must consume asynchronous iterators"),
]

# Examples per operation and way of signing in: enough to reach every status an
# operation declares, few enough to keep the file within ~30 s on a busy machine.
FUZZ = settings(
    max_examples=20,
    deadline=None,
    # The same cases on every run: a failure here is reproducible, not a flake.
    derandomize=True,
    # The database and the credentials are per test, shared by its examples on purpose;
    # many generated requests are refused by design, which filter_too_much would flag.
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.filter_too_much,
        HealthCheck.too_slow,
    ],
)

CONFIG = SchemathesisConfig.from_dict(
    {
        "checks": {
            # A well-formed request may still break a rule no JSON Schema states (a
            # title blank once whitespace is collapsed, a cursor this list never issued,
            # an expiry in the past): those are 400 with their own code. A 422 means the
            # schema let through what the API refuses, and stays a failure.
            "positive_data_acceptance": {
                "expected-statuses": ["2xx", "400", "401", "403", "404", "409", "429"]
            },
        }
    }
)

# Loaded when the module is collected (the schema is served without the database).
# Not through schemathesis.pytest.from_fixture: its lazy loader sets pytest's private
# Node._nodeid, which pytest 9 no longer has.
schema = schemathesis.openapi.from_wsgi("/api/openapi.json", WSGIHandler(), config=CONFIG)

# Credentials fixed in advance: schemathesis asks for them when it builds the cases, at
# collection, before any test's database exists; the `caller` fixture makes them valid.
API_KEY = "ak_f0f0f0f0_" + "F" * 43
SESSION_KEY = "fuzzer" + "0" * 26
CSRF_TOKEN = "c" * 32


class KeyAuth:
    def get(self, case: Any, context: Any) -> str:
        return API_KEY

    def set(self, case: Any, key: str, context: Any) -> None:
        case.headers = {**(case.headers or {}), "X-API-Key": key}


class SessionAuth:
    def get(self, case: Any, context: Any) -> tuple[str, str]:
        return SESSION_KEY, CSRF_TOKEN

    def set(self, case: Any, data: tuple[str, str], context: Any) -> None:
        session, csrf = data
        case.cookies = {**(case.cookies or {}), "sessionid": session, "csrftoken": csrf}
        case.headers = {**(case.headers or {}), "X-CSRFToken": csrf}


@pytest.fixture
def caller(make_user):
    """A user whose account lets the fuzzer through (no rate limit), with an object of
    each kind for path ids to name, signed in both ways."""
    user = make_user("fuzzer")
    account = account_with_limits(user, requests_per_minute_per_account=1_000_000)
    conversation = services.conversation_create(owner=user, title="Fuzzed")
    # A finished run with its trace: its pages (and its event stream, replayed from the
    # database and then over) end, so the fuzzer reads them whole.
    run = Run.objects.create(
        conversation=conversation,
        model="m",
        status=Run.Status.COMPLETED,
        finished_at=timezone.now(),
        event_seq=1,  # its final event's: the stream rebuilds it from the database
    )
    tracing_services.trace_start(
        run_id=run.id, user_id=user.id, model="m", started_at=timezone.now()
    )
    api_key, _ = api_key_create(
        account=account, created_by=user, name="fuzzer", scopes=ApiKey.Scope.values
    )
    ApiKey.objects.filter(pk=api_key.pk).update(
        prefix=API_KEY[:11], key_hash=hashlib.sha256(API_KEY.encode()).hexdigest()
    )
    client = Client()
    client.force_login(user)
    Session.objects.filter(session_key=client.cookies["sessionid"].value).update(
        session_key=SESSION_KEY
    )
    return {
        "conversation_id": str(conversation.id),
        "run_id": str(run.id),
        "api_key_id": api_key.pk,
    }


def own_ids_half_the_time(case: Any, ids: dict[str, Any]) -> None:
    # A path made invalid on purpose stays so: the API must refuse it.
    if not case.path_parameters or case.meta.is_negative_at(ParameterLocation.PATH):
        return
    # Chosen by the case itself, so a derandomized run makes the same choices.
    if zlib.crc32(repr(case.path_parameters).encode()) % 2:
        for name in case.path_parameters:
            if name in ids:
                case.path_parameters[name] = ids[name]


def one_idempotency_key_per_request(case: Any) -> None:
    """A generated Idempotency-Key is a short string, soon sent again with another body:
    422 `idempotency_key_reused`, by design (Stripe's semantics), and no schema can say
    so. A well-formed one is made the request's own: the same request, the same key (its
    replay is then checked too)."""
    headers = case.headers or {}
    if "Idempotency-Key" not in headers or case.meta.is_negative_at(ParameterLocation.HEADER):
        return
    request = repr((case.method, case.path, case.path_parameters, case.query, case.body))
    headers["Idempotency-Key"] = hashlib.sha256(request.encode()).hexdigest()


@schema.auth(KeyAuth, refresh_interval=None)
@schema.parametrize()
@FUZZ
def test_the_api_keeps_its_schema_for_a_key(case, caller):
    own_ids_half_the_time(case, caller)
    one_idempotency_key_per_request(case)
    case.call_and_validate()


@schema.auth(SessionAuth, refresh_interval=None)
@schema.parametrize()
@FUZZ
def test_the_api_keeps_its_schema_for_a_session(case, caller):
    own_ids_half_the_time(case, caller)
    one_idempotency_key_per_request(case)
    case.call_and_validate()


def test_no_two_schemas_share_a_name(monkeypatch):
    """ninja files every model under its class name in the schema's components, and a
    second model of the same name silently replaces the first: the operations that use
    the first would then document (and schemathesis check) the other's fields."""
    from ninja.openapi.schema import OpenAPISchema

    from agentsite.api import api

    clashes = []
    add = OpenAPISchema.add_schema_definitions

    def add_checked(self, definitions):
        clashes.extend(
            name
            for name, definition in definitions.items()
            if self.schemas.get(name, definition) != definition
        )
        add(self, definitions)

    monkeypatch.setattr(OpenAPISchema, "add_schema_definitions", add_checked)
    api.get_openapi_schema()
    assert clashes == []
