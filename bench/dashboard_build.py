"""Seconds to build the monitoring dashboard over 30 nights of history (target: <= 20 s).

The history is real: the micro world, base model, benchmark data and a 2-iteration hypernetwork
are built with `flows.bootstrap`, then every night the simulator serves one day of traffic with
the champion (`flows.demo.serve_days`, bad rows on, so quarantine has reasons) and the real
nightly flow runs (`flows.nightly.run_nightly`: Prefect, MLflow SQLite store, DVC, ledger).
Gates are open, except every seventh night, whose strict broad-locality gate rejects the
candidate, and one rollback of the champion's first edit after night 20: the dashboard then has
rejections and a rollback to show. The micro settings and open gates are the tests'
(`tests/conftest.py`, `tests/monitoring/conftest.py`). Making the history takes about 15 minutes
on 2 shared cores; it is kept in `--root` and reused.

The build is `monitoring.dashboard.build_dashboard` end to end (collect the history, draw, write
the page, log it and its metrics to MLflow), timed `--builds` times; the median is compared with
the target.

    python bench/dashboard_build.py [--root /tmp/retouch-dashboard-bench] [--nights 30]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import statistics
import subprocess
import time
from datetime import timedelta
from pathlib import Path

import torch

from core.settings import Settings, load_settings

TARGET_SECONDS = 20.0
STRICT_EVERY = 7  # every seventh night gets a gate no candidate passes
ROLLBACK_AFTER = 20  # night index after which the champion's first edit is rolled back


def test_settings(module: str, name: str) -> list[str]:
    """A list of overrides the tests keep (one copy: the micro settings, the open gates)."""
    path = Path(__file__).resolve().parents[1] / "tests" / module
    spec = importlib.util.spec_from_file_location(f"retouch_tests_{name.lower()}", path)
    loaded = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loaded)
    return list(getattr(loaded, name))


def bench_settings(root: Path, extra: list[str] = ()) -> Settings:
    """Micro settings with open gates and every path under `root`."""
    paths = [f"paths.{name}={root / name}" for name in ("artifacts", "data", "mlruns", "state")]
    paths += [f"paths.monitoring={root / 'monitoring'}", f"paths.dvc_remote={root / 'remote'}"]
    tuning = ["train.epochs=1", "metatrain.iterations=2", "simulate.images_per_day=60"]
    tuning += ["monitoring.after_night=false"]  # the bench times the build on its own
    return load_settings(
        None,
        [
            *test_settings("conftest.py", "MICRO_OVERRIDES"),
            *test_settings("monitoring/conftest.py", "OPEN_GATES"),
            *paths,
            *tuning,
            "simulate.bad_rows=true",
            *extra,
        ],
    )


def make_history(root: Path, n_nights: int) -> Settings:
    """Build the micro artifacts and run `n_nights` real nights under `root` (kept if done)."""
    from prefect.testing.utilities import prefect_test_harness

    from flows import bootstrap
    from flows.demo import serve_days
    from flows.nightly import night_folder, run_nightly
    from flows.operations import rollback

    settings = bench_settings(root)
    strict = bench_settings(root, ["gate.min_broad_locality_vs_champion=1.0"])
    nights = [settings.simulate.start_date + timedelta(days=day) for day in range(n_nights)]
    todo = [
        (day, night)
        for day, night in enumerate(nights)
        if not (night_folder(settings, night.isoformat()) / "record.json").is_file()
    ]
    if not bootstrap.hypernet_path(settings).is_file():
        subprocess.run(["git", "init", "-q", str(root)], check=True)
        for step in (bootstrap.build_world, bootstrap.build_base, bootstrap.build_benchmark):
            step(settings)
        bootstrap.build_hypernet(settings)
    if not todo:
        return settings
    os.environ["PREFECT_HOME"] = str(root / "prefect-home")
    with prefect_test_harness(server_startup_timeout=120):
        for day, night in todo:
            serve_days(settings, day)
            result = run_nightly(
                strict if day % STRICT_EVERY == STRICT_EVERY - 1 else settings, night
            )
            if day == ROLLBACK_AFTER and result.ledger_ids:
                rollback(settings, result.ledger_ids[0])
    return settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path("/tmp/retouch-dashboard-bench"))
    parser.add_argument("--nights", type=int, default=30)
    parser.add_argument("--builds", type=int, default=3)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING)
    args.root.mkdir(parents=True, exist_ok=True)
    settings = make_history(args.root.resolve(), args.nights)
    from monitoring.dashboard import build_dashboard

    seconds = []
    for _ in range(args.builds):
        start = time.perf_counter()
        built = build_dashboard(settings)
        seconds.append(time.perf_counter() - start)
    figures = {
        "nights": len(built.history.nights),
        "ledger_entries": len(built.history.edits),
        "versions": len(built.history.versions),
        "build_s": [round(value, 2) for value in seconds],
        "median_s": round(statistics.median(seconds), 2),
        "target_s": TARGET_SECONDS,
        "page": str(built.path),
        "page_kib": round(built.path.stat().st_size / 1024),
    }
    print(json.dumps(figures, indent=1))
    return 0 if statistics.median(seconds) <= TARGET_SECONDS else 1


if __name__ == "__main__":
    raise SystemExit(main())
