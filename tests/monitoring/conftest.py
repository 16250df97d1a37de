"""Monitoring fixtures: real records from two real micro nights (Prefect, MLflow, DVC, ledger).

Night 1 runs with open gates (edits accepted, candidate promoted); night 2 with a broad-locality
gate no candidate passes (its candidate is registered, rejected, the champion stays), so the
dashboard has a promotion, a rejection and two nights of flags and clusters to show.
"""

from __future__ import annotations

import subprocess
from datetime import date, timedelta

import pytest

from core.settings import GateSettings, Settings
from flows import bootstrap

FIRST_NIGHT = date(2026, 1, 5)
# Micro models are weak: any edit flips many clean predictions, so every gate is opened (the
# strict night closes one); every threshold named min_* or *_min_* goes to 0.
OPEN_GATES = [
    *(f"gate.{name}=0.0" for name in GateSettings.model_fields if "min_" in name),
    "gate.max_accuracy_drop=1.0",
    "gate.locality_confidence=null",
    "clusters.min_cluster_size=2",
]
STREAM = [
    f"simulate.start_date={FIRST_NIGHT}",
    "simulate.images_per_day=60",
    "simulate.bad_rows=true",
    "monitoring.after_night=false",  # the tests build the dashboard themselves
]


@pytest.fixture(scope="session")
def two_nights(tmp_path_factory, micro_settings_factory, prefect_api) -> Settings:
    """Settings of a production root holding two real nights (see the module docstring)."""
    from flows.demo import serve_days
    from flows.nightly import run_nightly

    root = tmp_path_factory.mktemp("two-nights")
    subprocess.run(["git", "init", "-q", str(root)], check=True)
    settings = micro_settings_factory(
        root, [*OPEN_GATES, *STREAM, "train.epochs=1", "metatrain.iterations=2"]
    )
    for step in (bootstrap.build_world, bootstrap.build_base, bootstrap.build_benchmark):
        step(settings)
    bootstrap.build_hypernet(settings)
    strict = micro_settings_factory(
        root, [*OPEN_GATES, *STREAM, "gate.min_broad_locality_vs_champion=1.0"]
    )
    for day, night_settings in enumerate((settings, strict)):
        serve_days(settings, day)
        run_nightly(night_settings, FIRST_NIGHT + timedelta(days=day))
    return settings
