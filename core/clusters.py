"""Failure clusters: still-wrong flags grouped by cause, with ids that survive across nights.

Flags are grouped by true label, then clustered within each label on the base model's pooled
features (L2-normalised, so Euclidean distance is a monotone function of cosine distance) with
scikit-learn's AgglomerativeClustering cut at `distance_threshold`. Each cluster is matched to a
persisted catalogue of known clusters by centroid distance, so the same failure cause keeps its id
night after night. A cluster is `ready` (editable) from `min_cluster_size` flags on; below that it
is `waiting`, and its flags are clustered again the next night with whatever arrived since.

Quality against a known generating group (the simulator's `world_group`): `adjusted_rand_index`
and `purity`.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from sklearn.cluster import AgglomerativeClustering
from sklearn.metrics import adjusted_rand_score

from core.errors import DataError
from core.settings import ClusterSettings

log = logging.getLogger(__name__)

READY = "ready"
WAITING = "waiting"


@dataclass(frozen=True)
class KnownCluster:
    """A catalogue entry: a failure cause seen on an earlier night."""

    cluster_id: str
    label: int
    centroid: tuple[float, ...]  # unit vector in the base model's feature space
    n_flags: int  # flags in the cluster when last seen
    first_seen: str  # night (ISO date) the id was created
    last_seen: str


@dataclass(frozen=True)
class FailureCluster:
    """One night's cluster of still-wrong flags sharing a true label and a cause."""

    cluster_id: str
    label: int
    status: str  # READY or WAITING
    sample_ids: tuple[str, ...]
    edit_ids: tuple[str, ...]  # the n_edit_samples flags closest to the centroid
    held_out_ids: tuple[str, ...]  # the rest: generalisation check of the edit
    centroid: tuple[float, ...]


def normalize_rows(features: np.ndarray) -> np.ndarray:
    """Scale each row to unit L2 norm (zero rows stay zero). (N, D) -> (N, D)."""
    norms = np.linalg.norm(features, axis=1, keepdims=True)  # (N, 1)
    return features / np.maximum(norms, 1e-12)


def _cluster_one_label(unit_features: np.ndarray, settings: ClusterSettings) -> np.ndarray:
    """Cluster index per row of one label's unit features (N, D) -> (N,)."""
    if len(unit_features) == 1:
        return np.zeros(1, dtype=np.int64)
    model = AgglomerativeClustering(
        n_clusters=None,
        distance_threshold=settings.distance_threshold,
        linkage=settings.linkage,
    )
    return model.fit_predict(unit_features).astype(np.int64)


def _centroid(unit_features: np.ndarray) -> np.ndarray:
    """Mean direction of unit features (N, D) -> (D,), itself a unit vector."""
    return normalize_rows(unit_features.mean(axis=0, keepdims=True))[0]


