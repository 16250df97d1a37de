"""Failure clustering on hand-made features: grouping, stable ids, edit split, quality figures."""

from __future__ import annotations

import numpy as np
import pytest

from core.clusters import (
    READY,
    WAITING,
    adjusted_rand_index,
    cluster_failures,
    load_catalogue,
    purity,
    save_catalogue,
)
from core.errors import DataError
from core.settings import ClusterSettings

SETTINGS = ClusterSettings(
    distance_threshold=0.5, min_cluster_size=4, n_edit_samples=2, match_threshold=0.5
)


def _blob(
    direction: np.ndarray, n: int, rng: np.random.Generator, spread: float = 0.05
) -> np.ndarray:
    """n points scattered around a direction. (n, D)."""
    return direction + spread * rng.standard_normal((n, len(direction)))


def _two_causes_one_label(rng: np.random.Generator, n_first: int = 6, n_second: int = 3):
    """Label 0 fails for two causes (orthogonal feature directions)."""
    first = _blob(np.eye(8)[0] * 3.0, n_first, rng)  # scale is irrelevant after normalisation
    second = _blob(np.eye(8)[1], n_second, rng)
    features = np.concatenate([first, second])  # (n_first + n_second, 8)
    ids = [f"a{i}" for i in range(n_first)] + [f"b{i}" for i in range(n_second)]
    return features, np.zeros(len(ids), dtype=np.int64), ids


def test_clusters_split_by_cause_and_never_mix_labels():
    # Given two causes under label 0 and one cause under label 1 that shares cause A's direction
    rng = np.random.default_rng(0)
    features, labels, ids = _two_causes_one_label(rng)
    features = np.concatenate([features, _blob(np.eye(8)[0], 5, rng)])
    labels = np.concatenate([labels, np.ones(5, dtype=np.int64)])
    ids = [*ids, *(f"c{i}" for i in range(5))]

    # When clustering
    clusters, _ = cluster_failures(features, labels, ids, SETTINGS, [], night="2026-01-05")

    # Then there are three clusters, one per (label, cause)
    members = sorted(sorted(c.sample_ids) for c in clusters)
    assert members == [
        [f"a{i}" for i in range(6)],
        [f"b{i}" for i in range(3)],
        [f"c{i}" for i in range(5)],
    ]


def test_status_and_edit_split_follow_settings():
    # Given a big cause (6 flags) and a small one (3 flags, below min_cluster_size=4)
    features, labels, ids = _two_causes_one_label(np.random.default_rng(1))

    # When clustering
    clusters, _ = cluster_failures(features, labels, ids, SETTINGS, [], night="2026-01-05")

    # Then the big one is ready, the small one waits; edit samples are the 2 nearest the centroid
    by_size = sorted(clusters, key=lambda c: len(c.sample_ids))
    assert [c.status for c in by_size] == [WAITING, READY]
    big = by_size[1]
    unit = features[:6] / np.linalg.norm(features[:6], axis=1, keepdims=True)
    distances = np.linalg.norm(unit - np.array(big.centroid), axis=1)
    assert set(big.edit_ids) == {ids[i] for i in np.argsort(distances)[:2]}
    assert set(big.edit_ids) | set(big.held_out_ids) == set(big.sample_ids)
    assert not set(big.edit_ids) & set(big.held_out_ids)


def test_same_cause_keeps_its_id_on_a_later_night(tmp_path):
    # Given a first night's catalogue, persisted and read back
    rng = np.random.default_rng(2)
    features, labels, ids = _two_causes_one_label(rng)
    first, catalogue = cluster_failures(features, labels, ids, SETTINGS, [], night="2026-01-05")
    save_catalogue(catalogue, tmp_path / "catalogue.json")
    catalogue = load_catalogue(tmp_path / "catalogue.json")

    # When a later night brings new flags of cause B, plus a brand-new cause C
    later = np.concatenate([_blob(np.eye(8)[1], 4, rng), _blob(np.eye(8)[2], 4, rng)])
    later_ids = [f"b-new{i}" for i in range(4)] + [f"c-new{i}" for i in range(4)]
    second, updated = cluster_failures(
        later, np.zeros(8, dtype=np.int64), later_ids, SETTINGS, catalogue, night="2026-01-06"
    )

    # Then cause B keeps the id it had, cause C gets a new id, and the catalogue holds all three
    first_b = next(c.cluster_id for c in first if "b0" in c.sample_ids)
    second_b = next(c.cluster_id for c in second if "b-new0" in c.sample_ids)
    second_c = next(c.cluster_id for c in second if "c-new0" in c.sample_ids)
    assert second_b == first_b
    assert second_c not in {c.cluster_id for c in first}
    assert len(updated) == 3
    assert next(e for e in updated if e.cluster_id == first_b).first_seen == "2026-01-05"


def test_single_flag_is_one_waiting_cluster():
    # Given one flag; when clustering; then it waits alone
    clusters, _ = cluster_failures(np.ones((1, 4)), np.array([2]), ["x"], SETTINGS, [], night="d")
    assert [(c.status, c.sample_ids, c.edit_ids) for c in clusters] == [(WAITING, ("x",), ("x",))]


def test_misaligned_inputs_fail_early():
    with pytest.raises(DataError, match="one entry per flag"):
        cluster_failures(np.ones((3, 4)), np.zeros(2), ["a", "b", "c"], SETTINGS, [], night="d")
    with pytest.raises(DataError, match="unique"):
        cluster_failures(np.ones((2, 4)), np.zeros(2), ["a", "a"], SETTINGS, [], night="d")


def test_corrupt_catalogue_names_the_file(tmp_path):
    path = tmp_path / "catalogue.json"
    path.write_text("{not json")
    with pytest.raises(DataError, match=r"catalogue\.json"):
        load_catalogue(path)


def test_quality_figures_on_known_cases():
    # Given generating groups and two clusterings: a perfect relabelling and a merged one
    groups = ["g1", "g1", "g2", "g2"]
    # Then the perfect one scores 1 on both, the merged one loses purity and ARI
    assert purity(groups, ["x", "x", "y", "y"]) == 1.0
    assert adjusted_rand_index(groups, ["x", "x", "y", "y"]) == pytest.approx(1.0)
    assert purity(groups, ["x", "x", "x", "x"]) == 0.5
    assert adjusted_rand_index(groups, ["x", "x", "x", "x"]) == pytest.approx(0.0)
