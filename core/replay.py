"""Replay batches for the locality term of an edit (extension (a), beyond the paper).

Production has clean data at edit time, which the paper's setting did not. An edit can then
keep the pre-edit predictions of a replay batch fixed while it fits the edit samples. The
lowest-margin clean images flip first when an edit spills over (findings.md), so the batch
holds those plus a random share for breadth. Draw it from data the gates do not measure on.

The targets are one fixed model's probabilities. In continual editing that model is the base,
not the model each edit starts from: edits stacked night after night then pull back the drift
of the edits before them instead of locking it in (README, 'Continual runs').
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from core.edit import EditBatch, EditDelta, Editor
from core.model import predict_logits


@dataclass(frozen=True)
class ReplayBatch:
    """Clean images (R, 3, S, S) and the anchor model's probabilities on them (R, C): the
    predictions every edit holds."""

    images: torch.Tensor
    probs: torch.Tensor


def build_replay_batch(
    model: torch.nn.Module, images: torch.Tensor, n_low_margin: int, n_random: int, seed: int
) -> ReplayBatch:
    """The `n_low_margin` lowest-margin images of `images` plus `n_random` others at random.

    Args:
        model: the anchor model (the model before any edit).
        images: (N, 3, S, S) preprocessed clean images.
        n_low_margin: images with the smallest top1 - top2 probability gap.
        n_random: further images drawn uniformly from the rest (seeded).
        seed: seed of the random draw.
    """
    probs = predict_logits(model, images).softmax(dim=1)  # (N, C)
    top2 = probs.topk(2, dim=1).values  # (N, 2)
    order = (top2[:, 0] - top2[:, 1]).argsort()
    low, rest = order[:n_low_margin], order[n_low_margin:]
    generator = torch.Generator().manual_seed(seed)
    picked = rest[torch.randperm(len(rest), generator=generator)[:n_random]]
    chosen = torch.cat([low, picked])
    return ReplayBatch(images[chosen], probs[chosen])


@dataclass(frozen=True)
class ReplayingEditor:
    """An Editor that hands every request the same replay batch (for edits of one fixed model,
    as in the benchmark, where the model is restored after each edit)."""

    editor: Editor
    replay: ReplayBatch

    def edit(self, model: nn.Module, batch: EditBatch, *, seed: int) -> EditDelta:
        """`editor.edit` with the replay batch attached to `batch`."""
        replayed = replace(batch, replay_images=self.replay.images, replay_probs=self.replay.probs)
        return self.editor.edit(model, replayed, seed=seed)
