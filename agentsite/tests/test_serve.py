"""The server as deployed (`python -m agentsite.serve`, Daphne), started by the test in
its own process: its log is JSON lines throughout, Daphne's access log included, and
its metrics exist before anything has happened."""

import json
import os
import secrets
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from chat.models import Run

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("AGENT_", "DATABASE_", "DJANGO_", "LOG_")) and key != "ALLOWED_HOSTS"
    }
    env.update(
        DJANGO_SETTINGS_MODULE="agentsite.settings",
        AGENTSITE_READ_DOTENV="false",
        DEBUG="false",
        SECRET_KEY=secrets.token_urlsafe(50),
        ALLOWED_HOSTS="127.0.0.1",
        USE_X_FORWARDED_PROTO="false",
        LOG_FORMAT="json",
        DATABASE_URL=f"sqlite:///{tmp_path / 'db.sqlite3'}",
        AGENT_CHECKPOINT_SQLITE_PATH=str(tmp_path / "checkpoints.sqlite3"),
        PYTHONUNBUFFERED="1",
    )
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "server.log"
    with log.open("wb") as output:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "agentsite.serve",
                "--port",
                str(port),
                "agentsite.asgi:application",
            ],
            cwd=ROOT,
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, f"the server exited:\n{log.read_text()[-4000:]}"
            assert time.monotonic() < deadline, f"no answer in 60 s:\n{log.read_text()[-4000:]}"
            try:
                if get(url + "/healthz")[0] == 200:
                    break
            except OSError:
                time.sleep(0.2)
        yield url, log
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def log_lines(log: Path, until: str) -> list[dict]:
    """The log's lines, parsed, once one contains `until` (the log is written as the
    server goes: wait for the line rather than for time)."""
    deadline = time.monotonic() + 30
    while until not in log.read_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    text = log.read_text()
    assert until in text, text[-4000:]
    return [json.loads(line) for line in text.splitlines()]  # every line is JSON


def test_the_access_log_is_json_like_the_rest(server):
    url, log = server
    assert get(url + "/healthz?probe=1")[0] == 200
    assert get(url + "/no-such-page")[0] == 404
    lines = log_lines(log, '"path": "/no-such-page"')

    access = [line for line in lines if line["logger"] == "daphne.access"]
    ok = next(line for line in access if line["path"] == "/healthz?probe=1")
    assert ok["method"] == "GET" and ok["status"] == 200 and ok["level"] == "INFO"
    assert ok["message"] == "GET /healthz?probe=1 200"
    assert ok["client"].startswith("127.0.0.1:") and ok["duration_ms"] >= 0 and ok["size"] > 0
    assert ok["time"].endswith("+00:00")
    missing = next(line for line in access if line["path"] == "/no-such-page")
    assert missing["status"] == 404 and missing["level"] == "WARNING"


def test_labelled_metrics_exist_before_anything_happens(server):
    url, _ = server
    status, body = get(url + "/metrics")
    assert status == 200
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
    }
    # Every final status the Run model has, whatever it is, including any added later.
    final = [s for s in Run.Status.values if s not in Run.ACTIVE_STATUSES]
    assert "failed" in final
    for run_status in final:
        assert samples[("agentsite_runs_total", (("status", run_status),))] == 0
    for tool in ("calculator", "current_time", "other"):
        for outcome in ("ok", "error"):
            key = (("outcome", outcome), ("tool", tool))
            assert samples[("agentsite_tool_calls_total", key)] == 0
    model = (("model", "agentsite-offline-demo"),)
    assert samples[("agentsite_llm_cost_usd_total", model)] == 0
    assert samples[("agentsite_llm_call_duration_seconds_count", model)] == 0
    for direction in ("input", "output", "cached"):
        key = (("direction", direction), *model)
        assert samples[("agentsite_llm_tokens_total", key)] == 0
