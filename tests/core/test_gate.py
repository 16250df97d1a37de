"""Promotion gates: pass, every failure reason, fail closed on missing or NaN figures."""

from __future__ import annotations

import math

import pytest

from core.gate import GateResult, cluster_gate, global_gate, retention_key, wilson_lower_bound
from core.settings import GateSettings

POINT = GateSettings(locality_confidence=None)  # point estimates: thresholds read directly


def good_cluster_figures() -> dict[str, float]:
    return {
        "reliability": 1.0,
        "generalization": 0.4,
        "locality": 0.99,
        "n_locality": 2000,
        "retained_broken": 0.0,
    }


def good_global_figures() -> dict[str, float]:
    return {
        "broad_locality_vs_champion": 0.99,
        "broad_locality_vs_base": 0.97,
        "sensitive_locality_vs_champion": 0.8,
        "sensitive_locality_vs_base": 0.6,
        "n_broad": 2000,
        "n_sensitive": 300,
        "accuracy": 0.975,
        "accuracy_base": 0.98,
        retention_key("e1"): 1.0,
        retention_key("e2"): 0.96,
    }


def test_cluster_gate_passes_good_edit_and_records_generalization():
    # Given an edit that fixes every edit sample and keeps broad locality
    # When it is gated
    result = cluster_gate(good_cluster_figures(), GateSettings())
    # Then it passes, says why, and keeps the (ungated) held-out generalization
    assert isinstance(result, GateResult)
    assert result.passed
    assert any("reliability" in reason for reason in result.reasons)
    assert result.figures["generalization"] == 0.4


def test_cluster_gate_rejects_an_edit_sample_still_wrong():
    figures = good_cluster_figures() | {"reliability": 2 / 3}
    result = cluster_gate(figures, POINT)
    assert not result.passed
    assert result.reasons == ["reliability 0.6667 < 1: an edit sample is still wrong"]


def test_cluster_gate_rejects_low_locality_naming_the_setting():
    figures = good_cluster_figures() | {"locality": 0.9}
    result = cluster_gate(figures, POINT)
    assert not result.passed
    assert len(result.reasons) == 1
    assert "gate.cluster_min_locality" in result.reasons[0]


def test_cluster_gate_rejects_an_edit_that_undoes_an_earlier_one():
    figures = good_cluster_figures() | {"retained_broken": 1.0}
    result = cluster_gate(figures, POINT)
    assert not result.passed
    assert any("retained_broken 1" in reason for reason in result.reasons)


def test_cluster_gate_does_not_gate_generalization():
    figures = good_cluster_figures() | {"generalization": 0.0}
    assert cluster_gate(figures, POINT).passed


@pytest.mark.parametrize("bad", [math.nan, math.inf, None])
def test_cluster_gate_fails_closed_on_nan_or_missing(bad):
    # Given a locality that could not be measured
    figures = good_cluster_figures()
    if bad is None:
        del figures["locality"]
    else:
        figures["locality"] = bad
    # When gated, Then it is rejected with the figure named
    result = cluster_gate(figures, POINT)
    assert not result.passed
    assert result.reasons[0].startswith("locality is ")
    assert "failing closed" in result.reasons[0]


def test_global_gate_passes_good_candidate_and_derives_accuracy_drop():
    result = global_gate(good_global_figures(), GateSettings(), earlier_edit_ids=["e1", "e2"])
    assert result.passed, result.reasons
    assert result.figures["accuracy_drop"] == pytest.approx(0.005)
    assert result.figures["broad_locality_vs_base_lower"] < 0.97


@pytest.mark.parametrize(
    ("key", "value", "setting"),
    [
        ("broad_locality_vs_champion", 0.94, "gate.min_broad_locality_vs_champion"),
        ("broad_locality_vs_base", 0.85, "gate.min_broad_locality_vs_base"),
        ("sensitive_locality_vs_champion", 0.35, "gate.min_sensitive_locality_vs_champion"),
        ("sensitive_locality_vs_base", 0.25, "gate.min_sensitive_locality_vs_base"),
        ("accuracy", 0.95, "gate.max_accuracy_drop"),
        (retention_key("e2"), 0.9, "gate.min_retention"),
    ],
)
def test_global_gate_rejects_each_failed_check_with_its_reason(key, value, setting):
    # Given a candidate good on everything but one figure
    figures = good_global_figures() | {key: value}
    # When gated
    result = global_gate(figures, POINT, earlier_edit_ids=["e1", "e2"])
    # Then exactly that check fails, naming its setting
    assert not result.passed
    assert len(result.reasons) == 1
    assert setting in result.reasons[0]


def test_global_gate_accuracy_drop_at_threshold_passes_despite_float_noise():
    figures = good_global_figures() | {"accuracy_base": 0.95, "accuracy": 0.94}
    assert global_gate(figures, POINT, earlier_edit_ids=["e1", "e2"]).passed


def test_global_gate_fails_closed_when_an_earlier_edit_has_no_retention():
    # Given the champion holds edit e3 but nobody measured its retention
    result = global_gate(good_global_figures(), POINT, earlier_edit_ids=["e1", "e2", "e3"])
    # Then the candidate is rejected, naming the missing figure
    assert not result.passed
    assert result.reasons == ["retention/e3 is missing: cannot judge, failing closed"]


def test_global_gate_fails_closed_on_nan_accuracy():
    figures = good_global_figures() | {"accuracy": math.nan}
    result = global_gate(figures, POINT, earlier_edit_ids=["e1", "e2"])
    assert not result.passed
    assert "accuracy is not a finite number (nan)" in result.reasons[0]


def test_wilson_bound_rejects_a_share_that_passes_only_by_luck():
    # Given 63 of 64 images unchanged: a point estimate of 0.984 over a 0.95 threshold
    figures = good_cluster_figures() | {"locality": 63 / 64, "n_locality": 64}
    # When gated with and without the confidence bound
    point = cluster_gate(figures, POINT)
    bounded = cluster_gate(figures, GateSettings(locality_confidence=0.95))
    # Then only the point estimate passes
    assert point.passed
    assert not bounded.passed
    assert bounded.figures["locality_lower"] < 0.95


def test_wilson_bound_needs_the_sample_count():
    figures = good_cluster_figures()
    del figures["n_locality"]
    result = cluster_gate(figures, GateSettings(locality_confidence=0.95))
    assert not result.passed
    assert result.reasons[0].startswith("n_locality is missing")


def test_wilson_lower_bound_matches_the_textbook_value():
    # 9 of 10 at z = 1.96 (one-sided 0.975): Wilson interval (0.5958, 0.9821)
    assert wilson_lower_bound(0.9, 10, 0.975) == pytest.approx(0.5958, abs=1e-4)
    assert wilson_lower_bound(0.9, 10_000, 0.975) > wilson_lower_bound(0.9, 100, 0.975)
