"""Drill: Redis (channel layer, event log, cache) restarts empty while a run streams.

The run goes on and ends as it would have; `/readyz` reports the outage while it lasts;
a client whose socket the outage broke reconnects, resumes the run and learns how it
ended, from the event log or, when the log lost it, from the database."""

import asyncio
import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from websockets.exceptions import ConnectionClosed

from chat.event_schemas import FINAL_EVENT_TYPES
from tests.drills import (
    DrillServer,
    RedisServer,
    receive,
    receive_until,
    redis_server_available,
    resume_until_final,
)

pytestmark = pytest.mark.skipif(
    not redis_server_available(), reason="redis-server is NOT installed: Redis drill skipped"
)


def readyz(url: str) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(url + "/readyz", timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


async def test_a_client_learns_how_a_run_ended_across_a_redis_restart(tmp_path: Path) -> None:
    redis = RedisServer(tmp_path)
    redis.start()
    server = DrillServer(tmp_path, AGENT_REDIS_URL=redis.url, AGENT_OFFLINE_TOKEN_DELAY="0.15")
    try:
        login = server.prepare_and_start()
        seen: list[dict[str, Any]] = []
        async with server.socket(login) as socket:
            assert (await receive(socket))["type"] == "session"
            await socket.send('{"type": "message", "content": "Tell me about yourself"}')
            seen += await receive_until(socket, "token")
            while sum(frame["type"] == "token" for frame in seen) < 5:
                seen.append(await receive(socket))
            run = seen[-1]["run"]

            redis.kill()
            status, body = await asyncio.to_thread(readyz, server.url)
            assert status == 503 and body["checks"]["redis"] != "ok"
            redis.start()
            # Whatever the broken socket still delivers, until it closes or goes quiet.
            try:
                while seen[-1]["type"] not in FINAL_EVENT_TYPES:
                    seen.append(await receive(socket, wait=5))
            except (ConnectionClosed, TimeoutError):
                pass

        if seen[-1]["type"] not in FINAL_EVENT_TYPES:
            after_seq = max(frame.get("seq", 0) for frame in seen if frame.get("run") == run)
            seen += await resume_until_final(server.url, login, run, after_seq=after_seq)
        final = seen[-1]
        assert final["run"] == run
        # The outage did not fail the run: it answered, and the answer is stored.
        assert final["type"] == "run.completed" and final["messages"], final
        [(status_in_db,)] = server.query(
            "SELECT status FROM chat_run WHERE id = ?", run.replace("-", "")
        )
        assert status_in_db == "completed"
        assert (await asyncio.to_thread(readyz, server.url))[0] == 200

        # Redis restarts again, empty: the run's log is gone, its outcome is not.
        redis.kill()
        redis.start()
        rebuilt = (await resume_until_final(server.url, login, run, after_seq=3))[-1]
        assert {k: v for k, v in rebuilt.items() if k != "budget"} == {
            k: v for k, v in final.items() if k != "budget"
        }
    finally:
        server.stop()
        redis.kill()
