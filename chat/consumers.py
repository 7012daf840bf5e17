"""The chat WebSocket: `/ws/chat/<conversation>/`.

The socket only starts, cancels and watches runs; runs execute elsewhere and outlive it.
Every run event is delivered in `seq` order without gaps: when a live event arrives
ahead of what this socket has sent, the missing ones are replayed from the event log.
Runs that start while the socket is open are followed from their first event; a run
already under way at connect is followed once the client resumes it.
"""

import logging
from typing import Any
from uuid import UUID

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer

from agentsite.errors import ApplicationError
from agentsite.metrics import OPEN_WEBSOCKETS
from billing.ratelimit import rate_limit_hit_for_user

from . import lifecycle, selectors, services
from .events import Event, conversation_group, event_log
from .frames import ClientFrame, parse_client_frame
from .lifecycle import lease_keeper
from .models import Conversation
from .presentation import browser_frame

logger = logging.getLogger(__name__)

CLOSE_UNAUTHENTICATED = 4401
# Also for another user's conversation: a stranger cannot tell it from a missing one.
CLOSE_NOT_FOUND = 4404


class ChatConsumer(AsyncJsonWebsocketConsumer):
    conversation: Conversation
    group: str

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        # Counted around the whole connection, not in connect/disconnect: a consumer that
        # crashes, or is cancelled by the server, never reaches disconnect().
        with OPEN_WEBSOCKETS.track_inprogress():
            await super().__call__(scope, receive, send)

    async def connect(self) -> None:
        self.sent_seq: dict[str, int] = {}
        # The run under way at connect: followed only once the client resumes it.
        self.awaiting_resume: set[str] = set()
        user = self.scope["user"]
        # Accept first: a close before accept becomes a bare HTTP 403 and the client
        # would never learn the reason code.
        await self.accept()
        if not user.is_authenticated:
            await self.close(code=CLOSE_UNAUTHENTICATED)
            return
        try:
            self.conversation = await database_sync_to_async(selectors.conversation_get)(
                user=user, conversation_id=self.scope["url_route"]["kwargs"]["conversation_id"]
            )
        except ApplicationError:
            await self.close(code=CLOSE_NOT_FOUND)
            return
        self.group = conversation_group(self.conversation.id)
        await self.channel_layer.group_add(self.group, self.channel_name)
        # A run whose process died is closed now, not at the next reaper tick: its
        # final event reaches this socket when the client resumes it.
        lease_keeper().ensure_started()
        await lifecycle.runs_reap(conversation_id=self.conversation.id)
        active = await database_sync_to_async(selectors.run_get_active)(
            conversation=self.conversation
        )
        if active is not None:
            self.awaiting_resume.add(str(active.id))
        await self.send_json(
            {
                "type": "session",
                "conversation": str(self.conversation.id),
                "active_run": str(active.id) if active else None,
            }
        )

    async def disconnect(self, code: int) -> None:
        if hasattr(self, "group"):
            await self.channel_layer.group_discard(self.group, self.channel_name)

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        # Parsed here rather than by receive_json so bad input gets an error frame
        # instead of closing the socket.
        try:
            frame = parse_client_frame(text_data)
            await self._handle(frame)
        except ApplicationError as error:
            await self.send_json({"type": "error", **error.as_dict()})

    async def _handle(self, frame: ClientFrame) -> None:
        if frame.type == "message":
            # Starting a run counts like an API request; cancel and resume never do, so
            # a user over the limit can still stop a run and watch it.
            await database_sync_to_async(rate_limit_hit_for_user)(user_id=self.scope["user"].pk)
            await database_sync_to_async(services.run_create)(
                conversation=self.conversation, content=frame.content
            )
        elif frame.type == "cancel":
            await database_sync_to_async(services.run_cancel)(
                conversation=self.conversation, run_id=frame.run
            )
        else:
            assert frame.run is not None
            await self._resume(frame.run, frame.after_seq)

    async def _resume(self, run_id: UUID, after_seq: int) -> None:
        run = await database_sync_to_async(selectors.run_get)(
            conversation=self.conversation, run_id=run_id
        )
        key = str(run.id)
        self.sent_seq[key] = max(self.sent_seq.get(key, 0), after_seq)
        events = await self._log_after(run.id, self.sent_seq[key])
        # A finished run whose log is gone (Redis restarted) still yields its final event.
        final = await database_sync_to_async(lifecycle.final_event_missing)(
            run=run, events=events, after_seq=self.sent_seq[key]
        )
        await self._send_events([*events, final] if final else events)

    async def run_event(self, message: dict[str, Any]) -> None:
        """A live event from the channel layer (handler for type "run.event")."""
        event: Event = message["event"]
        if event["run"] in self.awaiting_resume and event["run"] not in self.sent_seq:
            # Under way when this socket connected: the client resumes it from the last
            # seq it saw (the session frame named it), so wait for that.
            return
        sent = self.sent_seq.get(event["run"], 0)
        if event["seq"] <= sent:
            return
        if event["seq"] > sent + 1:
            await self._send_events([*await self._log_after(UUID(event["run"]), sent), event])
        else:
            await self._send_events([event])

    async def _log_after(self, run_id: UUID, seq: int) -> list[Event]:
        try:
            return await event_log().after(run_id, seq)
        except Exception as error:  # Redis is down: what the database knows still comes
            logger.warning("run %s: event log unreadable: %r", run_id, error)
            return []

    async def _send_events(self, events: list[Event]) -> None:
        for event in events:
            if event["seq"] > self.sent_seq.get(event["run"], 0):
                await self.send_json(browser_frame(event))
                self.sent_seq[event["run"]] = event["seq"]
