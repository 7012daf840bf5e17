"""Agentsite settings: everything comes from the environment (django-environ).

`.env.example` documents every variable. The defaults are the embedded monolith
(SQLite, in-memory channel layer and cache, the built-in offline model); production
values are configuration only, never code.
"""

import hashlib
from pathlib import Path

import environ
from django.core.exceptions import ImproperlyConfigured

BASE_DIR = Path(__file__).resolve().parent.parent
VAR_DIR = BASE_DIR / "var"

env = environ.Env()
if env.bool("AGENTSITE_READ_DOTENV", default=True):
    environ.Env.read_env(BASE_DIR / ".env")

DEBUG = env.bool("DEBUG", default=False)
SECRET_KEY = env.str("SECRET_KEY", default="")
LOCAL_HOSTS = ["localhost", "127.0.0.1", "[::1]"]
ALLOWED_HOSTS = env.list("ALLOWED_HOSTS", default=LOCAL_HOSTS if DEBUG else [])


def _refuse_insecure_defaults() -> None:
    # Production must never run on a guessable key or answer for any host by accident.
    if DEBUG:
        public = [h for h in ALLOWED_HOSTS if h not in LOCAL_HOSTS]
        if public:
            raise ImproperlyConfigured(
                f"DEBUG is on while ALLOWED_HOSTS names public hosts ({', '.join(public)}); "
                "set DEBUG=false for a public deployment."
            )
        return
    # `manage.py check --deploy`'s own rule (security.W009), refused here, not warned about.
    # Its function is private (so not in django-stubs); its public check reads the
    # settings, which are still being made here.
    from django.core.checks.security.base import (  # type: ignore[attr-defined]
        SECRET_KEY_INSECURE_PREFIX,
        SECRET_KEY_MIN_LENGTH,
        SECRET_KEY_MIN_UNIQUE_CHARACTERS,
        _check_secret_key,
    )

    if not _check_secret_key(SECRET_KEY):
        raise ImproperlyConfigured(
            "DEBUG is off, so SECRET_KEY must be set to a random value of at least "
            f"{SECRET_KEY_MIN_LENGTH} characters, at least {SECRET_KEY_MIN_UNIQUE_CHARACTERS} "
            f"of them different, not starting with {SECRET_KEY_INSECURE_PREFIX!r} "
            "(python -c 'import secrets; print(secrets.token_urlsafe(50))')."
        )
    if not ALLOWED_HOSTS or "*" in ALLOWED_HOSTS:
        raise ImproperlyConfigured(
            "DEBUG is off, so ALLOWED_HOSTS must list the host names this site serves."
        )


_refuse_insecure_defaults()
if DEBUG and not SECRET_KEY:
    SECRET_KEY = "django-insecure-local-development-only"  # refused when DEBUG is off

INSTALLED_APPS = [
    "daphne",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "channels",
    "corsheaders",
    # For its static files: /api/docs loads Swagger UI from here, not from a CDN.
    "ninja",
    # Idempotency-Key for every app's POSTs: on the ground floor, so billing can use it.
    "agentsite.idempotency",
    "chat",
    "tracing",
    "billing",
]

MIDDLEWARE = [
    "agentsite.middleware.RequestIdMiddleware",
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "corsheaders.middleware.CorsMiddleware",
    # After corsheaders: its 413/400/405 answers get the CORS headers an allowed
    # browser app needs to read them.
    "agentsite.middleware.ApiBoundaryMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "agentsite.urls"
ASGI_APPLICATION = "agentsite.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
                "chat.context_processors.agent_model",
            ],
        },
    },
]

# Seconds a SQLite writer waits for another's lock before failing (the database and the
# checkpoint file alike).
SQLITE_TIMEOUT = 20
DATABASES = {"default": env.db("DATABASE_URL", default=f"sqlite:///{VAR_DIR / 'db.sqlite3'}")}
# The embedded defaults keep their files in var/, which a fresh clone does not have yet.
VAR_DIR.mkdir(exist_ok=True)
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # Kept open (unless the URL says `?conn_max_age=`): opening one took 0.6 ms of CPU,
    # and runs and sockets made a dozen and more per turn (see agentsite/db.py, which
    # closes an HTTP request's own when it ends). PostgreSQL has its pool instead.
    DATABASES["default"].setdefault("CONN_MAX_AGE", None)
    # WAL + a busy timeout let the web requests and the run executor write side by side;
    # IMMEDIATE transactions take the write lock up front instead of failing mid-way.
    DATABASES["default"].setdefault("OPTIONS", {}).update(
        {
            "transaction_mode": "IMMEDIATE",
            "timeout": SQLITE_TIMEOUT,
            "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
        }
    )
