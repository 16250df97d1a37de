"""The ingest flow: inbox partitions -> validation -> quarantine / dedupe -> still-wrong -> clusters
-> a new DVC data version.

Layout under `paths.data` (all of it versioned by DVC as one folder):
- `inbox/date=YYYY-MM-DD/*.parquet`: flag partitions as delivered (README: Flags); never moved.
- `flagged/<partition>`: accepted rows, plus `content_id`, `true_index`, `predicted_index`.
- `quarantine/<partition>`: failing rows with `reasons`; `quarantine/rejected.jsonl`: partitions
  rejected whole (not Parquet, schema), whose files stay in the inbox.
- `duplicates/<partition>`: exact duplicates dropped (sample_id, content_id, duplicate_of).
- `ingest_log.jsonl`: one line per ingested partition (sha256, counts): the idempotency record.
- `clusters/catalogue.json` and `clusters/night=YYYY-MM-DD.parquet`: every accepted flag with its
  night status (`fixed`, `ready`, `waiting`), cluster id and role (`edit`, `held_out`).

Conservation per partition, asserted and logged: rows in = accepted + quarantined + duplicates.
Tasks pass paths, never models or frames; the rules live in flows/validation.py and
core/clusters.py, testable without Prefect.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from prefect import flow, task

from core.clusters import (
    adjusted_rand_index,
    cluster_failures,
    load_catalogue,
    purity,
    save_catalogue,
)
from core.data import decode_image
from core.errors import DataError
from core.model import (
    CARD_FILE,
    ModelCard,
    Preprocessing,
    load_saved_model,
    pooled_features,
    predict_logits,
    preprocess,
)
from core.settings import ClusterSettings, IngestSettings, Settings
from flows.lock import retry_when_busy
from flows.validation import AcceptedIndex, read_partition, split_rows, validate_rows
from flows.versioning import DvcCommandError, version_data

log = logging.getLogger(__name__)

FLAG_COLUMNS_ADDED = ["content_id", "true_index", "predicted_index", "partition"]
LOG_FILE = "ingest_log.jsonl"
REJECTED_FILE = "quarantine/rejected.jsonl"  # partitions rejected whole, with sha256 and error
FIXED = "fixed"


@dataclass(frozen=True)
class PartitionCounts:
    """What ingest did with one partition; rows_in = accepted + quarantined + duplicates."""

    partition: str  # path relative to the inbox, e.g. "date=2026-01-05/flags.parquet"
    rows_in: int
    accepted: int
    quarantined: int
    duplicates: int


@dataclass(frozen=True)
class ClusterSummary:
    """One night's clustering: where the table is and how it came out."""

    table: Path
    n_fixed: int
    n_still_wrong: int
    n_clusters: int
    n_ready: int
    quality: dict[str, float] = field(default_factory=dict)  # ARI / purity when ground truth exists


