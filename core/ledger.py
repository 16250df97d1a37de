"""The edit ledger: every accepted edit as an immutable record beside its saved delta.

A model version is its base model plus an ordered list of ledger ids; `Ledger.replay` rebuilds
its weights from the base and the ledger alone, bit for bit (deltas are added in the recorded
order, see `core.edit.apply_delta`). Rolling one edit back is a replay of the list without it.

On disk (`folder/`):
- `index.jsonl`: one line per entry, appended and never rewritten: the record and the sha256 of
  every file of its saved delta.
- `entries/<id>/`: the delta as `EditDelta.save` wrote it.

Integrity: a delta whose files are missing or differ from the hashes in the index, or an index
line that does not parse or whose id does not match its content, raises `LedgerIntegrityError`
naming the entry and the file.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from torch import nn

from core.edit import EditDelta, apply_delta
from core.errors import EditError, LedgerIntegrityError

logger = logging.getLogger(__name__)

INDEX_NAME = "index.jsonl"
ENTRIES_FOLDER = "entries"
ID_LENGTH = 16  # hex characters of a record id: short enough to read, 64 bits against collisions


def record_id(parent_model_hash: str, cluster_id: str, delta_sha256: str) -> str:
    """Deterministic id of an edit: the same edit of the same cluster on the same model."""
    text = f"{parent_model_hash}\n{cluster_id}\n{delta_sha256}"
    return hashlib.sha256(text.encode()).hexdigest()[:ID_LENGTH]


@dataclass(frozen=True)
class EditRecord:
    """One accepted edit: what was fixed, where the weights moved, what it cost.

    Attributes:
        id: `record_id(parent_model_hash, cluster_id, delta_sha256)`.
        cluster_id: the failure cluster the edit fixes.
        sample_ids: ids of the edit samples (content hashes of their images).
        mask_hash: hash of the binary unit mask, or None for an edit without one.
        touched_parameters: names of the parameters the delta changes, sorted.
        delta_sha256: `EditDelta.sha256()` of the delta.
        delta_path: folder of the saved delta, relative to the ledger folder.
        metrics_before: figures of the model before the edit (e.g. the gate's inputs).
        metrics_after: the same figures after the edit.
        settings: the resolved settings the edit ran with (JSON-ready).
        seed: the edit's seed.
        parent_model_hash: weights hash of the model the delta was computed on.
        created_at: ISO 8601 UTC time the record was made.
        run_id: the night (or run) that made the edit.
    """

    id: str
    cluster_id: str
    sample_ids: tuple[str, ...]
    mask_hash: str | None
    touched_parameters: tuple[str, ...]
    delta_sha256: str
    delta_path: str
    metrics_before: dict[str, float]
    metrics_after: dict[str, float]
    settings: dict[str, Any]
    seed: int
    parent_model_hash: str
    created_at: str
    run_id: str

    @classmethod
    def from_delta(
        cls,
        delta: EditDelta,
        *,
        cluster_id: str,
        sample_ids: Sequence[str],
        parent_model_hash: str,
        metrics_before: Mapping[str, float],
        metrics_after: Mapping[str, float],
        settings: Mapping[str, Any],
        seed: int,
        run_id: str,
    ) -> EditRecord:
        """The record of `delta`; id, hashes, touched parameters and path derive from it."""
        delta_sha256 = delta.sha256()
        entry_id = record_id(parent_model_hash, cluster_id, delta_sha256)
        return cls(
            id=entry_id,
            cluster_id=cluster_id,
            sample_ids=tuple(sample_ids),
            mask_hash=delta.meta.get("mask_sha256"),
            touched_parameters=delta.touched_parameters(),
            delta_sha256=delta_sha256,
            delta_path=f"{ENTRIES_FOLDER}/{entry_id}",
            metrics_before=dict(metrics_before),
            metrics_after=dict(metrics_after),
            settings=dict(settings),
            seed=seed,
            parent_model_hash=parent_model_hash,
            created_at=datetime.now(UTC).isoformat(timespec="seconds"),
            run_id=run_id,
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (tuples become lists)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EditRecord:
        """Inverse of `to_dict`.

        Raises:
            KeyError, TypeError: a field is missing or unknown (the caller names the line).
        """
        names = {item.name for item in fields(cls)}
        if set(data) != names:
            raise KeyError(f"fields {sorted(set(data) ^ names)} missing or unknown")
        values = dict(data)
        values["sample_ids"] = tuple(values["sample_ids"])
        values["touched_parameters"] = tuple(values["touched_parameters"])
        return cls(**values)

    def content(self) -> dict[str, Any]:
        """What identifies the edit: every field but when and in which run it was made.

        A rerun of a night rebuilds the same record later in time, and a later night whose
        champion did not move re-makes the same delta on the same parent: both are the same
        entry, which keeps the `run_id` of the run that first made it.
        """
        when = {"created_at", "run_id"}
        return {key: value for key, value in self.to_dict().items() if key not in when}


@dataclass(frozen=True)
class _Entry:
    """An index line: the record and the sha256 of each file of its saved delta."""

    record: EditRecord
    files: dict[str, str]


def _file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class Ledger:
    """Append-only store of edit records and their deltas in one folder.

    Every call re-reads the index, so several `Ledger` objects on one folder (say, in different
    flow tasks) always agree; the index is small (one line per accepted edit).
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.index_path = self.folder / INDEX_NAME

    def _entries(self) -> dict[str, _Entry]:
        """Index lines by id, in append order."""
        if not self.index_path.is_file():
            return {}
        entries: dict[str, _Entry] = {}
        lines = self.index_path.read_text().splitlines()
        for number, line in enumerate(lines, start=1):
            entry = self._parse_line(line, number)
            if entry.record.id in entries:
                raise LedgerIntegrityError(
                    f"{self.index_path} line {number} repeats entry {entry.record.id}; the index "
                    "was edited by hand: restore it from its last good copy"
                )
            entries[entry.record.id] = entry
        return entries

    def _parse_line(self, line: str, number: int) -> _Entry:
        where = f"{self.index_path} line {number}"
        try:
            raw = json.loads(line)
            entry = _Entry(EditRecord.from_dict(raw["record"]), dict(raw["files"]))
        except (ValueError, KeyError, TypeError) as exc:
            raise LedgerIntegrityError(
                f"{where} is not a ledger record ({exc}); restore the index from its last good copy"
            ) from exc
        record = entry.record
        if record.id != record_id(record.parent_model_hash, record.cluster_id, record.delta_sha256):
            raise LedgerIntegrityError(
                f"{where}: entry {record.id} does not match its own parent hash, cluster and delta "
                "hash; the record was altered: restore the index from its last good copy"
            )
        return entry

    def _entry(self, entry_id: str, entries: Mapping[str, _Entry] | None = None) -> _Entry:
        entries = self._entries() if entries is None else entries
        if entry_id not in entries:
            raise LedgerIntegrityError(
                f"ledger {self.folder} has no entry {entry_id}; the model version that names it "
                "belongs to another ledger, or the entry was never appended"
            )
        return entries[entry_id]

    def records(self) -> list[EditRecord]:
        """Every record, in append order."""
        return [entry.record for entry in self._entries().values()]

    def get(self, entry_id: str) -> EditRecord:
        """The record `entry_id`.

        Raises:
            LedgerIntegrityError: no such entry.
        """
        return self._entry(entry_id).record

    def append(self, record: EditRecord, delta: EditDelta) -> EditRecord:
        """Store `delta` and append `record`; return the stored record.

        Idempotent: appending an id already present with the same content (every field but
        `created_at` and `run_id`) returns the stored record and writes nothing, so a crashed
        night can rerun and a later night may re-make an edit that was never promoted.
        The delta is written under a temporary name and renamed before the index line is
        appended, so an interrupted append leaves no index line pointing at a partial delta.

        Raises:
            LedgerIntegrityError: the id exists with other content, or `record` does not
                describe `delta` (hash or id mismatch).
        """
        self._check_describes(record, delta)
        existing = self._entries().get(record.id)
        if existing is not None:
            if existing.record.content() != record.content():
                raise LedgerIntegrityError(
                    f"ledger entry {record.id} already exists in {self.index_path} with other "
                    "content; an entry is immutable: build a new edit instead"
                )
            logger.info("ledger entry %s already present; nothing appended", record.id)
            return existing.record
        folder = self._store_delta(record, delta)
        files = {path.name: _file_sha256(path) for path in sorted(folder.iterdir())}
        line = json.dumps({"record": record.to_dict(), "files": files}, sort_keys=True) + "\n"
        self.folder.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(self.index_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(descriptor, line.encode())
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
        logger.info("ledger entry %s appended (cluster %s)", record.id, record.cluster_id)
        return record

    @staticmethod
    def _check_describes(record: EditRecord, delta: EditDelta) -> None:
        delta_sha256 = delta.sha256()
        if record.delta_sha256 != delta_sha256:
            raise LedgerIntegrityError(
                f"record {record.id} says delta {record.delta_sha256[:12]}, the delta given hashes "
                f"to {delta_sha256[:12]}; build the record with EditRecord.from_delta(delta, ...)"
            )
        if record.id != record_id(record.parent_model_hash, record.cluster_id, delta_sha256):
            raise LedgerIntegrityError(
                f"record id {record.id} does not derive from its parent hash, cluster and delta; "
                "build the record with EditRecord.from_delta(delta, ...)"
            )

    def _store_delta(self, record: EditRecord, delta: EditDelta) -> Path:
        """Save the delta at `record.delta_path` via a temporary folder and a rename."""
        folder = (self.folder / record.delta_path).resolve()
        if self.folder.resolve() not in folder.parents:
            raise LedgerIntegrityError(
                f"record {record.id} has delta_path {record.delta_path!r} outside the ledger "
                f"folder {self.folder}; use a relative path such as {ENTRIES_FOLDER}/{record.id}"
            )
        partial = folder.with_name(f".{folder.name}.partial")
        shutil.rmtree(partial, ignore_errors=True)
        delta.save(partial)
        if folder.exists():  # left by an append that crashed before its index line: unreferenced
            shutil.rmtree(folder)
        partial.rename(folder)
        return folder

    def load_delta(self, entry_id: str) -> EditDelta:
        """The saved delta of `entry_id`, after checking every file against the index.

        Raises:
            LedgerIntegrityError: the entry is unknown, or a delta file is missing or altered.
        """
        return self._load_checked(self._entry(entry_id))

    def _load_checked(self, entry: _Entry) -> EditDelta:
        record = entry.record
        folder = self.folder / record.delta_path
        for name, expected in entry.files.items():
            path = folder / name
            if not path.is_file():
                raise LedgerIntegrityError(
                    f"ledger entry {record.id}: delta file {path} is missing; restore the ledger "
                    "folder from its last good copy (the entry cannot be replayed without it)"
                )
            if _file_sha256(path) != expected:
                raise LedgerIntegrityError(
                    f"ledger entry {record.id}: delta file {path} was altered (sha256 differs from "
                    "the index); restore it from the last good copy of the ledger"
                )
        delta = EditDelta.load(folder)
        if delta.sha256() != record.delta_sha256:
            raise LedgerIntegrityError(
                f"ledger entry {record.id}: the delta in {folder} hashes to {delta.sha256()[:12]}, "
                f"the record says {record.delta_sha256[:12]}; restore the entry's folder"
            )
        return delta

    def replay(self, base_model: nn.Module, ids: Sequence[str]) -> nn.Module:
        """A copy of `base_model` with the deltas of `ids` added in order; the base is untouched.

        Same base, same ids: the same bits, every time. Every delta is loaded and checked before
        any weight changes.

        Raises:
            LedgerIntegrityError: an id is unknown, or one of its delta files is missing or altered.
        """
        entries = self._entries()
        deltas = [self._load_checked(self._entry(entry_id, entries)) for entry_id in ids]
        model = copy.deepcopy(base_model)
        for delta in deltas:
            apply_delta(model, delta)
        return model

    def without(self, ids: Sequence[str], removed_id: str) -> list[str]:
        """The ledger ids of a version with one edit rolled back, order kept.

        Raises:
            EditError: `removed_id` is not among `ids`.
            LedgerIntegrityError: an id is unknown to this ledger.
        """
        entries = self._entries()
        for entry_id in ids:
            self._entry(entry_id, entries)
        if removed_id not in ids:
            raise EditError(
                f"edit {removed_id} is not in this model version ({len(ids)} edits: "
                f"{', '.join(ids) or 'none'}); pick one of those to roll back"
            )
        return [entry_id for entry_id in ids if entry_id != removed_id]
