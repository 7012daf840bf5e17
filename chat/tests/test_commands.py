import pytest
from django.contrib.auth import authenticate
from django.core.management import CommandError, call_command

pytestmark = pytest.mark.django_db


def test_ensure_local_admin_prints_a_working_password_once(capsys):
    call_command("ensure_local_admin")
    first = capsys.readouterr().out
    password = first.split("password: ")[1].split()[0]
    assert authenticate(username="admin", password=password) is not None

    call_command("ensure_local_admin")
    second = capsys.readouterr().out
    assert password not in second and "existing superuser 'admin'" in second


def test_agent_worker_says_it_has_nothing_to_do_for_the_inline_executor():
    # The embedded default: runs execute in the web process, and a worker would wait
    # for jobs that never come.
    with pytest.raises(CommandError, match="AGENT_EXECUTOR=queue"):
        call_command("agent_worker")
