"""`python manage.py agent_worker`: execute runs (AGENT_EXECUTOR=queue) until SIGTERM."""

import asyncio
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError


class Command(BaseCommand):
    help = (
        "Execute queued runs (AGENT_EXECUTOR=queue): a Procrastinate worker running up to "
        "AGENT_WORKER_CONCURRENCY runs at once. SIGTERM: stop taking runs, let those under "
        "way finish for AGENT_WORKER_DRAIN_SECONDS, hand the rest back, exit 0."
    )

    def handle(self, *args: Any, **options: Any) -> None:
        if settings.AGENT_EXECUTOR != "queue":
            raise CommandError(
                "agent_worker executes the runs of AGENT_EXECUTOR=queue; this configuration "
                f"executes them {settings.AGENT_EXECUTOR} (in the web process). Set "
                "AGENT_EXECUTOR=queue for the web processes and the workers alike."
            )
        # Once the configuration is known to be the queue's: they load Procrastinate.
        from chat.agent.models import chat_model_preload
        from chat.agent.worker import worker_serve
        from chat.metrics import chat_metrics_preinitialise

        chat_metrics_preinitialise()
        chat_model_preload()
        if settings.AGENT_WORKER_METRICS_PORT:
            from prometheus_client import start_http_server

            start_http_server(settings.AGENT_WORKER_METRICS_PORT)
        asyncio.run(
            worker_serve(
                concurrency=settings.AGENT_WORKER_CONCURRENCY,
                drain_seconds=settings.AGENT_WORKER_DRAIN_SECONDS,
            )
        )
