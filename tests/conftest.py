"""Fixtures for the browser tests: a real server in a subprocess and headless Chromium.

The server is the one `make run` starts (Daphne's `runserver`, which also serves the static
files while DEBUG is on) on a free port, with its own throwaway database and checkpoint
file. The browser is Debian's Chromium driven by Playwright's sync API; Playwright never
downloads a browser here. Without Chromium the browser tests skip, loudly.
"""

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
USERNAME = "browser-tester"
PASSWORD = "correct-horse-battery-staple"
# Slow enough that streaming (and pressing Stop mid-answer) is observable, fast enough
# that the offline model's ~60-token reply takes about two seconds.
TOKEN_DELAY = "0.03"

_skipped_browser_tests: list[str] = []


def chromium_path() -> str | None:
    # AGENTSITE_CHROMIUM names another Chromium build (or a missing one, to see the skip).
    chosen = os.environ.get("AGENTSITE_CHROMIUM")
    if chosen:
        return chosen if os.access(chosen, os.X_OK) else None
    if os.access("/usr/bin/chromium", os.X_OK):
        return "/usr/bin/chromium"
    return shutil.which("chromium") or shutil.which("chromium-browser")


def _why_browser_tests_cannot_run() -> str | None:
    if chromium_path() is None:
        return (
            "Chromium is not installed (no /usr/bin/chromium, no `chromium` on PATH, or "
            "AGENTSITE_CHROMIUM does not name an executable): the browser tests did NOT "
            "run. Install it with `apt-get install chromium` (or `make browser`)."
        )
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "The `playwright` package is missing: the browser tests did NOT run."
    return None


def pytest_runtest_setup(item: pytest.Item) -> None:
    # Checked before any fixture so a missing browser does not even start the server.
    if item.get_closest_marker("browser") is None:
        return
    reason = _why_browser_tests_cannot_run()
    if reason is not None:
        _skipped_browser_tests.append(item.nodeid)
        pytest.skip(f"BROWSER TEST SKIPPED: {reason}")


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not _skipped_browser_tests:
        return
    terminalreporter.write_sep(
        "!", f"WARNING: {len(_skipped_browser_tests)} BROWSER TESTS SKIPPED", red=True, bold=True
    )
    terminalreporter.write_line(_why_browser_tests_cannot_run() or "", red=True, bold=True)
    for nodeid in _skipped_browser_tests:
        terminalreporter.write_line(f"  skipped: {nodeid}", red=True)


@dataclass(frozen=True)
class LiveServer:
    url: str
    username: str
    password: str
    log: Path


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _server_env(workdir: Path) -> dict[str, str]:
    env = {
        key: value
        for key, value in os.environ.items()
        # Nothing from the developer's environment may point the server elsewhere.
        if not key.startswith(("AGENT_", "DATABASE_", "DJANGO_")) and key != "ALLOWED_HOSTS"
    }
    env.update(
        DJANGO_SETTINGS_MODULE="agentsite.settings",
        AGENTSITE_READ_DOTENV="false",
        DEBUG="true",
        DATABASE_URL=f"sqlite:///{workdir / 'db.sqlite3'}",
        AGENT_CHECKPOINT_SQLITE_PATH=str(workdir / "checkpoints.sqlite3"),
        AGENT_MODEL="offline",
        AGENT_OFFLINE_TOKEN_DELAY=TOKEN_DELAY,
        PYTHONUNBUFFERED="1",
    )
    return env


def _prepare_database(env: dict[str, str]) -> subprocess.Popen[bytes]:
    """Migrate and create the test user in one process (one Django start-up, not two)."""
    script = (
        "from django.contrib.auth import get_user_model\n"
        "from django.core.management import call_command\n"
        "call_command('migrate', interactive=False, verbosity=0)\n"
        f"get_user_model().objects.create_user({USERNAME!r}, password={PASSWORD!r})\n"
    )
    return subprocess.Popen(
        [sys.executable, "manage.py", "shell", "--no-imports", "-c", script],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def _runserver(env: dict[str, str], port: int, log: Path) -> subprocess.Popen[bytes]:
    """`make run`'s server on 127.0.0.1:`port`, its output appended to `log`."""
    with log.open("ab") as output:
        return subprocess.Popen(
            [sys.executable, "manage.py", "runserver", f"127.0.0.1:{port}", "--noreload"],
            cwd=ROOT,
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
        )


def _stop(server: subprocess.Popen[bytes]) -> None:
    server.terminate()
    try:
        server.wait(timeout=5)
    except subprocess.TimeoutExpired:
        # After a run the server does not exit on SIGTERM: the checkpointer's
        # aiosqlite connection keeps a non-daemon thread alive.
        server.kill()
        server.wait()


@contextmanager
def serving(env: dict[str, str], log: Path) -> Iterator[str]:
    """`make run`'s server on a free port while the block runs: its URL, once it answers."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    server = _runserver(env, port, log)
    try:
        _wait_until_up(url, server, log)
        yield url
    finally:
        _stop(server)


def _wait_until_up(url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"The server exited early:\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(url + "/login/", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.1)
    raise RuntimeError(f"The server did not answer within 30 s:\n{log.read_text()[-4000:]}")


@pytest.fixture(scope="session")
def agentsite_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    workdir = tmp_path_factory.mktemp("browser-server")
    env = _server_env(workdir)
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = workdir / "server.log"
    # The server starts while the database is prepared: it touches the database only
    # when the first request comes, which waits for both.
    preparing = _prepare_database(env)
    server = _runserver(env, port, log)
    try:
        prepared, _ = preparing.communicate(timeout=120)
        if preparing.returncode != 0:
            raise RuntimeError(f"Preparing the database failed:\n{prepared.decode()}")
        _wait_until_up(url, server, log)
        with urllib.request.urlopen(url + "/static/chat/chat.js", timeout=5) as response:
            assert response.status == 200, "runserver did not serve the static files"
        yield LiveServer(url=url, username=USERNAME, password=PASSWORD, log=log)
    finally:
        preparing.kill()
        _stop(server)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    # Module scope: Playwright's sync API owns an event loop while it runs, so it is shut
    # down before any later module's asyncio tests (pytest-asyncio, auto mode) start.
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=chromium_path(), headless=True, args=CHROMIUM_ARGS
        )
        yield chromium
        chromium.close()


def new_context(browser: Any, server: LiveServer, **options: Any) -> Any:
    context = browser.new_context(
        base_url=server.url, viewport={"width": 1280, "height": 800}, **options
    )
    context.set_default_timeout(10_000)
    return context


@pytest.fixture
def new_page(browser: Any, agentsite_server: LiveServer) -> Iterator[Callable[..., Any]]:
    """Pages in fresh browser contexts (own cookies), e.g. new_page(storage_state=...)."""
    contexts: list[Any] = []

    def make(**options: Any) -> Any:
        contexts.append(new_context(browser, agentsite_server, **options))
        return contexts[-1].new_page()

    yield make
    for context in contexts:
        context.close()


@pytest.fixture
def page(new_page: Callable[..., Any]) -> Any:
    """A page of a browser that has never visited the site."""
    return new_page()
