"""Settings for the test suite: the embedded defaults, isolated from a developer's .env."""

import os
import tempfile

os.environ["AGENTSITE_READ_DOTENV"] = "false"
os.environ.setdefault("DEBUG", "true")
for name in ("DATABASE_URL", "AGENT_REDIS_URL", "AGENT_MODEL", "ALLOWED_HOSTS"):
    os.environ.pop(name, None)

from agentsite.settings import *  # noqa: E402,F403

AGENT_OFFLINE_TOKEN_DELAY = 0.0
AGENT_CHECKPOINT_SQLITE_PATH = os.path.join(
    tempfile.mkdtemp(prefix="agentsite-test-"), "checkpoints.sqlite3"
)
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
