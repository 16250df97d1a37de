"""Replay batches: the lowest-margin images first, then a seeded random share."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from core.edit import EditBatch, EditDelta
from core.replay import ReplayBatch, ReplayingEditor, build_replay_batch


class FixedLogits(nn.Module):
    """A 'model' whose logits are the first two pixels of the image: margins are chosen."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images[:, 0, 0, :2]


def test_replay_batch_takes_lowest_margins_then_random_others():
    # Given 6 images whose logit gaps are 5, 0.1, 3, 0.2, 4, 2
    gaps = torch.tensor([5.0, 0.1, 3.0, 0.2, 4.0, 2.0])
    images = torch.zeros(6, 3, 2, 2)
    images[:, 0, 0, 0] = gaps
    # When 2 low-margin and 2 random images are drawn
    batch = build_replay_batch(FixedLogits(), images, n_low_margin=2, n_random=2, seed=0)
    # Then the two smallest gaps come first, two distinct others follow, probs match the model
    chosen = batch.images[:, 0, 0, 0]
    assert chosen[:2].tolist() == pytest.approx([0.1, 0.2])
    assert len(set(chosen[2:].tolist())) == 2
    assert (chosen[2:] > 1).all()
    assert torch.allclose(batch.probs, FixedLogits()(batch.images).softmax(1))
    again = build_replay_batch(FixedLogits(), images, n_low_margin=2, n_random=2, seed=0)
    assert torch.equal(again.images, batch.images)


class RecordingEditor:
    """An Editor that remembers the batch it was given."""

    def __init__(self) -> None:
        self.batches: list[EditBatch] = []

    def edit(self, model: nn.Module, batch: EditBatch, *, seed: int) -> EditDelta:
        self.batches.append(batch)
        return EditDelta({}, {"seed": seed})


def test_replaying_editor_attaches_the_replay_batch():
    # Given an editor wrapped with a replay batch of 3 images
    replay = ReplayBatch(torch.ones(3, 3, 2, 2), torch.full((3, 2), 0.5))
    inner = RecordingEditor()
    request = EditBatch(torch.zeros(1, 3, 2, 2), torch.tensor([1]))
    # When it edits one request
    delta = ReplayingEditor(inner, replay).edit(FixedLogits(), request, seed=7)
    # Then the wrapped editor saw the request's samples plus the replay batch, and the seed
    seen = inner.batches[0]
    assert torch.equal(seen.images, request.images)
    assert torch.equal(seen.labels, request.labels)
    assert seen.replay_images is replay.images
    assert seen.replay_probs is replay.probs
    assert delta.meta == {"seed": 7}
