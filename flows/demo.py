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
from core.settings import Settings, load_settings
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


def sandbox_settings(
    root: Path, artifacts: Path, params_path: Path, overrides: list[str] = ()
) -> Settings:
    """Settings whose production state (data, state, MLflow, reports, DVC remote) lives under
    `root`, reading an existing build from `artifacts` (only read): for benchmarks of nights."""
    folders = {
        "artifacts": artifacts,
        "data": root / "data",
        "state": root / "state",
        "mlruns": root / "mlruns",
        "monitoring": root / "monitoring",
        "dvc_remote": root / "dvc-remote",
    }
    paths = [f"paths.{name}={folder}" for name, folder in folders.items()]
    return load_settings(params_path, [*paths, *overrides])


def champion_folder(settings: Settings, scratch: Path) -> tuple[Path, int | None]:
    """The saved champion (downloaded into `scratch`) and its version; the base model before
    the registry has one."""
    registry = Registry.connect(settings.paths.mlruns, settings.registry)
    version = registry.get_alias_version(CHAMPION)
    if version is None:
        return bootstrap.base_dir(settings), None
    return registry.load_version_folder(version, scratch), version


def serve_days(settings: Settings, first_day: int, n_days: int = 1) -> list[Path]:
    """Serve simulated days with the current champion (the base model before the registry).

    Returns:
        The flag files written to the inbox, one per day.
    """
    with tempfile.TemporaryDirectory() as scratch:
        folder, version = champion_folder(settings, Path(scratch))
        model, card = load_saved_model(folder)
        return simulate(
            model,
            card,
            build_plan(settings.world),
            settings.simulate,
            settings.paths.data / "inbox",
            n_days=n_days,
            model_version=str(version or 1),
            first_day=first_day,
        )


def run_demo(settings: Settings, n_nights: int = 3) -> DemoResult:
    """`dvc repro --pull` (cached after the first time), then `n_nights` serve-flag-ingest-edit."""
    build_seconds = bootstrap.reproduce(settings)
    bootstrap.prepare_data(settings)
    started = time.perf_counter()
    nights = []
    for day in range(n_nights):
        serve_days(settings, day)
        nights.append(run_nightly(settings, settings.simulate.start_date + timedelta(days=day)))
    return DemoResult(build_seconds, nights, time.perf_counter() - started)
