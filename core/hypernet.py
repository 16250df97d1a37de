"""The mask hypernetwork: where to edit, predicted from the edit sample (method.md section 3).

Owns `MaskHypernet` (frozen base model's CLS feature -> soft mask over the scope's hidden units),
`HypernetLocator` (the Locator protocol of core/edit.py on top of it), the per-unit gradient
statistics of extension (c), the per-unit clean-data importance of extension (d), and checkpoint
I/O that ties a hypernetwork to the weights of the base model it was meta-trained on: a
meta-learned locator does not transfer across base models (method.md section 6), so loading it
beside another model is refused.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from timm.models.vision_transformer import Block
from torch import nn

from core.errors import CheckpointMismatch, ConfigError, EditError, ModelError
from core.model import pooled_features, predict_logits, tensors_hash, weights_hash
from core.scope import EditScope, build_scope
from core.settings import HypernetSettings

GRADIENT_FLOOR = 1e-3  # added to normalised gradient statistics before their log


class EditSamples(Protocol):
    """What a locator reads from core.edit.EditBatch."""

    images: torch.Tensor  # (k, 3, S, S) float, preprocessed
    labels: torch.Tensor  # (k,) int64


class MaskHypernet(nn.Module):
    """CLS feature (B, D) -> soft masks (B, n_mask_entries), flat in `scope.param_names` order.

    One zero-initialised query token per edited matrix (2 per FFN) is prepended to the feature
    token; `n_layers` pre-norm transformer blocks of width D (MLP hidden D, GELU, LayerNorm eps
    1e-6, no dropout) mix them; a final LayerNorm and one Linear(D -> H_i) head per query token
    give the logits; the mask is sigmoid(mask_temperature * logits) clamped to [clamp, 1 - clamp].

    Extension (c), on when `settings.inputs` holds "grad": each query token also gets a
    Linear(H_i -> D) projection of the edit sample's normalised per-unit gradient magnitudes of
    its matrix (`unit_gradient_stats`), and the logits get a learned-gain skip of their log, so
    the locator starts at one-gradient saliency and learns to refine it.

    Extension (d), on when `settings.inputs` also holds "clean": the skip also subtracts a
    learned power (starting at `clean_exponent`) of the log of each unit's importance on clean
    images (`clean_importance`, a buffer set by `build_hypernet` from the base model), so the
    locator starts at saliency divided by clean importance: units the clean data leans on are
    edited last.
    """

    def __init__(self, feature_dim: int, scope: EditScope, settings: HypernetSettings) -> None:
        """Build the network.

        Args:
            feature_dim: D, the width of the base model's pooled pre-logits feature.
            scope: the edit scope; gives the number of query tokens and each head's width.
            settings: the `hypernet` section of params.yaml.

        Raises:
            ConfigError: `n_heads` does not divide D, or `inputs` lacks "cls".
        """
        super().__init__()
        if feature_dim % settings.n_heads:
            raise ConfigError(
                f"hypernet.n_heads={settings.n_heads} must divide the model's feature width "
                f"{feature_dim}; pick a divisor in params.yaml"
            )
        if "cls" not in settings.inputs:
            raise ConfigError(f"hypernet.inputs={list(settings.inputs)} must contain 'cls'")
        if "clean" in settings.inputs and "grad" not in settings.inputs:
            raise ConfigError(
                f"hypernet.inputs={list(settings.inputs)}: 'clean' scales the gradient skip, "
                "so it needs 'grad' too"
            )
        self.settings = settings
        self.feature_dim = feature_dim
        self.scope_blocks = scope.blocks
        self.mask_widths = scope.mask_widths
        norm_layer = partial(nn.LayerNorm, eps=1e-6)
        self.queries = nn.Parameter(torch.zeros(1, len(self.mask_widths), feature_dim))
        self.blocks = nn.Sequential(
            *[
                Block(
                    feature_dim,
                    settings.n_heads,
                    mlp_ratio=1.0,
                    qkv_bias=True,
                    norm_layer=norm_layer,
                )
                for _ in range(settings.n_layers)
            ]
        )
        self.norm = norm_layer(feature_dim)
        self.heads = nn.ModuleList(nn.Linear(feature_dim, width) for width in self.mask_widths)
        projections = [nn.Linear(width, feature_dim) for width in self.mask_widths]
        self.gradient_projections = nn.ModuleList(projections if self.reads_gradients else [])
        if self.reads_gradients:
            # A saliency skip: logits start as gain * log(gradient statistic), so the locator
            # starts out ranking units exactly as one-gradient saliency does and meta-training
            # learns the correction (zero heads), instead of rediscovering saliency from scratch.
            self.gradient_gain = nn.Parameter(torch.ones(len(self.mask_widths)))
            for head in self.heads:
                nn.init.zeros_(head.weight)
                nn.init.zeros_(head.bias)
        if self.reads_clean_importance:
            exponents = torch.full((len(self.mask_widths),), settings.clean_exponent)
            self.clean_gain = nn.Parameter(exponents)
            self.register_buffer("clean_importance", torch.ones(scope.n_mask_entries))

    @property
    def reads_gradients(self) -> bool:
        """Whether extension (c) is on: forward needs per-unit gradient statistics."""
        return "grad" in self.settings.inputs

    @property
    def reads_clean_importance(self) -> bool:
        """Whether extension (d) is on: the skip is divided by clean-data unit importance."""
        return "clean" in self.settings.inputs

    def forward(
        self, features: torch.Tensor, unit_gradients: Sequence[torch.Tensor] | None = None
    ) -> torch.Tensor:
        """Soft masks for a batch of edit samples.

        Args:
            features: (B, D) pooled pre-logits features of the frozen base model.
            unit_gradients: extension (c) only: one (B, H_i) tensor per edited matrix.

        Returns:
            (B, n_mask_entries) soft masks in [clamp, 1 - clamp].
        """
        if features.dim() != 2 or features.shape[1] != self.feature_dim:
            raise ModelError(
                f"hypernetwork expects features of shape (B, {self.feature_dim}), got "
                f"{tuple(features.shape)}; it belongs to a base model of another width"
            )
        queries = self.queries.expand(features.shape[0], -1, -1)  # (B, Q, D)
        if self.reads_gradients:
            if unit_gradients is None:
                raise ModelError(
                    "hypernet.inputs has 'grad': pass unit_gradients to the hypernetwork"
                )
            projected = [
                proj(grad)
                for proj, grad in zip(self.gradient_projections, unit_gradients, strict=True)
            ]
            queries = queries + torch.stack(projected, dim=1)  # (B, Q, D)
        tokens = torch.cat([queries, features[:, None]], dim=1)  # (B, Q + 1, D)
        tokens = self.norm(self.blocks(tokens))
        per_matrix = [head(tokens[:, q]) for q, head in enumerate(self.heads)]  # (B, H_q) each
        if self.reads_gradients:
            per_matrix = [
                logits + self.gradient_gain[q] * torch.log(grad + GRADIENT_FLOOR)
                for q, (logits, grad) in enumerate(zip(per_matrix, unit_gradients, strict=True))
            ]
        if self.reads_clean_importance:
            clean = torch.split(self.clean_importance, self.mask_widths)  # (H_q,) each
            per_matrix = [
                logits - self.clean_gain[q] * torch.log(clean[q] + GRADIENT_FLOOR)
                for q, logits in enumerate(per_matrix)
            ]
        logits = torch.cat(per_matrix, dim=-1)  # (B, n)
        mask = torch.sigmoid(self.settings.mask_temperature * logits)
        return mask.clamp(self.settings.clamp, 1 - self.settings.clamp)


def feature_width(model: nn.Module) -> int:
    """D, the width of `model.forward_head(..., pre_logits=True)` for a timm model."""
    width = getattr(model, "head_hidden_size", None) or getattr(model, "num_features", None)
    if not isinstance(width, int):
        raise ModelError(
            f"{type(model).__name__} has no num_features; retouch needs a timm classifier"
        )
    return width


def build_hypernet(
    model: nn.Module,
    scope: EditScope,
    settings: HypernetSettings,
    seed: int,
    clean_images: torch.Tensor | None = None,
) -> MaskHypernet:
    """A freshly initialised hypernetwork for `model` and `scope`, seeded (global RNG untouched).

    With extension (d) on, its `clean_importance` is measured on the first
    `settings.clean_images` of `clean_images` (preprocessed, (N, 3, S, S)).

    Raises:
        ConfigError: extension (d) is on and no clean images were given.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        hypernet = MaskHypernet(feature_width(model), scope, settings)
    if hypernet.reads_clean_importance:
        if clean_images is None or not len(clean_images):
            raise ConfigError("hypernet.inputs has 'clean': pass clean images to build_hypernet")
        importance = clean_unit_importance(model, scope, clean_images[: settings.clean_images])
        hypernet.clean_importance.copy_(torch.cat(importance))
    return hypernet


