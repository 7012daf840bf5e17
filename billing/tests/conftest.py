import importlib

import pytest
from django.apps import apps

# The seed migration's own function: the prices a fresh install starts with.
_seed = importlib.import_module("billing.migrations.0002_seed_model_prices")


@pytest.fixture
def prices(db):
    """The seeded price table. Transactional tests empty every table when they end, the
    migration's rows included, so each test that needs prices seeds them again."""
    _seed.seed(apps, None)
