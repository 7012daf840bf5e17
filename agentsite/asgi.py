"""ASGI entry point: HTTP goes to Django, WebSockets to Channels."""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "agentsite.settings")
# Django must be set up before anything imports models (the consumers do).
django_asgi_app = get_asgi_application()

from channels.auth import AuthMiddlewareStack  # noqa: E402
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from django.core.signals import request_finished  # noqa: E402

from agentsite.db import request_connections_close  # noqa: E402
from agentsite.middleware import api_body_limit  # noqa: E402
from agentsite.websocket import SameOriginValidator, daphne_fail_with_close_frames  # noqa: E402
from chat.agent.executor import get_executor  # noqa: E402
from chat.agent.host import run_host_hand_back_with_server  # noqa: E402
from chat.agent.models import chat_model_preload  # noqa: E402
from chat.lifecycle import lease_keeper_start_with_server  # noqa: E402
from chat.metrics import chat_metrics_preinitialise  # noqa: E402
from chat.routing import websocket_urlpatterns  # noqa: E402

daphne_fail_with_close_frames()
request_finished.connect(request_connections_close)
application = ProtocolTypeRouter(
    {
        "http": api_body_limit(django_asgi_app),
        "websocket": SameOriginValidator(AuthMiddlewareStack(URLRouter(websocket_urlpatterns))),
    }
)

# Here, where the server starts: the series exist before the first scrape. (It also
# loads the agent's tools now rather than on the first run.)
chat_metrics_preinitialise()
chat_model_preload()

# Renew this process's run leases and resume runs whose process died from the moment the
# server runs, before anyone connects.
lease_keeper_start_with_server(get_executor())
# ... and hand back the runs it executes when it shuts down.
run_host_hand_back_with_server()
