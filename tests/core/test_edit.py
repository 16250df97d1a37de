"""Edit requests, exact top-k, masked fine-tuning, and reversible, reproducible deltas."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from torch import nn

from core.edit import (
    EditBatch,
    EditDelta,
    MaskedEditor,
    ParamDelta,
    SplitForward,
    apply_delta,
    masked_finetune,
    restore,
    topk_mask,
)
from core.errors import EditError
from core.scope import EditScope, build_scope
from core.settings import EditSettings

SETTINGS = EditSettings(lr=1e-2, max_steps=30)


@pytest.fixture
def model(micro_vit) -> nn.Module:
    """Micro ViT whose head has a trained model's logit spread (timm's random head is ~0)."""
    return micro_vit(head_std=0.3)


@pytest.fixture
def scope(model) -> EditScope:
    return build_scope(model, [1, 2])


def wrong_batch(model: nn.Module, k: int = 2, seed: int = 1) -> EditBatch:
    """k random images labelled with a class the model does not predict."""
    images = torch.randn(k, 3, 16, 16, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        predictions = model(images).argmax(1)
    return EditBatch(images, (predictions + 1) % 4)


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.clone() for name, tensor in model.state_dict().items()}


def assert_same_bits(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]) -> None:
    assert first.keys() == second.keys()
    for name in first:
        assert torch.equal(first[name], second[name]), name


# --- EditBatch ---------------------------------------------------------------------------------


def test_empty_batch_is_rejected():
    with pytest.raises(EditError, match="at least one"):
        EditBatch(torch.zeros(0, 3, 16, 16), torch.zeros(0, dtype=torch.int64))


def test_labels_must_be_int64_one_per_image():
    with pytest.raises(EditError, match="int64"):
        EditBatch(torch.zeros(2, 3, 16, 16), torch.zeros(2, dtype=torch.int32))
    with pytest.raises(EditError, match=r"shape \(2,\)"):
        EditBatch(torch.zeros(2, 3, 16, 16), torch.zeros(3, dtype=torch.int64))


def test_replay_images_need_their_probabilities():
    with pytest.raises(EditError, match="together"):
        EditBatch(
            torch.zeros(1, 3, 16, 16), torch.zeros(1, dtype=torch.int64), torch.zeros(2, 3, 16, 16)
        )


def test_retained_samples_need_int64_labels_of_their_own():
    images, labels = torch.zeros(1, 3, 16, 16), torch.zeros(1, dtype=torch.int64)
    with pytest.raises(EditError, match="together"):
        EditBatch(images, labels, retain_images=images)
    with pytest.raises(EditError, match="retained"):
        EditBatch(images, labels, retain_images=images, retain_labels=labels.int())


def test_retained_labels_outside_the_classes_are_refused(model, scope):
    images, labels = torch.zeros(1, 3, 16, 16), torch.zeros(1, dtype=torch.int64)
    batch = EditBatch(images, labels, retain_images=images, retain_labels=torch.tensor([9]))
    with pytest.raises(EditError, match="retained labels"):
        MaskedEditor("random", scope, _Ones(), 0.5, SETTINGS).edit(model, batch, seed=0)


@pytest.mark.parametrize(
    ("images", "labels", "message"),
    [
        (torch.zeros(1, 3, 16, 16), torch.tensor([4]), "outside"),
        (torch.zeros(1, 3, 16, 16), torch.tensor([-1]), "outside"),
        (torch.zeros(1, 3, 32, 32), torch.tensor([0]), "the model needs"),
        (torch.zeros(1, 1, 16, 16), torch.tensor([0]), "the model needs"),
    ],
    ids=["label-too-big", "label-negative", "wrong-size", "wrong-channels"],
)
def test_bad_requests_fail_before_any_weight_changes(model, scope, images, labels, message):
    # Given a bad request
    batch = EditBatch(images, labels)
    before = state(model)
    # When it is edited, then it is refused and the model is untouched
    with pytest.raises(EditError, match=message):
        MaskedEditor("random", scope, _Ones(), 0.5, SETTINGS).edit(model, batch, seed=0)
    assert_same_bits(before, state(model))


class _Ones:
    def scores(self, model, scope, batch):
        return torch.ones(scope.n_mask_entries)


@pytest.mark.parametrize("rho", [1.0, -0.1, 1.5])
def test_rho_outside_zero_one_fails_before_any_weight_changes(model, scope, rho):
    before = state(model)
    with pytest.raises(EditError, match=r"edit\.rho"):
        MaskedEditor("random", scope, _Ones(), rho, SETTINGS).edit(
            model, wrong_batch(model), seed=0
        )
    assert_same_bits(before, state(model))


# --- topk_mask ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "rho", "k"), [(512, 0.9, 51), (512, 0.0, 512), (10, 0.25, 8), (10, 0.99, 1)]
)
def test_topk_keeps_exactly_k(n, rho, k):
    scores = torch.rand(n, generator=torch.Generator().manual_seed(0))
    mask = topk_mask(scores, rho)
    assert mask.dtype == torch.bool
    assert int(mask.sum()) == k
    assert torch.equal(mask.nonzero().flatten(), scores.topk(k).indices.sort().values)


def test_topk_breaks_ties_toward_the_lower_index():
    scores = torch.tensor([1.0, 2.0, 2.0, 2.0, 0.0])
    assert topk_mask(scores, 0.6).tolist() == [False, True, True, False, False]


def test_topk_rejects_nan_scores():
    with pytest.raises(EditError, match="finite"):
        topk_mask(torch.tensor([1.0, float("nan")]), 0.5)


# --- masked fine-tuning ------------------------------------------------------------------------


def test_masked_finetune_moves_only_the_selected_rows_and_columns(model, scope):
    # Given a mask over a few units of each scope matrix
    mask = topk_mask(
        torch.rand(scope.n_mask_entries, generator=torch.Generator().manual_seed(3)), 0.9
    )
    before = state(model)
    # When the model is edited and the delta applied
    delta = masked_finetune(model, scope, mask, wrong_batch(model), SETTINGS)
    assert_same_bits(before, state(model))  # the edit itself leaves the model alone
    apply_delta(model, delta)
    after = state(model)
    # Then only selected fc1 rows / fc2 columns of scope weights differ; the rest is bit-equal
    allowed = {}
    for name, unit_mask in zip(scope.param_names, scope.split(mask), strict=True):
        allowed[name] = scope.expand(name, unit_mask, after[name]).bool()
    for name in before:
        changed = before[name] != after[name]
        if name in allowed:
            assert not (changed & ~allowed[name]).any(), name
            assert changed.any(), name
        else:
            assert not changed.any(), name


def test_masked_finetune_fixes_the_edit_samples_and_records_its_run(model, scope):
    batch = wrong_batch(model)
    mask = topk_mask(torch.ones(scope.n_mask_entries), 0.5)
    delta = masked_finetune(model, scope, mask, batch, SETTINGS)
    apply_delta(model, delta)
    with torch.no_grad():
        assert (model(batch.images).argmax(1) == batch.labels).all()
    assert delta.meta["success"] is True
    assert len(delta.meta["losses"]) == delta.meta["steps"] + 1
    assert delta.meta["losses"][-1] <= SETTINGS.ce_stop < delta.meta["losses"][0]


def test_max_steps_bounds_the_run(model, scope):
    settings = EditSettings(lr=1e-6, max_steps=3)
    delta = masked_finetune(
        model,
        scope,
        torch.ones(scope.n_mask_entries, dtype=torch.bool),
        wrong_batch(model),
        settings,
    )
    assert delta.meta["steps"] == 3
    assert delta.meta["success"] is False


def edited_copy(model: nn.Module, scope: EditScope, batch: EditBatch, **settings) -> nn.Module:
    """A copy of `model` with a whole-scope masked edit of `batch` (lr 1e-2, 30 steps) applied."""
    mask = torch.ones(scope.n_mask_entries, dtype=torch.bool)
    edit = EditSettings(lr=1e-2, max_steps=30, **settings)
    edited = copy.deepcopy(model)
    apply_delta(edited, masked_finetune(model, scope, mask, batch, edit))
    return edited


def with_replay(model: nn.Module, n_replay: int) -> EditBatch:
    """`wrong_batch` plus `n_replay` random clean images and the model's probabilities on them."""
    batch = wrong_batch(model)
    replay = torch.randn(n_replay, 3, 16, 16, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        replay_probs = model(replay).softmax(1)
    return EditBatch(batch.images, batch.labels, replay, replay_probs)


def test_locality_term_keeps_replay_predictions_closer(model, scope):
    # Given an edit with a replay batch of clean images and their pre-edit probabilities
    replaying = with_replay(model, 16)
    replay, replay_probs = replaying.replay_images, replaying.replay_probs
    drift = {}
    for weight in (0.0, 10.0):
        # When it is edited without and with the locality term
        edited = edited_copy(model, scope, replaying, locality_weight=weight)
        with torch.no_grad():
            log_q = edited(replay).log_softmax(1)
        drift[weight] = torch.nn.functional.kl_div(
            log_q, replay_probs, reduction="batchmean"
        ).item()
    # Then the replay predictions drift less with the term
    assert drift[10.0] < drift[0.0]


@pytest.mark.parametrize("per_step", [0, 3], ids=["all-each-step", "3-drawn-each-step"])
def test_retention_term_keeps_earlier_fixes_right(model, scope, per_step):
    # Given an edit and 8 earlier-edit samples labelled with what the model predicts now
    batch = wrong_batch(model, k=4, seed=3)
    kept = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        kept_labels = model(kept).argmax(1)
    retaining = EditBatch(batch.images, batch.labels, retain_images=kept, retain_labels=kept_labels)
    loss = {}
    for weight in (0.0, 10.0):
        # When it is edited without and with the retention term
        edited = edited_copy(
            model, scope, retaining, retention_weight=weight, retention_batch_size=per_step
        )
        with torch.no_grad():
            loss[weight] = torch.nn.functional.cross_entropy(edited(kept), kept_labels).item()
    # Then the earlier samples keep a lower loss on their labels with the term
    assert loss[10.0] < loss[0.0]


def test_replay_drawn_per_step_is_seeded_and_still_keeps_predictions(model, scope):
    # Given an edit with 32 replay images, of which each step sees a random 4
    replaying = with_replay(model, 32)
    replay, replay_probs = replaying.replay_images, replaying.replay_probs
    drift, params = {}, {}
    for weight, seed in ((0.0, 0), (10.0, 0), (10.0, 0), (10.0, 1)):
        settings = EditSettings(lr=1e-2, max_steps=30, locality_weight=weight, replay_batch_size=4)
        editor = MaskedEditor("random", scope, _Ones(), 0.5, settings)
        # When it is edited without the term, and with it twice at seed 0 and once at seed 1
        delta = editor.edit(model, replaying, seed=seed)
        edited = copy.deepcopy(model)
        apply_delta(edited, delta)
        with torch.no_grad():
            log_q = edited(replay).log_softmax(1)
        drift[weight] = torch.nn.functional.kl_div(log_q, replay_probs, reduction="batchmean")
        params.setdefault((weight, seed), []).append(delta.params)
    # Then the sampled term still keeps the replay predictions closer, the same seed gives the
    # same delta to the bit and another seed draws other images
    assert drift[10.0] < drift[0.0]
    first, again = params[(10.0, 0)]
    other = params[(10.0, 1)][0]
    assert all(torch.equal(first[n].values, again[n].values) for n in first)
    assert not all(torch.equal(first[n].values, other[n].values) for n in first)


def test_unit_mask_of_the_wrong_shape_is_rejected(model, scope):
    with pytest.raises(EditError, match="unit_mask"):
        masked_finetune(model, scope, torch.ones(3, dtype=torch.bool), wrong_batch(model), SETTINGS)


# --- the split forward -------------------------------------------------------------------------


def test_split_forward_matches_the_full_forward(model, scope):
    images = torch.randn(3, 3, 16, 16)
    forward = SplitForward(model, list(scope.param_names))
    assert forward.first_block == 1
    named = dict(model.named_parameters())
    weights = {name: named[name] * 1.5 for name in scope.param_names}
    with torch.no_grad():
        split = forward.suffix(forward.prefix(images), weights)
        full = torch.func.functional_call(model, weights, (images,))
    torch.testing.assert_close(split, full, rtol=1e-5, atol=1e-6)


def test_split_forward_falls_back_to_the_full_forward_for_other_models():
    model = timm.create_model(
        "convnext_atto", dims=(8, 16, 24, 32), depths=(1, 1, 1, 1), num_classes=4
    ).eval()
    forward = SplitForward(model, ["stages.1.blocks.0.mlp.fc1.weight"])
    images = torch.randn(2, 3, 32, 32)
    assert forward.first_block is None
    with torch.no_grad():
        torch.testing.assert_close(forward.suffix(forward.prefix(images), {}), model(images))


# --- deltas ------------------------------------------------------------------------------------


def _delta(model: nn.Module, scope: EditScope, seed: int) -> EditDelta:
    mask = topk_mask(
        torch.rand(scope.n_mask_entries, generator=torch.Generator().manual_seed(seed)), 0.8
    )
    return masked_finetune(model, scope, mask, wrong_batch(model, seed=seed), SETTINGS)


def test_apply_then_restore_is_bit_exact(model, scope):
    before = state(model)
    undo = apply_delta(model, _delta(model, scope, 0))
    assert not all(torch.equal(before[n], t) for n, t in state(model).items())
    restore(model, undo)
    assert_same_bits(before, state(model))


def test_dense_delta_apply_and_restore(model):
    name = "blocks.0.attn.qkv.weight"
    delta = EditDelta({name: ParamDelta(None, 0, torch.full((96, 32), 0.1))})
    before = state(model)
    undo = apply_delta(model, delta)
    torch.testing.assert_close(state(model)[name], before[name] + 0.1)
    restore(model, undo)
    assert_same_bits(before, state(model))


def test_applying_deltas_in_order_is_reproducible_to_the_bit(model, scope, tmp_path):
    # Given two deltas, the same two read back from disk, and two copies of the same base
    first, second = _delta(model, scope, 0), _delta(model, scope, 1)
    stored = [EditDelta.load(d.save(tmp_path / str(i))) for i, d in enumerate((first, second))]
    copies = [copy.deepcopy(model), copy.deepcopy(model)]
    # When each copy gets the deltas in the same order (in memory, then from disk)
    for edited, deltas in zip(copies, ([first, second], stored), strict=True):
        for delta in deltas:
            apply_delta(edited, delta)
    # Then the weights are bit-identical
    assert_same_bits(state(copies[0]), state(copies[1]))


def test_delta_survives_save_and_load(model, scope, tmp_path):
    delta = _delta(model, scope, 0)
    loaded = EditDelta.load(delta.save(tmp_path / "delta"))
    assert loaded.sha256() == delta.sha256()
    assert (
        loaded.touched_parameters()
        == delta.touched_parameters()
        == tuple(sorted(scope.param_names))
    )
    assert loaded.meta == delta.meta
    for name, change in delta.params.items():
        assert torch.equal(loaded.params[name].units, change.units)
        assert torch.equal(loaded.params[name].values, change.values)


def test_sha256_changes_with_the_values(model, scope):
    delta = _delta(model, scope, 0)
    name = delta.touched_parameters()[0]
    change = delta.params[name]
    nudged = EditDelta(
        {**delta.params, name: ParamDelta(change.units, change.dim, change.values + 1e-6)},
        delta.meta,
    )
    assert nudged.sha256() != delta.sha256()


def test_loading_a_folder_without_a_delta_fails(tmp_path):
    with pytest.raises(EditError, match="no saved delta"):
        EditDelta.load(tmp_path)


def test_a_delta_from_another_model_is_refused_before_any_change(model, scope):
    delta = _delta(model, scope, 0)
    other = timm.create_model(
        "vit_tiny_patch16_224",
        img_size=16,
        patch_size=4,
        embed_dim=16,
        depth=4,
        num_heads=2,
        num_classes=4,
    )
    before = state(other)
    with pytest.raises(EditError, match="another model"):
        apply_delta(other, delta)
    assert_same_bits(before, state(other))
