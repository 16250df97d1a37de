"""Budget of the embedded default's build on this machine: world + base model + benchmark data.

Targets (issue: foundation): whole build <= 8 minutes on 2 cores; base accuracy >= 95 % in
distribution and >= 90 % on the minority contexts; at least 12 failure groups of >= 30 failures,
from both the context and the style subsets, every style kind among them; >= 300 sensitive
images; >= 2,000 broad images.

Each stage is timed in wall seconds and in CPU seconds of this process (user + system, all
threads): on a machine shared with other jobs the wall time grows with the load, the CPU time
much less, so both are printed, with the load average before and after.

Usage: python bench/build_budget.py [--params params.yaml] [--set KEY=VALUE ...] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time
from collections.abc import Callable
from pathlib import Path

import torch

from core.model import CARD_FILE
from core.settings import Settings, load_settings
from flows import bootstrap

BUDGET_SECONDS = 480
MIN_FAILURES = 30  # failures a group needs to count towards the 12


def cpu_seconds() -> float:
    """User + system CPU seconds of this process so far, all threads."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def timed(step: Callable[[Settings], object], settings: Settings) -> dict[str, float]:
    """Run one build step; return its wall and CPU seconds."""
    wall, cpu = time.perf_counter(), cpu_seconds()
    step(settings)
    return {"wall": time.perf_counter() - wall, "cpu": cpu_seconds() - cpu}


def checks(card_metrics: dict, summary: dict, wall_seconds: float) -> dict[str, bool]:
    """Each budget of the issue, met or not."""
    groups = {g: n for g, n in summary["failures_per_group"].items() if n >= MIN_FAILURES}
    subsets = {"ctx" if g.startswith("ctx-") else "style" for g in groups}
    styles = {group.split(":")[0] for group in groups if group.startswith("style-")}
    return {
        f"build <= {BUDGET_SECONDS} s wall": wall_seconds <= BUDGET_SECONDS,
        "accuracy in distribution >= 0.95": card_metrics["accuracy_in_distribution"] >= 0.95,
        "accuracy minority contexts >= 0.90": card_metrics["accuracy_minority"] >= 0.90,
        f">= 12 failure groups of >= {MIN_FAILURES}": len(groups) >= 12,
        "context and style groups": subsets == {"ctx", "style"},
        "every style kind has groups": len(styles) == 3,
        ">= 300 sensitive": summary["n_sensitive"] >= 300,
        ">= 2000 broad": summary["n_broad"] >= 2000,
    }


def report_lines(result: dict) -> list[str]:
    """A readable table of the stage times and the bars."""
    lines = [f"{'stage':<10} {'wall s':>8} {'cpu s':>8}"]
    for stage, seconds in result["seconds"].items():
        lines.append(f"{stage:<10} {seconds['wall']:>8.1f} {seconds['cpu']:>8.1f}")
    lines.append(f"load average before / after: {result['load_before']} / {result['load_after']}")
    for bar, met in result["checks"].items():
        lines.append(f"{'met   ' if met else 'MISSED'} {bar}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--out", type=Path, default=Path("bench/out"))
    args = parser.parse_args()
    settings = load_settings(args.params, args.set)
    load_before = [round(x, 2) for x in os.getloadavg()]
    seconds = {
        "world": timed(bootstrap.build_world, settings),
        "base": timed(bootstrap.build_base, settings),
        "benchmark": timed(bootstrap.build_benchmark, settings),
    }
    seconds["total"] = {key: sum(s[key] for s in seconds.values()) for key in ("wall", "cpu")}
    card = json.loads((bootstrap.base_dir(settings) / CARD_FILE).read_text())
    training = json.loads((bootstrap.base_dir(settings) / bootstrap.TRAINING_FILE).read_text())
    summary = json.loads((bootstrap.benchmark_dir(settings) / "summary.json").read_text())
    result = {
        "seconds": seconds,
        "torch_threads": settings.train.num_threads,
        "cpu_count": os.cpu_count(),
        "torch_version": torch.__version__,
        "load_before": load_before,
        "load_after": [round(x, 2) for x in os.getloadavg()],
        "base_model": card["metrics"],
        "base_training": {key: training[key] for key in ("seconds", "images_per_second")},
        "failure_groups": len(summary["failures_per_group"]),
        "groups_per_subset": summary["groups_per_subset"],
        "n_sensitive": summary["n_sensitive"],
        "n_sensitive_scanned": summary["n_sensitive_scanned"],
        "n_broad": summary["n_broad"],
        "checks": checks(card["metrics"], summary, seconds["total"]["wall"]),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "build_budget.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    print("\n".join(report_lines(result)))


if __name__ == "__main__":
    main()
