#!/usr/bin/env bash
# The scaled-out topology as plain processes on loopback, for drills on one machine:
# nginx -> TOPOLOGY_WEB Daphne web instances, TOPOLOGY_WORKERS agent workers
# (`manage.py agent_worker`, AGENT_EXECUTOR=queue), on the local PostgreSQL (a database
# of its own) and Redis (a DB number of its own). docker-compose.yml is the same topology
# in containers.
#
#   scripts/topology.sh up       start what is not running, wait until all is healthy,
#                                print the URL (run it again to restart a dead process)
#   scripts/topology.sh status   each process: pid, port, health; exit 1 unless all are up
#   scripts/topology.sh down     SIGTERM everything, wait, SIGKILL what is left; exit 0
#
# Environment (defaults in brackets). Ports and counts are fixed at the first `up` and
# kept until `down`, so a restarted process comes back where nginx and clients expect it.
#   TOPOLOGY_DIR            state: pids, logs, env, nginx conf, static files [.topology]
#   TOPOLOGY_WEB            web instances [2]
#   TOPOLOGY_WORKERS        worker processes [2]
#   TOPOLOGY_PORT           nginx's port [a free one]
#   TOPOLOGY_WEB_PORTS      the web instances' ports, space-separated [free ones]
#   TOPOLOGY_DATABASE_URL   its database, created when missing and migrated at each `up`
#                           [postgres://postgres@127.0.0.1:5432/agentsite_topology]
#   TOPOLOGY_REDIS_URL      [redis://127.0.0.1:6379/13]
#   TOPOLOGY_EXECUTOR       AGENT_EXECUTOR of every process [queue]
#   TOPOLOGY_API_RATE       nginx's limit_req per client address on /api/ and /openai/
#                           [200r/s], with TOPOLOGY_API_BURST requests at once [400]
#   TOPOLOGY_STOP_SECONDS   how long `down` waits after SIGTERM before SIGKILL [30: more
#                           than a worker's AGENT_WORKER_DRAIN_SECONDS, 20 by default]
#   TOPOLOGY_WAIT_SECONDS   how long `up` waits for every process to be healthy [90]
#   NGINX                   the nginx binary [nginx on PATH, else /usr/sbin/nginx]
# Every other setting reaches every process from the environment as usual, e.g.
# AGENT_RUN_LEASE_SECONDS, AGENT_WORKER_CONCURRENCY, AGENT_WORKER_DRAIN_SECONDS,
# AGENT_OFFLINE_TOKEN_DELAY, DATABASE_POOL_SIZE, AGENT_MODEL (offline unless set).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
PYTHON="$ROOT/.venv/bin/python"
DIR=$(mkdir -p "${TOPOLOGY_DIR:-.topology}" && cd "${TOPOLOGY_DIR:-.topology}" && pwd)
STOP_SECONDS=${TOPOLOGY_STOP_SECONDS:-30}
WAIT_SECONDS=${TOPOLOGY_WAIT_SECONDS:-90}

say() { echo "topology: $*" >&2; }
die() { say "$*"; exit 1; }

[ -x "$PYTHON" ] || die "no .venv/: run \`make install\` first"

nginx_binary() {
    if [ -n "${NGINX:-}" ]; then echo "$NGINX"
    elif command -v nginx >/dev/null 2>&1; then command -v nginx
    elif [ -x /usr/sbin/nginx ]; then echo /usr/sbin/nginx
    else die "nginx is not installed (sh scripts/ensure-nginx.sh, or apt-get install nginx)"
    fi
}

# $1 free ports on loopback, all different: held open together while they are chosen.
free_ports() {
    "$PYTHON" - "$1" <<'EOF'
import socket, sys
held = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in held:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in held))
EOF
}

