"""Metric definitions (method.md section 1) on hand-made cases."""

from __future__ import annotations

import pytest
import torch

from core.errors import DataError
from core.metrics import (
    accuracy,
    generalization,
    locality,
    mask_iou,
    reliability,
    retention,
    sensitive_mask,
)


def test_reliability_is_the_share_of_edit_samples_fixed():
    assert reliability(torch.tensor([1, 2, 0]), torch.tensor([1, 2, 2])) == pytest.approx(2 / 3)


def test_generalization_excludes_the_edit_samples_from_numerator_and_denominator():
    # Given a group of 5 failures, the edit sample at position 0 fixed, 2 of the other 4 fixed
    predictions = torch.tensor([3, 3, 3, 0, 0])
    labels = torch.tensor([3, 3, 3, 3, 3])
    # Then GR is 2 / 4, not 3 / 5 (the authors' n denominator)
    assert generalization(predictions, labels, torch.tensor([0])) == pytest.approx(0.5)
    assert generalization(predictions, labels, torch.tensor([0, 1])) == pytest.approx(1 / 3)


def test_generalization_needs_a_held_out_sample():
    with pytest.raises(DataError, match="zero samples"):
        generalization(torch.tensor([1, 1]), torch.tensor([1, 1]), torch.tensor([0, 1]))


def test_generalization_rejects_edit_indices_outside_the_group():
    with pytest.raises(DataError, match="outside the group"):
        generalization(torch.tensor([1, 1]), torch.tensor([1, 1]), torch.tensor([2]))


def test_locality_compares_predictions_not_labels():
    # Given a locality set where the base model was wrong on the last image and stays wrong
    pre_edit = torch.tensor([0, 1, 2, 3])
    edited = torch.tensor([0, 1, 0, 3])
    # Then only the one changed prediction counts against locality
    assert locality(edited, pre_edit) == pytest.approx(0.75)


def test_accuracy_and_retention():
    assert accuracy(torch.tensor([1, 1, 0, 0]), torch.tensor([1, 0, 0, 1])) == pytest.approx(0.5)
    assert retention(torch.tensor([2, 2]), torch.tensor([2, 2])) == 1.0


@pytest.mark.parametrize(
    ("predictions", "targets"),
    [
        (torch.tensor([], dtype=torch.int64), torch.tensor([], dtype=torch.int64)),
        (torch.tensor([1]), torch.tensor([1, 2])),
    ],
    ids=["empty", "length-mismatch"],
)
def test_bad_shapes_are_data_errors(predictions, targets):
    with pytest.raises(DataError):
        accuracy(predictions, targets)


def test_sensitive_mask_keeps_right_but_barely_right_samples():
    probs = torch.tensor(
        [
            [0.50, 0.48, 0.02],  # right, margin 0.02: sensitive
            [0.90, 0.05, 0.05],  # right, confident: not sensitive
            [0.48, 0.50, 0.02],  # wrong: not sensitive however close
            [0.40, 0.36, 0.24],  # right, margin 0.04: sensitive
        ]
    )
    labels = torch.tensor([0, 0, 0, 0])
    assert sensitive_mask(probs, labels, margin=0.05).tolist() == [True, False, False, True]


def test_mask_iou():
    first = torch.tensor([1, 1, 0, 0], dtype=torch.bool)
    second = torch.tensor([0, 1, 1, 0], dtype=torch.bool)
    assert mask_iou(first, second) == pytest.approx(1 / 3)
    assert mask_iou(first, first) == 1.0
    assert mask_iou(torch.zeros(3, dtype=torch.bool), torch.zeros(3, dtype=torch.bool)) == 1.0
    with pytest.raises(DataError, match="shapes"):
        mask_iou(first, torch.zeros(3, dtype=torch.bool))
