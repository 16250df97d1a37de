"""The methods HPRD is compared against (method.md section 5), all behind the `Editor` protocol.

Mask methods are a `MaskedEditor` with another locator: FT (every unit of the scope, rho 0),
FT-L1 / FT-L2 (FT plus a weight penalty on W - W0), a random mask and a gradient-saliency mask
at the editor's rho. LoRA trains a rank-r update of every block's attention qkv instead.
`DenseDeltas` / `LowRankDeltas` are the whole-matrix parameterizations (plain and rank-r) that
`fit_edit_delta` trains for LoRA here and for attention FT in core/evaluation.py.
`EDITORS` maps a method name to a factory `(scope, settings) -> Editor`; the learned locator
("hprd") joins it where its hypernetwork is loaded.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from core.edit import (
    EditBatch,
    EditDelta,
    Editor,
    MaskedEditor,
    ParamDelta,
    SplitForward,
    eval_mode,
    fit_edit_delta,
    input_spec,
)
from core.errors import EditError
from core.scope import EditScope
from core.settings import EditSettings

EditorFactory = Callable[[EditScope, EditSettings], Editor]


@dataclass(frozen=True)
class FullLocator:
    """Every unit scores the same: with rho 0 the mask is the whole scope (plain FT)."""

    def scores(self, model: nn.Module, scope: EditScope, batch: EditBatch) -> torch.Tensor:
        """(n_mask_entries,) ones."""
        return torch.ones(scope.n_mask_entries)


@dataclass(frozen=True)
class RandomLocator:
    """Uniform random scores: the ablation that tells localizing from mere sparsity.

    Draws from torch's default generator, which `MaskedEditor.edit` seeds with the edit's seed.
    """

    def scores(self, model: nn.Module, scope: EditScope, batch: EditBatch) -> torch.Tensor:
        """(n_mask_entries,) uniform in [0, 1)."""
        return torch.rand(scope.n_mask_entries)


def _unit_norms(grad: torch.Tensor, dim: int) -> torch.Tensor:
    """L2 norm of each slice of `grad` along `dim`: (H,) per fc1 row (dim 0) or fc2 column (1)."""
    return grad.transpose(0, dim).flatten(1).norm(dim=1)


@dataclass(frozen=True)
class SaliencyLocator:
    """Units ranked by the gradient of the edit samples' CE (the idea behind KN and SPT).

    A unit's score is the norm of its slice of the gradient at the base weights: the fc1 row or
    the fc2 column. One backward pass, through the scope and what follows it only.
    """

    def scores(self, model: nn.Module, scope: EditScope, batch: EditBatch) -> torch.Tensor:
        """(n_mask_entries,) per-unit gradient norms, in `scope.param_names` order."""
        named = dict(model.named_parameters())
        weights = {name: named[name].detach().requires_grad_(True) for name in scope.param_names}
        forward = SplitForward(model, list(weights))
        with eval_mode(model):
            logits = forward.suffix(forward.prefix(batch.images), weights)  # (k, C)
            grads = torch.autograd.grad(
                F.cross_entropy(logits, batch.labels), list(weights.values())
            )
        norms = [
            _unit_norms(grad, 0 if ".fc1." in name else 1)
            for name, grad in zip(weights, grads, strict=True)
        ]
        return torch.cat(norms).cpu()


@dataclass(frozen=True)
class CleanSaliencyLocator:
    """Saliency divided by each unit's clean-data importance to a power (a heuristic of ours).

    `clean_importance` is `core.hypernet.clean_unit_importance` of the base model, flattened:
    units the clean predictions lean on rank lower, so at the same rho the edit moves fewer of
    the weights clean images need. The fixed-rule counterpart of hypernet extension (d).
    """

    clean_importance: torch.Tensor  # (n_mask_entries,)
    exponent: float = 0.5

    def scores(self, model: nn.Module, scope: EditScope, batch: EditBatch) -> torch.Tensor:
        """(n_mask_entries,) saliency / clean_importance ** exponent."""
        if self.clean_importance.shape != (scope.n_mask_entries,):
            raise EditError(
                f"clean importance has shape {tuple(self.clean_importance.shape)}, the scope "
                f"needs ({scope.n_mask_entries},); measure it on this model and scope"
            )
        saliency = SaliencyLocator().scores(model, scope, batch)
        return saliency / self.clean_importance.clamp_min(1e-12) ** self.exponent


@dataclass(frozen=True)
class WeightPenalty:
    """FT-L1: c * ||W - W0||_1; FT-L2: c / 2 * ||W - W0||^2, summed over the edited matrices."""

    norm: Literal["l1", "l2"]
    weight: float

    def __call__(self, deltas: dict[str, torch.Tensor]) -> torch.Tensor:
        """The penalty on the current changes `deltas` (name -> W - W0)."""
        if self.norm == "l1":
            return self.weight * sum(delta.abs().sum() for delta in deltas.values())
        return self.weight / 2 * sum(delta.pow(2).sum() for delta in deltas.values())


class _WholeMatrixDeltas:
    """Changes of whole weight matrices: edited weight = base + `deltas()`, stored dense.

    Subclasses set `trainables` and define `deltas()` (the `DeltaParameterization` protocol).
    """

    def __init__(self, model: nn.Module, names: Sequence[str]) -> None:
        named = dict(model.named_parameters())
        self.base = {name: named[name].detach() for name in names}

    def deltas(self) -> dict[str, torch.Tensor]:
        """The current change W - W0 per weight: (out, in)."""
        raise NotImplementedError

    def edited_weights(self) -> dict[str, torch.Tensor]:
        """Base plus the current change, added the way `apply_delta` adds it."""
        return {name: self.base[name] + delta for name, delta in self.deltas().items()}

    def to_params(self) -> dict[str, ParamDelta]:
        """Dense `ParamDelta`s (units None), copied off the trained tensors."""
        return {
            name: ParamDelta(None, 0, delta.detach().cpu().clone())
            for name, delta in self.deltas().items()
        }


class DenseDeltas(_WholeMatrixDeltas):
    """Plain FT of whole weight matrices: the change itself is trained, zero at the start."""

    def __init__(self, model: nn.Module, names: Sequence[str]) -> None:
        super().__init__(model, names)
        self.values = {
            name: torch.zeros_like(weight, requires_grad=True) for name, weight in self.base.items()
        }
        self.trainables = list(self.values.values())

    def deltas(self) -> dict[str, torch.Tensor]:
        """The trained change W - W0 per weight."""
        return dict(self.values)


class LowRankDeltas(_WholeMatrixDeltas):
    """LoRA: W + (alpha / r) * B @ A per weight, A (r, in) random, B (out, r) zero at the start."""

    def __init__(self, model: nn.Module, names: Sequence[str], rank: int, alpha: float) -> None:
        super().__init__(model, names)
        self.scale = alpha / rank
        self.down: dict[str, torch.Tensor] = {}
        self.up: dict[str, torch.Tensor] = {}
        for name, weight in self.base.items():
            down = torch.empty(rank, weight.shape[1], device=weight.device)
            nn.init.kaiming_uniform_(down, a=math.sqrt(5))  # (r, in), as in the LoRA paper's code
            self.down[name] = down.requires_grad_(True)
            self.up[name] = torch.zeros(
                weight.shape[0], rank, device=weight.device, requires_grad=True
            )
        self.trainables = [*self.down.values(), *self.up.values()]

    def deltas(self) -> dict[str, torch.Tensor]:
        """The dense change (alpha / r) * B @ A per weight: (out, in)."""
        return {name: self.scale * (self.up[name] @ self.down[name]) for name in self.base}


@dataclass(frozen=True)
class LoRAEditor:
    """Rank-r LoRA on the attention qkv weight of every block; the delta is stored dense.

    Attributes:
        settings: learning rate, stopping rule, locality term, `lora_rank`, `lora_alpha`.
    """

    settings: EditSettings

    def edit(self, model: nn.Module, batch: EditBatch, *, seed: int) -> EditDelta:
        """Fit A, B (A seeded by `seed`) until the edit samples are fixed; `model` is unchanged.

        Raises:
            EditError: bad batch, or the model has no `attn.qkv` weights (e.g. ConvNeXt).
        """
        batch.check(*input_spec(model))
        names = [name for name, _ in model.named_parameters() if name.endswith("attn.qkv.weight")]
        if not names:
            raise EditError(f"LoRA edits attention qkv weights; {type(model).__name__} has none")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            delta = LowRankDeltas(model, names, self.settings.lora_rank, self.settings.lora_alpha)
        meta = {"method": "lora", "rank": self.settings.lora_rank, "seed": seed}
        return fit_edit_delta(model, batch, self.settings, delta, meta)


def _penalized_ft(norm: Literal["l1", "l2"]) -> EditorFactory:
    """FT-L1 / FT-L2 factory: dense scope FT with `settings.penalty_weight` as c."""

    def make(scope: EditScope, settings: EditSettings) -> Editor:
        penalty = WeightPenalty(norm, settings.penalty_weight)
        return MaskedEditor(f"ft-{norm}", scope, FullLocator(), 0.0, settings, penalty)

    return make


EDITORS: dict[str, EditorFactory] = {
    "ft": lambda scope, settings: MaskedEditor("ft", scope, FullLocator(), 0.0, settings),
    "ft-l1": _penalized_ft("l1"),
    "ft-l2": _penalized_ft("l2"),
    "random": lambda scope, settings: MaskedEditor(
        "random", scope, RandomLocator(), settings.rho, settings
    ),
    "saliency": lambda scope, settings: MaskedEditor(
        "saliency", scope, SaliencyLocator(), settings.rho, settings
    ),
    "lora": lambda scope, settings: LoRAEditor(settings),
}
