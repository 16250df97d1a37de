"""Continual editing of one night: clusters edited one after another on a running candidate.

Owns the science of a night that needs no orchestration: edit one cluster on top of the running
candidate, judge it with the cluster gate against the model as it stood before that edit, retry
once with a fallback (more units, more steps), and undo a rejected edit bit for bit; then measure
the figures the global gate judges the whole candidate on.

Protocol (anchors.md: locality is measured against the ORIGINAL model): the candidate's locality
is always computed against predictions of the base model and of the champion cached once per
night (`references` of `candidate_figures`), never against an already-edited model; only the
per-cluster locality is, by definition, against the model right before that cluster's edit.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

import torch
from torch import nn

from core.edit import (
    EditBatch,
    EditDelta,
    Editor,
    SplitForward,
    apply_delta,
    eval_mode,
    restore,
)
from core.gate import GateResult, cluster_gate, retention_key
from core.metrics import accuracy, generalization, locality, reliability, retention
from core.model import predict_logits, weights_hash
from core.replay import ReplayBatch
from core.scope import EditScope
from core.settings import EditSettings, GateSettings

logger = logging.getLogger(__name__)

# (rho, edit settings) -> the editor of one attempt; the flow binds the locator (HPRD).
MakeEditor = Callable[[float, EditSettings], Editor]


@dataclass(frozen=True)
class ClusterRequest:
    """One ready failure cluster, its images preprocessed for the model.

    Attributes:
        cluster_id: the cluster's stable id (core.clusters).
        edit_sample_ids: ids of the edit samples, in the order of `edit_images`.
        edit_images: (k, 3, S, S) float edit samples.
        edit_labels: (k,) int64 true labels.
        held_out_images: (h, 3, S, S) float held-out flags of the cluster; h may be 0.
        held_out_labels: (h,) int64.
    """

    cluster_id: str
    edit_sample_ids: tuple[str, ...]
    edit_images: torch.Tensor
    edit_labels: torch.Tensor
    held_out_images: torch.Tensor
    held_out_labels: torch.Tensor


@dataclass(frozen=True)
class Attempt:
    """One try at editing a cluster: its sparsity, step budget and gate decision."""

    rho: float
    max_steps: int
    gate: GateResult


@dataclass(frozen=True)
class ClusterOutcome:
    """What became of one cluster tonight.

    Attributes:
        cluster_id: the cluster.
        attempts: every try, in order (one, or two with the fallback).
        delta: the accepted delta (now in the candidate), or None when rejected.
        parent_hash: weights hash of the model the delta was computed on.
        reliability_before: share of the edit samples that model already got right.
        edit_settings: the edit settings of the accepted (or last) attempt, JSON-ready.
    """

    cluster_id: str
    attempts: tuple[Attempt, ...]
    delta: EditDelta | None
    parent_hash: str
    reliability_before: float
    edit_settings: dict

    @property
    def accepted(self) -> bool:
        """Whether the edit joined the candidate."""
        return self.delta is not None

    @property
    def gate(self) -> GateResult:
        """The decision of the last attempt (the accepted one, or the final rejection)."""
        return self.attempts[-1].gate


class LocalityProbe:
    """The clean images the cluster gate measures locality on, with their prefix cached.

    An edit changes only the blocks from its first touched one on, so the patch embedding and
    the blocks before it give the same activations before and after the edit: they run once a
    night (`SplitForward.prefix`), and each gate check runs only the rest. The predictions equal
    a full forward's bit for bit (the same batches through the same operations).
    """

    def __init__(self, images: torch.Tensor, batch_size: int) -> None:
        """Args: images (N, 3, S, S) float, preprocessed; batch_size: images per forward."""
        self.images = images
        self.batch_size = batch_size
        self._prefixes: dict[int | None, torch.Tensor] = {}  # cut -> (N, T, D) activations

    @torch.no_grad()
    def predictions(self, model: nn.Module, touched: Sequence[str]) -> torch.Tensor:
        """(N,) classes of `model` whose blocks before those holding `touched` are unchanged
        since the probe last ran them (`settle` keeps that true)."""
        if not touched:
            return predicted_classes(model, self.images, self.batch_size)
        forward = SplitForward(model, list(touched))
        with eval_mode(model):
            cut = forward.first_block
            if cut not in self._prefixes:
                self._prefixes[cut] = forward.prefix_in_batches(self.images, self.batch_size)
            return forward.classes(self._prefixes[cut], self.batch_size)

    def settle(self, model: nn.Module, touched: Sequence[str]) -> None:
        """`model` changed for good in `touched`: forget the prefixes that ran through them."""
        if not touched:
            return
        cut = SplitForward(model, list(touched)).first_block
        self._prefixes = {
            kept: tokens
            for kept, tokens in self._prefixes.items()
            if kept is None or (cut is not None and kept <= cut)
        }


@torch.no_grad()
def predicted_classes(model: nn.Module, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    """(N,) argmax classes of `model` (in eval mode) on preprocessed images (N, 3, S, S)."""
    with eval_mode(model):
        return predict_logits(model, images, batch_size).argmax(dim=1)


def fallback_tries(
    settings: EditSettings, rho: float, fallback_rho: float, fallback_max_steps: int
) -> list[tuple[float, EditSettings]]:
    """The primary try and the fallback (lower rho = more units, more steps), as (rho, settings)."""
    fallback = settings.model_copy(update={"max_steps": fallback_max_steps})
    return [(rho, settings), (fallback_rho, fallback)]


@dataclass(frozen=True)
class RetainedSamples:
    """Earlier edits' samples (m, 3, S, S) and labels (m,), and which of them the model got
    right before this cluster's edit (m,) bool: what the edit must not undo."""

    images: torch.Tensor
    labels: torch.Tensor
    right_before: torch.Tensor

    @classmethod
    def of(
        cls, model: nn.Module, retained: tuple[torch.Tensor, torch.Tensor] | None, batch_size: int
    ) -> RetainedSamples | None:
        """`retained` (images, labels) with `model`'s hits on them, or None when there are none."""
        if retained is None or not len(retained[1]):
            return None
        images, labels = retained
        return cls(images, labels, predicted_classes(model, images, batch_size) == labels)

    def broken(self, model: nn.Module, batch_size: int) -> int:
        """How many samples right before are wrong in `model` now."""
        right_now = predicted_classes(model, self.images, batch_size) == self.labels
        return int((self.right_before & ~right_now).sum())