def unit_gradient_stats(
    scope: EditScope, weight_grads: Mapping[str, torch.Tensor]
) -> list[torch.Tensor]:
    """Per-hidden-unit gradient magnitudes, normalised per matrix (extension (c)).

    Args:
        scope: the edit scope.
        weight_grads: per edited parameter, per-sample gradients (B, out, in[, 1, 1]).

    Returns:
        One (B, H_i) tensor per matrix in `scope.param_names` order: the L2 norm of each unit's
        row (fc1) or column (fc2), divided by that matrix's root-mean-square unit norm so the
        scale of the loss does not matter (meta-training reads a KL, editing a cross-entropy).
    """
    stats = []
    for name in scope.param_names:
        grad = weight_grads[name]
        grad = grad.reshape(*grad.shape[:3])  # (B, out, in): drops a 1x1 conv's kernel dims
        norms = grad.norm(dim=2 if ".fc1." in name else 1)  # (B, H)
        rms = norms.pow(2).mean(dim=-1, keepdim=True).sqrt().clamp_min(1e-12)
        stats.append(norms / rms)
    return stats


def sample_unit_gradients(
    model: nn.Module, scope: EditScope, images: torch.Tensor, labels: torch.Tensor
) -> list[torch.Tensor]:
    """`unit_gradient_stats` of each edit sample's cross-entropy, one at a time (k is small)."""
    params = dict(model.named_parameters())
    per_sample: list[tuple[torch.Tensor, ...]] = []
    for image, label in zip(images, labels, strict=True):
        weights = {name: params[name].detach().requires_grad_() for name in scope.param_names}
        logits = torch.func.functional_call(model, weights, (image[None],))  # (1, C)
        loss = F.cross_entropy(logits, label[None])
        per_sample.append(torch.autograd.grad(loss, list(weights.values())))
    stacked = {
        name: torch.stack([grads[j] for grads in per_sample])
        for j, name in enumerate(scope.param_names)
    }
    return unit_gradient_stats(scope, stacked)


