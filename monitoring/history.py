"""What the flows recorded, collected into one typed `History` for the monitoring dashboard.

Sources, read only:
- the MLflow store (`paths.mlruns`): registered versions with their aliases, provenance and gate
  tags (flows/registry.py), and the night runs (tag `night`) with their artifacts;
- `paths.state`: night records (`nights/<date>/record.json`; a `start.json` alone is a night
  that did not finish), the edit ledger (core/ledger.py) and the champion moves (`audit.jsonl`);
- `paths.data`: the ingest log, quarantined rows, accepted flags and the per-night cluster
  tables (flows/ingest.py);
- `paths.artifacts`: the base model (weight change, drift features), training images (the drift
  reference) and the hypernetwork's header (which base model it belongs to).

Collecting never fails on a missing or partial record (a crashed night, a deleted artifact, an
empty registry): each gap becomes a line of `History.missing` naming the file or run and the fix,
and whatever depends on it is left out.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd
from safetensors import safe_open
from torch import nn

from core.hypernet import hypernet_version
from core.ledger import EditRecord
from core.model import CARD_FILE, ModelCard, load_saved_model
from core.settings import Settings
from flows.bootstrap import base_dir, hypernet_path
from flows.ingest import REJECTED_FILE
from flows.nightly import NIGHT_TAG, ledger_of, night_folder
from flows.registry import CHAMPION, Registry, VersionInfo
from monitoring.drift import DriftTest, flag_drift
from monitoring.edits import ledger_edits
from monitoring.records import (
    ChampionMove,
    ClusterNight,
    FlagDay,
    History,
    HypernetInfo,
    Night,
    Version,
    attempt,
)

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------- MLflow and state


def _versions(registry: Registry | None) -> tuple[list[Version], int | None]:
    """Registered versions (oldest first) and the champion's number."""
    if registry is None:
        return [], None
    infos: list[VersionInfo] = registry.versions()
    versions = []
    for info in infos:
        try:
            gate = json.loads(info.tags.get("gate_decision", ""))
        except ValueError:  # the base model's tag is a sentence, not a decision
            gate = None
        parent = info.tags.get("parent_version", "")
        created = datetime.fromtimestamp(info.created_ms / 1000, UTC).isoformat(timespec="seconds")
        versions.append(
            Version(
                info.version,
                info.aliases,
                created,
                int(parent) if parent else None,
                tuple(info.ledger_ids),
                gate if isinstance(gate, dict) else None,
            )
        )
    return versions, registry.get_alias_version(CHAMPION)


def _night_runs(registry: Registry | None) -> dict[str, Any]:
    """Night (ISO date) -> its MLflow run."""
    if registry is None:
        return {}
    runs = registry.client.search_runs([registry.experiment_id], max_results=5000)
    return {run.data.tags[NIGHT_TAG]: run for run in runs if NIGHT_TAG in run.data.tags}


def _read_record(settings: Settings, night: str) -> dict[str, Any] | None:
    path = night_folder(settings, night) / "record.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _nights(settings: Settings, runs: dict[str, Any], missing: list[str]) -> list[Night]:
    """Every night with a folder under state/nights or an MLflow run, in date order."""
    folder = settings.paths.state / "nights"
    dates = {p.name for p in folder.iterdir() if p.is_dir()} if folder.is_dir() else set()
    nights = []
    for index, night in enumerate(sorted(dates | set(runs)), start=1):
        record = attempt(
            f"night {night} record", missing, lambda n=night: _read_record(settings, n), None
        )
        run = runs.get(night)
        if record is None:
            missing.append(
                f"night {night} did not finish (no {night_folder(settings, night)}/record.json): "
                f"rerun it with `retouch nightly --night {night}`"
            )
        nights.append(Night(index, night, record, run.info.run_id if run else ""))
    return nights


def _check_night_artifacts(
    registry: Registry | None, nights: list[Night], missing: list[str]
) -> None:
    """Each finished night's MLflow run must hold its report and tables."""
    for night in nights:
        if night.record is None or registry is None:
            continue
        if not night.run_id:
            missing.append(f"night {night.night}: no MLflow run in {registry.tracking_uri}")
            continue
        logged = {item.path for item in registry.client.list_artifacts(night.run_id)}
        expected = {f"night-{night.night}.html", "clusters.json", "settings.json"}
        for name in sorted(expected - logged):
            missing.append(f"night {night.night}: artifact {name} missing from run {night.run_id}")


def _moves(settings: Settings) -> list[ChampionMove]:
    path = settings.paths.state / "audit.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    events = [json.loads(line) for line in lines if line.strip()]
    return [ChampionMove(e["at"], e["action"], int(e["version"]), e["detail"]) for e in events]


# ---------------------------------------------------------------- the ledger


# ---------------------------------------------------------------- ingest records


def _night_table(settings: Settings, night: str) -> pd.DataFrame | None:
    path = settings.paths.data / "clusters" / f"night={night}.parquet"
    return pd.read_parquet(path) if path.is_file() else None


def _clusters_of_night(night: Night, table: pd.DataFrame, seen: set[str]) -> list[ClusterNight]:
    """The night's clusters; the record's decisions turn `ready` into edited or rejected."""
    decided = {
        row["cluster_id"]: row["accepted"] for row in (night.record or {}).get("clusters", [])
    }
    rows = []
    pending = table.dropna(subset=["cluster_id"])
    for cluster_id, members in pending.groupby("cluster_id", sort=True):
        status = str(members["status"].iloc[0])
        if cluster_id in decided:
            status = "edited" if decided[cluster_id] else "rejected"
        rows.append(
            ClusterNight(
                night.index,
                night.night,
                str(cluster_id),
                int(members["true_index"].iloc[0]),
                len(members),
                status,
                cluster_id not in seen,
            )
        )
    return rows


def _clusters(settings: Settings, nights: list[Night], missing: list[str]) -> list[ClusterNight]:
    """Every failure cluster of every night, from the night tables ingest wrote."""
    seen: set[str] = set()
    clusters = []
    for night in nights:
        table = attempt(
            f"cluster table of night {night.night}",
            missing,
            lambda n=night.night: _night_table(settings, n),
            None,
        )
        if table is None:
            if night.record is not None:
                missing.append(
                    f"night {night.night}: cluster table {settings.paths.data}/clusters/"
                    f"night={night.night}.parquet is missing (restore data/ with `dvc checkout`)"
                )
            continue
        rows = _clusters_of_night(night, table, seen)
        seen |= {row.cluster_id for row in rows}
        clusters += rows
    return clusters


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    lines = path.read_text().splitlines() if path.is_file() else []
    return [json.loads(line) for line in lines if line.strip()]


def _reasons_by_day(data_dir: Path) -> dict[str, Counter[str]]:
    """Day -> quarantine reason counts, from the quarantined rows' `reasons` column."""
    by_day: dict[str, Counter[str]] = {}
    for path in sorted((data_dir / "quarantine").glob("date=*/*.parquet")):
        day = path.parent.name.removeprefix("date=")
        reasons = pd.read_parquet(path, columns=["reasons"])["reasons"]
        counter = by_day.setdefault(day, Counter())
        for text in reasons:
            counter.update(reason for reason in str(text).split("; ") if reason)
    return by_day


def _day_of(partition: str) -> str:
    """`date=2026-01-05/flags.parquet` -> `2026-01-05`."""
    return partition.split("/")[0].removeprefix("date=")


def _flag_days(
    settings: Settings, flags: pd.DataFrame, drift: dict[str, DriftTest], missing: list[str]
) -> list[FlagDay]:
    """Volume, quarantine and drift per day, from the ingest log and the quarantine folder."""
    data_dir = settings.paths.data
    log = _read_jsonl(data_dir / "ingest_log.jsonl")
    if not log and not flags.empty:
        missing.append(f"{data_dir}/ingest_log.jsonl is missing: flag volumes not drawn")
    reasons = _reasons_by_day(data_dir)
    totals: dict[str, Counter[str]] = {}
    for line in log:
        totals.setdefault(_day_of(line["partition"]), Counter()).update(
            {key: line[key] for key in ("rows_in", "accepted", "quarantined", "duplicates")}
        )
    for line in _read_jsonl(data_dir / REJECTED_FILE):
        totals.setdefault(_day_of(line["partition"]), Counter())["partitions_rejected"] += 1
    return [
        FlagDay(
            day,
            c["rows_in"],
            c["accepted"],
            c["quarantined"],
            c["duplicates"],
            c["partitions_rejected"],
            dict(reasons.get(day, {})),
            drift.get(day),
        )
        for day, c in sorted(totals.items())
    ]


def _accepted_flags(settings: Settings) -> pd.DataFrame:
    """Accepted flags: sample id, image bytes, partition day."""
    data_dir = settings.paths.data
    files = sorted((data_dir / "flagged").glob("date=*/*.parquet"))
    frames = [
        pd.read_parquet(f, columns=["sample_id", "image"]).assign(day=f.parent.name[5:])
        for f in files
    ]
    return (
        pd.concat(frames, ignore_index=True)
        if frames
        else pd.DataFrame(columns=["sample_id", "image", "day"])
    )


