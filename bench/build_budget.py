"""Budget of the embedded default's build on this machine: world + base model + benchmark data.

Targets (issue: foundation): whole build <= 8 minutes on 2 cores; base accuracy >= 95 % in
distribution and >= 90 % on the minority contexts; at least 12 failure groups of >= 30 failures,
from both the context and the style subsets, every style kind among them; >= 300 sensitive
images; >= 2,000 broad images.

Usage: python bench/build_budget.py [--params params.yaml] [--set KEY=VALUE ...] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from core.settings import load_settings
from flows import bootstrap


def timed(step, settings) -> tuple[object, float]:
    """Run one build step; return its result and wall seconds."""
    started = time.perf_counter()
    result = step(settings)
    return result, time.perf_counter() - started


def checks(card_metrics: dict, summary: dict, seconds: float) -> dict[str, bool]:
    """Each budget of the issue, passed or not."""
    groups = summary["failures_per_group"]
    styles = {group.split(":")[0] for group in groups if group.startswith("style-")}
    return {
        "build <= 480 s": seconds <= 480,
        "accuracy in distribution >= 0.95": card_metrics["accuracy_in_distribution"] >= 0.95,
        "accuracy minority contexts >= 0.90": card_metrics["accuracy_minority"] >= 0.90,
        ">= 12 failure groups": len(groups) >= 12,
        "context and style groups": all(n > 0 for n in summary["groups_per_subset"].values()),
        "every style kind has groups": len(styles) == 3,
        ">= 300 sensitive": summary["n_sensitive"] >= 300,
        ">= 2000 broad": summary["n_broad"] >= 2000,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--out", type=Path, default=Path("bench/out"))
    args = parser.parse_args()
    settings = load_settings(args.params, args.set)
    seconds = {}
    _, seconds["world"] = timed(bootstrap.build_world, settings)
    card, seconds["base"] = timed(bootstrap.build_base, settings)
    summary, seconds["benchmark"] = timed(bootstrap.build_benchmark, settings)
    total = sum(seconds.values())
    summary = json.loads((bootstrap.benchmark_dir(settings) / "summary.json").read_text())
    result = {
        "seconds": {**seconds, "total": total},
        "base_model": card.metrics,
        "failure_groups": len(summary["failures_per_group"]),
        "groups_per_subset": summary["groups_per_subset"],
        "n_sensitive": summary["n_sensitive"],
        "n_sensitive_scanned": summary["n_sensitive_scanned"],
        "n_broad": summary["n_broad"],
        "checks": checks(card.metrics, summary, total),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "build_budget.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
