"""Continual editing of a night on a micro model: accept, fall back, reject without a trace."""

from __future__ import annotations

import pytest
import torch

from core.baselines import SaliencyLocator
from core.continual import (
    ClusterRequest,
    LocalityProbe,
    candidate_figures,
    edit_cluster,
    edit_clusters,
    fallback_tries,
    predicted_classes,
    unit_mask,
)
from core.edit import EditBatch, EditDelta, MaskedEditor, ParamDelta, apply_delta
from core.gate import retention_key
from core.model import build_model, weights_hash
from core.replay import ReplayBatch
from core.scope import build_scope
from core.settings import EditSettings, GateSettings


@pytest.fixture
def setup(micro_settings):
    """A random micro ViT, its scope, two requests (3 edit samples each) and clean images."""
    torch.manual_seed(0)
    model = build_model(micro_settings.model, 4, seed=0).eval()
    scope = build_scope(model, micro_settings.scope.blocks)
    images = torch.randn(8, 3, 16, 16)
    wrong = (predicted_classes(model, images, 8) + 1) % 4  # labels the model gets wrong
    requests = [
        ClusterRequest(
            f"c0{i}",
            ("a", "b", "c"),
            images[4 * i : 4 * i + 3],
            wrong[4 * i : 4 * i + 3],
            images[4 * i + 3 : 4 * i + 4],
            wrong[4 * i + 3 : 4 * i + 4],
        )
        for i in (1, 0)
    ]
    return model, scope, requests, torch.randn(16, 3, 16, 16)


def saliency(scope):
    return lambda rho, settings: MaskedEditor("saliency", scope, SaliencyLocator(), rho, settings)


def test_open_gate_accepts_in_id_order(setup, micro_settings):
    # Given an open cluster gate
    model, scope, requests, clean = setup
    gate = micro_settings.gate.model_copy(
        update={"cluster_min_locality": 0.0, "locality_confidence": None}
    )
    settings = micro_settings.edit.model_copy(update={"lr": 0.01})
    tries = fallback_tries(settings, 0.9, 0.5, 200)

    # When editing both clusters
    outcomes = edit_clusters(model, requests, saliency(scope), tries, clean, gate, 0, 8)

    # Then they are edited in id order, both accepted, and their edit samples are now right
    assert [o.cluster_id for o in outcomes] == ["c00", "c01"]
    assert all(o.accepted for o in outcomes)
    assert outcomes[1].parent_hash != outcomes[0].parent_hash  # edited on top of the first
    for request in requests:
        assert (predicted_classes(model, request.edit_images, 8) == request.edit_labels).all()
    assert int(unit_mask(scope, outcomes[0].delta).sum()) == outcomes[0].delta.meta["n_units"]


def test_rejected_cluster_leaves_no_trace_after_fallback(setup, micro_settings):
    # Given a gate no edit can pass (locality 1 on a Wilson bound needs more images)
    model, scope, requests, clean = setup
    before = weights_hash(model)
    tries = fallback_tries(micro_settings.edit, 0.9, 0.5, 3)

    # When editing
    outcomes = edit_clusters(
        model, requests, saliency(scope), tries, clean, micro_settings.gate, 0, 8
    )

    # Then each cluster was tried twice (the fallback with more units and steps), rejected with
    # a reason, and the model is bit-identical to before
    for outcome in outcomes:
        assert not outcome.accepted
        assert [(a.rho, a.max_steps) for a in outcome.attempts] == [(0.9, 100), (0.5, 3)]
        assert outcome.gate.reasons
    assert weights_hash(model) == before


def test_candidate_figures_name_every_gate_input(setup, micro_settings):
    # Given cached references equal to the candidate's own clean predictions, and labels that
    # make the base model right on half the validation images
    model, _, requests, clean = setup
    predictions = predicted_classes(model, clean, 8)
    own = {"broad": predictions, "sensitive": predictions, "validation": predictions}
    labels = torch.where(torch.arange(16) < 8, predictions, (predictions + 1) % 4)
    references = {f"{name}/{who}": predictions for name in own for who in ("base", "champion")}
    references["validation/labels"] = labels
    retained = {"e1": (requests[0].edit_images, requests[0].edit_labels)}

    # When measuring the candidate
    figures = candidate_figures(model, own, references, retained, 8)

    # Then every gate input is there with the expected value
    assert figures["broad_locality_vs_base"] == figures["sensitive_locality_vs_champion"] == 1.0
    assert figures["n_broad"] == 16
    assert figures["accuracy"] == figures["accuracy_base"] == 0.5
    assert figures[retention_key("e1")] == 0.0  # the unedited model gets them wrong


def test_locality_probe_matches_the_full_forward_as_edits_settle(micro_vit):
    # Given a micro ViT, clean images and a probe whose prefix is cached at block 2
    model = micro_vit(head_std=0.3)
    images = torch.randn(20, 3, 16, 16)
    probe = LocalityProbe(images, 8)
    later = ("blocks.2.mlp.fc1.weight",)
    probe.predictions(model, later)

    def delta(name: str) -> EditDelta:
        weight = dict(model.named_parameters())[name]
        return EditDelta({name: ParamDelta(None, 0, torch.randn_like(weight))}, {})

    # When an edit in block 2 is kept, then one in block 0 is kept and settled
    for name in (later[0], "blocks.0.mlp.fc1.weight"):
        apply_delta(model, delta(name))
        probe.settle(model, (name,))
        full = predicted_classes(model, images, 8)

        # Then the probe's predictions equal a full forward's for any later edit
        assert torch.equal(probe.predictions(model, later), full)
        assert torch.equal(probe.predictions(model, ()), full)