# --- State, fixed at the first `up` ------------------------------------------------------
# .topology/topology.env: the shape (counts, ports); .topology/app.env: what every
# process of the app gets. Both are plain `NAME=value` lines.
write_state() {
    local web=${TOPOLOGY_WEB:-2} workers=${TOPOLOGY_WORKERS:-2}
    local free port web_ports
    free=$(free_ports $((web + 1)))
    port=${TOPOLOGY_PORT:-${free%% *}}
    web_ports=$(echo ${TOPOLOGY_WEB_PORTS:-${free#* }})
    [ "$(echo "$web_ports" | wc -w)" = "$web" ] || die "TOPOLOGY_WEB_PORTS must name $web ports"
    mkdir -p "$DIR/pids" "$DIR/logs" "$DIR/nginx"
    [ -s "$DIR/secret_key" ] ||
        "$PYTHON" -c 'import secrets; print(secrets.token_urlsafe(50))' > "$DIR/secret_key"
    cat > "$DIR/topology.env" <<EOF
WEB=$web
WORKERS=$workers
PORT=$port
WEB_PORTS="$web_ports"
EOF
    local origin="http://127.0.0.1:$port" var
    {
        # The caller's settings first (kept for every later restart), then the topology's.
        for var in $(compgen -e); do
            case $var in
                AGENT_*|DATABASE_POOL_SIZE|LOG_LEVEL|LOG_FORMAT|TRACING_*|METRICS_ENABLED|OTEL_*)
                    printf '%s=%q\n' "$var" "${!var}" ;;
            esac
        done
        printf '%s=%q\n' \
            DJANGO_SETTINGS_MODULE agentsite.settings \
            AGENTSITE_READ_DOTENV false \
            DEBUG false \
            SECRET_KEY "$(cat "$DIR/secret_key")" \
            ALLOWED_HOSTS 127.0.0.1,localhost \
            CSRF_TRUSTED_ORIGINS "$origin,http://localhost:$port" \
            SESSION_COOKIE_SECURE false \
            CSRF_COOKIE_SECURE false \
            SECURE_HSTS_SECONDS 0 \
            DATABASE_URL "${TOPOLOGY_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/agentsite_topology}" \
            AGENT_REDIS_URL "${TOPOLOGY_REDIS_URL:-redis://127.0.0.1:6379/13}" \
            AGENT_EXECUTOR "${TOPOLOGY_EXECUTOR:-queue}" \
            AGENT_MODEL "${AGENT_MODEL:-offline}" \
            STATIC_ROOT "$DIR/static" \
            PYTHONUNBUFFERED 1
    } > "$DIR/app.env"
}

load_state() {
    [ -f "$DIR/topology.env" ] || return 1
    # shellcheck disable=SC1091
    . "$DIR/topology.env"
}

app_env() { set -a; . "$DIR/app.env"; set +a; }

# --- Processes -----------------------------------------------------------------------------
names() {
    echo nginx
    for i in $(seq "$WEB"); do echo "web$i"; done
    for i in $(seq "$WORKERS"); do echo "worker$i"; done
}

pid_of() { cat "$DIR/pids/$1.pid" 2>/dev/null || true; }

# Alive, not a zombie (a killed process nobody has reaped yet), and still the program we
# started (not a later process that was given the same pid).
running() {
    local pid state
    pid=$(pid_of "$1")
    [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 1
    [ -r "/proc/$pid/stat" ] || return 0
    state=$(sed 's/.*) //' "/proc/$pid/stat" | cut -d' ' -f1)
    [ "$state" != Z ] || return 1
    case $1 in
        nginx) grep -q nginx "/proc/$pid/cmdline" ;;
        web*) grep -q agentsite.serve "/proc/$pid/cmdline" ;;
        *) grep -q agent_worker "/proc/$pid/cmdline" ;;
    esac
}

web_port() { echo "$WEB_PORTS" | cut -d' ' -f"${1#web}"; }

port_of() {
    case $1 in
        nginx) echo "$PORT" ;;
        web*) web_port "$1" ;;
        *) echo - ;;
    esac
}

# Started in the background with its output in logs/NAME.log; the pid is the program's own.
launch() {
    local name=$1
    shift
    "$@" >> "$DIR/logs/$name.log" 2>&1 < /dev/null &
    echo $! > "$DIR/pids/$name.pid"
}

start_web() {
    local port
    port=$(web_port "$1")
    # Daphne with the app's JSON access log, as the Docker image runs it.
    launch "$1" "$PYTHON" -m agentsite.serve --bind 127.0.0.1 --port "$port" --proxy-headers \
        agentsite.asgi:application
}

start_worker() { launch "$1" "$PYTHON" manage.py agent_worker; }