def clean_unit_importance(
    model: nn.Module, scope: EditScope, images: torch.Tensor
) -> list[torch.Tensor]:
    """How much clean data leans on each hidden unit (extension (d)): one (H_i,) per matrix.

    The root mean square over `images` of `unit_gradient_stats` of the cross-entropy on the
    model's own prediction: a unit whose weights move the clean predictions a lot is a unit an
    edit should touch last. Per-sample normalisation keeps every image's vote equal.
    """
    predicted = predict_logits(model, images).argmax(dim=1)  # (N,)
    per_sample = sample_unit_gradients(model, scope, images, predicted)  # (N, H_i) each
    return [stats.pow(2).mean(dim=0).sqrt() for stats in per_sample]


class HypernetLocator:
    """The Locator protocol on a hypernetwork: mean soft mask over the edit samples.

    Averaging the per-sample masks over a cluster's samples is the product's design
    (method.md section 4, step 1): group edits generalize better than single-sample ones.
    """

    def __init__(self, hypernet: MaskHypernet) -> None:
        """Wrap a (meta-trained) hypernetwork; it is used in eval mode, never trained here."""
        self.hypernet = hypernet.eval()

    def scores(self, model: nn.Module, scope: EditScope, batch: EditSamples) -> torch.Tensor:
        """(n_mask_entries,) mean soft mask of `batch.images` under `model`.

        Raises:
            EditError: `scope` is not the scope the hypernetwork was trained for.
        """
        if (
            scope.blocks != self.hypernet.scope_blocks
            or scope.mask_widths != self.hypernet.mask_widths
        ):
            raise EditError(
                "hypernetwork was meta-trained for scope blocks "
                f"{list(self.hypernet.scope_blocks)}, "
                f"the edit uses {list(scope.blocks)}; set scope.blocks to match or re-run "
                "`retouch metatrain`"
            )
        features = pooled_features(model, batch.images)  # (k, D)
        unit_gradients = None
        if self.hypernet.reads_gradients:
            unit_gradients = sample_unit_gradients(model, scope, batch.images, batch.labels)
        with torch.no_grad():
            return self.hypernet(features, unit_gradients).mean(dim=0)  # (n,)


