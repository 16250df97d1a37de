"""Tests of core/hypernet.py: shapes, range, extension (c), the locator, checkpoint I/O."""

from __future__ import annotations

from functools import partial

import pytest
import torch

from core.edit import EditBatch
from core.errors import CheckpointMismatch, ConfigError, EditError, ModelError
from core.hypernet import (
    HypernetLocator,
    MaskHypernet,
    build_hypernet,
    clean_unit_importance,
    hypernet_version,
    load_hypernet,
    save_hypernet,
    unit_gradient_stats,
)
from core.model import pooled_features, weights_hash
from core.scope import EditScope, FFNSite, build_scope


@pytest.fixture
def tiny_vit(micro_vit):
    """The micro ViT (16 px, patch 4, dim 32, depth 4, 4 classes), random init, seeded."""
    return micro_vit()


def test_output_shape_and_range_follow_unequal_scope_widths(micro_settings):
    # Given a scope whose FFNs have different hidden widths
    scope = EditScope((FFNSite(0, "a.mlp", 32, 16), FFNSite(1, "b.mlp", 32, 48)))
    hypernet = MaskHypernet(32, scope, micro_settings.hypernet)
    # When it masks a batch of features with large values
    masks = hypernet(100 * torch.randn(5, 32))
    # Then the masks are (B, 16 + 16 + 48 + 48), clamped, and each head has its matrix's width
    clamp = micro_settings.hypernet.clamp
    assert masks.shape == (5, 128)
    assert masks.min() >= clamp
    assert masks.max() <= 1 - clamp
    assert [head.out_features for head in hypernet.heads] == [16, 16, 48, 48]
    assert torch.all(hypernet.queries == 0)


def test_gradient_extension_reads_unit_gradients(tiny_vit, micro_settings):
    # Given a hypernetwork with extension (c) on
    scope = build_scope(tiny_vit, micro_settings.scope.blocks)
    settings = micro_settings.hypernet.model_copy(update={"inputs": ("cls", "grad")})
    hypernet = build_hypernet(tiny_vit, scope, settings, seed=0)
    features = torch.randn(2, 32)
    gradients = [torch.rand(2, width) for width in scope.mask_widths]
    # When the gradients change, then the masks change; without them it refuses
    first = hypernet(features, gradients)
    second = hypernet(features, [3 * grad.flip(-1) for grad in gradients])
    assert not torch.allclose(first, second)
    with pytest.raises(ModelError, match="unit_gradients"):
        hypernet(features)


def test_untrained_gradient_locator_ranks_units_like_saliency(tiny_vit, micro_settings):
    # Given a fresh hypernetwork with extension (c) and its saliency skip
    scope = build_scope(tiny_vit, micro_settings.scope.blocks)
    settings = micro_settings.hypernet.model_copy(update={"inputs": ("cls", "grad")})
    hypernet = build_hypernet(tiny_vit, scope, settings, seed=0)
    gradients = [torch.rand(1, width) for width in scope.mask_widths]
    # When it scores units, then each matrix's top units are the top-gradient units
    # (only the top: the output clamp merges the lowest scores)
    masks = scope.split(hypernet(torch.randn(1, 32), gradients)[0])
    for mask, grad in zip(masks, gradients, strict=True):
        top = len(grad[0]) // 4
        assert torch.equal(
            mask.topk(top).indices.sort().values, grad[0].topk(top).indices.sort().values
        )