def cluster_figures(
    model: nn.Module,
    request: ClusterRequest,
    probe: LocalityProbe,
    touched: Sequence[str],
    before_predictions: torch.Tensor,
    batch_size: int,
    retained: RetainedSamples | None = None,
) -> tuple[dict[str, float], torch.Tensor]:
    """Cluster-gate figures of `model` (edited in `touched`) and its locality-image predictions.

    Returns:
        The figures (`reliability`, `generalization` when held-out flags exist, `locality`,
        `n_locality`, `retained_broken`) and the (N,) predictions on the locality images: the
        next cluster's "before".
    """
    edit_predictions = predicted_classes(model, request.edit_images, batch_size)  # (k,)
    after = probe.predictions(model, touched)  # (N,)
    figures = {
        "reliability": reliability(edit_predictions, request.edit_labels),
        "locality": locality(after, before_predictions),
        "n_locality": float(after.numel()),
        "retained_broken": float(retained.broken(model, batch_size) if retained else 0),
    }
    if request.held_out_labels.numel():
        held_out_predictions = predicted_classes(model, request.held_out_images, batch_size)
        figures["generalization"] = generalization(
            held_out_predictions, request.held_out_labels, torch.zeros(0, dtype=torch.long)
        )
    return figures, after


def edit_cluster(
    model: nn.Module,
    request: ClusterRequest,
    make_editor: MakeEditor,
    tries: Sequence[tuple[float, EditSettings]],
    probe: LocalityProbe,
    before_predictions: torch.Tensor,
    gate: GateSettings,
    seed: int,
    batch_size: int,
    replay: ReplayBatch | None = None,
    retained: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[ClusterOutcome, torch.Tensor]:
    """Edit one cluster on top of `model` (in place), keeping the edit only if its gate passes.

    Each try edits, applies the delta, and judges it with `cluster_gate`: every edit sample
    right, locality on the probe's images against `before_predictions` (the model before this
    cluster's edit), and no `retained` sample undone that was right before it. A failed try is
    undone with `restore` (bit-exact) before the next one, so a rejected cluster leaves no trace
    in `model`. With `replay` (clean images the gates do not measure on, and an anchor model's
    probabilities on them) and a try whose `locality_weight` is positive, the edit also holds
    those probabilities (extension (a)). Anchored to the base model rather than to `model`,
    every edit pulls back the drift of the edits before it instead of keeping it. `retained`
    (images, labels) of earlier edits go with every try, held right by its `retention_weight`.

    Returns:
        The outcome and the (N,) locality-set predictions of `model` after the call.
    """
    parent_hash = weights_hash(model)
    reliability_before = reliability(
        predicted_classes(model, request.edit_images, batch_size), request.edit_labels
    )
    retain_images, retain_labels = retained if retained is not None else (None, None)
    retained_before = RetainedSamples.of(model, retained, batch_size)
    plain = EditBatch(
        request.edit_images,
        request.edit_labels,
        retain_images=retain_images,
        retain_labels=retain_labels,
    )
    replayed = plain
    if replay is not None and len(replay.images):
        replayed = replace(plain, replay_images=replay.images, replay_probs=replay.probs)
    attempts: list[Attempt] = []
    for rho, settings in tries:
        batch = replayed if settings.locality_weight > 0 else plain
        delta = make_editor(rho, settings).edit(model, batch, seed=seed)
        undo = apply_delta(model, delta)
        touched = delta.touched_parameters()
        figures, after = cluster_figures(
            model, request, probe, touched, before_predictions, batch_size, retained_before
        )
        result = cluster_gate(figures, gate)
        attempts.append(Attempt(rho, settings.max_steps, result))
        settings_json = settings.model_dump(mode="json") | {"rho": rho}
        if result.passed:
            probe.settle(model, touched)
            logger.info("cluster %s accepted (rho %g)", request.cluster_id, rho)
            outcome = ClusterOutcome(
                request.cluster_id,
                tuple(attempts),
                delta,
                parent_hash,
                reliability_before,
                settings_json,
            )
            return outcome, after
        restore(model, undo)
        logger.info(
            "cluster %s try at rho %g rejected: %s", request.cluster_id, rho, result.reasons
        )
    outcome = ClusterOutcome(
        request.cluster_id, tuple(attempts), None, parent_hash, reliability_before, settings_json
    )
    return outcome, before_predictions


def edit_clusters(
    model: nn.Module,
    requests: Sequence[ClusterRequest],
    make_editor: MakeEditor,
    tries: Sequence[tuple[float, EditSettings]],
    locality_images: torch.Tensor,
    gate: GateSettings,
    seed: int,
    batch_size: int,
    replay: ReplayBatch | None = None,
    retained: tuple[torch.Tensor, torch.Tensor] | None = None,
    retention_per_edit: int = 0,
) -> list[ClusterOutcome]:
    """Edit every cluster in id order on the running candidate `model` (changed in place).

    The order is deterministic (sorted cluster ids), so the same night on the same champion
    gives the same deltas and the same candidate bits. `retained` holds samples (images, labels)
    of earlier nights' edits; the first `retention_per_edit` edit samples of each cluster
    accepted tonight join them for the clusters after it, so a later edit keeps earlier fixes.
    """
    probe = LocalityProbe(locality_images, batch_size)
    before = probe.predictions(model, ())  # (N,)
    outcomes = []
    for request in sorted(requests, key=lambda r: r.cluster_id):
        outcome, before = edit_cluster(
            model,
            request,
            make_editor,
            tries,
            probe,
            before,
            gate,
            seed,
            batch_size,
            replay,
            retained,
        )
        outcomes.append(outcome)
        if outcome.accepted and retention_per_edit:
            # later clusters of the night keep this fix too (retention)
            fixed = (
                request.edit_images[:retention_per_edit],
                request.edit_labels[:retention_per_edit],
            )
            if retained is not None:
                fixed = (torch.cat([retained[0], fixed[0]]), torch.cat([retained[1], fixed[1]]))
            retained = fixed
    return outcomes


def unit_mask(scope: EditScope, delta: EditDelta) -> torch.Tensor:
    """(n_mask_entries,) bool: the scope's hidden units the delta changes (its binary mask)."""
    masks = [torch.zeros(width, dtype=torch.bool) for width in scope.mask_widths]
    for mask, name in zip(masks, scope.param_names, strict=True):
        change = delta.params.get(name)
        if change is not None and change.units is not None:
            mask[change.units] = True
        elif change is not None:
            mask[:] = True
    return torch.cat(masks)


def candidate_figures(
    candidate: nn.Module,
    clean_predictions: Mapping[str, torch.Tensor],
    references: Mapping[str, torch.Tensor],
    retention_sets: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    batch_size: int,
) -> dict[str, float]:
    """The global gate's figures of a candidate (names as in core/gate.py).

    Locality is always against predictions cached before the night's edits, never against an
    edited model; the candidate's own clean-set predictions come in too, so a caller that has
    them (a cache keyed by weights) does not run the model again.

    Args:
        candidate: the candidate model (run on the retention sets).
        clean_predictions: the candidate's (N,) classes on `broad`, `sensitive`, `validation`.
        references: `<set>/base` and `<set>/champion` (N,) classes of the base model and of the
            night's champion on `broad` and `sensitive`; `validation/base` and
            `validation/labels` for the accuracies.
        retention_sets: ledger id -> (its edit samples (k, 3, S, S), their labels (k,)).
        batch_size: inference batch size.
    """
    labels = references["validation/labels"]
    figures: dict[str, float] = {
        "accuracy_base": accuracy(references["validation/base"], labels),
        "accuracy": accuracy(clean_predictions["validation"], labels),
    }
    for name in ("broad", "sensitive"):
        predictions = clean_predictions[name]  # (N,)
        for reference in ("base", "champion"):
            figures[f"{name}_locality_vs_{reference}"] = locality(
                predictions, references[f"{name}/{reference}"]
            )
        figures[f"n_{name}"] = float(predictions.numel())
    for edit_id, (images, labels) in retention_sets.items():
        predictions = predicted_classes(candidate, images, batch_size)
        figures[retention_key(edit_id)] = retention(predictions, labels)
    return figures
