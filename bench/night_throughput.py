"""Throughput of one nightly run with about 1,000 flags (issue 5 target: at most 3 minutes).

A sandbox production root reads the build under `--artifacts` (never writes there). The base
model serves one day in which every shift group is live and half the stream comes from them, so
it makes enough mistakes; the day's flags are cut to exactly `--flags` rows. Prefect's temporary
server, the registry's base version, the DVC repository and what the nightly caches once per
base model (its replay batch, its predictions on the gate sets) are set up before the clock runs:
a production night finds them there, left by the nights before. Then `run_nightly` runs once,
through real Prefect, MLflow and DVC; its wall time and CPU seconds (this process and its
finished children, e.g. `dvc`) are printed, with the night's counts. `--profile FILE` writes a
cProfile of the night. The night runs on `nightly.num_threads` torch threads (params.yaml: 2,
one a core here); `--set nightly.num_threads=1` measures a machine whose other core is busy
without oversubscribing it.

    python bench/night_throughput.py --artifacts artifacts [--flags 1000] [--set KEY=VALUE]
"""

from __future__ import annotations

import argparse
import cProfile
import json
import logging
import resource
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
from prefect import flow

from core.model import load_saved_model, torch_threads
from core.simulate import FLAG_FILE
from flows.bootstrap import base_dir, prepare_data
from flows.demo import sandbox_settings, serve_days
from flows.nightly import clean_predictions, night_metrics, replay_batch, run_nightly
from flows.registry import Registry, VersionTags

TARGET_SECONDS = 180.0
FLAGS_PER_IMAGE = 0.12  # a lower bound of the base model's error rate on this stream (0.16)


@flow(name="warm-up")
def _warm_up() -> None:
    """An empty flow: starts Prefect's temporary server before the clock runs."""


def _cpu_seconds() -> float:
    """User + system CPU seconds of this process and its finished children."""
    own, children = (
        resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
    )
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def prepare(root: Path, artifacts: Path, params: Path, n_flags: int, extra: list[str]):
    """Sandbox settings, a registry with the base model, and one day of `n_flags` flags."""
    overrides = [
        f"simulate.images_per_day={round(n_flags / FLAGS_PER_IMAGE)}",
        "simulate.shift_share=0.5",
        "simulate.n_shift_groups_first_day=1000",  # every shift group live
        *extra,
    ]
    settings = sandbox_settings(root, artifacts, params, overrides)
    prepare_data(settings)
    registry = Registry.connect(settings.paths.mlruns, settings.registry)
    registry.ensure_base(base_dir(settings), VersionTags.base())
    base_model, card = load_saved_model(base_dir(settings))
    with torch_threads(settings.nightly.num_threads):  # the threads the night computes them on
        replay_batch(settings, base_model, card)
        clean_predictions(settings, base_model, card)
    (day,) = serve_days(settings, 0)
    flags = pq.read_table(day)
    if flags.num_rows < n_flags:
        raise SystemExit(f"only {flags.num_rows} flags served; lower FLAGS_PER_IMAGE")
    pq.write_table(flags.slice(0, n_flags), day.parent / FLAG_FILE)
    return settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifacts", type=Path, required=True, help="an existing build")
    parser.add_argument("--flags", type=int, default=1_000)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--set", action="append", default=[], help="section.key=value")
    parser.add_argument("--profile", type=Path, help="write a cProfile of the night here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="cb-throughput-") as folder:
        settings = prepare(
            Path(folder), args.artifacts.resolve(), args.params, args.flags, args.set
        )
        _warm_up()
        profiler = cProfile.Profile() if args.profile else None
        cpu, wall = _cpu_seconds(), time.perf_counter()
        if profiler:
            profiler.enable()
        result = run_nightly(settings, settings.simulate.start_date)
        if profiler:
            profiler.disable()
            profiler.dump_stats(args.profile)
        wall, cpu = time.perf_counter() - wall, _cpu_seconds() - cpu
    counts = {key: value for key, value in night_metrics(result).items() if "/" not in key}
    figures = {
        **counts,
        "tries": sum(row.tries for row in result.clusters),
        "candidate_hash": result.candidate_hash[:16],
        "gate": None if result.gate is None else result.gate["figures"],
        "night_wall_s": round(wall, 1),
        "night_cpu_s": round(cpu, 1),
        "target_s": TARGET_SECONDS,
    }
    print(json.dumps(figures, indent=1))
    return 0 if wall <= TARGET_SECONDS else 1


if __name__ == "__main__":
    raise SystemExit(main())
