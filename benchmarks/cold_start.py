"""How long a web process takes from exec to its first 200 (issue 11): the number that
matters where instances start on demand (the seed's serverless pattern, a scale-up).

    .venv/bin/python benchmarks/cold_start.py               # 5 starts of each, interleaved
    .venv/bin/python benchmarks/cold_start.py --starts 10

Run from the root of a checkout. Each start execs the server as production does
(`python -m agentsite.serve`, i.e. Daphne, DEBUG off; the bare pattern under uvicorn) on
a free port and polls GET /healthz every 5 ms until it answers 200; the time from exec
to that answer is the cold start. Configurations, started in turn so the machine's
other work falls on all alike: Agentsite on its embedded defaults (SQLite, migrated
beforehand), Agentsite on PostgreSQL + Redis (a throwaway database, a redis-server of
this run's own), and the bare FastAPI + SSE pattern (benchmarks/fastapi_baseline.py).
The page cache is warm after the first start (as on a host that ran the image before);
the first start of each is printed apart.
"""

import argparse
import contextlib
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.turn_cost import agentsite_command, fastapi_command  # noqa: E402
from tests.conftest import _free_port, _server_env  # noqa: E402
from tests.drills import RedisServer  # noqa: E402
from tests.servers import postgres_database  # noqa: E402

POLL = 0.005
TIMEOUT = 120.0


def first_200(command: list[str], env: dict[str, str], port: int, log: Path) -> float:
    """Seconds from exec to the first 200 of GET /healthz; the process is stopped after."""
    url = f"http://127.0.0.1:{port}/healthz"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with log.open("ab") as out:
        started = time.perf_counter()
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=out)
    try:
        while time.perf_counter() - started < TIMEOUT:
            if process.poll() is not None:
                raise RuntimeError(f"{command[2]} exited; see {log}")
            try:
                with opener.open(url, timeout=1) as response:
                    if response.status == 200:
                        return time.perf_counter() - started
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(POLL)
        raise RuntimeError(f"no 200 within {TIMEOUT:.0f} s; see {log}")
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def migrate(env: dict[str, str]) -> None:
    subprocess.run(
        [sys.executable, "manage.py", "migrate", "--noinput", "-v", "0"],
        cwd=ROOT,
        env=env,
        check=True,
        timeout=300,
    )


@contextlib.contextmanager
def configurations(workdir: Path) -> Iterator[dict[str, tuple[dict[str, str], bool]]]:
    """name -> (environment, is Agentsite)."""
    base = _server_env(workdir)
    base.update(
        DEBUG="false",
        SECRET_KEY="cold-start-" + secrets.token_urlsafe(48),
        ALLOWED_HOSTS="127.0.0.1,localhost",
        LOG_LEVEL="WARNING",
    )
    migrate(base)
    redis = RedisServer(workdir)
    redis.start()
    try:
        with postgres_database("bench_cold") as url:
            postgres = {**base, "DATABASE_URL": url, "AGENT_REDIS_URL": redis.url}
            migrate(postgres)
            yield {
                "agentsite, SQLite (defaults)": (base, True),
                "agentsite, PostgreSQL + Redis": (postgres, True),
                "fastapi (bare pattern)": (base, False),
            }
    finally:
        redis.kill()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--starts", type=int, default=5, help="starts of each, after the first")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="cold-start-") as tmp:
        workdir = Path(tmp)
        with configurations(workdir) as configs:
            times: dict[str, list[float]] = {name: [] for name in configs}
            for round_ in range(args.starts + 1):
                for name, (env, is_agentsite) in configs.items():
                    port = _free_port()
                    command = agentsite_command(port) if is_agentsite else fastapi_command(port)
                    times[name].append(first_200(command, env, port, workdir / "server.log"))
                    print(f"  start {round_}: {name}: {times[name][-1] * 1000:.0f} ms", flush=True)
    print(f"\n== cold start: exec -> first 200 of /healthz, {args.starts} warm starts each ==")
    width = max(map(len, times))
    print(f"  {'':{width}}  {'first':>7}  {'median':>7}  {'min':>7}  {'max':>7}   (ms)")
    for name, values in times.items():
        warm = values[1:]
        row = [values[0], statistics.median(warm), min(warm), max(warm)]
        print(f"  {name:{width}}  " + "  ".join(f"{v * 1000:7.0f}" for v in row))


if __name__ == "__main__":
    main()
