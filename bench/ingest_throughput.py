"""Throughput of ingest + validate + cluster on about 1,000 flagged rows (target: <= 60 s).

A random-init model at the project's model settings serves a simulated day sized to give about
`--rows` flags (a random model gets almost everything wrong), with the bad rows on. The ingest
flow then runs once, timed after a warm-up flow so Prefect's temporary server start is excluded,
with DVC versioning timed separately. Everything lives in a temporary folder.

    python bench/ingest_throughput.py [--rows 1000] [--params params.yaml]
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import torch
from prefect import flow

from core.model import ModelCard, build_model, model_create_kwargs, preprocessing_for, save_model
from core.settings import load_settings
from core.simulate import simulate
from core.world import build_plan
from flows.ingest import ingest_flow


@flow(name="warm-up")
def _warm_up() -> None:
    """An empty flow: starts Prefect's temporary server before the clock runs."""


def _prepare(root: Path, rows: int, params: Path):
    """Settings rooted at `root`, a saved random model, and one simulated day in the inbox."""
    settings = load_settings(
        params,
        [f"paths.data={root / 'data'}", f"paths.dvc_remote={root / 'remote'}",
         f"simulate.images_per_day={round(rows * 1.15)}", "simulate.bad_rows=true"],
    )  # fmt: skip
    world = build_plan(settings.world)
    n_classes = len(world.class_names)
    model = build_model(settings.model, n_classes, seed=0)
    kwargs = model_create_kwargs(settings.model, n_classes)
    card = ModelCard(
        settings.model.name, kwargs, tuple(world.class_names), preprocessing_for(model)
    )
    save_model(model, card, root / "model")
    simulate(model, card, world, settings.simulate, settings.paths.data / "inbox", 1, "bench")
    return settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        settings = _prepare(root, args.rows, args.params)
        _warm_up()
        start = time.perf_counter()
        result = ingest_flow(settings, root / "model", version=False)
        ingest_s = time.perf_counter() - start
        start = time.perf_counter()
        ingest_flow(settings, root / "model", version=True)
        version_s = time.perf_counter() - start
    figures = {
        "rows_in": result.rows_in,
        "accepted": result.accepted,
        "quarantined": result.quarantined,
        "duplicates": result.duplicates,
        "clusters": result.clusters.n_clusters if result.clusters else 0,
        "ingest_validate_cluster_s": round(ingest_s, 2),
        "rerun_with_dvc_version_s": round(version_s, 2),
    }
    print(json.dumps(figures, indent=1))
    return 0 if ingest_s <= 60 else 1


if __name__ == "__main__":
    raise SystemExit(main())
