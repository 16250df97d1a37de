"""The edit benchmark protocol: known metrics, restored model, paired design, summaries."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from core.edit import EditBatch, EditDelta, ParamDelta, apply_delta
from core.errors import ConfigError, DataError
from core.evaluation import (
    AttentionEditor,
    EditCase,
    EditEvaluator,
    EditResult,
    FailureGroup,
    Level,
    LocalitySet,
    Measurement,
    benchmark_levels,
    choose_lr,
    frontier_gaps,
    make_editor,
    mask_diagnostics,
    paired_differences,
    plan_cases,
    recommend_window,
    run_edits,
    scope_search_jobs,
    summarize,
)
from core.model import weights_hash
from core.scope import build_scope
from core.settings import EditSettings

SETTINGS = EditSettings(lr=1e-2, max_steps=8)
N_CLASSES = 4


@pytest.fixture
def model(micro_vit) -> nn.Module:
    """Micro ViT whose head has a trained model's logit spread (timm's random head is ~0)."""
    return micro_vit(head_std=0.3)


def random_images(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def failures(model: nn.Module, name: str, subset: str, n: int, seed: int) -> FailureGroup:
    """n images labelled with a class the model does not predict: real failures."""
    images = random_images(n, seed)
    with torch.no_grad():
        labels = (model(images).argmax(1) + 1) % N_CLASSES
    ids = tuple(f"{name}-{i}" for i in range(n))
    return FailureGroup(name, subset, images, labels, ids)


@pytest.fixture
def groups(model) -> list[FailureGroup]:
    return [
        failures(model, "ctx-a", "context", 5, 1),
        failures(model, "ctx-b", "context", 5, 2),
        failures(model, "style-a", "style", 5, 3),
    ]


@pytest.fixture
def locality_sets() -> list[LocalitySet]:
    labels = torch.arange(12) % N_CLASSES
    return [
        LocalitySet("sensitive", random_images(8, 10), labels[:8]),
        LocalitySet("broad", random_images(12, 11), labels),
    ]


@dataclass(frozen=True)
class AlwaysClassEditor:
    """Adds a huge bias to one class: every prediction becomes that class (known metrics)."""

    target: int

    def edit(self, model: nn.Module, batch: EditBatch, *, seed: int) -> EditDelta:
        bias = torch.zeros(N_CLASSES)
        bias[self.target] = 1e4
        return EditDelta({"head.bias": ParamDelta(None, 0, bias)}, {"steps": 3, "success": True})


def test_metrics_of_an_edit_with_a_known_answer(model, locality_sets):
    # given a group whose edit sample (position 0) and two of four others are labelled 2
    labels = torch.tensor([2, 2, 0, 2, 1])
    group = FailureGroup("g", "style", random_images(5, 5), labels, tuple("abcde"))
    evaluator = EditEvaluator(model, [group], locality_sets, "broad", batch_size=4)
    pre_edit = {s.name: model(s.images).argmax(1) for s in locality_sets}
    case = EditCase(0, "g", "style", (0, 1), seed=0)
    level = Level("always-2", 0.0, 1, 1e-3, "head")
    # when an edit makes the model predict class 2 everywhere
    [result] = run_edits([(level, AlwaysClassEditor(2))], [case], evaluator)
    # then SR counts the edit sample, GR only the held-out four, LR compares with pre-edit
    measured = result.measurement
    assert measured.reliability == 1.0
    assert measured.generalization == pytest.approx(2 / 4)
    for item in locality_sets:
        expected = (pre_edit[item.name] == 2).double().mean().item()
        assert measured.locality[item.name] == pytest.approx(expected)
    assert measured.accuracy == pytest.approx((locality_sets[1].labels == 2).double().mean().item())
    assert result.edit_ids == ("a",)
    assert result.steps == 3


def test_two_sample_edit_excludes_both_samples_from_generalization(model, locality_sets):
    labels = torch.tensor([2, 0, 2, 2, 1])
    group = FailureGroup("g", "style", random_images(5, 5), labels, tuple("abcde"))
    evaluator = EditEvaluator(model, [group], locality_sets, "broad", batch_size=4)
    case = EditCase(0, "g", "style", (0, 1), seed=0)
    [result] = run_edits(
        [(Level("x", 0.0, 2, 1e-3, "head"), AlwaysClassEditor(2))], [case], evaluator
    )
    assert result.measurement.reliability == 0.5  # sample b (label 0) is not fixed
    assert result.measurement.generalization == pytest.approx(2 / 3)
    assert result.edit_ids == ("a", "b")


def test_cached_prefix_gives_the_full_forward_predictions(model, groups, locality_sets):
    # given an FT edit of blocks 1-2 (the evaluator runs only blocks 1.. from a cache)
    scope = build_scope(model, [1, 2])
    evaluator = EditEvaluator(model, groups, locality_sets, "broad", batch_size=3)
    case = plan_cases(groups, 1, 1, 1, seed=0)[0]
    delta = make_editor(Level("ft", 0.0, 1, 5e-2, "1-2"), scope, SETTINGS, None).edit(
        model, evaluator.edit_batch(case, 1), seed=0
    )
    measured = evaluator.measure(delta, case, 1)
    # when the same delta is applied to a copy and evaluated with the plain full forward
    edited = copy.deepcopy(model)
    apply_delta(edited, delta)
    with torch.no_grad():
        expected = {
            s.name: (edited(s.images).argmax(1) == model(s.images).argmax(1)).double().mean().item()
            for s in locality_sets
        }
    # then both agree
    assert measured.locality == pytest.approx(expected)


def test_model_is_bit_identical_after_the_whole_grid(model, groups, locality_sets):
    scope = build_scope(model, [1, 2])
    evaluator = EditEvaluator(model, groups, locality_sets, "broad", batch_size=8)
    levels = benchmark_levels(
        ["random", "saliency", "ft", "ft-l2", "lora"], (0.5,), (0.01,), (1, 2), 5e-2, scope
    )
    cases = plan_cases(groups, 2, 1, 2, seed=0)
    before = weights_hash(model)
    results = run_edits(
        [(level, make_editor(level, scope, SETTINGS, None)) for level in levels],
        cases,
        evaluator,
        scope,
    )
    assert weights_hash(model) == before
    assert len(results) == len(levels) * len(cases)
    assert any(result.measurement.locality["broad"] < 1 for result in results)  # edits did act


def test_every_method_and_level_edits_the_same_samples(model, groups, locality_sets):
    scope = build_scope(model, [1, 2])
    evaluator = EditEvaluator(model, groups, locality_sets, "broad", batch_size=8)
    levels = benchmark_levels(["random", "ft"], (0.5, 0.9), (), (1,), 5e-2, scope)
    cases = plan_cases(groups, 3, 1, 1, seed=4)
    results = run_edits(
        [(level, make_editor(level, scope, SETTINGS, None)) for level in levels], cases, evaluator
    )
    edits_by_level: dict[tuple, list] = {}
    for result in results:
        key = (result.level.method, result.level.level)
        edits_by_level.setdefault(key, []).append((result.case.case_id, result.edit_ids))
    assert len(edits_by_level) == 3
    assert len({tuple(edits) for edits in edits_by_level.values()}) == 1


def test_plan_alternates_subsets_and_nests_group_sizes(groups):
    cases = plan_cases(groups, 6, 2, 3, seed=0)
    assert cases == plan_cases(groups, 6, 2, 3, seed=0)
    assert [c.group for c in cases[0::2]] == [c.group for c in cases[1::2]]  # 2 per group
    assert {cases[0].subset, cases[2].subset} == {"context", "style"}
    for case in cases:
        assert len(set(case.positions)) == 3
    assert cases[0].positions != cases[1].positions  # the same group, other samples
    assert len({case.seed for case in cases}) == 6


def test_plan_refuses_groups_too_small_for_generalization(model):
    tiny = [failures(model, "g", "style", 2, 0)]
    with pytest.raises(DataError, match="more than 2 failures"):
        plan_cases(tiny, 1, 1, 2, seed=0)


def test_levels_cover_every_method_and_hprd_needs_a_locator(model):
    scope = build_scope(model, [1, 2])
    levels = benchmark_levels(
        ["hprd", "ft", "ft-l1", "lora"], (0.5, 0.9), (0.1, 0.0), (1, 3), 1e-3, scope
    )
    assert len(levels) == 2 * 2 + 1 + 2 + 1
    assert {level.k for level in levels if level.method == "hprd"} == {1, 3}
    with pytest.raises(ConfigError, match="retouch metatrain"):
        make_editor(levels[0], scope, SETTINGS, None)
    with pytest.raises(ConfigError, match="unknown"):
        benchmark_levels(["rome"], (0.5,), (), (1,), 1e-3, scope)


def row(method: str, case_id: int, generalization: float, subset: str = "style") -> dict:
    return {
        "method": method,
        "level": 0.9,
        "k": 1,
        "lr": 1e-3,
        "scope": "1-2",
        "case_id": case_id,
        "subset": subset,
        "reliability": 1.0,
        "generalization": generalization,
        "locality_sensitive": 0.5,
        "accuracy": 0.9,
        "steps": 4,
        "success": 1,
        "edit_seconds": 0.1,
        "eval_seconds": 0.2,
    }


def test_paired_differences_have_the_known_mean_and_standard_error():
    rows = [row("hprd", i, g) for i, g in enumerate([0.5, 0.6, 0.7])]
    rows += [row("random", i, g) for i, g in enumerate([0.4, 0.6, 0.4])]
    [difference] = [
        d
        for d in paired_differences(rows, [("hprd", "random")], ["generalization"])
        if d["subset"] == "all"
    ]
    # differences 0.1, 0.0, 0.3: mean 0.1333, sd 0.1528, se 0.0882
    assert difference["mean_difference"] == pytest.approx(0.4 / 3)
    assert difference["standard_error"] == pytest.approx(0.15275 / math.sqrt(3), rel=1e-3)
    assert difference["n_edits"] == 3


def curve_rows(method: str, points: dict[float, tuple[float, float]]) -> list[dict]:
    """Two cases per level whose means are the given (GR, sensitive locality) points."""
    rows = []
    for level, (gr, loc) in points.items():
        for case_id, spread in enumerate((-0.01, 0.01)):
            rows.append(
                row(method, case_id, gr + spread) | {"level": level, "locality_sensitive": loc}
            )
    return rows


def test_frontier_gap_reads_the_reference_curve_at_the_same_locality():
    # Given saliency's curve through (LR .4, GR .8) and (LR .6, GR .6), and a locator whose
    # levels sit at LR .5 (GR .75) and LR .7 (outside saliency's range)
    rows = curve_rows("saliency", {0.9: (0.8, 0.4), 0.95: (0.6, 0.6)})
    rows += curve_rows("hprd", {0.9: (0.75, 0.5), 0.95: (0.5, 0.7)})
    # When the locator's curve is compared with saliency's at equal locality
    gaps = frontier_gaps(rows, [("hprd", "saliency")], "locality_sensitive", n_boot=50)
    # Then its first level lies 0.05 above the line (saliency reaches GR .7 at LR .5), and the
    # level outside saliency's locality range is left out, not extrapolated
    [gap] = gaps
    assert gap["level"] == 0.9
    assert gap["gap"] == pytest.approx(0.05)
    assert gap["first_locality"] == pytest.approx(0.5)
    assert gap["n_cases"] == 2
    assert gap["standard_error"] < 0.05


def test_summary_reports_each_subset_and_all():
    rows = [row("ft", 0, 0.2, "context"), row("ft", 1, 0.6, "style"), row("ft", 2, 0.4, "style")]
    summary = {r["subset"]: r for r in summarize(rows)}
    assert summary["all"]["generalization"] == pytest.approx(0.4)
    assert summary["style"]["generalization"] == pytest.approx(0.5)
    assert summary["context"]["n_edits"] == 1


def test_choose_lr_prefers_the_best_tradeoff_among_reliable_rates():
    rows = [row("ft", 0, 0.3) | {"lr": 1e-3}, row("ft", 0, 0.9) | {"lr": 1e-2, "reliability": 0.5}]
    rows.append(row("ft", 0, 0.2) | {"lr": 1e-4})
    lr, table = choose_lr(rows, "locality_sensitive", min_reliability=0.9)
    assert lr == 1e-3
    assert len(table) == 3


def result_with_mask(method: str, group: str, kept: list[int], n: int) -> EditResult:
    mask = torch.zeros(n, dtype=torch.bool)
    mask[kept] = True
    return EditResult(
        Level(method, 0.5, 1, 1e-3, "1-2"),
        EditCase(0, group, "style", (0,), 0),
        ("a",),
        Measurement(1.0, 1.0, {}, 1.0),
        1,
        True,
        0.0,
        0.0,
        mask,
    )


def test_mask_diagnostics_tell_a_localizing_locator(model):
    scope = build_scope(model, [1, 2])  # 4 matrices x 128 hidden units
    n = scope.n_mask_entries
    results = [
        result_with_mask("saliency", "a", list(range(0, 4)), n),
        result_with_mask("saliency", "a", list(range(0, 4)), n),
        result_with_mask("saliency", "b", list(range(300, 304)), n),
    ]
    [row] = mask_diagnostics(results, scope, rho=0.5)
    assert row["iou_within_group"] == 1.0
    assert row["iou_across_groups"] == 0.0
    assert row["kept_share_block_1"] == pytest.approx(2 / 3)
    assert row["kept_share_block_2"] == pytest.approx(1 / 3)


def test_attention_editor_changes_only_the_window_attention(model, groups):
    batch = EditBatch(groups[0].images[:1], groups[0].labels[:1])
    delta = AttentionEditor((1, 2), SETTINGS).edit(model, batch, seed=0)
    assert delta.touched_parameters() == (
        "blocks.1.attn.proj.weight",
        "blocks.1.attn.qkv.weight",
        "blocks.2.attn.proj.weight",
        "blocks.2.attn.qkv.weight",
    )
    assert delta.meta["steps"] > 0


def test_scope_search_covers_ffn_and_attention_windows_and_recommends_one(model):
    jobs = scope_search_jobs(model, 3, SETTINGS)
    assert [(level.method, level.scope) for level, _ in jobs] == [
        ("ft", "0-2"),
        ("ft", "1-3"),
        ("attention-ft", "0-2"),
        ("attention-ft", "1-3"),
    ]
    summary = [
        {"method": "ft", "scope": "0-2", "subset": "all", "generalization": 0.5, "locality_s": 0.3},
        {"method": "ft", "scope": "1-3", "subset": "all", "generalization": 0.4, "locality_s": 0.6},
        {
            "method": "attention-ft",
            "scope": "1-3",
            "subset": "all",
            "generalization": 1.0,
            "locality_s": 1.0,
        },
    ]
    recommended = recommend_window(summary, "locality_s")
    assert recommended["blocks"] == [1, 2, 3]