def test_unit_gradient_stats_are_unit_norms_scaled_per_matrix(micro_settings, tiny_vit):
    # Given per-sample gradients where fc1 unit 0's row and fc2 unit 1's column are large
    scope = build_scope(tiny_vit, micro_settings.scope.blocks)
    grads = {}
    for name in scope.param_names:
        weight = dict(tiny_vit.named_parameters())[name]
        grad = torch.ones(3, *weight.shape)
        if ".fc1." in name:
            grad[:, 0, :] = 10
        else:
            grad[:, :, 1] = 10
        grads[name] = grad
    # When the statistics are computed
    stats = unit_gradient_stats(scope, grads)
    # Then each is (B, H), with unit RMS, and the marked unit is the largest
    for stat, name in zip(stats, scope.param_names, strict=True):
        assert stat.shape == (3, 128)
        assert torch.allclose(stat.pow(2).mean(-1), torch.ones(3))
        assert int(stat[0].argmax()) == (0 if ".fc1." in name else 1)


def test_locator_averages_the_samples_masks(tiny_vit, micro_settings):
    # Given a hypernetwork locator and three edit samples
    scope = build_scope(tiny_vit, micro_settings.scope.blocks)
    hypernet = build_hypernet(tiny_vit, scope, micro_settings.hypernet, seed=0)
    batch = EditBatch(torch.randn(3, 3, 16, 16), torch.tensor([0, 1, 2]))
    # When it scores them
    scores = HypernetLocator(hypernet).scores(tiny_vit, scope, batch)
    # Then the score is the mean of the per-sample masks
    expected = hypernet(pooled_features(tiny_vit, batch.images)).mean(0)
    assert scores.shape == (scope.n_mask_entries,)
    assert torch.allclose(scores, expected)


def test_locator_refuses_another_scope(tiny_vit, micro_settings):
    hypernet = build_hypernet(
        tiny_vit, build_scope(tiny_vit, [1, 2]), micro_settings.hypernet, seed=0
    )
    batch = EditBatch(torch.randn(1, 3, 16, 16), torch.tensor([0]))
    with pytest.raises(EditError, match="scope blocks"):
        HypernetLocator(hypernet).scores(tiny_vit, build_scope(tiny_vit, [2, 3]), batch)


def test_checkpoint_round_trip_and_refusal(tiny_vit, micro_settings, tmp_path):
    # Given a saved hypernetwork of the tiny ViT
    scope = build_scope(tiny_vit, micro_settings.scope.blocks)
    hypernet = build_hypernet(tiny_vit, scope, micro_settings.hypernet, seed=0)
    path = save_hypernet(
        tmp_path / "h.safetensors",
        hypernet,
        weights_hash(tiny_vit),
        scope,
        micro_settings.hypernet,
        {"iterations": 0},
    )
    # When it is loaded beside the same model, then it gives the same masks
    features = torch.randn(2, 32)
    assert torch.equal(load_hypernet(path, tiny_vit)(features), hypernet.eval()(features))
    # When the base model's weights change, then loading is refused naming both hashes and the fix
    other = tiny_vit
    with torch.no_grad():
        other.head.bias.add_(1.0)
    with pytest.raises(CheckpointMismatch, match="re-run `retouch metatrain`") as refused:
        load_hypernet(path, other)
    assert weights_hash(other)[:12] in str(refused.value)
    with pytest.raises(ModelError, match="not found"):
        load_hypernet(tmp_path / "missing.safetensors", tiny_vit)


def test_version_follows_the_content_not_the_file_bytes(tiny_vit, micro_settings, tmp_path):
    # Given one hypernetwork saved twice (safetensors orders the header anew on every save)
    scope = build_scope(tiny_vit, micro_settings.scope.blocks)
    hypernet = build_hypernet(tiny_vit, scope, micro_settings.hypernet, seed=0)
    save = partial(
        save_hypernet,
        hypernet=hypernet,
        base_weights_hash=weights_hash(tiny_vit),
        scope=scope,
        settings=micro_settings.hypernet,
    )
    paths = [save(tmp_path / f"{i}.safetensors", meta={"iterations": 3}) for i in range(4)]
    # Then every copy has one version
    assert len({hypernet_version(path) for path in paths}) == 1
    # and another header or another weight gives another version
    other_meta = save(tmp_path / "meta.safetensors", meta={"iterations": 4})
    with torch.no_grad():
        next(hypernet.parameters()).add_(1e-6)
    other_weight = save(tmp_path / "weight.safetensors", meta={"iterations": 3})
    versions = {hypernet_version(path) for path in (paths[0], other_meta, other_weight)}
    assert len(versions) == 3


