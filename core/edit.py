"""How to edit: edit requests, exact top-k masks, masked fine-tuning, and reversible deltas.

An edit never changes the model it is given. It returns an `EditDelta`, an additive weight change
on named parameters (a few rows or columns of the scope's fc1/fc2 weights, or a dense matrix).
`apply_delta` adds it in place and returns the slices it overwrote; `restore` writes them back
bit for bit. Applying the same deltas in the same order to the same base always yields the same
bits, which is what the ledger's replay relies on.

Where to edit is a `Locator`'s job: one score per scope mask entry, higher = edit first. How to
edit is `fit_delta`: RMSprop on cross-entropy over the edit samples until each is right and the
loss is small (method.md section 4), optionally with a locality term on a replay batch.
A `MaskedEditor` chains the two and is the shape every method in `core.baselines` shares.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from torch.func import functional_call

from core.errors import EditError
from core.scope import EditScope
from core.settings import EditSettings

logger = logging.getLogger(__name__)

IMAGE_CHANNELS = 3  # the data contract: RGB images


@dataclass(frozen=True)
class EditBatch:
    """One edit request: the edit samples and, optionally, what the edit must leave in place.

    Attributes:
        images: (k, 3, S, S) float, already preprocessed for the model.
        labels: (k,) int64, the labels the edited model must predict.
        replay_images: (R, 3, S, S) float clean images whose predictions should not move.
        replay_probs: (R, C) the pre-edit model's probabilities on `replay_images`: the targets
            of the locality term.
        retain_images: (m, 3, S, S) float samples of earlier edits, which must stay right.
        retain_labels: (m,) int64 their labels.
    """

    images: torch.Tensor
    labels: torch.Tensor
    replay_images: torch.Tensor | None = None
    replay_probs: torch.Tensor | None = None
    retain_images: torch.Tensor | None = None
    retain_labels: torch.Tensor | None = None

    def __post_init__(self) -> None:
        """Checks that need no model: non-empty, float images, one int64 label per image."""
        if self.images.dim() != 4 or self.images.shape[0] == 0:
            raise EditError(
                f"edit batch images have shape {tuple(self.images.shape)}; pass at least one "
                "preprocessed image as a (k, 3, S, S) float tensor"
            )
        if not self.images.is_floating_point():
            raise EditError(
                "edit batch images must be float; preprocess them with core.model.preprocess"
            )
        _check_labels("edit batch", self.images, self.labels)
        if (self.replay_images is None) != (self.replay_probs is None):
            raise EditError("pass replay_images and replay_probs together, or neither")
        if (
            self.replay_images is not None
            and self.replay_images.shape[0] != self.replay_probs.shape[0]
        ):
            raise EditError(
                f"{self.replay_images.shape[0]} replay images but {self.replay_probs.shape[0]} "
                "rows of replay_probs; give one probability row per replay image"
            )
        if (self.retain_images is None) != (self.retain_labels is None):
            raise EditError("pass retain_images and retain_labels together, or neither")
        if self.retain_images is not None:
            _check_labels("retained samples'", self.retain_images, self.retain_labels)

    @property
    def has_replay(self) -> bool:
        """Whether a non-empty replay batch came with the request."""
        return self.replay_images is not None and self.replay_images.shape[0] > 0

    @property
    def has_retained(self) -> bool:
        """Whether earlier edits' samples came with the request."""
        return self.retain_images is not None and self.retain_images.shape[0] > 0

    def check(self, num_classes: int, input_size: int | None) -> None:
        """Check the batch against the model it will edit.

        Args:
            num_classes: C; every label must lie in [0, C).
            input_size: S, the square input side the model expects; None skips the size check
                (fully convolutional models accept any size).

        Raises:
            EditError: a label is out of range, or an image has the wrong channels or size.
        """
        for what, labels in (("edit", self.labels), ("retained", self.retain_labels)):
            if labels is None:
                continue
            bad = (labels < 0) | (labels >= num_classes)
            if bool(bad.any()):
                raise EditError(
                    f"{what} labels {labels[bad].tolist()} outside [0, {num_classes}); "
                    "use the model card's class indices"
                )
        named = (
            ("images", self.images),
            ("replay_images", self.replay_images),
            ("retain_images", self.retain_images),
        )
        for name, images in named:
            if images is None:
                continue
            side = input_size or images.shape[-1]
            if tuple(images.shape[1:]) != (IMAGE_CHANNELS, side, side):
                raise EditError(
                    f"edit batch {name} have shape {tuple(images.shape[1:])}, the model needs "
                    f"({IMAGE_CHANNELS}, {side}, {side}); preprocess them with the model card"
                )
        if self.replay_probs is not None and self.replay_probs.shape[1] != num_classes:
            raise EditError(
                f"replay_probs has {self.replay_probs.shape[1]} classes, the model {num_classes}"
            )


