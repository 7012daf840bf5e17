# Two commands for a fresh clone (needs only Python 3.11+ and make):
#   make run    install everything into .venv/, migrate, serve http://127.0.0.1:8000
#   make test   install everything and run the whole test suite
#   make lock   upgrade the pinned packages deliberately (see below)
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# What is installed comes from the lock files, every package pinned with its hashes:
# requirements-dev.txt (everything, for .venv/), requirements.txt (what the app needs at
# run time, for the Docker image) and requirements-pip.txt (the pip that installs them:
# a current pip collects the packages several times faster than the one venv ships).
# pyproject.toml only bounds the versions.
LOCK := requirements-dev.txt
RUNTIME_LOCK := requirements.txt
PIP_LOCK := requirements-pip.txt
LOCKED := $(VENV)/.locked
INSTALLED := $(VENV)/.installed

.PHONY: run test install lint browser nginx lock bench

# .venv/.locked keeps a copy of the locks .venv/ was built from. A lock whose content
# changed rebuilds .venv/ from scratch, so it holds exactly what the locks name; a lock
# that was only touched (a branch switch, make lock without changes) does not.
$(LOCKED): $(PIP_LOCK) $(LOCK)
	@if cat $^ | cmp -s - $@; then touch $@; exit 0; fi; set -ex; \
	rm -rf $(VENV); \
	$(PYTHON) -m venv $(VENV); \
	$(BIN)/pip install --quiet --require-hashes -r $(PIP_LOCK); \
	$(BIN)/pip install --quiet --require-hashes -r $(LOCK); \
	cat $^ > $@

# The project itself, without dependencies: they all came from the lock. pip check
# catches a dependency added to pyproject.toml but not yet locked.
$(INSTALLED): $(LOCKED) pyproject.toml
	$(BIN)/pip install --quiet --no-deps -e .
	@$(BIN)/pip check || { echo "pyproject.toml asks for packages the lock lacks: run make lock UPGRADE=" >&2; exit 1; }
	touch $(INSTALLED)

install: $(INSTALLED)

# Upgrades are deliberate steps, tested with make test before the new locks are committed.
#   make lock                                   every package to the newest release pyproject.toml allows
#   make lock UPGRADE=                          only follow pyproject.toml's changes, keep every other pin
#   make lock UPGRADE="--upgrade-package redis" move one package
# uv resolves for every platform and Python 3.11+ (--universal) and records the hashes of
# every file of each pinned release; the runtime lock is constrained to the same versions.
UV_VERSION := 0.13.8
UPGRADE ?= --upgrade
LOCK_FLAGS := --universal --python-version 3.11 --generate-hashes --custom-compile-command "make lock"
lock: $(LOCKED)
	$(BIN)/pip install --quiet "uv==$(UV_VERSION)"
	$(BIN)/uv pip compile pyproject.toml --extra dev --extra bench $(LOCK_FLAGS) $(UPGRADE) -o $(LOCK)
	$(BIN)/uv pip compile pyproject.toml $(LOCK_FLAGS) -c $(LOCK) -o $(RUNTIME_LOCK)
	echo pip | $(BIN)/uv pip compile - $(LOCK_FLAGS) $(UPGRADE) -o $(PIP_LOCK)

# A local .env with DEBUG on and a random SECRET_KEY, made once; edit it to configure.
.env:
	$(PYTHON) -c "import secrets; print('DEBUG=true'); print('SECRET_KEY=' + secrets.token_urlsafe(50))" > .env
	@echo "Wrote .env (DEBUG=true, random SECRET_KEY); see .env.example for every setting."

run: install .env
	$(BIN)/python manage.py migrate --noinput
	$(BIN)/python manage.py ensure_local_admin
	$(BIN)/python manage.py runserver 127.0.0.1:8000

# Chromium for the browser tests comes from Debian's package; without it they skip loudly.
browser:
	@sh scripts/ensure-chromium.sh

# nginx for the topology drills (scripts/topology.sh) likewise, from Debian's package.
nginx:
	@sh scripts/ensure-nginx.sh

test: install browser nginx
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy .
	# Two workers, each taking whole files (a file's server fixtures start once): the
	# drills mostly wait (idle sockets, lapsing leases, restarts), so they overlap well.
	$(BIN)/pytest -n 2 --dist loadfile --durations=20

# A chat turn's server CPU, throughput and latency next to the bare FastAPI + SSE pattern
# (benchmarks/turn_cost.py; a few minutes). Options through BENCH, e.g.
#   make bench BENCH="--config sqlite"      make bench BENCH="--paced --concurrency 100"
bench: install
	$(BIN)/python benchmarks/turn_cost.py $(BENCH)

lint: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .
