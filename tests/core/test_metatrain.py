"""Tests of core/metatrain.py: pseudo-failures, the bi-level math, its batched form, resume."""

from __future__ import annotations

import pytest
import torch

import core.metatrain as metatrain_module
from core.errors import CheckpointMismatch, ConfigError
from core.hypernet import build_hypernet, hypernet_version, load_hypernet
from core.metatrain import (
    PSEUDO_FAILURES,
    KeepTargets,
    TargetBank,
    _loss_and_gradients,
    batched_suffix,
    cutmix,
    distill_bank,
    distill_kl,
    edited_weights,
    fit_mask_logits_batched,
    fit_mask_logits_reference,
    frozen_split,
    inner_loop,
    make_pseudo_failures,
    metatrain,
    scope_weights,
)
from core.model import pooled_features
from core.scope import build_scope

# Small enough for the micro model's curvature: the inner loop fits without diverging.
FAST = ["metatrain.inner_lr=0.001", "metatrain.inner_steps=3", "metatrain.outer_steps=3"]


@pytest.fixture
def settings(tmp_path, micro_settings_factory):
    return micro_settings_factory(tmp_path, FAST)


@pytest.fixture
def sharp_vit(micro_vit):
    """The micro ViT, random init with a larger head so pseudo-failures move its predictions."""
    return micro_vit(head_std=0.2)


@pytest.fixture
def pool():
    return torch.randn(16, 3, 16, 16, generator=torch.Generator().manual_seed(1))


@pytest.fixture
def fixed_batch(sharp_vit, settings, pool):
    """One batch of CutMix pseudo-failures: (clean logits, mixed images, initial mask logits)."""
    generator = torch.Generator().manual_seed(0)
    pseudo = make_pseudo_failures(pool, 4, settings.metatrain, generator)
    n_entries = build_scope(sharp_vit, settings.scope.blocks).n_mask_entries
    initial = torch.rand(4, n_entries, generator=generator) * 2 - 1
    with torch.no_grad():
        return sharp_vit(pseudo.clean), pseudo.mixed, initial


def test_cutmix_pastes_one_patch_aligned_rectangle(settings):
    # Given black images and white donors on a 4 x 4 token grid (patch 4)
    images, donors = torch.zeros(6, 3, 16, 16), torch.ones(6, 3, 16, 16)
    # When CutMix mixes them
    mixed = cutmix(images, donors, 4, settings.metatrain, torch.Generator().manual_seed(0))
    # Then each image holds one pasted rectangle of whole tokens, 1-2 tokens a side (0.2-0.6 of 4)
    for image in mixed[:, 0]:
        rows, cols = image.any(dim=1).nonzero().flatten(), image.any(dim=0).nonzero().flatten()
        assert len(rows) % 4 == 0
        assert len(cols) % 4 == 0
        assert 4 <= len(rows) <= 8
        assert 4 <= len(cols) <= 8
        assert rows[0] % 4 == 0
        assert cols[0] % 4 == 0
        assert image.sum() == len(rows) * len(cols)


@pytest.mark.parametrize("family", sorted(PSEUDO_FAILURES))
def test_every_family_changes_images_and_keeps_shape(family, settings, pool):
    images, donors = pool[:4], pool[4:8]
    mixed = PSEUDO_FAILURES[family](
        images, donors, 4, settings.metatrain, torch.Generator().manual_seed(0)
    )
    assert mixed.shape == images.shape
    assert torch.isfinite(mixed).all()
    assert not torch.allclose(mixed, images)


def test_unknown_family_fails_before_any_work(sharp_vit, tmp_path, micro_settings_factory, pool):
    settings = micro_settings_factory(tmp_path, ["metatrain.pseudo_failures=[cutmix,sepia]"])
    scope = build_scope(sharp_vit, settings.scope.blocks)
    with pytest.raises(ConfigError, match="sepia"):
        metatrain(sharp_vit, scope, pool, settings.metatrain, settings.hypernet, tmp_path / "run")


def test_prefix_cache_gives_the_full_forward(sharp_vit, settings, pool):
    # Given per-sample scope weights
    scope = build_scope(sharp_vit, settings.scope.blocks)
    base = scope_weights(sharp_vit, scope)
    weights = {
        name: w + 0.05 * torch.randn(4, *w.shape) for name, w in base.items()
    }  # (4, out, in)
    split = frozen_split(sharp_vit, scope)
    # When the suffix runs on cached prefix tokens with the weights batched
    batched = batched_suffix(split, split.prefix(pool[:4]), weights)
    # Then each row equals a full forward of that sample with its own weights
    for i in range(4):
        own = {name: w[i] for name, w in weights.items()}
        full = torch.func.functional_call(sharp_vit, own, (pool[i : i + 1],))[0]
        assert torch.allclose(batched[i], full, atol=1e-5)


def test_inner_loop_is_plain_gradient_descent_on_edited_weights(sharp_vit, settings, fixed_batch):
    # Given a fixed mask and the edit loss of one batch
    clean_logits, mixed, initial = fixed_batch
    scope = build_scope(sharp_vit, settings.scope.blocks)
    base, meta = scope_weights(sharp_vit, scope), settings.metatrain
    masks = torch.sigmoid(meta.logit_scale * initial)

    def edit_loss(weights):
        per_sample = [
            torch.func.functional_call(
                sharp_vit, {n: w[i] for n, w in weights.items()}, (mixed[i : i + 1],)
            )
            for i in range(4)
        ]
        return distill_kl(torch.cat(per_sample), clean_logits, meta.temperature)

    # When the inner loop runs (first step from the cached gradient at W)
    at_base = {name: w.expand(4, *w.shape) for name, w in base.items()}
    delta = inner_loop(
        scope, edit_loss, base, masks, _loss_and_gradients(edit_loss, at_base)[1], meta
    )
    # Then it equals d <- d - lr * dL/dV at V = W + m * d, from d = 0, inner_steps times
    expected = {name: torch.zeros(4, *w.shape) for name, w in base.items()}
    for _ in range(meta.inner_steps):
        _, grads = _loss_and_gradients(edit_loss, edited_weights(scope, base, masks, expected))
        expected = {name: expected[name] - meta.inner_lr * grads[name] for name in expected}
    for name in base:
        assert torch.allclose(delta[name], expected[name], atol=1e-6)


def test_inner_loop_reduces_the_edit_kl(sharp_vit, settings, fixed_batch):
    clean_logits, mixed, initial = fixed_batch
    scope = build_scope(sharp_vit, settings.scope.blocks)
    split = frozen_split(sharp_vit, scope)
    meta = settings.metatrain.model_copy(update={"outer_steps": 1, "inner_steps": 5})
    fit = fit_mask_logits_batched(split, scope, mixed, clean_logits, initial, meta)
    assert fit.kl_after.mean() < 0.5 * fit.kl_before.mean()


def test_batched_fit_equals_the_per_sample_loop(sharp_vit, settings, fixed_batch):
    # Given one batch of pseudo-failures
    clean_logits, mixed, initial = fixed_batch
    scope = build_scope(sharp_vit, settings.scope.blocks)
    split = frozen_split(sharp_vit, scope)
    # When the masks are fitted batched and one sample at a time
    batched = fit_mask_logits_batched(
        split, scope, mixed, clean_logits, initial, settings.metatrain
    )
    reference = fit_mask_logits_reference(
        sharp_vit, scope, mixed, clean_logits, initial, settings.metatrain
    )
    # Then both find the same logits and losses
    assert torch.allclose(batched.logits, reference.logits, atol=1e-4)
    assert torch.allclose(batched.kl_final, reference.kl_final, rtol=1e-3, atol=1e-6)
    assert batched.outer_losses == pytest.approx(reference.outer_losses, rel=1e-3)


