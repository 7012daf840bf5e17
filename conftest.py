"""Fixtures shared by every app's tests."""

import asyncio
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from channels.testing import WebsocketCommunicator
from django.contrib.auth import get_user_model
from django.contrib.auth.models import AbstractBaseUser
from django.test import Client

from agentsite.asgi import application
from chat import services
from chat.agent.host import run_host
from chat.models import Conversation


@pytest.fixture(autouse=True)
def fresh_rate_limits() -> None:
    """Request counts of one test must not limit the next: the in-memory limiter lives
    as long as the process, and account ids repeat once tables are emptied."""
    from billing.ratelimit import limiter_build

    limiter_build("memory://").storage.reset()


@pytest.fixture(autouse=True)
def fresh_cache() -> None:
    """What one test cached (limits and prices of ids that repeat once tables are
    emptied, sessions) must not leak into the next."""
    from django.core.cache import cache

    cache.clear()


@pytest.fixture
def make_user(db: None) -> Callable[..., AbstractBaseUser]:
    def make(username: str = "alice", password: str = "correct-horse-battery") -> Any:
        return get_user_model().objects.create_user(username=username, password=password)

    return make


def account_with_limits(user: AbstractBaseUser, **limits: Any) -> Any:
    """The user's account with only these limits: no plan (the default one is seeded by a
    migration, and transactional tests empty that table)."""
    from billing.services import account_for_user

    account = account_for_user(user_id=user.pk)
    account.plan = None
    for name, value in limits.items():
        setattr(account, name, value)
    account.save()
    return account


def session_cookie(user: AbstractBaseUser) -> str:
    client = Client()
    client.force_login(user)
    return client.cookies["sessionid"].value


async def open_socket(path: str, user: AbstractBaseUser | None = None) -> WebsocketCommunicator:
    """A WebSocket to the real ASGI application, authenticated like a browser would be."""
    headers = [(b"origin", b"http://localhost"), (b"host", b"localhost")]
    if user is not None:
        cookie = await sync_to_async(session_cookie)(user)
        headers.append((b"cookie", f"sessionid={cookie}".encode()))
    communicator = WebsocketCommunicator(application, path, headers=headers)
    connected, _ = await communicator.connect()
    assert connected
    return communicator


async def receive_until(
    communicator: WebsocketCommunicator, event_type: str, wait: float = 10
) -> list[dict[str, Any]]:
    """Every frame up to and including the first of `event_type`."""
    frames = []
    while True:
        frame = await communicator.receive_json_from(timeout=wait)
        frames.append(frame)
        if frame["type"] == event_type:
            return frames


async def wait_for_runs() -> None:
    """Let every run still executing in this process finish."""
    host = run_host()
    for run_id in host.active_run_ids():
        await host.join(run_id)
    await asyncio.sleep(0)


async def cancelled_mid_answer(user: AbstractBaseUser) -> Conversation:
    """A new conversation of `user` whose first run was cancelled while it streamed a long
    answer (set AGENT_OFFLINE_TOKEN_DELAY so it streams slowly); returns the
    conversation, its run over."""
    conversation = await sync_to_async(services.conversation_create)(owner=user)
    socket = await open_socket(f"/ws/chat/{conversation.id}/", user)
    await socket.receive_json_from()
    await socket.send_json_to({"type": "message", "content": "tell me a long story " * 5})
    await receive_until(socket, "token")
    await socket.send_json_to({"type": "cancel"})
    await receive_until(socket, "run.cancelled")
    await socket.disconnect()
    await wait_for_runs()
    return conversation


@pytest.fixture
def socket_factory() -> Callable[..., Awaitable[WebsocketCommunicator]]:
    return open_socket


@pytest.fixture
def busy_core() -> Iterator[None]:
    """Another process keeps one of the machine's cores busy, as on a shared machine."""
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        yield
    finally:
        spinner.kill()
        spinner.wait()
