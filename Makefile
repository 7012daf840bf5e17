# Two commands for a fresh clone (needs only Python 3.11+ and make):
#   make run    install everything into .venv/, migrate, serve http://127.0.0.1:8000
#   make test   install everything and run the whole test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed

.PHONY: run test install lint browser

$(INSTALLED): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(INSTALLED)

install: $(INSTALLED)

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

test: install browser
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy .
	$(BIN)/pytest

lint: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .
