"""The baselines behind one Editor contract, and what each locator ranks."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from core.baselines import (
    EDITORS,
    CleanSaliencyLocator,
    FullLocator,
    RandomLocator,
    SaliencyLocator,
    WeightPenalty,
)
from core.edit import EditBatch, EditDelta, apply_delta, topk_mask
from core.errors import EditError
from core.scope import build_scope
from core.settings import EditSettings

SETTINGS = EditSettings(lr=1e-2, max_steps=40, rho=0.75)


@pytest.fixture
def model(micro_vit) -> nn.Module:
    """Micro ViT whose head has a trained model's logit spread (timm's random head is ~0)."""
    return micro_vit(head_std=0.3)


@pytest.fixture
def batch(model) -> EditBatch:
    """Two random images labelled with a class the model does not predict."""
    images = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        predictions = model(images).argmax(1)
    return EditBatch(images, (predictions + 1) % 4)


def allowed_parameters(name: str, scope) -> set[str]:
    if name == "lora":
        return {f"blocks.{i}.attn.qkv.weight" for i in range(4)}
    return set(scope.param_names)


# --- the common contract, over every editor ----------------------------------------------------


@pytest.mark.parametrize("name", sorted(EDITORS))
def test_editor_contract(name, model, batch, tmp_path):
    # Given an editor built from its name, and a snapshot of the model
    scope = build_scope(model, [1, 2])
    editor = EDITORS[name](scope, SETTINGS)
    before = {key: value.clone() for key, value in model.state_dict().items()}
    rng_before = torch.get_rng_state()
    # When it edits twice with the same seed
    delta = editor.edit(model, batch, seed=3)
    again = editor.edit(model, batch, seed=3)
    # Then the model, its gradients, its mode and the global RNG are untouched
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert all(parameter.grad is None for parameter in model.parameters())
    assert not model.training
    assert torch.equal(torch.get_rng_state(), rng_before)
    # and only allowed parameters are touched, the same seed gives the same delta,
    assert set(delta.touched_parameters()) <= allowed_parameters(name, scope)
    assert again.sha256() == delta.sha256()
    # the delta survives disk, and it fixes the edit samples
    loaded = EditDelta.load(delta.save(tmp_path / name))
    assert loaded.sha256() == delta.sha256()
    apply_delta(model, loaded)
    with torch.no_grad():
        assert (model(batch.images).argmax(1) == batch.labels).all()
    assert loaded.meta["method"] == name
    assert loaded.meta["seed"] == 3


@pytest.mark.parametrize("name", sorted(EDITORS))
def test_editor_refuses_a_bad_label_before_any_change(name, model, batch):
    scope = build_scope(model, [1, 2])
    before = {key: value.clone() for key, value in model.state_dict().items()}
    bad = EditBatch(batch.images, torch.tensor([0, 9]))
    with pytest.raises(EditError, match="outside"):
        EDITORS[name](scope, SETTINGS).edit(model, bad, seed=0)
    assert all(torch.equal(value, before[key]) for key, value in model.state_dict().items())


# --- locators ----------------------------------------------------------------------------------


def test_full_locator_with_rho_zero_selects_the_whole_scope(model, batch):
    scope = build_scope(model, [1, 2])
    assert topk_mask(FullLocator().scores(model, scope, batch), 0.0).all()


def test_random_editor_masks_depend_on_the_seed_only(model, batch):
    scope = build_scope(model, [1, 2])
    editor = EDITORS["random"](scope, SETTINGS)
    hashes = [editor.edit(model, batch, seed=seed).meta["mask_sha256"] for seed in (0, 0, 1)]
    assert hashes[0] == hashes[1] != hashes[2]


def test_random_locator_scores_are_uniform_in_unit_interval(model, batch):
    scope = build_scope(model, [1, 2])
    scores = RandomLocator().scores(model, scope, batch)
    assert scores.shape == (scope.n_mask_entries,)
    assert scores.min() >= 0
    assert scores.max() < 1


def test_saliency_scores_are_per_unit_gradient_norms(model, batch):
    # Given the CE gradient of the edit samples w.r.t. the scope weights, by plain autograd
    scope = build_scope(model, [1, 2])
    probe = copy.deepcopy(model)
    F.cross_entropy(probe(batch.images), batch.labels).backward()
    grads = dict(probe.named_parameters())
    expected = [
        grads[name].grad.norm(dim=1 if ".fc1." in name else 0) for name in scope.param_names
    ]  # fc1 rows, fc2 columns
    # When the saliency locator scores the scope
    scores = SaliencyLocator().scores(model, scope, batch)
    # Then each unit's score is its row / column gradient norm
    torch.testing.assert_close(scores, torch.cat(expected), rtol=1e-4, atol=1e-7)
    assert all(parameter.grad is None for parameter in model.parameters())


# --- penalties and LoRA ------------------------------------------------------------------------


def test_weight_penalties_on_a_hand_made_delta():
    deltas = {"a": torch.tensor([1.0, -2.0]), "b": torch.tensor([[3.0]])}
    assert WeightPenalty("l1", 0.1)(deltas).item() == pytest.approx(0.6)
    assert WeightPenalty("l2", 0.1)(deltas).item() == pytest.approx(0.7)


def test_l2_penalty_keeps_the_delta_smaller_than_plain_ft(model, batch):
    scope = build_scope(model, [1, 2])
    settings = EditSettings(lr=1e-2, max_steps=10, ce_stop=1e-6, penalty_weight=100.0)

    def size(name: str) -> float:
        delta = EDITORS[name](scope, settings).edit(model, batch, seed=0)
        return sum(change.values.pow(2).sum().item() for change in delta.params.values())

    assert size("ft-l2") < size("ft")


def test_lora_delta_is_dense_and_low_rank(model, batch):
    scope = build_scope(model, [1, 2])
    delta = EDITORS["lora"](scope, SETTINGS).edit(model, batch, seed=0)
    for change in delta.params.values():
        assert change.units is None
        assert change.values.shape == (96, 32)
        assert torch.linalg.matrix_rank(change.values) <= SETTINGS.lora_rank


def test_lora_needs_attention_weights():
    convnext = timm.create_model(
        "convnext_atto", dims=(8, 16, 24, 32), depths=(1, 1, 1, 1), num_classes=4
    )
    scope = build_scope(convnext, [1])
    images = torch.zeros(1, 3, 16, 16)
    with pytest.raises(EditError, match="qkv"):
        EDITORS["lora"](scope, SETTINGS).edit(
            convnext.eval(), EditBatch(images, torch.tensor([0])), seed=0
        )


def test_masked_editors_edit_a_convnext_through_the_full_forward():
    # Given a ConvNeXt (no prefix cache: the generic forward path) and an image it gets "wrong"
    torch.manual_seed(0)
    convnext = timm.create_model(  # layer scale 1, not timm's 1e-6: a random FFN must matter
        "convnext_atto", dims=(8, 16, 24, 32), depths=(1, 1, 1, 1), num_classes=4, ls_init_value=1.0
    ).eval()
    nn.init.normal_(convnext.head.fc.weight, std=0.3)
    scope = build_scope(convnext, [2, 3])
    image = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        label = (convnext(image).argmax(1) + 1) % 4
    # When saliency edits it
    delta = EDITORS["saliency"](scope, SETTINGS).edit(convnext, EditBatch(image, label), seed=0)
    # Then only scope weights change and the edit sample is fixed
    assert set(delta.touched_parameters()) <= set(scope.param_names)
    apply_delta(convnext, delta)
    with torch.no_grad():
        assert convnext(image).argmax(1).item() == label.item()


def test_clean_saliency_is_saliency_when_clean_importance_is_flat(model, batch):
    scope = build_scope(model, [1, 2])
    flat = CleanSaliencyLocator(torch.full((scope.n_mask_entries,), 2.0), exponent=1.0)
    saliency = SaliencyLocator().scores(model, scope, batch)
    assert torch.allclose(flat.scores(model, scope, batch), saliency / 2.0)


def test_clean_saliency_demotes_units_clean_data_leans_on(model, batch):
    # Given clean importance that is huge for the unit saliency ranks first
    scope = build_scope(model, [1, 2])
    saliency = SaliencyLocator().scores(model, scope, batch)
    importance = torch.ones(scope.n_mask_entries)
    importance[saliency.argmax()] = 1e6
    # When the clean-saliency locator scores the same edit, then that unit is no longer first
    scores = CleanSaliencyLocator(importance, exponent=0.5).scores(model, scope, batch)
    assert scores.argmax() != saliency.argmax()
    with pytest.raises(EditError, match="clean importance has shape"):
        CleanSaliencyLocator(torch.ones(3)).scores(model, scope, batch)
