"""The chat WebSocket: `/ws/chat/<conversation>/`.

The socket only starts, cancels and watches runs; runs execute elsewhere and outlive it.
It reads each run's events through `chat.events.follow`, one task per run, so every
event reaches it once, in `seq` order, without gaps. The conversation's channel-layer
group only tells it that a run has events: runs that start while the socket is open are
followed from their first event; a run already under way at connect is followed once
the client resumes it.
"""

import asyncio
import logging
from typing import Any
from uuid import UUID

from channels.consumer import get_handler_name
from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer

from agentsite.errors import ApplicationError
from agentsite.metrics import OPEN_WEBSOCKETS

from . import lifecycle, selectors, services
from .agent.executor import get_executor
from .events import Frame, conversation_group, follow
from .frames import ClientFrame, parse_client_frame
from .lifecycle import lease_keeper
from .models import Conversation
from .presentation import browser_frame, presented

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

    async def dispatch(self, message: dict[str, Any]) -> None:
        # Channels' own dispatch first closes stale database connections in a thread hop,
        # for every message: every event of every run this socket follows. Nothing here
        # touches the database but through database_sync_to_async, which does that
        # around each call.
        handler = getattr(self, get_handler_name(message), None)
        if handler is None:
            raise ValueError(f"No handler for message type {message['type']!r}")
        await handler(message)

    async def connect(self) -> None:
        # Every run this socket followed or was asked to resume, with the last seq it
        # sent of it: a run's entry stays once its follow is over, so that a late
        # "run.events" for it (a batch announced after its final event was read) does
        # not start it again.
        self.sent_seq: dict[str, int] = {}
        # The follows under way, one per run; each drops itself when it ends.
        self.following: dict[str, asyncio.Task[None]] = {}
        # The run under way at connect: followed only once the client resumes it.
        self.awaiting_resume: set[str] = set()
        user = self.scope["user"]
        # Accept first: a close before accept becomes a bare HTTP 403 and the client
        # would never learn the reason code.
        await self.accept()
        if not user.is_authenticated:
            await self.close(code=CLOSE_UNAUTHENTICATED)
            return
        lease_keeper().ensure_started(get_executor())
        try:
            joined = await database_sync_to_async(services.conversation_join)(
                user=user, conversation_id=self.scope["url_route"]["kwargs"]["conversation_id"]
            )
        except ApplicationError:
            await self.close(code=CLOSE_NOT_FOUND)
            return
        self.conversation = joined.conversation
        self.group = conversation_group(self.conversation.id)
        # Joined after the lookup (one hop for all of it): a run that starts in between
        # is followed from its first event when it is announced again (run_events: at
        # least every second while it runs, and with its final event).
        await self.channel_layer.group_add(self.group, self.channel_name)
        # Runs whose process died were closed by the lookup: their final events reach
        # this socket when the client resumes them.
        for closed in joined.closed:
            await lifecycle.run_closed_publish(closed)
        active = joined.active_run
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
        for task in self.following.values():
            task.cancel()
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
            await database_sync_to_async(services.run_create)(
                conversation=self.conversation, content=frame.content, count_request=True
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
        following = self.following.get(key)
        if following is None or following.done():  # done: not yet dropped
            self._follow(key)

    async def run_events(self, message: dict[str, Any]) -> None:
        """A run of the conversation has new events (handler for type "run.events")."""
        run: str = message["run"]
        if run in self.following or run in self.sent_seq or run in self.awaiting_resume:
            # Followed already (or now); or under way when this socket connected: the
            # client resumes it from the last seq it saw (the session frame named it).
            return
        self._follow(run)

    def _follow(self, run: str) -> None:
        self.sent_seq.setdefault(run, 0)
        task = asyncio.create_task(self._send_run(run))
        self.following[run] = task

        def drop(done: asyncio.Task[None]) -> None:
            # Unless a resume has started another follow of the run meanwhile.
            if self.following.get(run) is done:
                del self.following[run]

        task.add_done_callback(drop)

    async def _send_run(self, run: str) -> None:
        try:
            async for frame in follow(UUID(run), self.sent_seq.get(run, 0)):
                assert frame is not None  # no idle wake-ups were asked for
                await self._send_frame(run, frame)
        except Exception:  # the client resumes it, on this socket or the next
            logger.exception("run %s: following it on a socket failed", run)

    async def _send_frame(self, run: str, frame: Frame) -> None:
        """Send an event unless this socket has it (the client may have said it saw
        more): as its frame, encoded once for every socket, or for the few events the
        page draws differently, as the page's view of it (`browser_frame`)."""
        if frame.seq > self.sent_seq.get(run, 0):
            if presented(frame.type):
                await self.send_json(browser_frame(frame.event()))
            else:
                await self.send(frame.text)
            self.sent_seq[run] = frame.seq