def test_replay_reaches_the_edit_only_when_the_locality_term_is_on(micro_vit):
    # Given a recording editor, a cluster request, and a replay batch whose targets come from
    # another (anchor) model
    model = micro_vit(head_std=0.3)
    seen: list[EditBatch] = []

    class Recording:
        def edit(self, model, batch, *, seed):
            seen.append(batch)
            return EditDelta({}, {"steps": 0})

    request = ClusterRequest(
        "c00-001",
        ("a",),
        torch.randn(1, 3, 16, 16),
        torch.tensor([0]),
        torch.zeros(0, 3, 16, 16),
        torch.zeros(0, dtype=torch.long),
    )
    images = torch.randn(8, 3, 16, 16)
    before = predicted_classes(model, images, 8)
    anchor_probs = micro_vit(head_std=0.3, seed=1)(images[:4]).softmax(1).detach()
    edit = EditSettings()
    # When edited without, then with a locality weight
    for weight in (0.0, 1.0):
        tries = [(0.9, edit.model_copy(update={"locality_weight": weight}))]
        edit_cluster(
            model,
            request,
            lambda rho, s: Recording(),
            tries,
            LocalityProbe(images, 8),
            before,
            GateSettings(),
            0,
            8,
            replay=ReplayBatch(images[:4], anchor_probs),
        )
    # Then only the second edit saw the replay images, with the anchor's probabilities as its
    # targets, not the edited model's
    assert not seen[0].has_replay
    assert seen[1].has_replay
    assert torch.equal(seen[1].replay_probs, anchor_probs)


@pytest.mark.parametrize("locality_weight", [1.0, 0.0], ids=["with-locality", "without"])
def test_accepted_cluster_samples_are_retained_by_later_clusters(
    setup, micro_settings, locality_weight
):
    # Given an open gate, a replay batch of 4 clean images (targets: the model before the night),
    # one retained sample of an earlier night, and an editor that records its batches
    model, scope, requests, clean = setup
    gate = micro_settings.gate.model_copy(
        update={"cluster_min_locality": 0.0, "locality_confidence": None}
    )
    edit = micro_settings.edit.model_copy(
        update={"lr": 0.01, "locality_weight": locality_weight, "retention_weight": 1.0}
    )
    seen: list[EditBatch] = []

    def recording(rho, settings):
        editor = saliency(scope)(rho, settings)

        class Recording:
            def edit(self, model, batch, *, seed):
                seen.append(batch)
                return editor.edit(model, batch, seed=seed)

        return Recording()

    # When both clusters are edited and accepted
    earlier = (clean[4:5], torch.tensor([3]))
    replay = ReplayBatch(clean[:4], model(clean[:4]).softmax(1).detach())
    outcomes = edit_clusters(
        model, requests, recording, [(0.5, edit)], clean, gate, 0, 8, replay, earlier, 2
    )
    # Then both see the clean replay when the locality term is on (none when it is off), the
    # second with the same targets although the first edit changed the model; the second
    # retains 2 of the first one's samples either way
    assert all(outcome.accepted for outcome in outcomes)
    first = min(requests, key=lambda r: r.cluster_id)
    if locality_weight:
        assert all(torch.equal(batch.replay_images, clean[:4]) for batch in seen)
        assert all(torch.equal(batch.replay_probs, replay.probs) for batch in seen)
    else:
        assert not any(batch.has_replay for batch in seen)
    assert torch.equal(seen[0].retain_images, clean[4:5])
    assert torch.equal(seen[1].retain_images, torch.cat([clean[4:5], first.edit_images[:2]]))
    assert torch.equal(seen[1].retain_labels, torch.cat([earlier[1], first.edit_labels[:2]]))


def test_an_edit_that_undoes_an_earlier_edit_is_rejected(setup, micro_settings):
    # Given retained samples the model gets right, and an editor whose delta pushes every image
    # to the cluster's class (its edit samples right, the retained samples of other classes not)
    model, _, _, clean = setup
    before = weights_hash(model)
    predicted = predicted_classes(model, clean, 8)
    target = int(predicted[0])
    others = predicted != target
    retained = (clean[others], predicted[others])
    request = ClusterRequest(
        "c00",
        ("a",),
        clean[:1],
        torch.tensor([target]),
        clean[:0],
        torch.zeros(0, dtype=torch.long),
    )
    push = torch.zeros(4)
    push[target] = 1e3

    class Pushing:
        def edit(self, model, batch, *, seed):
            return EditDelta({"head.bias": ParamDelta(None, 0, push)}, {"steps": 1})

    gate = micro_settings.gate.model_copy(
        update={"cluster_min_locality": 0.0, "locality_confidence": None}
    )
    edit = micro_settings.edit
    # When the cluster is edited with those samples retained
    outcome, _ = edit_cluster(
        model,
        request,
        lambda rho, s: Pushing(),
        [(0.9, edit)],
        LocalityProbe(clean, 8),
        predicted,
        gate,
        0,
        8,
        retained=retained,
    )
    # Then the gate turns it away for what it undid, and the model is as before
    assert not outcome.accepted
    assert outcome.gate.figures["retained_broken"] == int(others.sum()) > 0
    assert any("retained_broken" in reason for reason in outcome.gate.reasons)
    assert weights_hash(model) == before
