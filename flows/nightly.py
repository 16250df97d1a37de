"""The nightly continual-editing flow: ingest, edit each ready cluster, gate, register, promote.

`nightly_edit` (Prefect flow) runs one night under the edit lock (flows/lock.py):
1. open the registry (base model = version 1, first champion) and check the hypernetwork
   belongs to the base model, before anything else;
2. fix the night's parent (the champion when the night started, kept in `start.json` so a rerun
   of a crashed night edits the same model) and download it;
3. the ingest flow as a subflow (validation, quarantine, clusters, DVC data version);
4. cache the base model's and the parent's predictions on the broad sample, the sensitive set
   and clean validation data, once (kept under `state/cache/` by weights hash, so the base
   model's and a champion judged on an earlier night are not run again);
5. edit the ready clusters in id order on the running candidate (core/continual.py), append
   every accepted edit to the ledger;
6. rebuild the candidate from base + ledger alone, judge it with the global gate, register it
   (alias `candidate`), move `champion` only on a pass;
7. log the night to MLflow (one run per night), write the HTML report and a Prefect markdown
   artifact, and record the night in `state/nights/<date>/record.json`.

Every step is idempotent, so a night that crashed anywhere reruns to the same versions and the
same ledger entries; a finished night returns its record. Any error stops the flow before the
champion moves (fail closed). Tasks pass paths and ids, never models.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow.parquet as pq
import torch
from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NONE
from safetensors.torch import load_file, save_file

from core.continual import (
    ClusterOutcome,
    ClusterRequest,
    MakeEditor,
    candidate_figures,
    edit_clusters,
    fallback_tries,
    predicted_classes,
    unit_mask,
)
from core.data import decode_image, iter_batches, load_images
from core.edit import MaskedEditor
from core.errors import LedgerIntegrityError, RegistryError, RetouchError
from core.gate import GateResult, global_gate
from core.hypernet import HypernetLocator, hypernet_version, load_hypernet
from core.ledger import EditRecord, Ledger
from core.model import (
    ModelCard,
    load_saved_model,
    preprocess,
    save_model,
    torch_threads,
    weights_hash,
)
from core.replay import ReplayBatch, build_replay_batch
from core.scope import build_scope
from core.settings import Settings, load_settings
from flows.bootstrap import base_dir, benchmark_dir, hypernet_path, world_dir
from flows.ingest import IngestResult, ingest_flow, load_accepted
from flows.lock import edit_lock, lock_path, retry_when_busy
from flows.registry import CANDIDATE, CHAMPION, Registry, VersionTags
from monitoring.night_report import write_night_report

logger = logging.getLogger(__name__)

ARTIFACT_KEY = "nightly-edit"  # Prefect markdown artifact key: one history of night tables
NIGHT_TAG = "night"  # MLflow tag naming the night of a night run
READY = "ready"


@dataclass(frozen=True)
class ClusterRow:
    """One cluster's line of the night table."""

    cluster_id: str
    accepted: bool
    tries: int
    rho: float
    reliability: float | None
    generalization: float | None
    locality: float | None
    reasons: str
    ledger_id: str = ""


@dataclass(frozen=True)
class NightResult:
    """What a night did; also its record on disk (`record.json`) and the CLI's table."""

    night: str  # ISO date
    parent_version: int
    champion_version: int  # the champion after the night
    candidate_version: int | None  # None when no edit was accepted (nothing registered)
    promoted: bool
    flags_in: int
    quarantined: int
    duplicates: int
    partitions_rejected: int
    clusters_ready: int
    clusters_waiting: int
    clusters: list[ClusterRow]
    ledger_ids: list[str]  # the candidate's (= parent's when nothing was accepted)
    candidate_hash: str
    data_version: str | None
    hypernet_version: str
    gate: dict[str, Any] | None = None  # asdict(GateResult) of the global gate
    run_id: str = ""  # the MLflow night run
    report: str = ""  # the night's HTML page

    @property
    def n_accepted(self) -> int:
        """Clusters whose edit joined the candidate."""
        return sum(row.accepted for row in self.clusters)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> NightResult:
        """Inverse of `to_dict`."""
        rows = [ClusterRow(**row) for row in data["clusters"]]
        return cls(**{**data, "clusters": rows})


@dataclass(frozen=True)
class EditSummary:
    """What the edit task hands on: table rows, tonight's ledger ids, the candidate's hash."""

    rows: list[ClusterRow]
    new_ids: list[str]
    candidate_hash: str
    masks: Path
    waiting: int = 0
    ready: int = 0


