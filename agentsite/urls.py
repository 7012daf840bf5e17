from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.urls import include, path, re_path

from billing.auth import ApiKeyBearerAuth
from chat.openai_compat.api import openai_api
from chat.openai_compat.api import route_not_found as openai_route_not_found

from .api import api
from .api_errors import route_not_found
from .health import healthz, readyz
from .metrics import metrics_view

# The OpenAI-compatible API takes an API key as the bearer token, as OpenAI's SDKs send
# theirs (no session: a browser page has no business there).
openai = openai_api(auth=[ApiKeyBearerAuth()])

urlpatterns = [
    path("admin/", admin.site.urls),
    path("api/", api.urls),
    # Any other path under /api/: a 404 in the API's error shape, not the HTML page.
    re_path(r"^api/(?P<rest>.*)$", route_not_found),
    path("openai/v1/", openai.urls),
    re_path(r"^openai/(?P<rest>.*)$", openai_route_not_found),
    path("metrics", metrics_view, name="metrics"),
    path("healthz", healthz, name="healthz"),
    path("readyz", readyz, name="readyz"),
    path("login/", auth_views.LoginView.as_view(), name="login"),
    path("logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("traces/", include("tracing.urls")),
    path("", include("chat.urls")),
]