def save_hypernet(
    path: str | Path,
    hypernet: MaskHypernet,
    base_weights_hash: str,
    scope: EditScope,
    settings: HypernetSettings,
    meta: Mapping[str, Any],
) -> Path:
    """Write the hypernetwork as one safetensors file; its header records what it belongs to.

    Args:
        path: file to write (parent folders are created).
        hypernet: the network.
        base_weights_hash: `weights_hash` of the base model it was meta-trained on.
        scope: its edit scope.
        settings: the `hypernet` section it was built from.
        meta: JSON-ready facts to keep beside it (iterations, final losses, ...).

    Returns:
        The written path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = {
        "base_weights_hash": base_weights_hash,
        "scope_blocks": json.dumps(list(scope.blocks)),
        "feature_dim": str(hypernet.feature_dim),
        "settings": settings.model_dump_json(),
        "meta": json.dumps(dict(meta)),
    }
    state = {
        name: tensor.detach().cpu().contiguous() for name, tensor in hypernet.state_dict().items()
    }
    save_file(state, str(path), metadata=header)
    return path


def hypernet_version(path: str | Path) -> str:
    """Short content hash of a saved hypernetwork: its header and tensors. Not the file's bytes,
    because safetensors writes the header's keys in another order on every save."""
    with safe_open(str(path), framework="pt") as handle:
        header = json.dumps(handle.metadata() or {}, sort_keys=True)
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    return hashlib.sha256(f"{header}|{tensors_hash(tensors)}".encode()).hexdigest()[:16]


def load_hypernet(path: str | Path, base_model: nn.Module) -> MaskHypernet:
    """Load a hypernetwork saved by `save_hypernet`, only beside the base model it belongs to.

    Raises:
        ModelError: the file is missing or not a hypernetwork checkpoint.
        CheckpointMismatch: `base_model`'s weights hash differs from the recorded one.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"hypernetwork checkpoint {path} not found; run `retouch metatrain` first")
    try:
        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
            state = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    except (SafetensorError, OSError) as exc:
        raise ModelError(f"{path} is not a readable safetensors file: {exc}") from exc
    if "base_weights_hash" not in header:
        raise ModelError(
            f"{path} is not a retouch hypernetwork (no base_weights_hash in its header)"
        )
    actual = weights_hash(base_model)
    if header["base_weights_hash"] != actual:
        raise CheckpointMismatch(
            f"hypernetwork {path} was meta-trained on base weights "
            f"{header['base_weights_hash'][:12]}, "
            f"this model's weights hash is {actual[:12]}; re-run `retouch metatrain` for this model"
        )
    scope = build_scope(base_model, json.loads(header["scope_blocks"]))
    settings = HypernetSettings.model_validate_json(header["settings"])
    hypernet = MaskHypernet(int(header["feature_dim"]), scope, settings)
    hypernet.load_state_dict(state)
    return hypernet.eval()