# ---------------------------------------------------------------- paths and data


def night_folder(settings: Settings, night: str) -> Path:
    """Working folder of one night under the production state."""
    return settings.paths.state / "nights" / night


def night_index(settings: Settings, night: str) -> int:
    """1-based position of `night` among the nights started so far, in date order: the step of
    its MLflow metrics (the dashboard counts nights the same way)."""
    started = {path.name for path in (settings.paths.state / "nights").glob("*") if path.is_dir()}
    return sorted(started | {night}).index(night) + 1


def ledger_of(settings: Settings) -> Ledger:
    """The production edit ledger."""
    return Ledger(settings.paths.state / "ledger")


def file_version(path: Path) -> str:
    """Short content hash of a file's bytes (a cache key's part)."""
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def flag_images(pngs: list[bytes], card: ModelCard, source: str) -> torch.Tensor:
    """Flag PNGs (any size) -> preprocessed float (N, 3, S, S) for the model of `card`."""
    size = card.preprocessing.input_size
    images = [
        preprocess(torch.from_numpy(decode_image(data, source).copy()).permute(2, 0, 1)[None], card)
        for data in pngs
    ]  # each (1, 3, S, S)
    return torch.cat(images) if images else torch.zeros((0, 3, size, size))


def cluster_requests(
    night_table: pd.DataFrame, flags: pd.DataFrame, card: ModelCard
) -> list[ClusterRequest]:
    """The night's ready clusters as edit requests (images from `flags`, indexed by sample_id)."""
    ready = night_table[night_table["status"] == READY]
    requests = []
    for cluster_id, rows in ready.groupby("cluster_id", sort=True):
        parts = {}
        for role in ("edit", "held_out"):
            ids = sorted(rows.loc[rows["role"] == role, "sample_id"])
            pngs = flags.loc[ids, "image"].tolist()
            labels = torch.tensor(flags.loc[ids, "true_index"].to_numpy(), dtype=torch.int64)
            parts[role] = (ids, flag_images(pngs, card, f"flags of cluster {cluster_id}"), labels)
        requests.append(
            ClusterRequest(
                str(cluster_id), tuple(parts["edit"][0]), *parts["edit"][1:], *parts["held_out"][1:]
            )
        )
    return requests


def clean_set(path: Path, card: ModelCard) -> tuple[torch.Tensor, torch.Tensor]:
    """A clean image Parquet file as preprocessed images (N, 3, S, S) and labels (N,)."""
    images = load_images(path)
    return preprocess(images.images, card), images.labels


def reference_paths(settings: Settings) -> dict[str, Path]:
    """The frozen clean sets: broad sample, sensitive set, validation data."""
    return {
        "broad": benchmark_dir(settings) / "broad.parquet",
        "sensitive": benchmark_dir(settings) / "sensitive.parquet",
        "validation": world_dir(settings) / "val.parquet",
    }


def clean_labels(path: Path) -> torch.Tensor:
    """(N,) int64 labels of a clean image Parquet file, without decoding its images."""
    labels = pq.read_table(path, columns=["label"]).column("label").to_numpy()
    return torch.from_numpy(labels.astype("int64"))


def cached_tensors(
    settings: Settings, key: str, compute: Callable[[], dict[str, torch.Tensor]]
) -> dict[str, torch.Tensor]:
    """Tensors saved under `state/cache/<key>.safetensors`, computed and saved on first use.

    `key` must hash everything the tensors depend on (weights, files, settings), so a hit is the
    computation's result, bit for bit, without running it again.
    """
    path = settings.paths.state / "cache" / f"{key}.safetensors"
    if path.is_file():
        return load_file(str(path))
    tensors = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    save_file(tensors, str(partial))
    partial.rename(path)
    return tensors


def cache_key(*parts: str) -> str:
    """A short hash of the parts a cached result depends on."""
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:32]


def clean_predictions(
    settings: Settings, model: torch.nn.Module, card: ModelCard
) -> dict[str, torch.Tensor]:
    """(N,) classes of `model` on each frozen clean set (`reference_paths`), by set name.

    Cached by weights: the base model's are computed once, a champion's when it was judged as a
    candidate, so a night usually runs only its candidate on these sets.
    """
    paths = reference_paths(settings)
    batch = settings.nightly.inference_batch_size
    key = cache_key(
        "clean-predictions", weights_hash(model), str(batch), *map(file_version, paths.values())
    )
    return cached_tensors(
        settings,
        key,
        lambda: {
            name: predicted_classes(model, clean_set(path, card)[0], batch)
            for name, path in paths.items()
        },
    )