def _split_edit_held_out(
    unit_features: np.ndarray, ids: Sequence[str], centroid: np.ndarray, n_edit: int
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The n_edit ids closest to the centroid, then the rest (ties broken by id for determinism)."""
    distances = np.linalg.norm(unit_features - centroid, axis=1)  # (N,)
    order = sorted(range(len(ids)), key=lambda i: (round(float(distances[i]), 9), ids[i]))
    ranked = [ids[i] for i in order]
    return tuple(ranked[:n_edit]), tuple(ranked[n_edit:])


def _next_id(label: int, taken: set[str]) -> str:
    """The first free id of the form c{label:02d}-{seq:03d}."""
    seq = 1
    while f"c{label:02d}-{seq:03d}" in taken:
        seq += 1
    return f"c{label:02d}-{seq:03d}"


def match_to_catalogue(
    label: int,
    centroids: np.ndarray,
    catalogue: Sequence[KnownCluster],
    match_threshold: float,
) -> list[str | None]:
    """Known id for each new centroid (K, D) of one label, or None when nothing is close enough.

    Matching is one-to-one and greedy by distance, so two causes never share an id on one night.
    """
    known = [entry for entry in catalogue if entry.label == label]
    matches: list[str | None] = [None] * len(centroids)
    if not known:
        return matches
    known_centroids = np.array([entry.centroid for entry in known])  # (M, D)
    distances = np.linalg.norm(centroids[:, None, :] - known_centroids[None], axis=2)  # (K, M)
    used: set[int] = set()
    for flat in np.argsort(distances, axis=None, kind="stable"):
        new_index, known_index = divmod(int(flat), len(known))
        if distances[new_index, known_index] >= match_threshold:
            break
        if matches[new_index] is None and known_index not in used:
            matches[new_index] = known[known_index].cluster_id
            used.add(known_index)
    return matches


def _check_inputs(features: np.ndarray, labels: np.ndarray, sample_ids: Sequence[str]) -> None:
    """Fail early on misaligned inputs instead of deep inside scikit-learn."""
    if features.ndim != 2:
        raise DataError(f"features must be (N, D), got shape {features.shape}")
    if not len(features) == len(labels) == len(sample_ids):
        raise DataError(
            f"features ({len(features)}), labels ({len(labels)}) and sample_ids "
            f"({len(sample_ids)}) must have one entry per flag"
        )
    if len(set(sample_ids)) != len(sample_ids):
        raise DataError("sample_ids must be unique; deduplicate the flags before clustering")


def cluster_failures(
    features: np.ndarray,
    labels: np.ndarray,
    sample_ids: Sequence[str],
    settings: ClusterSettings,
    catalogue: Sequence[KnownCluster],
    night: str,
) -> tuple[list[FailureCluster], list[KnownCluster]]:
    """Cluster still-wrong flags and give each cluster a stable id.

    Args:
        features: (N, D) base-model pooled features of the flags.
        labels: (N,) true class index of each flag.
        sample_ids: N unique flag ids.
        settings: thresholds, minimum size and edit-sample count.
        catalogue: known clusters from earlier nights.
        night: ISO date of this night, recorded in the catalogue.

    Returns:
        The night's clusters (sorted by id) and the updated catalogue: matched entries take the new
        centroid and size, unmatched clusters are added, unseen entries are kept unchanged.
    """
    _check_inputs(features, labels, sample_ids)
    unit = normalize_rows(np.asarray(features, dtype=np.float64))  # (N, D)
    labels = np.asarray(labels, dtype=np.int64)
    clusters: list[FailureCluster] = []
    entries = {entry.cluster_id: entry for entry in catalogue}
    for label in sorted(set(labels.tolist())):
        rows = np.flatnonzero(labels == label)  # (n,)
        assignment = _cluster_one_label(unit[rows], settings)  # (n,)
        members = [rows[assignment == index] for index in range(assignment.max() + 1)]
        centroids = np.stack([_centroid(unit[m]) for m in members])  # (K, D)
        known_ids = match_to_catalogue(label, centroids, catalogue, settings.match_threshold)
        for member_rows, centroid, known_id in zip(members, centroids, known_ids, strict=True):
            cluster_id = known_id or _next_id(label, set(entries))
            ids = [sample_ids[i] for i in member_rows]
            clusters.append(
                _make_cluster(cluster_id, label, ids, unit[member_rows], centroid, settings)
            )
            first_seen = entries[cluster_id].first_seen if known_id else night
            entries[cluster_id] = KnownCluster(
                cluster_id, label, clusters[-1].centroid, len(ids), first_seen, night
            )
    n_ready = sum(c.status == READY for c in clusters)
    log.info("clustered %d flags: %d clusters, %d ready", len(sample_ids), len(clusters), n_ready)
    by_id = sorted(clusters, key=lambda c: c.cluster_id)
    return by_id, sorted(entries.values(), key=lambda e: e.cluster_id)


def _make_cluster(
    cluster_id: str,
    label: int,
    ids: list[str],
    unit_features: np.ndarray,
    centroid: np.ndarray,
    settings: ClusterSettings,
) -> FailureCluster:
    """One cluster from its members' ids and unit features (n, D); edit samples nearest centroid."""
    edit_ids, held_out_ids = _split_edit_held_out(
        unit_features, ids, centroid, settings.n_edit_samples
    )
    status = READY if len(ids) >= settings.min_cluster_size else WAITING
    return FailureCluster(
        cluster_id=cluster_id,
        label=label,
        status=status,
        sample_ids=tuple(sorted(ids)),
        edit_ids=edit_ids,
        held_out_ids=held_out_ids,
        centroid=tuple(float(v) for v in centroid),
    )


def save_catalogue(catalogue: Sequence[KnownCluster], path: Path) -> None:
    """Write the catalogue as JSON (one object per known cluster), atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps([asdict(entry) for entry in catalogue], indent=1))
    partial.replace(path)


def load_catalogue(path: Path) -> list[KnownCluster]:
    """Read a catalogue written by `save_catalogue`; a missing file is an empty catalogue.

    Raises:
        DataError: the file is not a catalogue.
    """
    if not path.is_file():
        return []
    try:
        entries = json.loads(path.read_text())
        return [KnownCluster(**{**e, "centroid": tuple(e["centroid"])}) for e in entries]
    except (json.JSONDecodeError, TypeError, KeyError) as exc:
        raise DataError(
            f"{path} is not a cluster catalogue ({exc}); restore it from the data version (DVC) "
            "or delete it to start new ids"
        ) from exc


def adjusted_rand_index(true_groups: Sequence[str], cluster_ids: Sequence[str]) -> float:
    """Adjusted Rand index against generating groups (1 = identical, about 0 = random)."""
    return float(adjusted_rand_score(list(true_groups), list(cluster_ids)))


def purity(true_groups: Sequence[str], cluster_ids: Sequence[str]) -> float:
    """Share of flags whose cluster's majority generating group is their own (1 = pure clusters)."""
    if len(true_groups) != len(cluster_ids):
        raise DataError(f"{len(true_groups)} groups but {len(cluster_ids)} cluster ids")
    if not true_groups:
        return 1.0
    by_cluster: dict[str, Counter[str]] = {}
    for group, cluster_id in zip(true_groups, cluster_ids, strict=True):
        by_cluster.setdefault(cluster_id, Counter())[group] += 1
    majority = sum(counts.most_common(1)[0][1] for counts in by_cluster.values())
    return majority / len(true_groups)
