"""The edit scope: which FFN weight matrices an edit may touch, discovered from the model.

Any timm model whose FFNs are `Mlp`-like modules (`fc1 -> act -> fc2`) works: ViT and DeiT
(`blocks.{i}.mlp`), Swin (`layers.{s}.blocks.{j}.mlp`), ConvNeXt (`stages.{s}.blocks.{j}.mlp`).
FFNs are numbered in forward order; a scope is a window of consecutive FFN indices.

Masks are structured over hidden units: one vector per edited matrix, of that FFN's hidden
width H. For fc1 (H x D) the mask selects rows; for fc2 (D x H) it selects columns. A scope's
masks travel as one flat vector, the per-matrix vectors concatenated in `param_names` order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from core.errors import ConfigError, ModelError


@dataclass(frozen=True)
class FFNSite:
    """One FFN of the model."""

    index: int  # position among the model's FFNs, in forward order
    module: str  # dotted module name, e.g. "blocks.3.mlp"
    in_features: int  # D: the FFN's input (token) width
    hidden: int  # H: the FFN's hidden width


def _weight_dims(layer: nn.Module) -> tuple[int, int] | None:
    """(out, in) of a Linear or 1x1 Conv2d, else None."""
    if isinstance(layer, nn.Linear):
        return layer.out_features, layer.in_features
    if isinstance(layer, nn.Conv2d) and layer.kernel_size == (1, 1):
        return layer.out_channels, layer.in_channels
    return None


def find_ffn_sites(model: nn.Module) -> list[FFNSite]:
    """All FFNs of `model` with fc1/fc2 Linear (or 1x1 conv) layers, in forward order."""
    sites: list[FFNSite] = []
    for name, module in model.named_modules():
        fc1, fc2 = getattr(module, "fc1", None), getattr(module, "fc2", None)
        if fc1 is None or fc2 is None:
            continue
        dims1, dims2 = _weight_dims(fc1), _weight_dims(fc2)
        if dims1 is None or dims2 is None or dims1[0] != dims2[1]:
            continue
        sites.append(FFNSite(len(sites), name, in_features=dims1[1], hidden=dims1[0]))
    return sites


@dataclass(frozen=True)
class EditScope:
    """A window of consecutive FFNs whose fc1/fc2 weights (not biases) may change."""

    sites: tuple[FFNSite, ...]

    @property
    def blocks(self) -> tuple[int, ...]:
        """FFN indices in the window."""
        return tuple(site.index for site in self.sites)

    @property
    def param_names(self) -> tuple[str, ...]:
        """Edited parameter names: per FFN, fc1.weight then fc2.weight."""
        return tuple(f"{s.module}.{fc}.weight" for s in self.sites for fc in ("fc1", "fc2"))

    @property
    def mask_widths(self) -> tuple[int, ...]:
        """Length of the mask vector of each edited matrix, in `param_names` order."""
        return tuple(s.hidden for s in self.sites for _ in ("fc1", "fc2"))

    @property
    def n_mask_entries(self) -> int:
        """Total entries of a flat scope mask."""
        return sum(self.mask_widths)

    def split(self, flat_mask: torch.Tensor) -> list[torch.Tensor]:
        """Cut a flat mask (..., n_mask_entries) into one (..., H) vector per edited matrix."""
        if flat_mask.shape[-1] != self.n_mask_entries:
            raise ValueError(
                f"mask has {flat_mask.shape[-1]} entries, scope needs {self.n_mask_entries}"
            )
        return list(torch.split(flat_mask, self.mask_widths, dim=-1))

    def expand(
        self, param_name: str, unit_mask: torch.Tensor, weight: torch.Tensor
    ) -> torch.Tensor:
        """Broadcast a hidden-unit mask (H,) to the full shape of `weight`.

        fc1 weights (H, D[, 1, 1]) are masked by row, fc2 weights (D, H[, 1, 1]) by column.
        """
        dim = 0 if ".fc1." in param_name else 1
        shape = [1] * weight.dim()
        shape[dim] = unit_mask.shape[-1]
        return unit_mask.reshape(shape).to(weight.dtype).expand_as(weight)


def build_scope(model: nn.Module, blocks: Sequence[int]) -> EditScope:
    """The scope over FFN indices `blocks` (consecutive, ascending) of `model`.

    Raises:
        ModelError: the model has no fc1/fc2 FFNs.
        ConfigError: `blocks` is empty, not consecutive, or out of range.
    """
    sites = find_ffn_sites(model)
    if not sites:
        raise ModelError(
            f"{type(model).__name__} has no Mlp-like FFN (modules with fc1/fc2 Linear layers); "
            "retouch edits timm ViT, DeiT, Swin and ConvNeXt style models"
        )
    blocks = list(blocks)
    if not blocks:
        raise ConfigError("scope.blocks is empty; name at least one FFN index")
    if blocks != list(range(blocks[0], blocks[0] + len(blocks))):
        raise ConfigError(f"scope.blocks {blocks} must be consecutive and ascending")
    if blocks[0] < 0 or blocks[-1] >= len(sites):
        raise ConfigError(
            f"scope.blocks {blocks} out of range: the model has FFNs 0..{len(sites) - 1}; set "
            "scope.blocks to a window inside them (`retouch scope-search` recommends one)"
        )
    return EditScope(tuple(sites[i] for i in blocks))


def default_window(n_ffn: int, width: int = 3) -> list[int]:
    """The prior window of `width` FFNs ending about 3/4 deep (method.md section 2)."""
    width = min(width, n_ffn)
    # The last FFN of the window sits at index floor(3/4 n): ViT-B (12) gets 7-9 as in the paper.
    end = min(n_ffn, max(width, int(0.75 * n_ffn) + 1))  # exclusive end of the window
    return list(range(end - width, end))