def _check_labels(what: str, images: torch.Tensor, labels: torch.Tensor) -> None:
    """One int64 label per image."""
    if labels.dtype != torch.int64 or labels.shape != (images.shape[0],):
        raise EditError(
            f"{what} labels must be int64 of shape ({images.shape[0]},), "
            f"got {labels.dtype} {tuple(labels.shape)}"
        )


def input_spec(model: nn.Module) -> tuple[int, int | None]:
    """(num_classes, square input side or None) of a timm classifier, for `EditBatch.check`."""
    img_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    side = img_size[0] if isinstance(img_size, tuple) else img_size
    return model.num_classes, side


class Locator(Protocol):
    """Says where to edit: one score per scope mask entry; higher means edit first."""

    def scores(self, model: nn.Module, scope: EditScope, batch: EditBatch) -> torch.Tensor:
        """(n_mask_entries,) float scores over the scope's hidden units (fc1 rows, fc2 columns)."""
        ...


def topk_mask(scores: torch.Tensor, rho: float) -> torch.Tensor:
    """Binarize scores: keep exactly k = round((1 - rho) * n) entries (at least one).

    Ties go to the lower index (stable sort), so the same scores always give the same mask.

    Args:
        scores: (n,) float scores, higher = keep first.
        rho: sparsity, the share of entries NOT kept, in [0, 1).

    Raises:
        EditError: rho outside [0, 1), or scores not a finite 1-D tensor.
    """
    if not 0 <= rho < 1:
        raise EditError(
            f"edit.rho={rho} must lie in [0, 1): it is the share of mask entries left unedited"
        )
    if scores.dim() != 1 or not bool(torch.isfinite(scores).all()):
        raise EditError(
            f"locator scores must be a finite 1-D tensor, got shape {tuple(scores.shape)}"
        )
    n_keep = max(1, round((1 - rho) * scores.numel()))
    order = torch.argsort(scores.detach().float().cpu(), descending=True, stable=True)
    mask = torch.zeros(scores.numel(), dtype=torch.bool)
    mask[order[:n_keep]] = True
    return mask


@dataclass(frozen=True)
class ParamDelta:
    """The change to one parameter: `values` added to the slices `units` along `dim`.

    Attributes:
        units: sorted int64 indices along `dim`, or None for a dense change of the whole tensor.
        dim: 0 for fc1 rows, 1 for fc2 columns (ignored when dense).
        values: the tensor added: the parameter's shape with `len(units)` along `dim`.
    """

    units: torch.Tensor | None
    dim: int
    values: torch.Tensor


@dataclass(frozen=True)
class UndoState:
    """The slices `apply_delta` overwrote, as they were: name -> (units, dim, old values)."""

    slices: dict[str, tuple[torch.Tensor | None, int, torch.Tensor]]


