"""`make demo`: build the embedded default, then three simulated production nights.

Each day the current champion serves drifting world traffic; its mistakes arrive as flags in
the inbox; `nightly_edit` ingests them, edits the ready clusters, gates and maybe promotes. The
next day is served by whatever is champion then, so fixed failures stop being flagged.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from core.model import load_saved_model
from core.settings import Settings
from core.simulate import simulate
from core.world import build_plan
from flows import bootstrap
from flows.nightly import NightResult, run_nightly
from flows.registry import CHAMPION, Registry


@dataclass(frozen=True)
class DemoResult:
    """What the demo did: build seconds, one result per night, where to look."""

    build_seconds: float
    nights: list[NightResult]
    nights_seconds: float


def serve_day(settings: Settings, day: int) -> None:
    """Serve simulated day `day` with the current champion (the base model before the registry)."""
    registry = Registry.connect(settings.paths.mlruns, settings.registry)
    version = registry.get_alias_version(CHAMPION)
    with tempfile.TemporaryDirectory() as scratch:
        folder = (
            bootstrap.base_dir(settings)
            if version is None
            else registry.load_version_folder(version, Path(scratch))
        )
        model, card = load_saved_model(folder)
        simulate(
            model,
            card,
            build_plan(settings.world),
            settings.simulate,
            settings.paths.data / "inbox",
            n_days=1,
            model_version=str(version or 1),
            first_day=day,
        )


def run_demo(settings: Settings, n_nights: int = 3) -> DemoResult:
    """`dvc repro --pull` (cached after the first time), then `n_nights` serve-flag-ingest-edit."""
    build_seconds = bootstrap.reproduce(settings)
    bootstrap.prepare_data(settings)
    started = time.perf_counter()
    nights = []
    for day in range(n_nights):
        serve_day(settings, day)
        nights.append(run_nightly(settings, settings.simulate.start_date + timedelta(days=day)))
    return DemoResult(build_seconds, nights, time.perf_counter() - started)
