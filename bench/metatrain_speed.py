"""Seconds per meta-training iteration: batched + prefix-cached vs the per-sample loop.

Runs the bi-level mask fit (the cost of an iteration) on the default model of params.yaml
(random init: no trained model is needed to time it) for a few iterations both ways, checks
they agree, and reports the inner loop's KL reduction at `metatrain.inner_lr` and at the
authors' 1e-3 (findings.md 3).

    python bench/metatrain_speed.py --iterations 3 --threads 1
"""

from __future__ import annotations

import argparse
import time

import timm
import torch

from core.metatrain import (
    fit_mask_logits_batched,
    fit_mask_logits_reference,
    frozen_split,
    make_pseudo_failures,
)
from core.scope import build_scope
from core.settings import Settings, load_settings


def build_default_model(settings: Settings) -> torch.nn.Module:
    """The default base model architecture, random init (seeded)."""
    torch.manual_seed(settings.seed)
    spec = settings.model
    return timm.create_model(
        spec.name,
        pretrained=False,
        num_classes=settings.world.n_classes,
        img_size=spec.img_size,
        patch_size=spec.patch_size,
        embed_dim=spec.embed_dim,
        depth=spec.depth,
        num_heads=spec.num_heads,
        mlp_ratio=spec.mlp_ratio,
    ).eval()


def main(argv: list[str] | None = None) -> int:
    """Time both implementations; print seconds per iteration, speed-up and inner-loop KL."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    settings = load_settings(args.params)
    meta = settings.metatrain
    model = build_default_model(settings)
    scope = build_scope(model, settings.scope.blocks)
    split = frozen_split(model, scope)
    size = settings.model.img_size
    pool = torch.randn(64, 3, size, size, generator=torch.Generator().manual_seed(0))
    patch_size = model.patch_embed.patch_size[0]
    timings: dict[str, list[float]] = {"batched": [], "reference": []}
    for iteration in range(args.iterations):
        generator = torch.Generator().manual_seed(iteration)
        pseudo = make_pseudo_failures(pool, patch_size, meta, generator)
        mixed = pseudo.mixed
        with torch.no_grad():
            clean_logits = model(pseudo.clean)
        initial = torch.rand(meta.batch_size, scope.n_mask_entries, generator=generator) * 2 - 1
        started = time.perf_counter()
        batched = fit_mask_logits_batched(split, scope, mixed, clean_logits, initial, meta)
        timings["batched"].append(time.perf_counter() - started)
        started = time.perf_counter()
        reference = fit_mask_logits_reference(model, scope, mixed, clean_logits, initial, meta)
        timings["reference"].append(time.perf_counter() - started)
        gap = (batched.logits - reference.logits).abs().max().item()
        print(
            f"iteration {iteration}: batched {timings['batched'][-1]:.2f} s, reference "
            f"{timings['reference'][-1]:.2f} s, max |z batched - z reference| {gap:.2e}"
        )
    batched_s = sorted(timings["batched"])[len(timings["batched"]) // 2]
    reference_s = sorted(timings["reference"])[len(timings["reference"]) // 2]
    print(
        f"median s/iteration (B={meta.batch_size}, "
        f"{meta.outer_steps} outer x {meta.inner_steps} inner): "
        f"batched {batched_s:.2f}, per-sample {reference_s:.2f}, "
        f"speed-up {reference_s / batched_s:.1f}x"
    )
    for inner_lr in sorted({meta.inner_lr, 1e-3}):
        fit = fit_mask_logits_batched(
            split,
            scope,
            mixed,
            clean_logits,
            initial,
            meta.model_copy(update={"inner_lr": inner_lr, "outer_steps": 1}),
        )
        print(
            f"inner_lr {inner_lr:g}: "
            f"edit KL {fit.kl_before.mean():.4g} -> {fit.kl_after.mean():.4g} "
            f"after {meta.inner_steps} inner steps (random initial masks)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