@dataclass(frozen=True)
class EditDelta:
    """An additive, sparse weight change and how it was found.

    Attributes:
        params: parameter name -> its change.
        meta: JSON-ready record (method, scope blocks, rho, mask hash, steps, losses, lr, seed,
            success).
    """

    params: dict[str, ParamDelta]
    meta: dict[str, Any] = field(default_factory=dict)

    def touched_parameters(self) -> tuple[str, ...]:
        """Names of the parameters this delta changes, sorted."""
        return tuple(sorted(self.params))

    def _tensors(self) -> dict[str, torch.Tensor]:
        tensors = {}
        for name, delta in self.params.items():
            tensors[f"{name}:values"] = delta.values.detach().contiguous()
            if delta.units is not None:
                tensors[f"{name}:units"] = delta.units.contiguous()
        return tensors

    def _header(self) -> dict[str, Any]:
        dims = {name: delta.dim for name, delta in self.params.items()}
        return {"dims": dims, "meta": self.meta}

    def sha256(self) -> str:
        """Hash of names, units, values (raw bytes) and meta: the ledger's integrity check."""
        digest = hashlib.sha256(json.dumps(self._header(), sort_keys=True).encode())
        for key, tensor in sorted(self._tensors().items()):
            digest.update(key.encode())
            digest.update(tensor.cpu().numpy().tobytes())
        return digest.hexdigest()

    def save(self, folder: str | Path) -> Path:
        """Write `delta.safetensors` and `delta.json` into `folder`; return the folder."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file(self._tensors(), str(folder / "delta.safetensors"))
        (folder / "delta.json").write_text(json.dumps(self._header(), sort_keys=True, indent=1))
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> EditDelta:
        """Read a delta written by `save`.

        Raises:
            EditError: the folder lacks `delta.safetensors` or `delta.json`.
        """
        folder = Path(folder)
        if not (folder / "delta.safetensors").is_file() or not (folder / "delta.json").is_file():
            raise EditError(f"{folder} holds no saved delta (delta.safetensors + delta.json)")
        tensors = load_file(str(folder / "delta.safetensors"))
        header = json.loads((folder / "delta.json").read_text())
        params = {
            name: ParamDelta(tensors.get(f"{name}:units"), dim, tensors[f"{name}:values"])
            for name, dim in header["dims"].items()
        }
        return cls(params, header["meta"])


def _check_fits(model: nn.Module, delta: EditDelta) -> dict[str, torch.Tensor]:
    """The model's parameters the delta touches, after checking every shape fits."""
    named = dict(model.named_parameters())
    for name, change in delta.params.items():
        if name not in named:
            raise EditError(
                f"the delta changes '{name}', which this model lacks; it belongs to another model"
            )
        expected = list(named[name].shape)
        if change.units is not None:
            expected[change.dim] = change.units.numel()
        if list(change.values.shape) != expected:
            raise EditError(
                f"delta values for '{name}' have shape {tuple(change.values.shape)}, "
                f"the model needs {tuple(expected)}; the delta belongs to another model"
            )
    return {name: named[name] for name in delta.params}


@torch.no_grad()
def apply_delta(model: nn.Module, delta: EditDelta) -> UndoState:
    """Add `delta` to `model` in place; return the overwritten slices for `restore`.

    Raises:
        EditError: the delta names a parameter the model lacks or has the wrong shape (checked
            before any weight changes).
    """
    targets = _check_fits(model, delta)
    slices = {}
    for name, change in delta.params.items():
        weight = targets[name]
        values = change.values.to(weight.device, weight.dtype)
        if change.units is None:
            slices[name] = (None, 0, weight.detach().clone())
            weight.copy_(weight + values)
            continue
        units = change.units.to(weight.device)
        old = weight.index_select(change.dim, units)
        slices[name] = (units, change.dim, old)
        weight.index_copy_(change.dim, units, old + values)
    return UndoState(slices)


@torch.no_grad()
def restore(model: nn.Module, undo: UndoState) -> None:
    """Write back the slices `apply_delta` overwrote: the weights are bit-identical to before."""
    named = dict(model.named_parameters())
    for name, (units, dim, old) in undo.slices.items():
        if units is None:
            named[name].copy_(old)
        else:
            named[name].index_copy_(dim, units, old)


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Run `model` in eval mode (no dropout, fixed norms), then give it back its own mode."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


