"""Edit metrics exactly as method.md section 1 defines them, plus mask overlap.

- reliability: the edited model is right on the edit samples.
- generalization: it is right on the *other* failures of the group (edit samples excluded, so
  the denominator is n - k; the authors' code divides by n and counts the edit sample as fixed).
- locality: its predictions agree with the pre-edit model's on a locality set (predictions, not
  labels: a locality image the base model got wrong must stay "wrong" the same way).
- retention: earlier edits still hold after later ones.

All take 1-D integer prediction / label tensors and return a float in [0, 1].
"""

from __future__ import annotations

import torch

from core.errors import DataError


def _agreement(predictions: torch.Tensor, targets: torch.Tensor, what: str) -> float:
    """Share of positions where `predictions` equals `targets`."""
    if predictions.shape != targets.shape or predictions.dim() != 1:
        raise DataError(
            f"{what}: predictions {tuple(predictions.shape)} and targets {tuple(targets.shape)} "
            "must be 1-D and of the same length"
        )
    if predictions.numel() == 0:
        raise DataError(f"{what} of zero samples is undefined; pass at least one sample")
    return (predictions == targets).double().mean().item()


def accuracy(predictions: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of predictions equal to the labels."""
    return _agreement(predictions, labels, "accuracy")


def reliability(edited_predictions: torch.Tensor, labels: torch.Tensor) -> float:
    """SR: share of edit samples the edited model gets right."""
    return _agreement(edited_predictions, labels, "reliability")


def generalization(
    edited_predictions_on_group: torch.Tensor, labels: torch.Tensor, edit_indices: torch.Tensor
) -> float:
    """GR: accuracy of the edited model on the group's failures other than the edit samples.

    Args:
        edited_predictions_on_group: (n,) edited predictions on every failure of the group.
        labels: (n,) their true labels.
        edit_indices: (k,) positions of the edit samples in the group; they are left out, so the
            denominator is n - k.

    Raises:
        DataError: shapes disagree, an index is out of range, or no held-out sample remains.
    """
    n = labels.shape[0]
    if edit_indices.numel() and (int(edit_indices.min()) < 0 or int(edit_indices.max()) >= n):
        raise DataError(
            f"generalization: edit_indices {edit_indices.tolist()} outside the group of {n}"
        )
    held_out = torch.ones(n, dtype=torch.bool)
    held_out[edit_indices] = False
    return _agreement(edited_predictions_on_group[held_out], labels[held_out], "generalization")


def locality(edited_predictions: torch.Tensor, pre_edit_predictions: torch.Tensor) -> float:
    """LR: share of the locality set whose prediction did not change with the edit."""
    return _agreement(edited_predictions, pre_edit_predictions, "locality")


def retention(
    predictions_on_earlier_edit_samples: torch.Tensor, their_labels: torch.Tensor
) -> float:
    """Share of earlier edits' samples the current model still gets right (sequential editing)."""
    return _agreement(predictions_on_earlier_edit_samples, their_labels, "retention")


def sensitive_mask(probs: torch.Tensor, labels: torch.Tensor, margin: float) -> torch.Tensor:
    """Which samples are right but barely: top-1 is the label and p(top1) - p(top2) < margin.

    These flip first when an edit spills over: the paper's locality set.

    Args:
        probs: (N, C) class probabilities of the base model.
        labels: (N,) true labels.
        margin: the probability gap under which a correct prediction is "sensitive".

    Returns:
        (N,) bool.
    """
    top2 = probs.topk(2, dim=1)  # values (N, 2), indices (N, 2)
    correct = top2.indices[:, 0] == labels
    return correct & ((top2.values[:, 0] - top2.values[:, 1]) < margin)


def mask_iou(first: torch.Tensor, second: torch.Tensor) -> float:
    """Intersection over union of two binary masks of equal shape; 1.0 when both are empty."""
    if first.shape != second.shape:
        raise DataError(f"mask_iou: masks of shapes {tuple(first.shape)} and {tuple(second.shape)}")
    first, second = first.bool(), second.bool()
    union = (first | second).sum().item()
    return 1.0 if union == 0 else (first & second).sum().item() / union