def test_clean_importance_is_one_positive_value_per_unit(tiny_vit, micro_settings):
    # Given clean images
    scope = build_scope(tiny_vit, micro_settings.scope.blocks)
    images = torch.randn(6, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    # When the units' clean importance is measured
    importance = clean_unit_importance(tiny_vit, scope, images)
    # Then each matrix gets one positive value per hidden unit, at the scale of the per-sample
    # normalised statistics (root mean square 1 per matrix for every image)
    assert [len(values) for values in importance] == list(scope.mask_widths)
    for values in importance:
        assert bool((values > 0).all())
        assert values.pow(2).mean().item() == pytest.approx(1.0, rel=1e-4)


def test_untrained_clean_locator_ranks_by_saliency_over_clean_importance(tiny_vit, micro_settings):
    # Given a fresh hypernetwork with extensions (c) and (d), built on clean images
    scope = build_scope(tiny_vit, micro_settings.scope.blocks)
    settings = micro_settings.hypernet.model_copy(
        update={"inputs": ("cls", "grad", "clean"), "clean_exponent": 1.0}
    )
    images = torch.randn(6, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    hypernet = build_hypernet(tiny_vit, scope, settings, seed=0, clean_images=images)
    importance = clean_unit_importance(tiny_vit, scope, images)
    gradients = [torch.rand(1, width) + 0.5 for width in scope.mask_widths]
    # When it scores units
    masks = scope.split(hypernet(torch.randn(1, 32), gradients)[0])
    # Then each matrix's top units are those of gradient / clean importance, not of the gradient
    ratios = [grad[0] / clean for grad, clean in zip(gradients, importance, strict=True)]
    for mask, ratio in zip(masks, ratios, strict=True):
        top = len(ratio) // 4
        assert torch.equal(
            mask.topk(top).indices.sort().values, ratio.topk(top).indices.sort().values
        )
    top_units = [set(r.topk(len(r) // 4).indices.tolist()) for r in ratios]
    by_gradient = [set(g[0].topk(len(g[0]) // 4).indices.tolist()) for g in gradients]
    assert top_units != by_gradient


def test_clean_extension_needs_gradients_and_clean_images(tiny_vit, micro_settings):
    scope = build_scope(tiny_vit, micro_settings.scope.blocks)
    alone = micro_settings.hypernet.model_copy(update={"inputs": ("cls", "clean")})
    with pytest.raises(ConfigError, match="needs 'grad'"):
        build_hypernet(tiny_vit, scope, alone, seed=0)
    both = micro_settings.hypernet.model_copy(update={"inputs": ("cls", "grad", "clean")})
    with pytest.raises(ConfigError, match="clean images"):
        build_hypernet(tiny_vit, scope, both, seed=0)


def test_clean_importance_survives_the_checkpoint(tiny_vit, micro_settings, tmp_path):
    # Given a saved hypernetwork with extension (d)
    scope = build_scope(tiny_vit, micro_settings.scope.blocks)
    settings = micro_settings.hypernet.model_copy(update={"inputs": ("cls", "grad", "clean")})
    images = torch.randn(6, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    hypernet = build_hypernet(tiny_vit, scope, settings, seed=0, clean_images=images)
    path = save_hypernet(
        tmp_path / "h.safetensors", hypernet, weights_hash(tiny_vit), scope, settings, {}
    )
    # When it is loaded, then it holds the measured importance, not the placeholder ones
    loaded = load_hypernet(path, tiny_vit)
    assert torch.equal(loaded.clean_importance, hypernet.clean_importance)
    assert not torch.equal(loaded.clean_importance, torch.ones_like(loaded.clean_importance))