class SplitForward:
    """A model's forward cut where the edited weights begin, so the frozen prefix runs once.

    For a timm `VisionTransformer` whose edited weights all live in `blocks.{i}`, the patch
    embedding and the blocks before the first edited one are run once without gradient; each
    fine-tuning step then runs only the remaining blocks and the head. Any other model falls
    back to the full forward with the edited weights swapped in (`torch.func.functional_call`).
    """

    def __init__(self, model: nn.Module, edited_names: list[str]) -> None:
        self.model = model
        self.first_block = self._first_block(model, edited_names)

    @staticmethod
    def _first_block(model: nn.Module, edited_names: list[str]) -> int | None:
        plain_vit = (
            isinstance(model, VisionTransformer)
            and type(model).forward_features is VisionTransformer.forward_features
        )
        if not plain_vit or not all(name.startswith("blocks.") for name in edited_names):
            return None
        return min(int(name.split(".")[1]) for name in edited_names)

    @torch.no_grad()
    def prefix(self, images: torch.Tensor) -> torch.Tensor:
        """Activations entering the first edited block: (N, T, D) tokens, or the images."""
        if self.first_block is None:
            return images
        vit = self.model
        tokens = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(images))))  # (N, T, D)
        for block in vit.blocks[: self.first_block]:
            tokens = block(tokens)
        return tokens

    def suffix(self, cached: torch.Tensor, weights: dict[str, torch.Tensor]) -> torch.Tensor:
        """(N, C) logits from `prefix` output, with `weights` (full names) replacing the model's."""
        if self.first_block is None:
            return functional_call(self.model, weights, (cached,))
        vit, tokens = self.model, cached
        for index in range(self.first_block, len(vit.blocks)):
            prefix = f"blocks.{index}."
            own = {name[len(prefix) :]: w for name, w in weights.items() if name.startswith(prefix)}
            tokens = (
                functional_call(vit.blocks[index], own, (tokens,))
                if own
                else vit.blocks[index](tokens)
            )
        return vit.forward_head(vit.norm(tokens))

    def prefix_in_batches(self, images: torch.Tensor, batch_size: int) -> torch.Tensor:
        """`prefix` of `images`, `batch_size` at a time: what a cache of many images holds."""
        return torch.cat([self.prefix(part) for part in images.split(batch_size)])

    @torch.no_grad()
    def classes(self, cached: torch.Tensor, batch_size: int) -> torch.Tensor:
        """(N,) classes of the model as it is now, from `prefix` output, in batches."""
        return torch.cat([self.suffix(part, {}) for part in cached.split(batch_size)]).argmax(1)


class DeltaParameterization(Protocol):
    """Trainable tensors and how they turn into edited weights and an `EditDelta`."""

    trainables: list[torch.Tensor]

    def edited_weights(self) -> dict[str, torch.Tensor]:
        """Full edited weights (base + current delta) by parameter name, differentiable."""
        ...

    def deltas(self) -> dict[str, torch.Tensor]:
        """The current change per parameter, as trained (what a weight penalty sees)."""
        ...

    def to_params(self) -> dict[str, ParamDelta]:
        """The final change as detached `ParamDelta`s."""
        ...


