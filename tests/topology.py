"""The scaled-out topology for drills: `scripts/topology.sh` run with a directory, a
PostgreSQL database and a redis-server of the drill's own. The drill kills and restarts
its processes by name (nginx, web1, web2, worker1, …) and reads the database directly,
as an operator would."""

import os
import shlex
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import psycopg

from tests.conftest import ROOT

SCRIPT = ROOT / "scripts" / "topology.sh"


def nginx_available() -> bool:
    return shutil.which("nginx") is not None or os.access("/usr/sbin/nginx", os.X_OK)


class Topology:
    def __init__(self, workdir: Path, *, database_url: str, redis_url: str, **env: str) -> None:
        self.dir = workdir / "topology"
        self.database_url = database_url
        self.env = {
            key: value
            for key, value in os.environ.items()
            # Nothing from the developer's environment may point the processes elsewhere.
            if not key.startswith(("AGENT_", "DATABASE_", "DJANGO_", "TOPOLOGY_"))
        }
        self.env.update(
            TOPOLOGY_DIR=str(self.dir),
            TOPOLOGY_DATABASE_URL=database_url,
            TOPOLOGY_REDIS_URL=redis_url,
            TOPOLOGY_WORKERS="2",
            TOPOLOGY_EXECUTOR="queue",
            TOPOLOGY_STOP_SECONDS="10",
            **env,
        )
        self.url = ""
        self.web_urls: list[str] = []

    def _script(self, command: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(SCRIPT), command],
            cwd=ROOT,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=180,
        )

    def up(self) -> float:
        """Start what is not running (all of it, the first time) and wait until it is
        healthy; the seconds it took."""
        started = time.monotonic()
        done = self._script("up")
        if done.returncode != 0:
            raise RuntimeError(f"topology.sh up failed:\n{done.stderr[-4000:]}")
        self.url = done.stdout.strip().splitlines()[-1]
        ports = self._state()["WEB_PORTS"].strip('"').split()
        self.web_urls = [f"http://127.0.0.1:{port}" for port in ports]
        return time.monotonic() - started

    def down(self) -> subprocess.CompletedProcess[str]:
        return self._script("down")

    def status(self) -> subprocess.CompletedProcess[str]:
        return self._script("status")

    def _state(self) -> dict[str, str]:
        lines = (self.dir / "topology.env").read_text().splitlines()
        return dict(line.split("=", 1) for line in lines if "=" in line)

    def app_env(self) -> dict[str, str]:
        """The environment every process of the app gets (its settings, SECRET_KEY too),
        for a `manage.py` command of the drill's own."""
        env = dict(self.env)
        for line in (self.dir / "app.env").read_text().splitlines():
            name, value = line.split("=", 1)
            env[name] = "".join(shlex.split(value)) if value else ""
        return env

    def pid(self, name: str) -> int:
        return int((self.dir / "pids" / f"{name}.pid").read_text())

    def names(self, kind: str) -> list[str]:
        """The processes of one kind ("web", "worker"), by name."""
        count = int(self._state()["WEB" if kind == "web" else "WORKERS"])
        return [f"{kind}{i}" for i in range(1, count + 1)]

    def signal(self, name: str, signum: signal.Signals) -> None:
        os.kill(self.pid(name), signum)

    def wait_gone(self, name: str, timeout: float = 60) -> None:
        pid = self.pid(name)
        deadline = time.monotonic() + timeout
        while _alive(pid):
            assert time.monotonic() < deadline, f"{name} still runs {timeout} s after its signal"
            time.sleep(0.05)

    def log(self, name: str) -> str:
        return (self.dir / "logs" / f"{name}.log").read_text(errors="replace")

    def query(self, sql: str, *params: Any) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.database_url, connect_timeout=5) as db:
            return db.execute(sql, params).fetchall()


def _alive(pid: int) -> bool:
    """Running, and not a zombie nobody has reaped yet (SIGKILLed, its parent gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"
