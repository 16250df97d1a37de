"""Manual control of the production model: rollback, promote, history, and reproducible reruns.

Plain functions the `retouch` CLI calls (no Prefect needed). Rollback and promote take the same
edit lock as the nightly flow, so they never race a night. Every champion move is appended to
`state/audit.jsonl`; `history` joins it with the registry's versions and their provenance tags.
"""

from __future__ import annotations

import io
import json
import logging
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd

from core.errors import DataError, RegistryError
from core.gate import GateResult
from core.model import load_saved_model, save_model, torch_threads, weights_hash
from core.settings import Settings
from flows.bootstrap import base_dir
from flows.lock import edit_lock, lock_path
from flows.nightly import (
    NIGHT_TAG,
    append_audit,
    judge,
    ledger_of,
    run_edit_stage,
    write_references,
)
from flows.registry import CANDIDATE, CHAMPION, Registry, VersionInfo, VersionTags
from flows.versioning import read_version_file

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RollbackResult:
    """A rollback: the version built without the edit, its gate decision, whether it serves."""

    removed_edit: str
    version: int
    ledger_ids: list[str]
    weights_hash: str
    gate: GateResult
    promoted: bool


@dataclass(frozen=True)
class RerunResult:
    """A night rerun: the recorded and the rebuilt candidate weights hashes."""

    run_id: str
    night: str
    recorded_hash: str
    rerun_hash: str

    @property
    def reproduced(self) -> bool:
        """Whether the rerun rebuilt the recorded weights bit for bit."""
        return self.recorded_hash == self.rerun_hash


def _version(registry: Registry, version: int) -> VersionInfo:
    found = {info.version: info for info in registry.versions()}
    if version not in found:
        raise RegistryError(
            f"{registry.model_name} has no version {version} (versions: {sorted(found)}); "
            "see `retouch history`"
        )
    return found[version]


def _lock(settings: Settings, purpose: str):
    nightly = settings.nightly
    return edit_lock(
        lock_path(settings.paths.state), purpose, nightly.lock_timeout_s, nightly.lock_poll_s
    )


def rollback(settings: Settings, edit_id: str) -> RollbackResult:
    """Build the champion without one edit (ledger replay), gate it, register it, promote on pass.

    Raises:
        EditError: the edit is not in the champion.
        LedgerIntegrityError: a delta is missing or altered.
        RegistryError: the store fails or holds no champion.
    """
    with _lock(settings, f"rollback {edit_id}"):
        registry = Registry.connect(settings.paths.mlruns, settings.registry)
        champion = _version(registry, registry.get_alias_version(CHAMPION) or 0)
        ids = ledger_of(settings).without(champion.ledger_ids, edit_id)
        work = settings.paths.state / "rollbacks" / edit_id
        base_model, card = load_saved_model(base_dir(settings))
        model = ledger_of(settings).replay(base_model, ids)
        folder = settings.paths.state / "candidates" / weights_hash(model)[:16]
        save_model(model, card, folder)
        champion_dir = registry.load_version_folder(champion.version, work / "champion")
        references = write_references(settings, champion_dir, work)
        decision = judge(settings, folder, references, ids)
        tags = VersionTags(
            champion.version,
            champion.tags.get("data_version", ""),
            champion.tags.get("hypernet_version", ""),
            tuple(ids),
            VersionTags.gate_json(decision),
        )
        version = registry.register_version(folder, tags)
        registry.set_alias(CANDIDATE, version)
        if decision.passed:
            registry.set_alias(CHAMPION, version)
            append_audit(settings, "rollback", version, f"edit {edit_id} rolled back")
    logger.info("rollback of %s: version %d, gate passed %s", edit_id, version, decision.passed)
    return RollbackResult(edit_id, version, ids, weights_hash(model), decision, decision.passed)


def promote(settings: Settings, version: int) -> int:
    """Point `champion` at `version` by hand (no gate: the operator decides); return it."""
    with _lock(settings, f"promote {version}"):
        registry = Registry.connect(settings.paths.mlruns, settings.registry)
        _version(registry, version)
        registry.set_alias(CHAMPION, version)
        append_audit(settings, "manual promote", version, "retouch promote")
    return version