start_nginx() {
    local servers="" port
    for port in $WEB_PORTS; do
        servers="${servers}server 127.0.0.1:$port max_fails=1 fail_timeout=5s; "
    done
    local user=""
    # Its workers would otherwise switch to `nobody`; any other user runs them as itself.
    [ "$(id -u)" = 0 ] && user="user root;"
    local mime=/etc/nginx/mime.types
    [ -f "$mime" ] || mime="$(dirname "$(nginx_binary)")/../conf/mime.types"
    NGINX_LISTEN="127.0.0.1:$PORT" NGINX_UPSTREAM_SERVERS="$servers" \
        NGINX_STATIC_ROOT="$DIR/static/" NGINX_API_RATE="${TOPOLOGY_API_RATE:-200r/s}" \
        NGINX_API_BURST="${TOPOLOGY_API_BURST:-400}" NGINX_DIR="$DIR/nginx" NGINX_USER="$user" \
        NGINX_MIME_TYPES="$mime" "$PYTHON" - "$DIR/nginx" <<'EOF'
import os, sys
from pathlib import Path

def render(template: str) -> str:
    # Only the NGINX_* names: nginx's own $variables stay as they are.
    text = Path(template).read_text()
    for name, value in os.environ.items():
        if name.startswith("NGINX_"):
            text = text.replace("${" + name + "}", value)
    return text

out = Path(sys.argv[1])
(out / "agentsite.conf").write_text(render("deploy/nginx.conf"))
(out / "nginx.conf").write_text(render("deploy/nginx.topology.conf"))
EOF
    local nginx
    nginx=$(nginx_binary)
    # -e: errors before the configuration is read go here too, not to /var/log/nginx.
    "$nginx" -p "$DIR/nginx" -e "$DIR/nginx/error.log" -c "$DIR/nginx/nginx.conf" -t -q ||
        die "the rendered nginx configuration is invalid ($DIR/nginx/nginx.conf)"
    launch nginx "$nginx" -p "$DIR/nginx" -e "$DIR/nginx/error.log" -c "$DIR/nginx/nginx.conf" \
        -g "daemon off;"
}

# --- Database ------------------------------------------------------------------------------
database_prepare() {
    "$PYTHON" - "$DATABASE_URL" <<'EOF'
import sys
from urllib.parse import urlsplit

import psycopg
from psycopg import sql

url = urlsplit(sys.argv[1])
name = url.path.lstrip("/")
server = url._replace(scheme="postgresql", path="/postgres").geturl()
with psycopg.connect(server, autocommit=True, connect_timeout=5) as admin:
    if not admin.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone():
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        print(f"topology: created database {name}", file=sys.stderr)
EOF
    "$PYTHON" manage.py migrate --noinput -v 0
}

# What the queue (Procrastinate's table of workers) knows, as one number: "high-water"
# (the latest worker's id), "since ID" (workers registered after that one), "heartbeating"
# (workers it heard from in the last 30 s). - when the table does not exist (inline).
queue_workers() {
    "$PYTHON" - "$DATABASE_URL" "$@" <<'EOF'
import sys
from urllib.parse import urlsplit

import psycopg

QUERIES = {
    "high-water": "SELECT coalesce(max(id), 0) FROM procrastinate_workers",
    "since": "SELECT count(*) FROM procrastinate_workers WHERE id > %s",
    "heartbeating": "SELECT count(*) FROM procrastinate_workers"
    " WHERE last_heartbeat > now() - '30 s'::interval",
}
url = urlsplit(sys.argv[1])._replace(scheme="postgresql").geturl()
kind, params = sys.argv[2], [int(arg) for arg in sys.argv[3:]]
with psycopg.connect(url, connect_timeout=5) as db:
    if db.execute("SELECT to_regclass('procrastinate_workers')").fetchone()[0] is None:
        print("-")
    else:
        print(db.execute(QUERIES[kind], params).fetchone()[0])
EOF
}

# --- Health --------------------------------------------------------------------------------
# The HTTP status of GET url (000 when nothing answers).
http_status() {
    if command -v curl >/dev/null 2>&1; then
        curl -s -o /dev/null -w '%{http_code}' --max-time 5 "$1" 2>/dev/null || true
    else
        "$PYTHON" - "$1" <<'EOF'
import sys, urllib.error, urllib.request
try:
    print(urllib.request.urlopen(sys.argv[1], timeout=5).status)
except urllib.error.HTTPError as error:
    print(error.code)
except OSError:
    print("000")
EOF
    fi
}

health_of() {
    local name=$1
    running "$name" || { echo down; return; }
    case $name in
        nginx|web*)
            local status
            status=$(http_status "http://127.0.0.1:$(port_of "$name")/readyz")
            if [ "$status" = 200 ]; then echo ready; else echo "not ready ($status)"; fi
            ;;
        *) echo running ;;
    esac
}