class UnitDeltas:
    """Trainable deltas for the selected fc1 rows / fc2 columns only: nothing else can move."""

    def __init__(self, model: nn.Module, scope: EditScope, unit_mask: torch.Tensor) -> None:
        named = dict(model.named_parameters())
        self.base: dict[str, torch.Tensor] = {}
        self.units: dict[str, tuple[torch.Tensor, int]] = {}
        self.values: dict[str, torch.Tensor] = {}
        for name, mask in zip(scope.param_names, scope.split(unit_mask), strict=True):
            units = torch.nonzero(mask).flatten()  # (h,) sorted
            if units.numel() == 0:
                continue
            weight = named[name].detach()
            dim = 0 if ".fc1." in name else 1
            self.base[name] = weight
            self.units[name] = (units.to(weight.device), dim)
            self.values[name] = torch.zeros_like(
                weight.index_select(dim, self.units[name][0]), requires_grad=True
            )
        self.trainables = list(self.values.values())

    def edited_weights(self) -> dict[str, torch.Tensor]:
        """Base weights with the trained deltas added at the selected units."""
        return {
            name: weight.index_add(self.units[name][1], self.units[name][0], self.values[name])
            for name, weight in self.base.items()
        }

    def deltas(self) -> dict[str, torch.Tensor]:
        """The trained values: exactly W - W0 on the selected units."""
        return dict(self.values)

    def to_params(self) -> dict[str, ParamDelta]:
        """One `ParamDelta` per edited matrix."""
        return {
            name: ParamDelta(units.cpu(), dim, self.values[name].detach().cpu().clone())
            for name, (units, dim) in self.units.items()
        }


Penalty = Callable[[dict[str, torch.Tensor]], torch.Tensor]


@dataclass(frozen=True)
class FitResult:
    """How a fine-tune went: optimizer steps taken, loss before each step and at the end."""

    steps: int
    losses: list[float]
    success: bool


def _uses_replay(batch: EditBatch, settings: EditSettings) -> bool:
    """Whether the locality term is on: a positive weight and a non-empty replay batch."""
    return settings.locality_weight > 0 and batch.has_replay


def _uses_retained(batch: EditBatch, settings: EditSettings) -> bool:
    """Whether the retention term is on: a positive weight and earlier edits' samples."""
    return settings.retention_weight > 0 and batch.has_retained


def _draw(n_rows: int, size: int) -> torch.Tensor:
    """Row indices for one step: all `n_rows`, or a fresh random `size` of them when 0 < size <
    n_rows (torch's default generator, which `MaskedEditor.edit` seeds)."""
    if 0 < size < n_rows:
        return torch.randperm(n_rows)[:size]
    return torch.arange(n_rows)


@dataclass(frozen=True)
class _StepRows:
    """Which retained samples and replay images one fine-tuning step runs on (indices into each
    set); `replay` is None when the locality term is off."""

    retained: torch.Tensor
    replay: torch.Tensor | None


@dataclass(frozen=True)
class _Objective:
    """The fine-tuning loss over one stacked image batch: edit samples, then retained samples,
    then replay images (each block present only when its term is on)."""

    batch: EditBatch
    settings: EditSettings

    @property
    def n_edit(self) -> int:
        return self.batch.labels.shape[0]

    @property
    def n_retained(self) -> int:
        return self.batch.retain_labels.shape[0] if _uses_retained(self.batch, self.settings) else 0

    def images(self) -> torch.Tensor:
        """(k + m, 3, S, S): the edit and retained samples, whose prefix is cached once. The
        replay set can be far larger than what the steps draw from it, so its draws go through
        the prefix step by step (`replay_images`)."""
        parts = [self.batch.images]
        if self.n_retained:
            parts.append(self.batch.retain_images)
        return torch.cat(parts)

    def replay_images(self, rows: _StepRows) -> torch.Tensor | None:
        """(r, 3, S, S) this step's replay images, or None when the locality term is off."""
        return None if rows.replay is None else self.batch.replay_images[rows.replay]

    def draw(self) -> _StepRows:
        """This step's retained samples (all, or `retention_batch_size` of them) and replay
        images (all, or `replay_batch_size`): large sets at the cost of small ones."""
        retained = _draw(self.n_retained, self.settings.retention_batch_size)
        if not _uses_replay(self.batch, self.settings):
            return _StepRows(retained, None)
        n_replay = self.batch.replay_images.shape[0]
        return _StepRows(retained, _draw(n_replay, self.settings.replay_batch_size))

    def step_rows(self, rows: _StepRows) -> torch.Tensor:
        """Rows of `images()` one step runs on: every edit sample, then the drawn retained."""
        return torch.cat([torch.arange(self.n_edit), self.n_edit + rows.retained])

    def __call__(
        self, logits: torch.Tensor, rows: _StepRows
    ) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """(total loss, edit CE, done?) from the logits of `step_rows(rows)`; done = every edit
        (and drawn retained) sample right and the edit CE at most `ce_stop`."""
        k, m, settings = self.n_edit, len(rows.retained), self.settings
        edit_logits = logits[:k]  # (k, C)
        ce = F.cross_entropy(edit_logits, self.batch.labels)
        right = bool((edit_logits.argmax(1) == self.batch.labels).all())
        loss = ce
        if m:
            retained_logits = logits[k : k + m]  # (m, C)
            labels = self.batch.retain_labels[rows.retained]
            right = right and bool((retained_logits.argmax(1) == labels).all())
            loss = loss + settings.retention_weight * F.cross_entropy(retained_logits, labels)
        if rows.replay is not None:
            log_q = F.log_softmax(logits[k + m :], dim=1)  # (r, C)
            loss = loss + settings.locality_weight * F.kl_div(
                log_q, self.batch.replay_probs[rows.replay], reduction="batchmean"
            )
        return loss, ce, right and ce.item() <= settings.ce_stop