# ---------------------------------------------------------------- the editing stage


def hprd_editor(settings: Settings, base_model: torch.nn.Module) -> MakeEditor:
    """(rho, edit settings) -> HPRD editor: the hypernetwork's mean mask over the edit samples.

    Raises:
        ModelError: the checkpoint is missing or unreadable.
        CheckpointMismatch: it was meta-trained on another base model.
    """
    locator = HypernetLocator(load_hypernet(hypernet_path(settings), base_model))
    scope = build_scope(base_model, settings.scope.blocks)
    return lambda rho, edit: MaskedEditor("hprd", scope, locator, rho, edit)


def replay_batch(settings: Settings, base_model: torch.nn.Module, card: ModelCard) -> ReplayBatch:
    """The locality term's replay batch (extension (a)): clean images picked by the base model
    from the first `nightly.replay_pool` training images (not gate sets), with the base model's
    probabilities as the targets every edit holds; cached by the base model's weights.
    """
    path, pool = world_dir(settings) / "train.parquet", settings.nightly.replay_pool
    size, seed = settings.edit.replay_size, settings.edit.seed
    key = cache_key(
        "replay+probs", weights_hash(base_model), file_version(path), f"{pool} {size} {seed}"
    )

    def pick() -> dict[str, torch.Tensor]:
        parts, n_read = [], 0
        for batch in iter_batches(path, pool):  # decode only the pool, not the whole file
            parts.append(batch.images[: pool - n_read])
            n_read += len(parts[-1])
            if n_read >= pool:
                break
        pool_images = preprocess(torch.cat(parts), card)  # (pool, 3, S, S)
        chosen = build_replay_batch(base_model, pool_images, size // 2, size - size // 2, seed)
        return {"images": chosen.images, "probs": chosen.probs}

    cached = cached_tensors(settings, key, pick)
    return ReplayBatch(cached["images"], cached["probs"])


def earlier_edit_samples(
    settings: Settings, ledger_ids: list[str], flags: pd.DataFrame, card: ModelCard
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The first `nightly.retention_replay_per_edit` samples of each earlier edit, as images
    (m, 3, S, S) and labels (m,) from the night's flags (indexed by sample_id), or None when there
    are none; lost samples are skipped (the global gate's retention check fails closed on them)."""
    per_edit = settings.nightly.retention_replay_per_edit
    ids = [i for r in map(ledger_of(settings).get, ledger_ids) for i in r.sample_ids[:per_edit]]
    kept = [i for i in ids if i in flags.index]
    if len(kept) < len(ids):
        logger.warning("%d earlier edit samples are not in the flags", len(ids) - len(kept))
    if not kept:
        return None
    labels = torch.tensor(flags.loc[kept, "true_index"].to_numpy(), dtype=torch.int64)
    return flag_images(flags.loc[kept, "image"].tolist(), card, "earlier edits"), labels


def run_edit_stage(
    settings: Settings,
    parent_dir: Path,
    night_table: pd.DataFrame,
    flags: pd.DataFrame,
    parent_ledger_ids: list[str],
) -> tuple[torch.nn.Module, list[ClusterRequest], list[ClusterOutcome]]:
    """Edit the night's ready clusters on the parent; shared by the night and its rerun.

    The locality term's replay batch holds clean training images and the base model's
    probabilities on them; samples of the parent's edits (`parent_ledger_ids`) go with it, so a
    new edit keeps earlier fixes in place.

    Returns:
        The candidate (parent plus accepted deltas), the requests and their outcomes.
    """
    model, card = load_saved_model(parent_dir)
    requests = cluster_requests(night_table, flags, card)
    if not requests:  # nothing ready: the candidate is the parent
        return model, requests, []
    base_model, _ = load_saved_model(base_dir(settings))
    make_editor = hprd_editor(settings, base_model)
    broad_images, _ = clean_set(reference_paths(settings)["broad"], card)
    night = settings.nightly
    replay, retained = None, None
    if settings.edit.locality_weight > 0:
        replay = replay_batch(settings, base_model, card)
    if settings.edit.retention_weight > 0:
        retained = earlier_edit_samples(settings, parent_ledger_ids, flags, card)
    first_try = settings.edit.model_copy(update={"max_steps": night.max_steps})
    tries = fallback_tries(
        first_try, settings.edit.rho, night.fallback_rho, night.fallback_max_steps
    )
    outcomes = edit_clusters(
        model,
        requests,
        make_editor,
        tries,
        broad_images,
        settings.gate,
        settings.edit.seed,
        night.inference_batch_size,
        replay,
        retained,
        night.retention_replay_per_edit if settings.edit.retention_weight > 0 else 0,
    )
    return model, requests, outcomes


def cluster_row(outcome: ClusterOutcome, ledger_id: str) -> ClusterRow:
    """The table line of one outcome."""
    figures = outcome.gate.figures
    return ClusterRow(
        cluster_id=outcome.cluster_id,
        accepted=outcome.accepted,
        tries=len(outcome.attempts),
        rho=outcome.attempts[-1].rho,
        reliability=figures.get("reliability"),
        generalization=figures.get("generalization"),
        locality=figures.get("locality"),
        reasons="; ".join(outcome.gate.reasons),
        ledger_id=ledger_id,
    )


def append_accepted(
    settings: Settings, night: str, requests: list[ClusterRequest], outcomes: list[ClusterOutcome]
) -> list[str]:
    """Append every accepted edit to the ledger (idempotent); return their ids in order."""
    ledger, by_id = ledger_of(settings), {r.cluster_id: r for r in requests}
    ids = []
    for outcome in outcomes:
        if not outcome.accepted:
            continue
        record = EditRecord.from_delta(
            outcome.delta,
            cluster_id=outcome.cluster_id,
            sample_ids=by_id[outcome.cluster_id].edit_sample_ids,
            parent_model_hash=outcome.parent_hash,
            metrics_before={"reliability": outcome.reliability_before},
            metrics_after=outcome.gate.figures,
            settings=outcome.edit_settings,
            seed=settings.edit.seed,
            run_id=night,
        )
        ids.append(ledger.append(record, outcome.delta).id)
    return ids


# ---------------------------------------------------------------- tasks


_store_busy = retry_when_busy((RegistryError,), "locked")  # a locked SQLite store


@task(retries=2, retry_delay_seconds=3, retry_condition_fn=_store_busy, cache_policy=NONE)
def open_registry(settings: Settings) -> int:
    """Connect to the store, make the base model version 1; return the current champion."""
    registry = Registry.connect(settings.paths.mlruns, settings.registry)
    registry.ensure_base(base_dir(settings), VersionTags.base())
    return registry.get_alias_version(CHAMPION)


@task(cache_policy=NONE)
def check_hypernet(settings: Settings) -> str:
    """Load the hypernetwork beside the base model (refused if it belongs to another); version."""
    base_model, _ = load_saved_model(base_dir(settings))
    load_hypernet(hypernet_path(settings), base_model)
    return hypernet_version(hypernet_path(settings))


@task(cache_policy=NONE)
def start_night(settings: Settings, night: str, champion: int) -> int:
    """The night's parent version: the champion at its first start, kept across reruns."""
    path = night_folder(settings, night) / "start.json"
    if path.is_file():
        return int(json.loads(path.read_text())["parent_version"])
    path.parent.mkdir(parents=True, exist_ok=True)
    started = {"parent_version": champion, "started_at": datetime.now(UTC).isoformat()}
    path.write_text(json.dumps(started))
    return champion


@task(retries=2, retry_delay_seconds=3, retry_condition_fn=_store_busy, cache_policy=NONE)
def fetch_version(settings: Settings, version: int, destination: Path) -> Path:
    """Download a registered version's model folder (replacing a partial earlier download)."""
    registry = Registry.connect(settings.paths.mlruns, settings.registry)
    destination.mkdir(parents=True, exist_ok=True)
    return registry.load_version_folder(version, destination)


def write_references(settings: Settings, parent_dir: Path, folder: Path) -> Path:
    """Predictions of the base model and of the parent on the frozen clean sets, saved once."""
    base_model, card = load_saved_model(base_dir(settings))
    parent, _ = load_saved_model(parent_dir)
    tensors = {}
    for owner, model in (("base", base_model), ("champion", parent)):
        for name, predictions in clean_predictions(settings, model, card).items():
            tensors[f"{name}/{owner}"] = predictions
    for name, path in reference_paths(settings).items():
        tensors[f"{name}/labels"] = clean_labels(path)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "references.safetensors"))
    return folder / "references.safetensors"


@task(cache_policy=NONE)
def cache_references(settings: Settings, parent_dir: Path, folder: Path) -> Path:
    """Cache the base model's and the parent's predictions for the night (`write_references`)."""
    return write_references(settings, parent_dir, folder)


@task(cache_policy=NONE)
def edit_night(
    settings: Settings,
    night: str,
    night_table: Path,
    parent_dir: Path,
    parent_ledger_ids: list[str],
) -> EditSummary:
    """Edit the ready clusters, append accepted edits to the ledger, save the masks."""
    table = pd.read_parquet(night_table)
    flags = load_accepted(settings.paths.data, ["sample_id", "image", "true_index"])
    flags = flags.drop_duplicates("sample_id").set_index("sample_id")
    model, requests, outcomes = run_edit_stage(
        settings, parent_dir, table, flags, parent_ledger_ids
    )
    new_ids = iter(append_accepted(settings, night, requests, outcomes))
    rows = [cluster_row(o, next(new_ids) if o.accepted else "") for o in outcomes]
    scope = build_scope(model, settings.scope.blocks)
    masks = {
        o.cluster_id: unit_mask(scope, o.delta).to(torch.uint8) for o in outcomes if o.accepted
    }
    masks_path = night_folder(settings, night) / "masks.safetensors"
    save_file(masks, str(masks_path))
    clusters = table.dropna(subset=["cluster_id"]).drop_duplicates("cluster_id")
    return EditSummary(
        rows=rows,
        new_ids=[row.ledger_id for row in rows if row.accepted],
        candidate_hash=weights_hash(model),
        masks=masks_path,
        waiting=int((clusters["status"] == "waiting").sum()),
        ready=int((clusters["status"] == READY).sum()),
    )


@task(cache_policy=NONE)
def build_candidate(settings: Settings, ledger_ids: list[str], expected_hash: str) -> Path:
    """Rebuild the candidate from base + ledger alone and save it under `state/candidates/`.

    Raises:
        LedgerIntegrityError: a delta is missing or altered, or the replay differs from the
            model the edits were made on.
    """
    base_model, card = load_saved_model(base_dir(settings))
    candidate = ledger_of(settings).replay(base_model, ledger_ids)
    actual = weights_hash(candidate)
    if actual != expected_hash:
        raise LedgerIntegrityError(
            f"replaying ledger ids {ledger_ids} gives weights {actual[:12]}, the edited model had "
            f"{expected_hash[:12]}; the ledger under {settings.paths.state} does not describe it"
        )
    folder = settings.paths.state / "candidates" / actual[:16]
    save_model(candidate, dataclasses.replace(card, metrics={}), folder)
    return folder


def retention_sets(
    settings: Settings, ledger_ids: list[str], card: ModelCard
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Ledger id -> its edit samples and labels, from the accepted flags; a lost sample drops
    the set, so the gate fails closed on its missing retention figure."""
    flags = load_accepted(settings.paths.data, ["sample_id", "image", "true_index"])
    flags = flags.drop_duplicates("sample_id").set_index("sample_id")
    sets = {}
    for record in map(ledger_of(settings).get, ledger_ids):
        ids = list(record.sample_ids)
        if not set(ids) <= set(flags.index):
            logger.error("edit %s: its samples are no longer in the flags", record.id)
            continue
        labels = torch.tensor(flags.loc[ids, "true_index"].to_numpy(), dtype=torch.int64)
        sets[record.id] = (flag_images(flags.loc[ids, "image"].tolist(), card, record.id), labels)
    return sets


def judge(
    settings: Settings, candidate_dir: Path, references: Path, ledger_ids: list[str]
) -> GateResult:
    """The global gate on a saved candidate against the cached reference predictions."""
    candidate, card = load_saved_model(candidate_dir)
    figures = candidate_figures(
        candidate,
        clean_predictions(settings, candidate, card),
        load_file(str(references)),
        retention_sets(settings, ledger_ids, card),
        settings.nightly.inference_batch_size,
    )
    return global_gate(figures, settings.gate, ledger_ids)


@task(cache_policy=NONE)
def judge_candidate(
    settings: Settings, candidate_dir: Path, references: Path, ledger_ids: list[str]
) -> GateResult:
    """Global gate: locality vs champion and base, accuracy drop, retention of every edit."""
    return judge(settings, candidate_dir, references, ledger_ids)


@task(cache_policy=NONE)  # never retried blindly: registration is idempotent instead
def register_candidate(settings: Settings, candidate_dir: Path, tags: VersionTags) -> int:
    """Register the candidate (an existing version with the same weights is returned)."""
    registry = Registry.connect(settings.paths.mlruns, settings.registry)
    return registry.register_version(candidate_dir, tags)


@task(cache_policy=NONE)
def move_aliases(settings: Settings, version: int, promote: bool) -> int:
    """`candidate` -> version; `champion` -> version only when promoted. Returns the champion."""
    registry = Registry.connect(settings.paths.mlruns, settings.registry)
    registry.set_alias(CANDIDATE, version)
    if promote:
        registry.set_alias(CHAMPION, version)
        append_audit(settings, "promote", version, "nightly: global gate passed")
    return registry.get_alias_version(CHAMPION)


def append_audit(settings: Settings, action: str, version: int, detail: str) -> None:
    """Append one champion move to `state/audit.jsonl` (what `retouch history` shows)."""
    path = settings.paths.state / "audit.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    event = {
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
        "action": action,
        "version": version,
        "detail": detail,
    }
    with path.open("a") as handle:
        handle.write(json.dumps(event) + "\n")


@task(cache_policy=NONE)
def version_ledger_ids(settings: Settings, version: int) -> list[str]:
    """The ordered ledger ids of a registered version (empty for the base model)."""
    registry = Registry.connect(settings.paths.mlruns, settings.registry)
    by_number = {info.version: info for info in registry.versions()}
    if version not in by_number:
        raise RegistryError(f"{settings.registry.model_name} has no version {version}")
    return by_number[version].ledger_ids


# ---------------------------------------------------------------- recording the night


def night_params(settings: Settings, result: NightResult) -> dict[str, str]:
    """The run's parameters: the sections that decide the edits, and the night's inputs."""
    params = {
        "night": result.night,
        "parent_version": str(result.parent_version),
        "data_version": result.data_version or "",
        "hypernet_version": result.hypernet_version,
        "seed": str(settings.edit.seed),
    }
    for section in ("edit", "gate", "nightly", "scope", "clusters"):
        for key, value in getattr(settings, section).model_dump(mode="json").items():
            params[f"{section}.{key}"] = json.dumps(value)
    return params


def night_metrics(result: NightResult) -> dict[str, float]:
    """Per-cluster figures (`cluster/<id>/<figure>`), global gate figures and the night's counts."""
    metrics = {
        "flags_in": result.flags_in,
        "quarantined": result.quarantined,
        "clusters_ready": result.clusters_ready,
        "edits_accepted": result.n_accepted,
        "edits_rejected": len(result.clusters) - result.n_accepted,
        "promoted": float(result.promoted),
    }
    for row in result.clusters:
        for name in ("reliability", "generalization", "locality"):
            value = getattr(row, name)
            if value is not None:
                metrics[f"cluster/{row.cluster_id}/{name}"] = value
        metrics[f"cluster/{row.cluster_id}/accepted"] = float(row.accepted)
    if result.gate is not None:
        metrics.update({f"gate/{k}": v for k, v in result.gate["figures"].items()})
    return {key: float(value) for key, value in metrics.items()}


def _mlflow_call(action: str, call, *args, **kwargs):
    """Run one MLflow client call; a store failure becomes a RegistryError naming the action."""
    from mlflow.exceptions import MlflowException
    from sqlalchemy.exc import SQLAlchemyError

    try:
        return call(*args, **kwargs)
    except (MlflowException, SQLAlchemyError) as exc:
        raise RegistryError(
            f"{action} failed: {str(exc).splitlines()[0]}; check paths.mlruns, then rerun the "
            "night (it resumes where it stopped)"
        ) from exc


@task(retries=2, retry_delay_seconds=3, retry_condition_fn=_store_busy, cache_policy=NONE)
def open_night_run(settings: Settings, night: str) -> str:
    """The night's MLflow run: the one a crashed attempt opened, else a new one."""
    registry = Registry.connect(settings.paths.mlruns, settings.registry)
    client = registry.client
    found = _mlflow_call(
        "finding the night run",
        client.search_runs,
        [registry.experiment_id],
        f"tags.{NIGHT_TAG} = '{night}'",
    )
    if found:
        return found[0].info.run_id
    run = _mlflow_call(
        "creating the night run",
        client.create_run,
        registry.experiment_id,
        run_name=f"night-{night}",
        tags={NIGHT_TAG: night},
    )
    return run.info.run_id


@task(retries=2, retry_delay_seconds=3, retry_condition_fn=_store_busy, cache_policy=NONE)
def log_night(settings: Settings, result: NightResult, masks: Path, new_ids: list[str]) -> None:
    """Params, metrics, tags and artifacts (report, cluster table, masks, edits, settings)."""
    from mlflow.entities import Metric, Param, RunTag

    registry = Registry.connect(settings.paths.mlruns, settings.registry)
    client, run_id = registry.client, result.run_id
    folder = night_folder(settings, result.night)
    (folder / "clusters.json").write_text(json.dumps([asdict(r) for r in result.clusters]))
    (folder / "settings.json").write_text(settings.model_dump_json(indent=1))
    now = int(datetime.now(UTC).timestamp() * 1000)
    step = night_index(settings, result.night)
    metrics = [Metric(k, v, now, step) for k, v in night_metrics(result).items()]
    params = [Param(k, v) for k, v in night_params(settings, result).items()]
    tags = {
        "candidate_version": str(result.candidate_version or ""),
        "candidate_hash": result.candidate_hash,
        "promoted": str(result.promoted),
    }
    _mlflow_call(
        "logging the night",
        client.log_batch,
        run_id,
        metrics,
        params,
        [RunTag(k, v) for k, v in tags.items()],
    )
    for path in (Path(result.report), folder / "clusters.json", folder / "settings.json", masks):
        _mlflow_call(f"logging {path.name}", client.log_artifact, run_id, str(path))
    for entry_id in new_ids:
        entry = ledger_of(settings).folder / ledger_of(settings).get(entry_id).delta_path
        _mlflow_call(
            "logging an edit", client.log_artifacts, run_id, str(entry), f"edits/{entry_id}"
        )
    _mlflow_call("closing the night run", client.set_terminated, run_id)


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def format_night_table(result: NightResult) -> str:
    """The night as Markdown tables: counts, one line per cluster, the global decision."""
    rejected = len(result.clusters) - result.n_accepted
    lines = [
        f"## Night {result.night} (parent version {result.parent_version})",
        "",
        "| flags in | quarantined | duplicates | clusters ready | waiting | accepted | rejected "
        "| candidate | promoted |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        f"| {result.flags_in} | {result.quarantined} | {result.duplicates} | "
        f"{result.clusters_ready} | {result.clusters_waiting} | {result.n_accepted} | {rejected} | "
        f"{result.candidate_version or '-'} | {'yes' if result.promoted else 'no'} |",
        "",
        "| cluster | edit | tries | rho | reliability | GR | LR | reasons |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in result.clusters:
        decision = f"accepted {row.ledger_id}" if row.accepted else "rejected"
        lines.append(
            f"| {row.cluster_id} | {decision} | {row.tries} | {row.rho:g} | "
            f"{_number(row.reliability)} | {_number(row.generalization)} | "
            f"{_number(row.locality)} | {row.reasons.replace('|', '/')} |"
        )
    if result.gate is not None:
        verdict = "passed" if result.gate["passed"] else "failed"
        lines += ["", f"Global gate {verdict}: " + "; ".join(result.gate["reasons"])]
    return "\n".join(lines)


@task(cache_policy=NONE)
def publish_night(settings: Settings, result: NightResult) -> NightResult:
    """HTML report, Prefect markdown artifact, and the night's record (which marks it done)."""
    report = write_night_report(result.to_dict(), settings.paths.monitoring / "nights")
    result = dataclasses.replace(result, report=str(report))
    create_markdown_artifact(
        markdown=format_night_table(result),
        key=ARTIFACT_KEY,
        description=f"retouch night {result.night}",
    )
    return result


@task(cache_policy=NONE)
def publish_dashboard(settings: Settings) -> None:
    """Rebuild the monitoring dashboard over every night so far and log it to MLflow.

    The night is already recorded: a dashboard that cannot be logged is reported, not raised
    (`retouch report` builds it again).
    """
    from monitoring.dashboard import build_dashboard  # monitoring reads this module's records

    try:
        build_dashboard(settings)
    except RetouchError as exc:
        logger.error("dashboard not built: %s; run `retouch report` once fixed", exc)


def save_record(settings: Settings, result: NightResult) -> None:
    """Write `record.json`: from now on the night is done and a rerun returns this record."""
    path = night_folder(settings, result.night) / "record.json"
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps(result.to_dict(), indent=1))
    partial.rename(path)


# ---------------------------------------------------------------- the flow


def _promote_candidate(
    settings: Settings,
    parent: int,
    ledger_ids: list[str],
    edits: EditSummary,
    references: Path,
    provenance: tuple[str, str],
) -> tuple[int, GateResult, int]:
    """Rebuild, judge, register and alias the candidate; returns (version, gate, champion)."""
    candidate_dir = build_candidate(settings, ledger_ids, edits.candidate_hash)
    decision = judge_candidate(settings, candidate_dir, references, ledger_ids)
    data_version, hypernet_version = provenance
    tags = VersionTags(
        parent, data_version, hypernet_version, tuple(ledger_ids), VersionTags.gate_json(decision)
    )
    version = register_candidate(settings, candidate_dir, tags)
    champion = move_aliases(settings, version, decision.passed)
    return version, decision, champion


def _night_result(
    night: str,
    parent: int,
    ingested: IngestResult,
    edits: EditSummary,
    ledger_ids: list[str],
    hypernet_version: str,
) -> NightResult:
    """The night's result before the candidate is judged (no gate, nothing registered)."""
    return NightResult(
        night=night,
        parent_version=parent,
        champion_version=parent,
        candidate_version=None,
        promoted=False,
        flags_in=ingested.rows_in,
        quarantined=ingested.quarantined,
        duplicates=ingested.duplicates,
        partitions_rejected=len(ingested.rejected),
        clusters_ready=edits.ready,
        clusters_waiting=edits.waiting,
        clusters=edits.rows,
        ledger_ids=ledger_ids,
        candidate_hash=edits.candidate_hash,
        data_version=ingested.data_version,
        hypernet_version=hypernet_version,
    )


def run_night(settings: Settings, night: str) -> NightResult:
    """One night, step by step (called by the flow under the edit lock)."""
    champion = open_registry(settings)
    hypernet_version = check_hypernet(settings)
    parent = start_night(settings, night, champion)
    folder = night_folder(settings, night)
    parent_dir = fetch_version(settings, parent, folder / "parent")
    ingested = ingest_flow(settings, parent_dir, base_dir(settings), date.fromisoformat(night))
    references = cache_references(settings, parent_dir, folder)
    parent_ledger_ids = version_ledger_ids(settings, parent)
    edits = edit_night(settings, night, ingested.clusters.table, parent_dir, parent_ledger_ids)
    ledger_ids = parent_ledger_ids + edits.new_ids
    result = _night_result(night, parent, ingested, edits, ledger_ids, hypernet_version)
    if edits.new_ids:
        provenance = (ingested.data_version or "", hypernet_version)
        version, decision, champion = _promote_candidate(
            settings, parent, ledger_ids, edits, references, provenance
        )
        result = dataclasses.replace(
            result,
            candidate_version=version,
            promoted=decision.passed,
            champion_version=champion,
            gate=asdict(decision),
        )
    result = dataclasses.replace(result, run_id=open_night_run(settings, night))
    result = publish_night(settings, result)
    log_night(settings, result, edits.masks, edits.new_ids)
    save_record(settings, result)
    if settings.monitoring.after_night:
        publish_dashboard(settings)
    return result


@flow(name="nightly_edit")
def nightly_edit(
    settings: Settings | None = None,
    night: date | None = None,
    params_path: str = "params.yaml",
    overrides: list[str] | None = None,
) -> NightResult:
    """Edit the champion with the night's ready clusters and promote the candidate if it passes.

    Args:
        settings: resolved settings; None loads `params_path` with `overrides` (deployments).
        night: the night's date; defaults to today (UTC). A finished night returns its record.
        params_path: settings file read when `settings` is None.
        overrides: `section.key=value` overrides applied to `params_path`.

    Raises:
        FlowLockedError: another run holds the edit lock past `nightly.lock_timeout_s`.
        RegistryError, ModelError, CheckpointMismatch, LedgerIntegrityError, DataError: a step
            failed; the champion has not moved, and a rerun completes the night.
    """
    settings = settings or load_settings(params_path, overrides or [])
    night_iso = (night or datetime.now(UTC).date()).isoformat()
    nightly = settings.nightly
    with (
        edit_lock(
            lock_path(settings.paths.state),
            f"nightly {night_iso}",
            nightly.lock_timeout_s,
            nightly.lock_poll_s,
        ),
        torch_threads(nightly.num_threads),
    ):
        record = night_folder(settings, night_iso) / "record.json"
        if record.is_file():
            logger.info("night %s is already done; returning its record", night_iso)
            return NightResult.from_dict(json.loads(record.read_text()))
        return run_night(settings, night_iso)


def run_nightly(settings: Settings, night: date | None = None) -> NightResult:
    """`retouch nightly`: one night through Prefect (a temporary local API when no server)."""
    return nightly_edit(settings=settings, night=night)