wait_healthy() {
    local deadline=$((SECONDS + WAIT_SECONDS)) name
    for name in "$@"; do
        while [ "$(health_of "$name")" != ready ]; do
            running "$name" ||
                die "$name exited; the end of $DIR/logs/$name.log:$(echo; tail -n 30 "$DIR/logs/$name.log")"
            [ $SECONDS -lt $deadline ] ||
                die "$name was not ready within ${WAIT_SECONDS}s (see $DIR/logs/$name.log)"
            sleep 0.2
        done
    done
}

# --- Commands --------------------------------------------------------------------------
up() {
    load_state || write_state
    load_state
    app_env
    local started_at=$SECONDS
    # Migrated once, before any web instance starts; restarting one process skips it.
    local name
    for name in $(names | grep web); do
        running "$name" && break
    done
    local collecting=""
    if ! running "$name"; then
        database_prepare
        # For nginx, which starts last: meanwhile the app's processes start.
        "$PYTHON" manage.py collectstatic --noinput -v 0 &
        collecting=$!
    fi
    local workers=() high_water=-
    for name in $(names | grep web); do
        running "$name" || start_web "$name"
    done
    if [ "$WORKERS" -gt 0 ]; then
        high_water=$(queue_workers high-water)
        for name in $(names | grep worker); do
            running "$name" || { start_worker "$name"; workers+=("$name"); }
        done
    fi
    if [ -n "$collecting" ]; then
        wait "$collecting" || die "collectstatic failed"
    fi
    running nginx || start_nginx
    # nginx last: probed before the instances listen, it would mark them failed.
    wait_healthy $(names | grep web) nginx
    # A worker is up once it has registered with the queue.
    local deadline=$((SECONDS + WAIT_SECONDS)) registered
    while [ ${#workers[@]} -gt 0 ] && [ "$high_water" != - ]; do
        for name in "${workers[@]}"; do
            running "$name" ||
                die "$name exited; the end of $DIR/logs/$name.log:$(echo; tail -n 30 "$DIR/logs/$name.log")"
        done
        registered=$(queue_workers since "$high_water")
        [ "$registered" -ge ${#workers[@]} ] && break
        [ $SECONDS -lt $deadline ] ||
            die "the workers did not register with the queue within ${WAIT_SECONDS}s (see $DIR/logs/)"
        sleep 0.2
    done
    say "up in $((SECONDS - started_at)) s: $WEB web, $WORKERS workers ($AGENT_EXECUTOR executor)"
    echo "http://127.0.0.1:$PORT"
}

status() {
    load_state || { say "not running (no $DIR/topology.env)"; exit 1; }
    local name pid health all=0
    printf '%-10s %-8s %-6s %s\n' PROCESS PID PORT HEALTH
    for name in $(names); do
        health=$(health_of "$name")
        pid=$(pid_of "$name")
        printf '%-10s %-8s %-6s %s\n' "$name" "${pid:--}" "$(port_of "$name")" "$health"
        case $health in ready|running) ;; *) all=1 ;; esac
    done
    if [ "$WORKERS" -gt 0 ]; then
        app_env
        echo "queue: $(queue_workers heartbeating) workers heartbeating (last 30 s)"
    fi
    echo "url: http://127.0.0.1:$PORT"
    return $all
}

# SIGTERM to each, then SIGKILL to what is still there after TOPOLOGY_STOP_SECONDS.
# Workers first (they hand their runs back), nginx last.
down() {
    load_state || { say "nothing to stop"; return 0; }
    local name pid pids=() order
    order=$( (names | grep worker; names | grep web; echo nginx) || true)
    for name in $order; do
        if running "$name"; then
            pid=$(pid_of "$name")
            kill -TERM "$pid" 2>/dev/null || true
            pids+=("$pid")
        fi
    done
    local deadline=$((SECONDS + STOP_SECONDS)) left
    while :; do
        left=()
        for pid in "${pids[@]}"; do
            kill -0 "$pid" 2>/dev/null && left+=("$pid")
        done
        [ ${#left[@]} -eq 0 ] && break
        if [ $SECONDS -ge $deadline ]; then
            say "still running after ${STOP_SECONDS}s, killed: ${left[*]}"
            kill -KILL "${left[@]}" 2>/dev/null || true
            break
        fi
        sleep 0.1
    done
    rm -f "$DIR"/pids/*.pid "$DIR/topology.env"
    say "down"
}

case ${1:-} in
    up) up ;;
    down) down ;;
    status) status ;;
    *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
