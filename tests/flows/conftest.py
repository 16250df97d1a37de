"""Flow-test fixtures: every flow test runs against the session's real Prefect API."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def prefect_harness(prefect_api):
    """Flows need an API: the session's temporary Prefect server (tests/conftest.py)."""