def _thumbnails(
    clusters: list[ClusterNight], records: list[EditRecord], settings: Settings, flags: pd.DataFrame
) -> dict[str, list[bytes]]:
    """Cluster id -> PNG bytes of its edit samples (ledger) or latest night's members."""
    images = flags.drop_duplicates("sample_id").set_index("sample_id")["image"]
    limit = settings.monitoring.thumbnails_per_cluster
    ids: dict[str, list[str]] = {}
    for record in records:
        ids.setdefault(record.cluster_id, list(record.sample_ids))
    for night in sorted({c.night for c in clusters}, reverse=True):
        table = _night_table(settings, night)
        for cluster_id, members in table.dropna(subset=["cluster_id"]).groupby("cluster_id"):
            known = ids.setdefault(str(cluster_id), [])
            known += [s for s in sorted(members["sample_id"]) if s not in known][:limit]
    return {
        cluster_id: [images[s] for s in samples if s in images.index][:limit]
        for cluster_id, samples in ids.items()
    }


# ---------------------------------------------------------------- artifacts and the whole


def _hypernet(settings: Settings) -> HypernetInfo:
    """The hypernetwork's header, checked against the base model's card."""
    path = hypernet_path(settings)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; run `retouch metatrain`")
    with safe_open(str(path), framework="pt") as handle:
        header = handle.metadata() or {}
    base_hash = header.get("base_weights_hash", "")
    card_path = base_dir(settings) / CARD_FILE
    matches = ModelCard.read(card_path).weights_hash == base_hash if card_path.is_file() else None
    return HypernetInfo(
        hypernet_version(path), base_hash, matches, json.loads(header.get("meta", "{}"))
    )


def _base_model(settings: Settings) -> nn.Module:
    return load_saved_model(base_dir(settings))[0].eval()


def _registry(settings: Settings) -> Registry:
    return Registry.connect(settings.paths.mlruns, settings.registry)


def _registry_and_nights(
    settings: Settings, missing: list[str]
) -> tuple[list[Version], int | None, list[Night]]:
    """Registered versions, the champion, and every night with its record and MLflow run."""
    registry = attempt("MLflow store", missing, lambda: _registry(settings), None)
    versions, champion = attempt(
        "registry versions", missing, lambda: _versions(registry), ([], None)
    )
    if registry is not None and not versions:
        missing.append(f"the registry {registry.tracking_uri} holds no model version yet")
    runs = attempt("night runs", missing, lambda: _night_runs(registry), {})
    nights = _nights(settings, runs, missing)
    if not nights:
        missing.append(f"no night recorded under {settings.paths.state / 'nights'}")
    attempt(
        "night artifacts", missing, lambda: _check_night_artifacts(registry, nights, missing), None
    )
    return versions, champion, nights


def collect_history(settings: Settings) -> History:
    """Read every record the flows left (see the module docstring) into one `History`.

    Never raises on a missing or broken record: `History.missing` lists each gap.
    """
    missing: list[str] = []
    versions, champion, nights = _registry_and_nights(settings, missing)
    moves = attempt("champion moves (audit.jsonl)", missing, lambda: _moves(settings), [])
    records = attempt("edit ledger", missing, lambda: ledger_of(settings).records(), [])
    base_model = attempt("base model", missing, lambda: _base_model(settings), None)
    edits, locator_drift = ledger_edits(
        settings, records, versions, champion, moves, base_model, missing
    )
    no_flags = pd.DataFrame(columns=["sample_id", "image", "day"])
    flags = attempt("accepted flags", missing, lambda: _accepted_flags(settings), no_flags)
    drift = attempt("flag drift", missing, lambda: flag_drift(settings, flags), {})
    clusters = _clusters(settings, nights, missing)
    flag_days = attempt("flags", missing, lambda: _flag_days(settings, flags, drift, missing), [])
    thumbnails = attempt(
        "thumbnails", missing, lambda: _thumbnails(clusters, records, settings, flags), {}
    )
    return History(
        nights=nights,
        versions=versions,
        champion=champion,
        moves=moves,
        edits=edits,
        clusters=clusters,
        flag_days=flag_days,
        hypernet=attempt("hypernetwork", missing, lambda: _hypernet(settings), None),
        locator_drift=locator_drift,
        thresholds=settings.gate.model_dump(),
        thumbnails=thumbnails,
        missing=missing,
    )
