"""Production settings refuse insecure defaults; checked in a fresh interpreter each time."""

import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
STRONG_KEY = secrets.token_urlsafe(50)


def load_settings(*, show: str = "", **env: str) -> subprocess.CompletedProcess[str]:
    """Import the settings in a fresh process with `env`; `show`: an expression over
    them (`s`) printed to stdout."""
    clean = {
        k: v
        for k, v in os.environ.items()
        if k not in {"DEBUG", "SECRET_KEY", "ALLOWED_HOSTS", "DATABASE_URL"}
    }
    code = "import agentsite.settings as s" + (f"; print({show})" if show else "")
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={**clean, "AGENTSITE_READ_DOTENV": "false", **env},
        capture_output=True,
        text=True,
        check=False,
    )


@pytest.mark.parametrize(
    ("env", "complaint"),
    [
        ({}, "SECRET_KEY must be set"),
        (
            {"DEBUG": "false", "SECRET_KEY": "short", "ALLOWED_HOSTS": "example.com"},
            "SECRET_KEY must be set",
        ),
        (
            {
                "DEBUG": "false",
                "SECRET_KEY": "django-insecure-" + STRONG_KEY,
                "ALLOWED_HOSTS": "example.com",
            },
            "SECRET_KEY must be set",
        ),
        # Long enough for the old rule, too few different characters for check --deploy.
        (
            {"DEBUG": "false", "SECRET_KEY": "a" * 40, "ALLOWED_HOSTS": "example.com"},
            "SECRET_KEY must be set",
        ),
        (
            {"DEBUG": "false", "SECRET_KEY": "abcd" * 20, "ALLOWED_HOSTS": "example.com"},
            "at least 5 of them different",
        ),
        (
            {"DEBUG": "false", "SECRET_KEY": STRONG_KEY[:49], "ALLOWED_HOSTS": "example.com"},
            "at least 50 characters",
        ),
        ({"DEBUG": "false", "SECRET_KEY": STRONG_KEY}, "ALLOWED_HOSTS must list"),
        (
            {"DEBUG": "false", "SECRET_KEY": STRONG_KEY, "ALLOWED_HOSTS": "*"},
            "ALLOWED_HOSTS must list",
        ),
        ({"DEBUG": "true", "ALLOWED_HOSTS": "agents.example.com"}, "public hosts"),
        ({"DEBUG": "true", "AGENT_MODEL": "gpt5"}, "AGENT_MODEL must be one of"),
        ({"DEBUG": "true", "AGENT_EXECUTOR": "celery"}, "AGENT_EXECUTOR must be one of"),
        # The queue lives in PostgreSQL: on the default SQLite it is refused, saying how.
        (
            {"DEBUG": "true", "AGENT_EXECUTOR": "queue"},
            "set DATABASE_URL=postgres://",
        ),
        (
            {
                "DEBUG": "true",
                "AGENT_EXECUTOR": "queue",
                "DATABASE_URL": "postgres://agentsite@127.0.0.1:5432/agentsite",
                "AGENT_REDIS_URL": "",
            },
            "set AGENT_REDIS_URL=",
        ),
    ],
)
def test_insecure_or_wrong_configuration_refuses_to_start(env, complaint):
    result = load_settings(**env)
    assert result.returncode != 0
    assert complaint in result.stderr


def test_production_configuration_starts_with_secure_cookies():
    result = load_settings(
        show="s.SESSION_COOKIE_SECURE, s.CSRF_COOKIE_SECURE",
        DEBUG="false",
        SECRET_KEY=STRONG_KEY,
        ALLOWED_HOSTS="agents.example.com",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["True", "True"]


def test_a_key_that_passes_check_deploy_starts():
    # The shortest, plainest key Django's deploy check accepts: the rule is Django's own.
    result = load_settings(
        DEBUG="false", SECRET_KEY="abcde" * 10, ALLOWED_HOSTS="agents.example.com"
    )
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(
    ("database_url", "installed"),
    [("sqlite:///:memory:", False), ("postgres://agentsite@127.0.0.1:5432/agentsite", True)],
)
def test_the_queue_tables_exist_wherever_postgresql_does(database_url, installed):
    """Procrastinate's app (its PostgreSQL-only migrations) is installed with PostgreSQL,
    whichever executor runs: switching to the queue needs no migration step."""
    result = load_settings(
        show="'procrastinate.contrib.django' in s.INSTALLED_APPS",
        DEBUG="true",
        DATABASE_URL=database_url,
        AGENT_EXECUTOR="inline",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(installed)
