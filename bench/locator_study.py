"""Which locator says best where to edit? Paired edits of several hypernetworks vs the baselines.

Every locator edits the same cases (same samples, same seeds) at the same learning rate, at each
sparsity rho and group size k; the output has per-edit rows, a summary per locator and level,
paired differences (locator minus saliency / random, with standard errors), the gaps between the
GR-vs-LR curves at equal locality (`frontier.csv`: does a curve lie above another?) and the
GR-vs-LR plot.
The faithful method and each extension are listed separately: extension (a) (a locality term
during the edit, `--locality-weight`) is run as its own locator rows when asked for.

Usage:
    python bench/locator_study.py --hypernet faithful=artifacts/hypernet/hypernet.safetensors \
        --hypernet extended=/tmp/ext/hypernet.safetensors [--cases 32] [--rhos 0.9,0.95] \
        [--ks 1,3] [--lr 0.001] [--locality-weight 1.0] [--out bench/out/locator-study]
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch
from tqdm import tqdm

from core.baselines import CleanSaliencyLocator, RandomLocator, SaliencyLocator
from core.data import load_images
from core.edit import Editor, Locator, MaskedEditor
from core.evaluation import (
    EditEvaluator,
    Level,
    frontier_gaps,
    paired_differences,
    plan_cases,
    run_edits,
    summarize,
    window_name,
)
from core.hypernet import HypernetLocator, clean_unit_importance, load_hypernet
from core.model import preprocess
from core.replay import ReplayingEditor, build_replay_batch
from core.scope import EditScope, build_scope
from core.settings import load_settings
from flows.benchmark import (
    ACCURACY_SET,
    PAIRED_COLUMNS,
    load_inputs,
    markdown_table,
    write_csv,
)
from flows.bootstrap import world_dir
from monitoring.plots import plot_tradeoff

METRICS = ("reliability", "generalization", "locality_sensitive", "locality_broad", "accuracy")
FRONTIER_COLUMNS = [
    "first", "second", "k", "level", "locality", "first_locality", "gap", "standard_error",
]  # fmt: skip


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--hypernet", action="append", default=[], metavar="NAME=PATH")
    parser.add_argument("--cases", type=int, default=32)
    parser.add_argument(
        "--baselines",
        default="saliency,random,clean-saliency",
        help="'' to run only hypernetworks",
    )
    parser.add_argument("--clean-exponent", type=float, default=0.5)
    parser.add_argument("--rhos", default="0.9,0.95")
    parser.add_argument("--ks", default="1,3")
    parser.add_argument("--lr", type=float, default=None, help="default: edit.lr")
    parser.add_argument("--locality-weight", type=float, default=0.0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed-replay", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("bench/out/locator-study"))
    return parser.parse_args()


def locators(
    args: argparse.Namespace, model: torch.nn.Module, scope: EditScope, clean: torch.Tensor
) -> dict[str, Locator]:
    """Baselines plus one HypernetLocator per --hypernet NAME=PATH.

    "clean-saliency" measures its clean importance on `clean`, the images extension (d) of a
    hypernetwork measures it on (the first `hypernet.clean_images` training images).
    """
    baselines: dict[str, Callable[[], Locator]] = {
        "saliency": SaliencyLocator,
        "random": RandomLocator,
        "clean-saliency": lambda: CleanSaliencyLocator(
            torch.cat(clean_unit_importance(model, scope, clean)), args.clean_exponent
        ),
    }
    found = {name: baselines[name]() for name in args.baselines.split(",") if name}
    for spec in args.hypernet:
        name, path = spec.split("=", 1)
        found[name] = HypernetLocator(load_hypernet(Path(path), model))
    return found


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    settings = load_settings(args.params, args.set)
    lr = args.lr or settings.edit.lr
    inputs = load_inputs(settings, full=False)  # capped locality sets: the same for every locator
    scope = build_scope(inputs.model, settings.scope.blocks)
    ks = [int(k) for k in args.ks.split(",")]
    cases = plan_cases(inputs.groups, args.cases, 2, max(ks), settings.edit_benchmark.seed)
    evaluator = EditEvaluator(inputs.model, inputs.groups, inputs.locality_sets, ACCURACY_SET, 256)
    # Replay images come from the training split: never from the sets locality is measured on.
    train = load_images(world_dir(settings) / "train.parquet")
    train_images = preprocess(train.images[:5000], inputs.card)
    replay = build_replay_batch(inputs.model, train_images, 32, 32, args.seed_replay)
    clean = train_images[: settings.hypernet.clean_images]
    variants = [("", 0.0)] + ([("+loc", args.locality_weight)] if args.locality_weight else [])
    jobs: list[tuple[Level, Editor]] = []
    for name, locator in locators(args, inputs.model, scope, clean).items():
        for suffix, weight in variants:
            edit = settings.edit.model_copy(update={"lr": lr, "locality_weight": weight})
            for rho in (float(r) for r in args.rhos.split(",")):
                editor: Editor = MaskedEditor(name + suffix, scope, locator, rho, edit)
                if weight:
                    editor = ReplayingEditor(editor, replay)
                level = Level(name + suffix, rho, ks[0], lr, window_name(scope.blocks))
                jobs += [(replace(level, k=k), editor) for k in ks]
    started = time.perf_counter()
    with tqdm(total=len(jobs) * len(cases), desc="edits", unit="edit", disable=None) as bar:
        results = run_edits(jobs, cases, evaluator, on_edit=lambda _: bar.update())
    rows = [result.row() for result in results]
    args.out.mkdir(parents=True, exist_ok=True)
    write_csv(rows, args.out / "edits.csv")
    summary = summarize(rows, keys=("method", "level", "k"))
    write_csv(summary, args.out / "summary.csv")
    methods = {str(row["method"]) for row in rows}
    baselines = [name for name in ("saliency", "random", "clean-saliency") if name in methods]
    pairs = [(name, base) for name in sorted(methods - set(baselines)) for base in baselines]
    paired = paired_differences(
        rows, pairs, ["generalization", "locality_sensitive", "locality_broad"]
    )
    write_csv(paired, args.out / "paired.csv")
    frontier = [
        gap
        for locality in ("locality_sensitive", "locality_broad")
        for gap in frontier_gaps(rows, pairs, locality)
    ]
    write_csv(frontier, args.out / "frontier.csv")
    plot_tradeoff(summary, args.out / "tradeoff.png", ["locality_sensitive", "locality_broad"])
    overall = [row for row in paired if row["subset"] == "all"]
    (args.out / "report.md").write_text(
        "# Locator study\n\n"
        f"{len(cases)} paired cases, lr {lr}, {time.perf_counter() - started:.0f} s\n\n"
        "## Summary\n\n"
        + markdown_table(summary, ["method", "level", "k", "n_edits", *METRICS])
        + "\n## Paired differences (all subsets)\n\n"
        + markdown_table(overall, PAIRED_COLUMNS)
        + "\n## GR gap at equal locality (first minus second's curve; bootstrap SE)\n\n"
        + markdown_table(frontier, FRONTIER_COLUMNS)
    )
    print((args.out / "report.md").read_text())
    print(json.dumps({"out": str(args.out)}))


if __name__ == "__main__":
    main()