def fit_delta(
    model: nn.Module,
    batch: EditBatch,
    settings: EditSettings,
    delta: DeltaParameterization,
    penalty: Penalty | None = None,
) -> FitResult:
    """Train `delta` with RMSprop until every edit sample is right and CE <= ce_stop.

    The objective is CE on the edit samples, plus `locality_weight * KL(replay_probs ||
    p_edited(replay))` when a replay batch is given (extension (a), see `masked_finetune`; over a
    fresh random `replay_batch_size` of it each step when that is set), plus `retention_weight *
    CE` on earlier edits' samples when given (a fresh `retention_batch_size` of them each step
    when set), plus `penalty(delta.deltas())`. Gradients go only
    to `delta.trainables` (`autograd.grad`, so the model's own `.grad` fields stay untouched);
    the model runs in eval mode and gets its mode back. Losses hold the edit CE before each step
    and at the end (`steps + 1` values).
    """
    objective = _Objective(batch, settings)
    forward = SplitForward(model, list(delta.edited_weights()))
    optimizer = torch.optim.RMSprop(delta.trainables, lr=settings.lr)
    losses: list[float] = []
    with eval_mode(model):
        cached = forward.prefix(objective.images())  # computed once: the prefix is frozen
        step = 0
        while True:
            rows = objective.draw()
            tokens = cached[objective.step_rows(rows)]
            replay = objective.replay_images(rows)
            if replay is not None:
                tokens = torch.cat([tokens, forward.prefix(replay)])
            logits = forward.suffix(tokens, delta.edited_weights())
            loss, ce, done = objective(logits, rows)
            if penalty is not None:
                loss = loss + penalty(delta.deltas())
            losses.append(round(ce.item(), 6))
            if done or step == settings.max_steps:
                return FitResult(step, losses, done)
            grads = torch.autograd.grad(loss, delta.trainables)
            for tensor, grad in zip(delta.trainables, grads, strict=True):
                tensor.grad = grad
            optimizer.step()
            step += 1


def fit_edit_delta(
    model: nn.Module,
    batch: EditBatch,
    settings: EditSettings,
    delta: DeltaParameterization,
    meta: dict[str, Any],
    penalty: Penalty | None = None,
) -> EditDelta:
    """`fit_delta`, then the trained change as an `EditDelta` whose meta records the fit.

    Every editor stores the same fit record (lr, steps, per-step edit CE `losses`, success) next
    to its own `meta`, so edit records compare across methods.
    """
    result = fit_delta(model, batch, settings, delta, penalty)
    record = {
        "lr": settings.lr,
        "steps": result.steps,
        "losses": result.losses,
        "success": result.success,
    }
    return EditDelta(delta.to_params(), {**meta, **record})