# PostgreSQL: each process borrows from one bounded pool (Django's own, psycopg_pool)
# instead of opening a connection per thread, so a burst of requests waits for a
# connection (up to 30 s) instead of failing with "too many clients". A process opens
# at most DATABASE_POOL_SIZE + AGENT_CHECKPOINT_POOL_SIZE connections (+1 for a moment
# while a conversation's checkpoints are deleted): keep instances x that under the
# server's max_connections (6 instances at the defaults on PostgreSQL's 100). 300 runs
# at once in one process used 2 connections of each pool: the defaults leave room.
DATABASE_POOL_SIZE = env.int("DATABASE_POOL_SIZE", default=10)
AGENT_CHECKPOINT_POOL_SIZE = env.int("AGENT_CHECKPOINT_POOL_SIZE", default=4)
if DATABASES["default"]["ENGINE"] == "django.db.backends.postgresql":
    DATABASES["default"].setdefault("OPTIONS", {})["pool"] = {
        "min_size": 1,
        "max_size": DATABASE_POOL_SIZE,
        "timeout": 30,
    }
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
ON_POSTGRES = DATABASES["default"]["ENGINE"] == "django.db.backends.postgresql"
if ON_POSTGRES:
    # Procrastinate's tables (its migrations are PostgreSQL-only SQL) exist wherever the
    # database can hold them, so switching AGENT_EXECUTOR is an environment change alone,
    # never a migration step; SQLite never sees them.
    INSTALLED_APPS.append("procrastinate.contrib.django")

REDIS_URL = env.str("AGENT_REDIS_URL", default="")

# Where runs execute: "inline" (asyncio tasks in the web process that accepted them, the
# monolith) or "queue" (Procrastinate jobs in PostgreSQL, executed by
# `manage.py agent_worker` processes).
AGENT_EXECUTOR = env.str("AGENT_EXECUTOR", default="inline")
if AGENT_EXECUTOR not in ("inline", "queue"):
    raise ImproperlyConfigured("AGENT_EXECUTOR must be one of: inline, queue.")
if AGENT_EXECUTOR == "queue" and not ON_POSTGRES:
    raise ImproperlyConfigured(
        "AGENT_EXECUTOR=queue keeps its jobs in PostgreSQL (Procrastinate), in the "
        "transaction that creates the run: set DATABASE_URL=postgres://user:pass@host/db, "
        "or use AGENT_EXECUTOR=inline for the one-process monolith on SQLite."
    )
if AGENT_EXECUTOR == "queue" and not REDIS_URL:
    raise ImproperlyConfigured(
        "AGENT_EXECUTOR=queue executes runs in worker processes, whose events and cancels "
        "reach the web processes through Redis: set AGENT_REDIS_URL=redis://host:6379/0."
    )
# Runs one `agent_worker` process executes at once (each an asyncio task: a run mostly
# waits on its model).
AGENT_WORKER_CONCURRENCY = env.int("AGENT_WORKER_CONCURRENCY", default=50)
# On SIGTERM a worker takes no new runs and lets its runs finish for this many seconds,
# then hands the rest back: another process resumes them from their checkpoint.
AGENT_WORKER_DRAIN_SECONDS = env.float("AGENT_WORKER_DRAIN_SECONDS", default=20.0)
# A worker has no web server: when set, it serves its Prometheus metrics (the queue's
# pickup latency among them) on this port, at any path.
AGENT_WORKER_METRICS_PORT = env.int("AGENT_WORKER_METRICS_PORT", default=0)
# Every Redis client the app builds (channel layer, cache, event log, rate limiter) uses
# these. A socket listening on the channel layer waits in a 5 s blocking pop (channels-
# redis's BZPOPMIN); redis-py 8 reads with a 5 s timeout by default, so every idle
# WebSocket was closed with 1011. The read timeout leaves the pop room even when a busy
# server reads its reply late; a dead Redis is still noticed: connecting times out, TCP
# keepalive probes idle connections, and one idle longer than the health check interval
# is pinged before use.
REDIS_CONNECT_TIMEOUT = env.float("AGENT_REDIS_CONNECT_TIMEOUT", default=5.0)
REDIS_READ_TIMEOUT = env.float("AGENT_REDIS_READ_TIMEOUT", default=15.0)
CHANNEL_LAYER_BLOCKING_POP = 5  # channels_redis.core.RedisChannelLayer.brpop_timeout
if REDIS_READ_TIMEOUT < 2 * CHANNEL_LAYER_BLOCKING_POP:
    raise ImproperlyConfigured(
        f"AGENT_REDIS_READ_TIMEOUT must be at least {2 * CHANNEL_LAYER_BLOCKING_POP} seconds: "
        f"chat sockets wait on the channel layer in {CHANNEL_LAYER_BLOCKING_POP} s blocking "
        "pops, and a read timeout near that closes them while they are idle."
    )