@dataclass(frozen=True)
class IngestResult:
    """The flow's result: counts, partitions, the cluster table and the data version."""

    partitions: list[PartitionCounts]
    rejected: dict[str, str]  # partition -> why it was rejected whole
    clusters: ClusterSummary | None
    data_version: str | None  # md5 of data/ in data.dvc; None when versioning is off

    @property
    def rows_in(self) -> int:
        """Rows read from this run's partitions."""
        return sum(p.rows_in for p in self.partitions)

    @property
    def accepted(self) -> int:
        """Rows accepted into flagged/."""
        return sum(p.accepted for p in self.partitions)

    @property
    def quarantined(self) -> int:
        """Rows moved to quarantine/."""
        return sum(p.quarantined for p in self.partitions)

    @property
    def duplicates(self) -> int:
        """Exact duplicates dropped."""
        return sum(p.duplicates for p in self.partitions)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def _append_jsonl(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        handle.write(json.dumps(record, sort_keys=True) + "\n")


def inbox_partitions(data_dir: Path) -> list[str]:
    """Every partition file under `inbox/date=*/`, relative to the inbox, in date order."""
    inbox = data_dir / "inbox"
    files = [p for p in inbox.glob("date=*/*") if p.is_file() and not p.name.startswith(".")]
    return sorted(str(p.relative_to(inbox)) for p in files)


def new_partitions(data_dir: Path) -> list[str]:
    """Partitions not ingested yet, nor rejected as they are now (a rewritten file is retried).

    Raises:
        DataError: an ingested partition's bytes changed (corrections need a new file name).
    """
    done = {record["partition"]: record["sha256"] for record in _read_jsonl(data_dir / LOG_FILE)}
    rejected = {r["partition"]: r["sha256"] for r in _read_jsonl(data_dir / REJECTED_FILE)}
    fresh = []
    for partition in inbox_partitions(data_dir):
        sha256 = _sha256(data_dir / "inbox" / partition)
        if partition in done and sha256 != done[partition]:
            raise DataError(
                f"{data_dir / 'inbox' / partition} changed after it was ingested; restore it and "
                "write corrections under a new file name in the inbox"
            )
        if partition not in done and rejected.get(partition) != sha256:
            fresh.append(partition)
    return fresh


def load_accepted(
    data_dir: Path, columns: list[str] | None = None, exclude: str | None = None
) -> pd.DataFrame:
    """All accepted flags (the `flagged/` tree, but partition `exclude`) as one frame."""
    skip = data_dir / "flagged" / exclude if exclude else None
    files = [f for f in sorted((data_dir / "flagged").glob("date=*/*")) if f != skip]
    if not files:
        return pd.DataFrame(columns=columns or ["sample_id", "content_id", "true_index"])
    return pd.concat([pd.read_parquet(f, columns=columns) for f in files], ignore_index=True)


def _write_rows(frame: pd.DataFrame, path: Path) -> None:
    """Write a frame as Parquet (even when empty, so every partition leaves a trace)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_parquet(path, index=False)


def route_partition(
    partition: str, data_dir: Path, class_names: list[str], settings: IngestSettings
) -> PartitionCounts:
    """Validate one partition and write its accepted, quarantined and duplicate rows.

    Raises:
        DataError: the partition cannot be read as a whole (not Parquet, schema).
    """
    frame = read_partition(data_dir / "inbox" / partition)
    contract = list(frame.columns)  # the delivered columns, extras included
    known = load_accepted(data_dir, ["sample_id", "content_id", "true_index"], exclude=partition)
    accepted_index = AcceptedIndex.from_frame(known)  # a rerun of this partition replaces it
    checked = validate_rows(frame, class_names, accepted_index, settings).assign(
        partition=partition
    )
    accepted, quarantined, duplicates = split_rows(checked)
    _write_rows(accepted[contract + FLAG_COLUMNS_ADDED], data_dir / "flagged" / partition)
    _write_rows(
        quarantined[[*contract, "partition", "reasons"]], data_dir / "quarantine" / partition
    )
    _write_rows(
        duplicates[["sample_id", "content_id", "true_label", "duplicate_of", "partition"]],
        data_dir / "duplicates" / partition,
    )
    counts = PartitionCounts(
        partition, len(frame), len(accepted), len(quarantined), len(duplicates)
    )
    if counts.rows_in != counts.accepted + counts.quarantined + counts.duplicates:
        raise AssertionError(f"conservation broken for {partition}: {counts}")
    return counts


_PIL_RESAMPLING = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}


def _flag_images(pngs: list[bytes], preprocessing: Preprocessing, source: Path) -> torch.Tensor:
    """Decode flag images (any size and mode) to uint8 (N, 3, S, S) at the model's input size.

    Resized one by one (the card's interpolation) so images of different sizes can be batched.
    """
    size, resample = preprocessing.input_size, _PIL_RESAMPLING[preprocessing.interpolation]
    images = []
    for index, data in enumerate(pngs):
        rgb = decode_image(data, f"{source} row {index}")  # (H, W, 3)
        if rgb.shape[:2] != (size, size):
            rgb = np.asarray(Image.fromarray(rgb).resize((size, size), resample))  # (S, S, 3)
        images.append(torch.from_numpy(np.array(rgb)).permute(2, 0, 1))  # writable copy
    return torch.stack(images) if images else torch.zeros((0, 3, size, size), dtype=torch.uint8)


def _model_inputs(
    model_dir: Path, pngs: list[bytes], source: Path
) -> tuple[torch.nn.Module, torch.Tensor]:
    """A saved model (eval mode) and the flag images preprocessed for it, float (N, 3, S, S)."""
    model, card = load_saved_model(model_dir)
    images = _flag_images(pngs, card.preprocessing, source)  # (N, 3, S, S) uint8
    return model.eval(), preprocess(images, card)


@torch.no_grad()
def predictions(model_dir: Path, pngs: list[bytes], batch_size: int, source: Path) -> np.ndarray:
    """Class index (N,) the saved model predicts for each flag image."""
    model, inputs = _model_inputs(model_dir, pngs, source)
    return predict_logits(model, inputs, batch_size).argmax(dim=1).numpy()


@torch.no_grad()
def features(model_dir: Path, pngs: list[bytes], batch_size: int, source: Path) -> np.ndarray:
    """Pooled features (N, D) of the saved model for each flag image: the clustering space."""
    model, inputs = _model_inputs(model_dir, pngs, source)
    return pooled_features(model, inputs, batch_size).numpy()


def _night_table_path(data_dir: Path, night: date) -> Path:
    return data_dir / "clusters" / f"night={night.isoformat()}.parquet"


def still_wrong(data_dir: Path, champion_dir: Path, batch_size: int) -> pd.DataFrame:
    """Every accepted flag with the champion's prediction; status `fixed` where it is now right.

    Rows not fixed get status "" until clustering fills it in.
    """
    flags = load_accepted(data_dir)
    if flags.empty:
        return pd.DataFrame(columns=["sample_id", "true_index", "champion_prediction", "status"])
    predicted = predictions(champion_dir, flags["image"].tolist(), batch_size, data_dir / "flagged")
    keep = [c for c in ("sample_id", "true_index", "partition", "world_group") if c in flags]
    table = flags[keep].assign(champion_prediction=predicted)
    table["status"] = np.where(predicted == table["true_index"].to_numpy(), FIXED, "")
    return table


def cluster_table(
    table: pd.DataFrame, features_of_pending: np.ndarray, settings: ClusterSettings,
    catalogue_path: Path, night: date,
) -> pd.DataFrame:  # fmt: skip
    """The night table with status, cluster_id and role for the rows not fixed."""
    pending = table.index[table["status"] != FIXED]
    clusters, catalogue = cluster_failures(
        features_of_pending,
        table.loc[pending, "true_index"].to_numpy(dtype=np.int64),
        table.loc[pending, "sample_id"].tolist(),
        settings,
        load_catalogue(catalogue_path),
        night.isoformat(),
    )
    save_catalogue(catalogue, catalogue_path)
    assignment = {}
    for cluster in clusters:
        for sample_id in cluster.sample_ids:
            role = "edit" if sample_id in cluster.edit_ids else "held_out"
            assignment[sample_id] = (cluster.status, cluster.cluster_id, role)
    table = table.assign(cluster_id=None, role=None)
    for column, position in (("status", 0), ("cluster_id", 1), ("role", 2)):
        table.loc[pending, column] = [
            assignment[s][position] for s in table.loc[pending, "sample_id"]
        ]
    return table


def clustering_quality(table: pd.DataFrame) -> dict[str, float]:
    """ARI and purity of the night's clusters against `world_group`, if the flags carry it."""
    clustered = table[table["cluster_id"].notna()]
    if "world_group" not in table or clustered.empty:
        return {}
    groups, ids = clustered["world_group"].tolist(), clustered["cluster_id"].tolist()
    return {"adjusted_rand_index": adjusted_rand_index(groups, ids), "purity": purity(groups, ids)}


@task
def find_new_partitions(data_dir: Path) -> list[str]:
    """Inbox partitions not ingested yet."""
    return new_partitions(data_dir)


@task
def ingest_partition(
    partition: str, data_dir: Path, class_names: list[str], settings: IngestSettings
) -> PartitionCounts | str:
    """Route one partition's rows and log it as ingested; a rejection comes back as its reason."""
    try:
        counts = route_partition(partition, data_dir, class_names, settings)
    except DataError as error:
        log.error("partition %s rejected: %s", partition, error)
        sha256 = _sha256(data_dir / "inbox" / partition)
        _append_jsonl(
            data_dir / REJECTED_FILE,
            {"partition": partition, "sha256": sha256, "error": str(error)},
        )
        return str(error)
    sha256 = _sha256(data_dir / "inbox" / partition)
    _append_jsonl(data_dir / LOG_FILE, {"sha256": sha256, **counts.__dict__})
    log.info(
        "%s: %d rows in = %d accepted + %d quarantined + %d duplicates",
        partition, counts.rows_in, counts.accepted, counts.quarantined, counts.duplicates,
    )  # fmt: skip
    return counts


@task
def check_still_wrong(data_dir: Path, champion_dir: Path, night: date, batch_size: int) -> Path:
    """Write the night table: every accepted flag, `fixed` where the champion is now right."""
    table = still_wrong(data_dir, champion_dir, batch_size)
    path = _night_table_path(data_dir, night)
    _write_rows(table, path)
    log.info(
        "%d accepted flags, %d already fixed", len(table), int((table["status"] == FIXED).sum())
    )
    return path


@task
def cluster_flags(
    night_table: Path, data_dir: Path, base_dir: Path, settings: ClusterSettings, night: date,
    batch_size: int,
) -> ClusterSummary:  # fmt: skip
    """Cluster the night's still-wrong flags on base-model features; rewrite the night table."""
    table = pd.read_parquet(night_table)
    pending_ids = table.loc[table["status"] != FIXED, "sample_id"]
    if not pending_ids.empty:
        flags = load_accepted(data_dir, ["sample_id", "image"]).set_index("sample_id")
        pngs = flags.loc[pending_ids, "image"].tolist()
        base_features = features(base_dir, pngs, batch_size, data_dir / "flagged")  # (n, D)
        table = cluster_table(
            table, base_features, settings, data_dir / "clusters" / "catalogue.json", night
        )
    else:  # nothing to cluster (empty inbox, all fixed): same columns, no cluster
        table = table.assign(cluster_id=None, role=None)
    _write_rows(table, night_table)
    clusters = table.drop_duplicates("cluster_id").dropna(subset=["cluster_id"])
    summary = ClusterSummary(
        table=night_table,
        n_fixed=int((table["status"] == FIXED).sum()),
        n_still_wrong=len(pending_ids),
        n_clusters=len(clusters),
        n_ready=int((clusters["status"] == "ready").sum()),
        quality=clustering_quality(table) if not pending_ids.empty else {},
    )
    log.info("night %s clusters: %s", night, summary)
    return summary


_dvc_busy = retry_when_busy((DvcCommandError,), "lock")  # a held DVC lock


@task(retries=2, retry_delay_seconds=5, retry_condition_fn=_dvc_busy)
def version_data_folder(data_dir: Path, remote: Path) -> str:
    """`dvc add` + `dvc push` the data folder; returns the new data version (md5)."""
    return version_data(data_dir, remote)


@flow(name="ingest")
def ingest_flow(
    settings: Settings,
    champion_dir: Path,
    base_dir: Path | None = None,
    night: date | None = None,
    version: bool = True,
) -> IngestResult:
    """Ingest new inbox partitions, cluster the still-wrong flags and version the data.

    Args:
        settings: all settings (paths, ingest, clusters are read).
        champion_dir: saved champion model (load_saved_model folder): still-wrong check and the
            class names labels must belong to.
        base_dir: saved base model whose features cluster the flags; defaults to the champion.
        night: the night's date (clusters table name, catalogue); defaults to today (UTC).
        version: run `dvc add` + `dvc push` and return the data version.
    """
    data_dir = settings.paths.data
    night = night or datetime.now(UTC).date()
    class_names = list(ModelCard.read(Path(champion_dir) / CARD_FILE).class_names)
    outcomes = {
        p: ingest_partition(p, data_dir, class_names, settings.ingest)
        for p in find_new_partitions(data_dir)
    }
    partitions = [c for c in outcomes.values() if isinstance(c, PartitionCounts)]
    night_table = check_still_wrong(data_dir, champion_dir, night, settings.ingest.batch_size)
    summary = cluster_flags(
        night_table,
        data_dir,
        base_dir or champion_dir,
        settings.clusters,
        night,
        settings.ingest.batch_size,
    )
    data_version = version_data_folder(data_dir, settings.paths.dvc_remote) if version else None
    result = IngestResult(
        partitions=partitions,
        rejected={p: c for p, c in outcomes.items() if isinstance(c, str)},
        clusters=summary,
        data_version=data_version,
    )
    counts = (result.rows_in, result.accepted, result.quarantined, result.duplicates)
    log.info("ingest: %d rows in = %d accepted + %d quarantined + %d duplicates", *counts)
    return result
