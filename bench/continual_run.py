"""A long continual run: N simulated nights of serve -> flags -> `nightly_edit` -> gate/promote.

Each day the current champion serves the drifting world stream (flows/demo.py `serve_days`), its
mistakes land in the inbox, and the real nightly flow (Prefect, MLflow, DVC, the ledger) ingests,
edits, gates and maybe promotes. Every night's candidate is judged by the global gate, whose
figures are the curve: broad-sample locality against the base model (LR vs base), clean accuracy
and the retention of every earlier edit, over the number of accepted edits in the model. The
champion's figures are those of the last promoted candidate (the base model's before any).

Writes `nights.csv` (one row per night) and `curve.png` under `--out`, and prints the per-night
table and the final figures against the aims (issue 5: LR vs base >= 0.9, accuracy drop <= 1
point, retention >= 0.95). The build under `--artifacts` is only read.

    python bench/continual_run.py --nights 30 --artifacts /tmp/art2 \
        --out /tmp/cb-continual --set simulate.images_per_day=1500

Everything runs on one torch thread (serving, and `nightly.num_threads=1` unless `--set` says
otherwise), so a second job can share this 2-core machine without oversubscribing it.
"""

from __future__ import annotations

import argparse
import csv
import logging
import math
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from core.gate import RETENTION_PREFIX
from flows.bootstrap import prepare_data
from flows.demo import sandbox_settings, serve_days
from flows.nightly import NightResult, run_nightly

AIMS = {"locality_vs_base": 0.9, "accuracy_drop": 0.01, "retention": 0.95}
COLUMNS = [
    "night", "seconds", "flags_in", "clusters_ready", "clusters_waiting", "accepted", "rejected",
    "candidate_edits", "promoted", "champion_version", "champion_edits", "generalization",
    "locality_vs_base", "sensitive_locality_vs_base", "accuracy", "accuracy_drop", "retention",
    "champion_locality_vs_base", "champion_accuracy_drop", "champion_retention", "gate_failures",
]  # fmt: skip


@dataclass
class Champion:
    """The served model's figures so far (the base model's until a promotion)."""

    version: int = 1
    edits: int = 0
    locality_vs_base: float = 1.0
    accuracy_drop: float = 0.0
    retention: float = 1.0


def candidate_figures(result: NightResult) -> dict[str, float]:
    """The night candidate's curve figures from its global gate (NaN when nothing was judged)."""
    if result.gate is None:
        return dict.fromkeys(
            ("locality_vs_base", "sensitive_locality_vs_base", "accuracy", "accuracy_drop",
             "retention"), math.nan,
        )  # fmt: skip
    figures = result.gate["figures"]
    retention = [v for k, v in figures.items() if k.startswith(RETENTION_PREFIX)]
    return {
        "locality_vs_base": figures["broad_locality_vs_base"],
        "sensitive_locality_vs_base": figures["sensitive_locality_vs_base"],
        "accuracy": figures["accuracy"],
        "accuracy_drop": figures["accuracy_base"] - figures["accuracy"],
        "retention": min(retention, default=1.0),
    }


def night_row(result: NightResult, seconds: float, champion: Champion) -> dict[str, object]:
    """One CSV row; updates `champion` when the night promoted its candidate."""
    figures = candidate_figures(result)
    if result.promoted:
        champion.version, champion.edits = result.champion_version, len(result.ledger_ids)
        champion.locality_vs_base = figures["locality_vs_base"]
        champion.accuracy_drop = figures["accuracy_drop"]
        champion.retention = figures["retention"]
    accepted = [row.generalization for row in result.clusters if row.accepted]
    known = [g for g in accepted if g is not None]
    failures = [] if result.gate is None or result.gate["passed"] else result.gate["reasons"]
    return {
        "night": result.night,
        "seconds": round(seconds, 1),
        "flags_in": result.flags_in,
        "clusters_ready": result.clusters_ready,
        "clusters_waiting": result.clusters_waiting,
        "accepted": result.n_accepted,
        "rejected": len(result.clusters) - result.n_accepted,
        "candidate_edits": len(result.ledger_ids) if result.gate else "",
        "promoted": int(result.promoted),
        "champion_version": champion.version,
        "champion_edits": champion.edits,
        "generalization": sum(known) / len(known) if known else math.nan,
        **figures,
        "champion_locality_vs_base": champion.locality_vs_base,
        "champion_accuracy_drop": champion.accuracy_drop,
        "champion_retention": champion.retention,
        "gate_failures": " / ".join(failures),
    }