def masked_finetune(
    model: nn.Module,
    scope: EditScope,
    unit_mask: torch.Tensor,
    batch: EditBatch,
    settings: EditSettings,
    penalty: Penalty | None = None,
) -> EditDelta:
    """Fine-tune only the masked fc1 rows / fc2 columns of the scope (method.md section 4.3).

    Cross-entropy on the edit samples, RMSprop at `settings.lr`; stops when every edit sample is
    right and CE <= `settings.ce_stop`, or after `settings.max_steps` steps. Only the selected
    units are parameterized, so no other weight can change. `model` is left unchanged.

    Extension (a), beyond the paper: when `settings.locality_weight > 0` and the batch carries a
    replay batch, `locality_weight * KL(replay_probs || p_edited(replay_images))` is added, which
    keeps the pre-edit predictions on clean images (findings.md, second round).

    Args:
        model: the model to edit; left unchanged.
        scope: the FFN window the mask covers.
        unit_mask: (n_mask_entries,) bool, True = this unit may change.
        batch: edit samples (and an optional replay batch).
        settings: learning rate, stopping rule, locality weight.
        penalty: optional weight penalty on W - W0 per parameter (FT-L1 / FT-L2).

    Raises:
        EditError: a bad mask or batch, before anything is trained.

    Returns:
        The delta, with `meta` holding steps, per-step edit CE (`losses`) and `success`.
    """
    if unit_mask.dtype != torch.bool or unit_mask.shape != (scope.n_mask_entries,):
        raise EditError(
            f"unit_mask must be bool of shape ({scope.n_mask_entries},), "
            f"got {unit_mask.dtype} {tuple(unit_mask.shape)}"
        )
    batch.check(*input_spec(model))
    delta = UnitDeltas(model, scope, unit_mask)
    return fit_edit_delta(model, batch, settings, delta, {}, penalty)


def mask_sha256(mask: torch.Tensor) -> str:
    """Short hash of a binary mask, for edit records."""
    return hashlib.sha256(mask.to(torch.uint8).numpy().tobytes()).hexdigest()[:16]


class Editor(Protocol):
    """Every editing method: a pure function of (model, batch, seed) to a delta."""

    def edit(self, model: nn.Module, batch: EditBatch, *, seed: int) -> EditDelta:
        """The delta that fixes `batch`; `model` is left unchanged."""
        ...


@dataclass(frozen=True)
class MaskedEditor:
    """Locator scores -> exact top-k mask -> masked fine-tune: HPRD and the mask baselines.

    The locator and the fine-tune run under `torch.manual_seed(seed)` inside `fork_rng`, so a
    random locator is seeded by the edit and the caller's random state is left alone.

    Attributes:
        name: method name recorded in the delta's meta.
        scope: the FFN window the edit may change.
        locator: where to edit.
        rho: sparsity, the share of mask entries left unedited (0 = dense FT of the scope).
        settings: learning rate, stopping rule, locality term.
        penalty: optional weight penalty on W - W0 (FT-L1 / FT-L2).
    """

    name: str
    scope: EditScope
    locator: Locator
    rho: float
    settings: EditSettings
    penalty: Penalty | None = None

    def edit(self, model: nn.Module, batch: EditBatch, *, seed: int) -> EditDelta:
        """Score, binarize, fine-tune; see `masked_finetune`.

        Raises:
            EditError: bad batch or rho, before any weight changes.
        """
        batch.check(*input_spec(model))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            mask = topk_mask(self.locator.scores(model, self.scope, batch), self.rho)
            delta = masked_finetune(model, self.scope, mask, batch, self.settings, self.penalty)
        meta = {
            "method": self.name,
            "scope_blocks": list(self.scope.blocks),
            "rho": self.rho,
            "n_units": int(mask.sum()),
            "mask_sha256": mask_sha256(mask),
            "seed": seed,
            **delta.meta,
        }
        logger.debug("%s edit: %d steps, success %s", self.name, meta["steps"], meta["success"])
        return EditDelta(delta.params, meta)