# redis-py 8's asyncio pools open at most 100 connections unless told, then fail with
# `Too many connections`: 300 runs publishing at once held more (each command in flight
# holds one), and sockets closed with 1011. The channel layer's and the event log's pools
# may each open this many per process: keep instances x 2 x this under Redis's
# `maxclients` (10,000 by default).
REDIS_MAX_CONNECTIONS = env.int("AGENT_REDIS_MAX_CONNECTIONS", default=1000)
REDIS_CLIENT_OPTIONS = {
    "max_connections": REDIS_MAX_CONNECTIONS,
    "socket_connect_timeout": REDIS_CONNECT_TIMEOUT,
    "socket_timeout": REDIS_READ_TIMEOUT,
    "socket_keepalive": True,
    "health_check_interval": 15,
}
# channels-redis queues the messages for all the sockets of one process in one Redis
# key, and drops (logging at INFO) what is sent while it holds `capacity` of them: a lost
# final event leaves its client waiting. Its default, 100, is less than one batch of
# events per socket at 300 sockets a process; this leaves room for ~16 each.
CHANNEL_LAYER_CAPACITY = 5000
# The cache holds rows of the database (sessions, limits, prices): its keys name the
# database, so two deployments or test runs sharing one Redis never read each other's.
_CACHE_KEY_PREFIX = (
    "agentsite:"
    + hashlib.sha256(
        "|".join(
            str(DATABASES["default"].get(part, "")) for part in ("HOST", "PORT", "NAME")
        ).encode()
    ).hexdigest()[:12]
)
if REDIS_URL:
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.core.RedisChannelLayer",
            "CONFIG": {
                "hosts": [{"address": REDIS_URL, **REDIS_CLIENT_OPTIONS}],
                "capacity": CHANNEL_LAYER_CAPACITY,
            },
        }
    }
    CACHES = {
        "default": {
            "BACKEND": "django_redis.cache.RedisCache",
            "LOCATION": REDIS_URL,
            "KEY_PREFIX": _CACHE_KEY_PREFIX,
            "OPTIONS": {
                "CLIENT_CLASS": "django_redis.client.DefaultClient",
                "CONNECTION_POOL_KWARGS": REDIS_CLIENT_OPTIONS,
                # Everything cached is also in the database: with Redis down, a read
                # misses and a write is skipped (logged), and pages and turns go on.
                "IGNORE_EXCEPTIONS": True,
            },
        }
    }
    DJANGO_REDIS_LOG_IGNORED_EXCEPTIONS = True
else:
    CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
    # One process: sessions (one entry per signed-in browser), limits and prices.
    CACHES = {
        "default": {
            "BACKEND": "django.core.cache.backends.locmem.LocMemCache",
            "KEY_PREFIX": _CACHE_KEY_PREFIX,
            "OPTIONS": {"MAX_ENTRIES": 100_000},
        }
    }

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]
# Browser apps on these origins may call the JSON API and the OpenAI-compatible one
# (and nothing else), and read the headers that link an answer to its run.
CORS_ALLOWED_ORIGINS = env.list("AGENT_CORS_ORIGINS", default=[])
CORS_URLS_REGEX = r"^/(api|openai)/.*$"
CORS_EXPOSE_HEADERS = [
    "Retry-After",
    "X-Agentsite-Run",
    "X-Agentsite-Trace",
    "X-Agentsite-Conversation",
]

LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "chat:index"
LOGOUT_REDIRECT_URL = "login"
SESSION_COOKIE_AGE = env.int("AGENT_SESSION_TTL", default=14 * 24 * 3600)
# Cached database sessions that ignore a cookie Django could not have issued (see the
# module).
SESSION_ENGINE = "agentsite.sessions"
# The request header programs send their API key in (billing.auth.ApiKeyHeaderAuth);
# `Authorization: Bearer <key>` works as well.
AGENT_API_KEY_HEADER = env.str("AGENT_API_KEY_HEADER", default="X-API-Key")
# The largest request body the JSON API accepts (413 request_too_large above it).
AGENT_API_MAX_BODY_BYTES = env.int("AGENT_API_MAX_BODY_BYTES", default=1024 * 1024)
# Requests per minute per account when its plan sets none (0: no limit); counted in
# memory per process, or in Redis (shared by every instance) with AGENT_REDIS_URL.
AGENT_RATE_LIMIT_PER_MINUTE = env.int("AGENT_RATE_LIMIT_PER_MINUTE", default=60)

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATICFILES_DIRS = [BASE_DIR / "static"]
STATIC_ROOT = env.path("STATIC_ROOT", default=BASE_DIR / "staticfiles")

# Production hardening: on by default whenever DEBUG is off, each overridable.
SESSION_COOKIE_SECURE = env.bool("SESSION_COOKIE_SECURE", default=not DEBUG)
CSRF_COOKIE_SECURE = env.bool("CSRF_COOKIE_SECURE", default=not DEBUG)
CSRF_TRUSTED_ORIGINS = env.list("CSRF_TRUSTED_ORIGINS", default=[])
SECURE_CONTENT_TYPE_NOSNIFF = True
SECURE_HSTS_SECONDS = env.int("SECURE_HSTS_SECONDS", default=0 if DEBUG else 3600)
if env.bool("USE_X_FORWARDED_PROTO", default=not DEBUG):
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")

# JSON lines in production (LOG_FORMAT=json, the default when DEBUG is off), readable
# text on a developer's machine; both carry request_id, run_id and the OpenTelemetry
# span_id (JSON adds trace_id). `python -m agentsite.serve` logs Daphne's access log alike.
LOG_FORMAT = env.str("LOG_FORMAT", default="text" if DEBUG else "json")
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "filters": {"context": {"()": "agentsite.logging.ContextFilter"}},
    "formatters": {
        "json": {"()": "agentsite.logging.JsonFormatter"},
        "text": {
            "format": "%(asctime)s %(levelname)s %(name)s [req=%(request_id)s run=%(run_id)s "
            "span=%(span_id)s] %(message)s"
        },
    },
    "handlers": {
        "console": {
            "class": "logging.StreamHandler",
            "filters": ["context"],
            "formatter": "json" if LOG_FORMAT == "json" else "text",
        }
    },
    "root": {"handlers": ["console"], "level": env.str("LOG_LEVEL", default="INFO")},
    # Procrastinate logs every job at INFO; a run's own lines say what matters of it.
    "loggers": {"httpx": {"level": "WARNING"}, "procrastinate": {"level": "WARNING"}},
}

# --- The agent -------------------------------------------------------------------------
# Which provider answers: "offline" (built in, deterministic, no network), "openai"
# (OpenAI or any OpenAI-compatible server) or "anthropic".
AGENT_MODEL = env.str("AGENT_MODEL", default="offline")
if AGENT_MODEL not in ("offline", "openai", "anthropic"):
    raise ImproperlyConfigured("AGENT_MODEL must be one of: offline, openai, anthropic.")
