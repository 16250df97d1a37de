"""Seconds per single-sample HPRD edit of the default model: masks + fine-tuning, no evaluation.

Target: a median of at most 1 s. Uses the base model and failure groups under `paths.artifacts`
when they exist, else the default architecture at random init with random images labelled with a
class the model does not predict; uses the meta-trained hypernetwork when it exists, else an
untrained one from `build_hypernet`. The output says which of each it timed.

    python bench/edit_speed.py --edits 30 --threads 1 --set paths.artifacts=/tmp/default-artifacts
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from torch import nn

from core.data import load_images
from core.edit import EditBatch, MaskedEditor
from core.hypernet import HypernetLocator, MaskHypernet, build_hypernet, load_hypernet
from core.model import CARD_FILE, build_model, load_saved_model, predict_logits, preprocess
from core.scope import EditScope, build_scope
from core.settings import Settings, load_settings
from flows.bootstrap import base_dir, benchmark_dir, hypernet_path

TARGET_SECONDS = 1.0


def edit_samples(settings: Settings, n: int) -> tuple[nn.Module, torch.Tensor, torch.Tensor, str]:
    """(model, images (n, 3, S, S), labels (n,), what they are) for the timed edits."""
    failures = benchmark_dir(settings) / "failures.parquet"
    if (base_dir(settings) / CARD_FILE).is_file() and failures.is_file():
        model, card = load_saved_model(base_dir(settings))
        table = load_images(failures)
        rows = torch.randperm(len(table), generator=torch.Generator().manual_seed(0))[:n]
        images = preprocess(table.images[rows], card.preprocessing)
        return model, images, table.labels[rows], f"base model and {len(rows)} real failures"
    model = build_model(settings.model, settings.world.n_classes, seed=settings.seed)
    size = settings.model.img_size
    images = torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(0))
    labels = (predict_logits(model, images).argmax(1) + 1) % settings.world.n_classes
    return model, images, labels, "random-init default model and random images (no base model)"


def hypernet_for(
    settings: Settings, model: nn.Module, scope: EditScope
) -> tuple[MaskHypernet, str]:
    """The meta-trained hypernetwork if it exists, else an untrained one (same cost)."""
    path = hypernet_path(settings)
    if path.is_file():
        return load_hypernet(path, model), f"meta-trained hypernetwork {path}"
    untrained = build_hypernet(model, scope, settings.hypernet, seed=settings.seed)
    return untrained, "UNTRAINED hypernetwork (build_hypernet): no checkpoint yet"


def main(argv: list[str] | None = None) -> int:
    """Time `--edits` single-sample HPRD edits; print the median and quartiles."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--edits", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    settings = load_settings(args.params, args.set)
    model, images, labels, samples = edit_samples(settings, args.edits + 1)
    scope = build_scope(model, settings.scope.blocks)
    hypernet, which = hypernet_for(settings, model, scope)
    editor = MaskedEditor(
        "hprd", scope, HypernetLocator(hypernet), settings.edit.rho, settings.edit
    )
    seconds, steps = [], []
    for index in range(len(labels)):
        batch = EditBatch(images[index : index + 1], labels[index : index + 1])
        started = time.perf_counter()
        delta = editor.edit(model, batch, seed=index)
        if index > 0:  # the first edit warms up allocators and caches
            seconds.append(time.perf_counter() - started)
            steps.append(delta.meta["steps"])
    first, median, third = np.percentile(seconds, [25, 50, 75])
    print(f"timed: {samples}; {which}")
    print(f"rho {settings.edit.rho}, lr {settings.edit.lr}, threads {args.threads}")
    print(f"{len(seconds)} edits: median {median:.3f} s (quartiles {first:.3f} - {third:.3f} s)")
    print(f"median steps {np.median(steps):.0f}; target <= {TARGET_SECONDS} s: ", end="")
    print("met" if median <= TARGET_SECONDS else "MISSED")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
