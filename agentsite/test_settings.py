"""Settings for the test suite: the embedded defaults, isolated from a developer's .env."""

import os
import tempfile

os.environ["AGENTSITE_READ_DOTENV"] = "false"
os.environ.setdefault("DEBUG", "true")
for name in (
    "DATABASE_URL",
    "AGENT_REDIS_URL",
    "AGENT_MODEL",
    "AGENT_EXECUTOR",
    "ALLOWED_HOSTS",
):
    os.environ.pop(name, None)

from agentsite.settings import *  # noqa: E402,F403

AGENT_OFFLINE_TOKEN_DELAY = 0.0
# pytest-django turns DEBUG off while tests run; every event they publish is checked.
AGENT_CHECK_EVENTS = True
_TEST_DIR = tempfile.mkdtemp(prefix="agentsite-test-")
AGENT_CHECKPOINT_SQLITE_PATH = os.path.join(_TEST_DIR, "checkpoints.sqlite3")
# A file, not Django's shared-cache in-memory database: the web requests and the run
# executor write from several threads, and only a file gets SQLite's real locking (WAL,
# busy timeout) that the deployed monolith has; shared cache fails at once instead.
DATABASES["default"]["TEST"] = {"NAME": os.path.join(_TEST_DIR, "test.sqlite3")}  # noqa: F405
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
# pytest-django allows each test the database or not. A connection kept open on the
# thread that runs every test's `database_sync_to_async` calls would carry one test's
# access into the next, so here each call closes its own, as Django does by default.
# What the deployed setting keeps open is tested in agentsite/tests/test_db.py and by
# the drills that start a real server.
DATABASES["default"]["CONN_MAX_AGE"] = 0  # noqa: F405