def _gate_summary(decision: str) -> str:
    try:
        return "passed" if json.loads(decision)["passed"] else "failed"
    except (ValueError, KeyError, TypeError):
        return decision


def history(settings: Settings) -> list[dict[str, Any]]:
    """One row per version (oldest first) with its provenance and every champion move to it."""
    registry = Registry.connect(settings.paths.mlruns, settings.registry)
    audit_path = settings.paths.state / "audit.jsonl"
    events = (
        [json.loads(line) for line in audit_path.read_text().splitlines()]
        if (audit_path.is_file())
        else []
    )
    rows = []
    for info in registry.versions():
        moves = [f"{e['at']} {e['action']}" for e in events if e["version"] == info.version]
        rows.append(
            {
                "version": info.version,
                "aliases": ",".join(info.aliases),
                "parent": info.tags.get("parent_version", ""),
                "edits": len(info.ledger_ids),
                "ledger_ids": ",".join(info.ledger_ids),
                "data_version": info.tags.get("data_version", ""),
                "gate": _gate_summary(info.tags.get("gate_decision", "")),
                "created": datetime.fromtimestamp(info.created_ms / 1000, UTC).isoformat(),
                "champion_moves": "; ".join(moves),
            }
        )
    return rows


def _night_run(registry: Registry, run_id: str) -> tuple[dict[str, str], dict[str, str]]:
    """(params, tags) of a night run; RegistryError if `run_id` is not one."""
    from mlflow.exceptions import MlflowException

    try:
        run = registry.client.get_run(run_id)
    except MlflowException as exc:
        raise RegistryError(
            f"no MLflow run {run_id} in {registry.tracking_uri}; take a night run id from "
            "`retouch history` or the MLflow UI"
        ) from exc
    if NIGHT_TAG not in run.data.tags or "candidate_hash" not in run.data.tags:
        raise RegistryError(f"MLflow run {run_id} is not a finished nightly run")
    return dict(run.data.params), dict(run.data.tags)


def _night_data(data_dir: Path, night: str, version: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The night table and the flags it names, read from data version `version` (DVC)."""
    table = pd.read_parquet(
        io.BytesIO(read_version_file(data_dir, f"clusters/night={night}.parquet", version=version))
    )
    partitions = sorted(table["partition"].dropna().unique()) if "partition" in table else []
    frames = [
        pd.read_parquet(io.BytesIO(read_version_file(data_dir, f"flagged/{p}", version=version)))
        for p in partitions
    ]
    columns = ["sample_id", "image", "true_index"]
    flags = pd.concat([f[columns] for f in frames]) if frames else pd.DataFrame(columns=columns)
    return table, flags.drop_duplicates("sample_id").set_index("sample_id")


def rerun(settings: Settings, run_id: str) -> RerunResult:
    """Re-run a recorded night on its data version with its settings and seed; compare hashes.

    Nothing in production changes: the rerun edits a downloaded copy of the night's parent.

    Raises:
        RegistryError: `run_id` is not a nightly run of this store.
        DataError: the night recorded no data version, or DVC no longer holds it.
    """
    registry = Registry.connect(settings.paths.mlruns, settings.registry)
    params, tags = _night_run(registry, run_id)
    night, version = tags[NIGHT_TAG], params.get("data_version", "")
    if not version:
        raise DataError(f"night run {run_id} recorded no data version; it cannot be rerun")
    with tempfile.TemporaryDirectory(prefix="retouch-rerun-") as scratch:
        recorded = Path(
            registry.client.download_artifacts(run_id, "settings.json", scratch)
        ).read_text()
        night_settings = Settings.model_validate_json(recorded)
        table, flags = _night_data(night_settings.paths.data, night, version)
        parent = _version(registry, int(params["parent_version"]))
        parent_dir = registry.load_version_folder(parent.version, Path(scratch))
        with torch_threads(night_settings.nightly.num_threads):
            model, _, _ = run_edit_stage(
                night_settings, parent_dir, table, flags, parent.ledger_ids
            )
    result = RerunResult(run_id, night, tags["candidate_hash"], weights_hash(model))
    logger.info("rerun of night %s: reproduced %s", night, result.reproduced)
    return result