def test_siblings_carry_the_same_corruption_on_other_images(settings, pool):
    # Given CutMix pseudo-failures drawn with siblings
    pseudo = make_pseudo_failures(
        pool, 4, settings.metatrain, torch.Generator().manual_seed(3), siblings=True
    )
    # Then each sibling is another clean image with the same donor rectangle pasted in
    for i in range(settings.metatrain.batch_size):
        pasted = (pseudo.mixed[i] != pseudo.clean[i]).any(0)  # (S, S)
        assert pasted.any()
        assert not torch.equal(pseudo.sibling_clean[i], pseudo.clean[i])
        assert torch.equal(pseudo.sibling_mixed[i][:, pasted], pseudo.mixed[i][:, pasted])
        assert torch.equal(pseudo.sibling_mixed[i][:, ~pasted], pseudo.sibling_clean[i][:, ~pasted])


def test_batched_fit_with_keep_targets_equals_the_per_sample_loop(
    sharp_vit, settings, fixed_batch, pool
):
    # Given one batch and the extension's extra outer terms (sibling-like and replay images)
    clean_logits, mixed, initial = fixed_batch
    scope = build_scope(sharp_vit, settings.scope.blocks)
    split = frozen_split(sharp_vit, scope)
    with torch.no_grad():
        keep = [
            KeepTargets(pool[4:8], sharp_vit(pool[8:12]), 0.5),
            KeepTargets(pool[12:16], sharp_vit(pool[12:16]), 2.0),
        ]
    # When fitted batched and one sample at a time
    batched = fit_mask_logits_batched(
        split, scope, mixed, clean_logits, initial, settings.metatrain, keep
    )
    reference = fit_mask_logits_reference(
        sharp_vit, scope, mixed, clean_logits, initial, settings.metatrain, keep
    )
    plain = fit_mask_logits_batched(split, scope, mixed, clean_logits, initial, settings.metatrain)
    # Then both agree, and the extra terms changed what the outer loop found
    assert torch.allclose(batched.logits, reference.logits, atol=1e-4)
    assert batched.outer_losses == pytest.approx(reference.outer_losses, rel=1e-3)
    assert not torch.allclose(batched.logits, plain.logits, atol=1e-3)


def test_outer_loop_and_distillation_reduce_their_losses(sharp_vit, settings, fixed_batch):
    # Given a fitted batch and a fresh hypernetwork
    clean_logits, mixed, initial = fixed_batch
    scope = build_scope(sharp_vit, settings.scope.blocks)
    split = frozen_split(sharp_vit, scope)
    fit = fit_mask_logits_batched(split, scope, mixed, clean_logits, initial, settings.metatrain)
    targets = torch.sigmoid(settings.metatrain.target_scale * fit.logits)
    meta = settings.metatrain.model_copy(update={"iterations": 1000, "distill_lr": 1e-3})
    state = metatrain_module._new_state(sharp_vit, scope, meta, settings.hypernet, mixed)
    features = pooled_features(sharp_vit, mixed)
    # When it distills the same targets for 50 iterations
    bces = [metatrain_module._distill(state, features, None, targets, meta) for _ in range(50)]
    # Then the outer loss fell, and the BCE fell below that of the best constant mask
    constant = targets.mean(0, keepdim=True).expand_as(targets)
    assert fit.outer_losses[-1] < fit.outer_losses[0]
    assert bces[-1] < 0.5 * bces[0]
    assert bces[-1] < torch.nn.functional.binary_cross_entropy(constant, targets).item()


def test_bank_distillation_learns_sample_specific_masks(sharp_vit, settings):
    # Given a bank of 96 targets that depend on the input feature
    scope = build_scope(sharp_vit, settings.scope.blocks)
    hypernet = build_hypernet(sharp_vit, scope, settings.hypernet, seed=0)
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(96, 32, generator=generator)
    mixing = torch.randn(32, scope.n_mask_entries, generator=generator)
    bank = TargetBank()
    for rows in torch.arange(96).split(8):
        bank.add(features[rows], None, torch.sigmoid(3 * features[rows] @ mixing / 6))
    meta = settings.metatrain.model_copy(update={"bank_epochs": 40, "bank_holdout": 0.25})
    # When the hypernetwork takes 40 passes over three quarters of it
    report = distill_bank(hypernet, bank, meta)
    # Then on the held-out quarter it beats where it started and the best constant mask
    assert report["bank_samples"] == 96
    assert report["bank_heldout_bce"] < report["bank_heldout_bce_before"]
    assert report["bank_heldout_bce"] < report["bank_heldout_constant_bce"]


@pytest.mark.parametrize("bank_epochs", [0, 2])
def test_resume_equals_an_uninterrupted_run(
    sharp_vit, settings, pool, tmp_path, monkeypatch, bank_epochs
):
    # Given an uninterrupted 4-iteration run, checkpointing every 2 (with a target bank or not)
    scope = build_scope(sharp_vit, settings.scope.blocks)
    meta = settings.metatrain.model_copy(update={"bank_epochs": bank_epochs})
    hyper = settings.hypernet
    whole = metatrain(sharp_vit, scope, pool, meta, hyper, tmp_path / "whole")
    # When another run is killed during iteration 3 and started again
    real_iteration = metatrain_module._run_iteration

    def crash_at_third(state, *args):
        if state.iteration == 2:
            raise KeyboardInterrupt
        return real_iteration(state, *args)

    monkeypatch.setattr(metatrain_module, "_run_iteration", crash_at_third)
    with pytest.raises(KeyboardInterrupt):
        metatrain(sharp_vit, scope, pool, meta, hyper, tmp_path / "resumed")
    monkeypatch.setattr(metatrain_module, "_run_iteration", real_iteration)
    resumed = metatrain(sharp_vit, scope, pool, meta, hyper, tmp_path / "resumed")
    # Then it resumed from iteration 2 and ends with the same network and history
    assert resumed.resumed_from == 2
    for name, tensor in whole.hypernet.state_dict().items():
        assert torch.equal(tensor, resumed.hypernet.state_dict()[name]), name
    assert [s.outer_loss for s in resumed.history] == [s.outer_loss for s in whole.history]
    assert torch.equal(
        load_hypernet(resumed.hypernet_path, sharp_vit)(torch.ones(1, 32)),
        whole.hypernet(torch.ones(1, 32)),
    )
    # and the saved file has the same version (no timing in its header)
    assert hypernet_version(resumed.hypernet_path) == hypernet_version(whole.hypernet_path)


def test_finished_run_redistilled_from_its_bank_equals_a_fresh_run(
    sharp_vit, settings, pool, tmp_path
):
    # Given a finished 2-iteration run with one bank epoch
    scope = build_scope(sharp_vit, settings.scope.blocks)
    few, many = (
        settings.metatrain.model_copy(update={"iterations": 2, "bank_epochs": epochs})
        for epochs in (1, 3)
    )
    metatrain(sharp_vit, scope, pool, few, settings.hypernet, tmp_path / "run")
    # When it is run again with three bank epochs, and a fresh run uses three from the start
    again = metatrain(sharp_vit, scope, pool, many, settings.hypernet, tmp_path / "run")
    fresh = metatrain(sharp_vit, scope, pool, many, settings.hypernet, tmp_path / "fresh")
    # Then the rerun resumed after the last iteration and ends with the fresh run's network
    assert again.resumed_from == 2
    for name, tensor in fresh.hypernet.state_dict().items():
        assert torch.equal(tensor, again.hypernet.state_dict()[name]), name


def test_checkpoint_of_another_base_model_is_refused(sharp_vit, settings, pool, tmp_path):
    # Given a finished run of one base model
    scope = build_scope(sharp_vit, settings.scope.blocks)
    meta = settings.metatrain.model_copy(update={"iterations": 1})
    metatrain(sharp_vit, scope, pool, meta, settings.hypernet, tmp_path / "run")
    # When the same folder is used for a model with other weights, then it is refused
    with torch.no_grad():
        sharp_vit.head.bias.add_(1.0)
    with pytest.raises(CheckpointMismatch, match="base weights"):
        metatrain(sharp_vit, scope, pool, meta, settings.hypernet, tmp_path / "run")