def plot_curve(rows: list[dict[str, object]], path: Path) -> None:
    """LR vs base, accuracy drop and retention over the number of accepted edits in the model."""
    judged = [row for row in rows if row["candidate_edits"] != ""]
    panels = [
        ("locality_vs_base", "LR vs base (broad sample)", AIMS["locality_vs_base"]),
        ("accuracy_drop", "clean accuracy drop vs base", AIMS["accuracy_drop"]),
        ("retention", "retention (worst earlier edit)", AIMS["retention"]),
    ]
    figure, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for axis, (key, title, aim) in zip(axes, panels, strict=True):
        for promoted, marker, label in ((1, "o", "candidate, promoted"), (0, "x", "rejected")):
            points = [(r["candidate_edits"], r[key]) for r in judged if r["promoted"] == promoted]
            if points:
                axis.scatter(*zip(*points, strict=True), marker=marker, label=label)
        champion = [(r["champion_edits"], r[f"champion_{key}"]) for r in rows]
        axis.plot(*zip(*champion, strict=True), drawstyle="steps-post", label="champion")
        axis.axhline(aim, linestyle="--", color="grey", label="aim")
        axis.set(title=title, xlabel="accepted edits in the model")
        axis.legend(fontsize=8)
    figure.suptitle(f"retouch continual run: {len(rows)} nights")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


SHOWN = [
    "night",
    "seconds",
    "flags_in",
    "clusters_ready",
    "accepted",
    "candidate_edits",
    "promoted",
    "generalization",
    "locality_vs_base",
    "accuracy_drop",
    "retention",
]


def verdicts(row: dict[str, object], prefix: str) -> str:
    """The figures of one model (`prefix` "champion_" or "" for the candidate) against the aims."""
    lr, drop, kept = (float(row[f"{prefix}{key}"]) for key in AIMS)
    checks = [
        f"LR vs base {lr:.3f} (aim >= 0.9: {'met' if lr >= 0.9 else 'NOT met'})",
        f"accuracy drop {drop * 100:.2f} points (aim <= 1: "
        f"{'met' if drop <= AIMS['accuracy_drop'] + 1e-9 else 'NOT met'})",
        f"retention {kept:.3f} (aim >= 0.95: {'met' if kept >= 0.95 else 'NOT met'})",
    ]
    return ", ".join(checks)


def print_summary(rows: list[dict[str, object]]) -> None:
    """The per-night table and the final champion / last candidate against the aims."""
    print(" | ".join(SHOWN))
    for row in rows:
        print(
            " | ".join(f"{row[k]:.3f}" if isinstance(row[k], float) else str(row[k]) for k in SHOWN)
        )
    last = rows[-1]
    promotions = sum(int(row["promoted"]) for row in rows)
    print(f"\nafter {len(rows)} nights: champion v{last['champion_version']} with "
          f"{last['champion_edits']} edits, {promotions} promotions")  # fmt: skip
    print(f"champion: {verdicts(last, 'champion_')}")
    judged = [row for row in rows if row["candidate_edits"] != ""]
    if judged:
        print(f"last candidate ({judged[-1]['night']}, {judged[-1]['candidate_edits']} edits): "
              f"{verdicts(judged[-1], '')}")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nights", type=int, default=30)
    parser.add_argument("--artifacts", type=Path, required=True, help="an existing build")
    parser.add_argument("--out", type=Path, required=True, help="a new folder for everything")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--set", action="append", default=[], help="section.key=value")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING)
    args.out.mkdir(parents=True, exist_ok=False)
    overrides = ["nightly.num_threads=1", *args.set]
    out, artifacts = args.out.resolve(), args.artifacts.resolve()
    settings = sandbox_settings(out, artifacts, args.params, overrides)
    prepare_data(settings)
    rows, champion = [], Champion()
    with (args.out / "nights.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, COLUMNS)
        writer.writeheader()
        for day in range(args.nights):
            started = time.perf_counter()
            serve_days(settings, day)
            result = run_nightly(settings, settings.simulate.start_date + timedelta(days=day))
            rows.append(night_row(result, time.perf_counter() - started, champion))
            writer.writerow(rows[-1])
            handle.flush()
            plot_curve(rows, args.out / "curve.png")  # a stopped run still leaves its curve
            print(f"night {day + 1}/{args.nights} done: {rows[-1]}", flush=True)
    print_summary(rows)
    print(f"\nCSV: {args.out / 'nights.csv'}\nPNG: {args.out / 'curve.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
