import pytest
from django.contrib.auth import authenticate
from django.core.management import call_command

pytestmark = pytest.mark.django_db


def test_ensure_local_admin_prints_a_working_password_once(capsys):
    call_command("ensure_local_admin")
    first = capsys.readouterr().out
    password = first.split("password: ")[1].split()[0]
    assert authenticate(username="admin", password=password) is not None

    call_command("ensure_local_admin")
    second = capsys.readouterr().out
    assert password not in second and "existing superuser 'admin'" in second
