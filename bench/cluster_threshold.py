"""Sweep clusters.distance_threshold on a simulated night: purity and ARI against world groups.

Needs a trained base model (saved with core.model.save_model; default: <artifacts>/base). A
simulated stream of `--days` days is served by that model, ingested without Prefect, and the
still-wrong flags are clustered at each threshold with an empty catalogue. The issue's target is
purity >= 0.9; the largest threshold that meets it (fewest clusters, so the most edit samples per
cluster) is the one to put in params.yaml.

    python bench/cluster_threshold.py [--model artifacts/base] [--days 3] [--params params.yaml]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch

from core.clusters import adjusted_rand_index, cluster_failures, purity
from core.model import load_saved_model
from core.settings import load_settings
from core.simulate import simulate
from core.world import build_plan
from flows.ingest import features, inbox_partitions, load_accepted, route_partition, still_wrong

THRESHOLDS = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.2)


def _still_wrong_flags(settings, model_dir: Path, days: int):
    """Simulate, ingest and return (features (N, D), true labels (N,), world groups (N,))."""
    data_dir = settings.paths.data
    model, card = load_saved_model(model_dir)
    simulate(
        model,
        card,
        build_plan(settings.world),
        settings.simulate,
        data_dir / "inbox",
        days,
        "bench",
    )
    for partition in inbox_partitions(data_dir):
        route_partition(partition, data_dir, list(card.class_names), settings.ingest)
    table = still_wrong(data_dir, model_dir, settings.ingest.batch_size)
    pending = table[table["status"] != "fixed"]
    images = load_accepted(data_dir, ["sample_id", "image"]).set_index("sample_id")
    pngs = images.loc[pending["sample_id"], "image"].tolist()
    base = features(model_dir, pngs, settings.ingest.batch_size, data_dir / "flagged")
    return base, pending["true_index"].to_numpy(np.int64), pending["world_group"].tolist()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--days", type=int, default=3)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as folder:
        settings = load_settings(args.params, [f"paths.data={Path(folder) / 'data'}"])
        model_dir = args.model or load_settings(args.params).paths.artifacts / "base"
        base, labels, groups = _still_wrong_flags(settings, model_dir, args.days)
    ids = [str(i) for i in range(len(labels))]
    rows = []
    for threshold in THRESHOLDS:
        cluster_settings = settings.clusters.model_copy(update={"distance_threshold": threshold})
        clusters, _ = cluster_failures(base, labels, ids, cluster_settings, [], night="bench")
        assigned = {s: c.cluster_id for c in clusters for s in c.sample_ids}
        found = [assigned[s] for s in ids]
        rows.append({
            "distance_threshold": threshold, "purity": round(purity(groups, found), 3),
            "adjusted_rand_index": round(adjusted_rand_index(groups, found), 3),
            "clusters": len(clusters), "ready": sum(c.status == "ready" for c in clusters),
        })  # fmt: skip
        print(json.dumps(rows[-1]))
    good = [r["distance_threshold"] for r in rows if r["purity"] >= 0.9]
    best = max(good, default=None)
    print(f"{len(labels)} still-wrong flags; largest threshold with purity >= 0.9: {best}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
