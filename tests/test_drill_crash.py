"""Drill: the server process dies (SIGKILL) while a run streams, and is started again.

Within seconds of the restart the run is `interrupted`, its budget hold is gone, its
trace is closed, the browser that reconnects and resumes the run gets its final event,
and the next message runs. The time from the server answering again to the conversation
accepting a message is printed (run with -s to see it)."""

import asyncio
import os
import time
from pathlib import Path

from tests.drills import DrillServer, receive, receive_until, uuid_hex

# Short here; DRILL_LEASE_SECONDS=10 measures the default lease (the README's number).
LEASE_SECONDS = os.environ.get("DRILL_LEASE_SECONDS", "3")


async def test_a_run_whose_server_was_killed_is_interrupted_and_the_conversation_works(
    tmp_path: Path,
) -> None:
    # A slow stream (about 9 s for the offline model's answer) and a short lease.
    server = DrillServer(
        tmp_path, AGENT_RUN_LEASE_SECONDS=LEASE_SECONDS, AGENT_OFFLINE_TOKEN_DELAY="0.15"
    )
    try:
        login = server.prepare_and_start()
        async with server.socket(login) as socket:
            assert (await receive(socket))["type"] == "session"
            await socket.send('{"type": "message", "content": "Tell me about yourself"}')
            seen = await receive_until(socket, "token")
            while sum(frame["type"] == "token" for frame in seen) < 5:
                seen.append(await receive(socket))
            run, last_seq = seen[-1]["run"], seen[-1]["seq"]
            # A renewal has flushed the trace row; the run is mid-stream.
            server.kill()
            killed = time.monotonic()

        [(status,)] = server.query("SELECT status FROM chat_run WHERE id = ?", uuid_hex(run))
        assert status == "running"

        server.start()
        back = time.monotonic()
        # Nobody has connected yet: the restarted server reaps the run by itself.
        while server.query("SELECT status FROM chat_run WHERE id = ?", uuid_hex(run)) == [
            ("running",)
        ]:
            assert time.monotonic() - back < 60, "the run was not reaped within 60 s"
            await asyncio.sleep(0.1)
        reaped_after = time.monotonic() - back
        # The browser reconnects and resumes the run it was showing.
        async with server.socket(login) as socket:
            session = await receive(socket)
            assert session["type"] == "session"
            await socket.send(f'{{"type": "resume", "run": "{run}", "after_seq": {last_seq}}}')
            final = (await receive_until(socket, "run.interrupted", wait=60))[-1]
            interrupted_after = time.monotonic() - back
            await socket.send('{"type": "message", "content": "What is 2 + 2?"}')
            started = (await receive_until(socket, "run.started", wait=60))[-1]
            usable_after = time.monotonic() - back
            completed = (await receive_until(socket, "run.completed", wait=60))[-1]

        print(
            f"\nserver back after {back - killed:.2f} s; then run reaped (nobody connected) "
            f"{reaped_after:.2f} s, run.interrupted received {interrupted_after:.2f} s, next "
            f"message started {usable_after:.2f} s (lease {LEASE_SECONDS} s; target 15 s)"
        )
        assert final["run"] == run and final["seq"] > last_seq
        assert final["error"]["code"] == "run_interrupted"
        assert started["run"] != run and completed["status"] == "completed"
        run_id = uuid_hex(run)
        [(status, error_code)] = server.query(
            "SELECT status, error_code FROM chat_run WHERE id = ?", run_id
        )
        assert (status, error_code) == ("interrupted", "run_interrupted")
        # The hold is gone: settled into the ledger for what streamed, or released.
        assert server.query(
            "SELECT COUNT(*) FROM billing_budgetreservation WHERE run_id = ?", run_id
        ) == [(0,)]
        [(trace_status, ended_at)] = server.query(
            "SELECT status, ended_at FROM tracing_trace WHERE run_id = ?", run_id
        )
        assert trace_status == "error" and ended_at is not None
    finally:
        server.stop()
