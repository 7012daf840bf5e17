"""Request types shared by the apps' views."""

from django.contrib.auth.models import User
from django.http import HttpRequest


class AuthenticatedHttpRequest(HttpRequest):
    """What a view behind @login_required receives (django-stubs' recipe)."""

    user: User