AGENT_OPENAI_API_KEY = env.str("AGENT_OPENAI_API_KEY", default="")
AGENT_OPENAI_MODEL = env.str("AGENT_OPENAI_MODEL", default="gpt-4.1-mini")
AGENT_OPENAI_BASE_URL = env.str("AGENT_OPENAI_BASE_URL", default="") or None
AGENT_ANTHROPIC_API_KEY = env.str("AGENT_ANTHROPIC_API_KEY", default="")
AGENT_ANTHROPIC_MODEL = env.str("AGENT_ANTHROPIC_MODEL", default="claude-sonnet-4-5")
AGENT_ANTHROPIC_BASE_URL = env.str("AGENT_ANTHROPIC_BASE_URL", default="") or None
AGENT_MAX_TOKENS = env.int("AGENT_MAX_TOKENS", default=1024)
# When the budget left cannot pay for AGENT_MAX_TOKENS of output, a call is made with its
# output capped to what it can pay for, down to this floor (a short answer or one tool
# call); below it the call is refused (budget_exceeded).
AGENT_MIN_OUTPUT_TOKENS = env.int("AGENT_MIN_OUTPUT_TOKENS", default=64)
AGENT_TEMPERATURE = env.float("AGENT_TEMPERATURE", default=0.2)
AGENT_PROVIDER_TIMEOUT = env.float("AGENT_PROVIDER_TIMEOUT", default=60.0)
AGENT_PROVIDER_MAX_RETRIES = env.int("AGENT_PROVIDER_MAX_RETRIES", default=2)
AGENT_OFFLINE_TOKEN_DELAY = env.float("AGENT_OFFLINE_TOKEN_DELAY", default=0.02)

AGENT_MAX_STEPS = env.int("AGENT_MAX_STEPS", default=8)
AGENT_RUN_TIMEOUT = env.float("AGENT_RUN_TIMEOUT", default=300.0)
# The process executing a run renews its lease every third of this; a run whose lease
# lapsed (its process died) is resumed by any process within about that.
AGENT_RUN_LEASE_SECONDS = env.float("AGENT_RUN_LEASE_SECONDS", default=10.0)
# How many times a run is resumed after its process died (or handed it back) before it
# is closed as interrupted instead: a run that kills its process every time must not
# loop forever.
AGENT_RUN_MAX_RECOVERIES = env.int("AGENT_RUN_MAX_RECOVERIES", default=3)
AGENT_CONTEXT_TOKENS = env.int("AGENT_CONTEXT_TOKENS", default=6000)
AGENT_MAX_MESSAGE_CHARS = env.int("AGENT_MAX_MESSAGE_CHARS", default=8000)
AGENT_EVENT_TTL = env.int("AGENT_EVENT_TTL", default=3600)
# Hold every event a run publishes to its schema (chat.event_schemas), raising at the
# emitter that drifts from it: in development and the tests, not on production's path.
AGENT_CHECK_EVENTS = env.bool("AGENT_CHECK_EVENTS", default=DEBUG)
AGENT_CHECKPOINT_SQLITE_PATH = env.path(
    "AGENT_CHECKPOINT_SQLITE_PATH", default=VAR_DIR / "checkpoints.sqlite3"
)

# --- Tracing ---------------------------------------------------------------------------
# Record every run as a span tree (off only for benchmarks or emergencies). Off also
# stops the LLM latency and token metrics, which are fed from the finished trace.
TRACING_ENABLED = env.bool("TRACING_ENABLED", default=True)
# Prompts, completions, tool arguments and results are cut to this many characters.
TRACING_MAX_PAYLOAD_CHARS = env.int("TRACING_MAX_PAYLOAD_CHARS", default=4000)
# An LLM span records its prompt's system message and last this many messages (0: all):
# the span says how many it left out. A whole prompt is the whole conversation.
TRACING_MAX_PROMPT_MESSAGES = env.int("TRACING_MAX_PROMPT_MESSAGES", default=40)
# Spans buffered in memory before they are written in one batch.
TRACING_FLUSH_BATCH = env.int("TRACING_FLUSH_BATCH", default=200)
TRACING_RUNNING_VISIBLE_AFTER = env.float("TRACING_RUNNING_VISIBLE_AFTER", default=0.5)
# `manage.py prune_traces` deletes traces older than this many days.
TRACING_RETENTION_DAYS = env.int("TRACING_RETENTION_DAYS", default=30)
# When set (e.g. http://127.0.0.1:4318), spans are also exported over OTLP/HTTP.
OTEL_EXPORTER_OTLP_ENDPOINT = env.str("OTEL_EXPORTER_OTLP_ENDPOINT", default="")
OTEL_SERVICE_NAME = env.str("OTEL_SERVICE_NAME", default="agentsite")
# Also export prompts, completions, tool arguments and results (opt-in, as the GenAI
# semantic conventions ask: they may hold personal data).
TRACING_EXPORT_CONTENT = env.bool("TRACING_EXPORT_CONTENT", default=False)
# Prometheus metrics at /metrics (unauthenticated: restrict it at the proxy in production).
METRICS_ENABLED = env.bool("METRICS_ENABLED", default=True)
