"""Scope discovery on the timm families retouch edits, and the window rules."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import timm
import torch
from torch import nn

from core.errors import ConfigError, ModelError
from core.scope import build_scope, default_window, find_ffn_sites


def _deit() -> nn.Module:
    return timm.create_model(
        "deit_tiny_distilled_patch16_224",
        img_size=16,
        patch_size=4,
        embed_dim=32,
        depth=3,
        num_heads=2,
        num_classes=4,
    )


def _swin() -> nn.Module:
    return timm.create_model(
        "swin_tiny_patch4_window7_224",
        img_size=32,
        window_size=4,
        embed_dim=16,
        depths=(1, 2),
        num_heads=(1, 2),
        num_classes=4,
    )


def _convnext() -> nn.Module:
    return timm.create_model(
        "convnext_atto", dims=(8, 16, 24, 32), depths=(1, 1, 2, 1), num_classes=4
    )


@pytest.fixture
def family_models(micro_vit) -> dict[str, Callable[[], nn.Module]]:
    """A builder of a small model per timm family retouch edits."""
    return {"vit": micro_vit, "deit": _deit, "swin": _swin, "convnext": _convnext}


@pytest.mark.parametrize(
    ("family", "expected"),
    [
        ("vit", [(f"blocks.{i}.mlp", 32, 128) for i in range(4)]),
        ("deit", [(f"blocks.{i}.mlp", 32, 128) for i in range(3)]),
        (
            "swin",
            [
                ("layers.0.blocks.0.mlp", 16, 64),
                ("layers.1.blocks.0.mlp", 32, 128),
                ("layers.1.blocks.1.mlp", 32, 128),
            ],
        ),
        (
            "convnext",
            [
                ("stages.0.blocks.0.mlp", 8, 32),
                ("stages.1.blocks.0.mlp", 16, 64),
                ("stages.2.blocks.0.mlp", 24, 96),
                ("stages.2.blocks.1.mlp", 24, 96),
                ("stages.3.blocks.0.mlp", 32, 128),
            ],
        ),
    ],
    ids=["vit", "deit", "swin", "convnext"],
)
def test_sites_are_found_in_forward_order_with_widths_from_the_model(
    family, expected, family_models
):
    # Given a small model of each family
    model = family_models[family]()
    # When its FFNs are discovered
    sites = find_ffn_sites(model)
    # Then module names, input widths and hidden widths match the architecture, in order
    assert [(s.module, s.in_features, s.hidden) for s in sites] == expected
    assert [s.index for s in sites] == list(range(len(expected)))
    for site in sites:
        fc1 = model.get_submodule(f"{site.module}.fc1").weight
        assert fc1.shape[0] == site.hidden


def test_scope_names_widths_and_mask_layout(micro_vit):
    # Given a ViT and the window of FFNs 1-2
    scope = build_scope(micro_vit(), [1, 2])
    # Then the scope lists fc1 then fc2 per block, one mask vector of width H per matrix
    assert scope.blocks == (1, 2)
    assert scope.param_names == (
        "blocks.1.mlp.fc1.weight",
        "blocks.1.mlp.fc2.weight",
        "blocks.2.mlp.fc1.weight",
        "blocks.2.mlp.fc2.weight",
    )
    assert scope.mask_widths == (128, 128, 128, 128)
    assert scope.n_mask_entries == 512


def test_split_and_expand_select_fc1_rows_and_fc2_columns(micro_vit):
    # Given a scope and a flat mask selecting unit 5 of every matrix
    model = micro_vit()
    scope = build_scope(model, [1])
    flat = torch.zeros(scope.n_mask_entries)
    flat[[5, 128 + 5]] = 1
    fc1_mask, fc2_mask = scope.split(flat)
    weights = dict(model.named_parameters())
    # When the unit masks are broadcast to the weights
    fc1 = scope.expand(
        "blocks.1.mlp.fc1.weight", fc1_mask, weights["blocks.1.mlp.fc1.weight"]
    )  # (H, D)
    fc2 = scope.expand(
        "blocks.1.mlp.fc2.weight", fc2_mask, weights["blocks.1.mlp.fc2.weight"]
    )  # (D, H)
    # Then fc1 is masked by row 5 and fc2 by column 5
    assert fc1[5].all()
    assert fc1.sum() == 32
    assert fc2[:, 5].all()
    assert fc2.sum() == 32


def test_split_rejects_a_mask_of_the_wrong_length(micro_vit):
    scope = build_scope(micro_vit(), [1])
    with pytest.raises(ValueError, match="scope needs 256"):
        scope.split(torch.zeros(10))


@pytest.mark.parametrize(
    ("blocks", "message"),
    [
        ([], "empty"),
        ([1, 3], "consecutive"),
        ([2, 1], "consecutive"),
        ([3, 4], "out of range"),
        ([-1, 0], "out of range"),
    ],
)
def test_bad_windows_are_config_errors(blocks, message, micro_vit):
    with pytest.raises(ConfigError, match=message):
        build_scope(micro_vit(), blocks)


def test_a_model_without_ffns_is_a_model_error():
    with pytest.raises(ModelError, match="no Mlp-like FFN"):
        build_scope(nn.Sequential(nn.Linear(4, 4)), [0])


def test_default_window_ends_about_three_quarters_deep():
    assert default_window(12) == [7, 8, 9]  # the paper's best window for ViT-B
    assert default_window(6) == [2, 3, 4]
    assert default_window(2) == [0, 1]
    assert default_window(4, width=2) == [2, 3]
