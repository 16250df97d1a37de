"""The edit ledger as the dashboard shows it: one `Edit` row per entry, with its status, the
gate figures of the candidate it joined, the accumulated weight change and its unit mask.

The accumulated weight change of an entry is that of the first registered version holding it,
counted up to and including the entry (base model + its ledger prefix, `core.edit.apply_delta`),
per edited matrix and relative to the base weights over the whole edit scope. The champion's
relative change is the locator drift: how far the model has moved from the base model the
hypernetwork was meta-trained on.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from core.continual import unit_mask
from core.edit import EditDelta, apply_delta
from core.ledger import EditRecord, Ledger
from core.scope import build_scope
from core.settings import Settings
from flows.nightly import ledger_of
from monitoring.records import ChampionMove, Edit, Version, attempt


def _statuses(
    records: Sequence[EditRecord],
    versions: list[Version],
    champion: int | None,
    moves: list[ChampionMove],
) -> dict[str, str]:
    """Ledger id -> in champion / rolled back (was in a champion, no longer) / not promoted."""
    by_number = {v.version: v for v in versions}
    served = {move.version for move in moves} | ({champion} if champion else set())
    in_champion = set(by_number[champion].ledger_ids) if champion in by_number else set()
    ever_served = {i for n in served if n in by_number for i in by_number[n].ledger_ids}

    def status(entry_id: str) -> str:
        if entry_id in in_champion:
            return "in champion"
        return "rolled back" if entry_id in ever_served else "not promoted"

    return {record.id: status(record.id) for record in records}


def _load_deltas(
    ledger: Ledger, records: Sequence[EditRecord], missing: list[str]
) -> dict[str, EditDelta]:
    """Every readable, intact delta by ledger id; a missing or altered one is noted."""
    deltas = {}
    for record in records:
        delta = attempt(
            f"ledger entry {record.id}", missing, lambda r=record: ledger.load_delta(r.id), None
        )
        if delta is not None:
            deltas[record.id] = delta
    return deltas


class ChangeMeter:
    """Accumulated weight change of ledger prefixes, applied incrementally on a base model copy.

    Consecutive calls usually extend the previous prefix (one candidate's edits in order), so
    each delta is added once; a prefix that does not extend the last one is replayed afresh.
    """

    def __init__(
        self, base_model: nn.Module, parameter_names: Sequence[str], deltas: dict[str, EditDelta]
    ) -> None:
        self.names = list(parameter_names)
        weights = dict(base_model.named_parameters())
        self.base = {name: weights[name].detach().clone() for name in self.names}
        self.base_norm = float(torch.sqrt(sum(w.norm() ** 2 for w in self.base.values())))
        self.base_model = base_model
        self.deltas = deltas
        self.model = copy.deepcopy(base_model)
        self.applied: list[str] = []

    def norms(self, ids: Sequence[str]) -> tuple[dict[str, float], float] | None:
        """(Frobenius norm of W - W_base per scope matrix, relative change over the scope).

        None when a delta of `ids` is unreadable.
        """
        if any(entry_id not in self.deltas for entry_id in ids):
            return None
        if list(ids[: len(self.applied)]) != self.applied:
            self.model, self.applied = copy.deepcopy(self.base_model), []
        for entry_id in ids[len(self.applied) :]:
            apply_delta(self.model, self.deltas[entry_id])
            self.applied.append(entry_id)
        current = dict(self.model.named_parameters())
        norms = {n: float((current[n].detach() - self.base[n]).norm()) for n in self.names}
        change = float(np.sqrt(sum(value**2 for value in norms.values())))
        return norms, change / max(self.base_norm, 1e-12)


def _candidate_of(entry_id: str, versions: list[Version]) -> tuple[Version | None, list[str]]:
    """The first version holding the edit, and its ledger ids up to and including it."""
    for version in versions:
        if entry_id in version.ledger_ids:
            ids = list(version.ledger_ids)
            return version, ids[: ids.index(entry_id) + 1]
    return None, []


def _edit(
    index: int,
    record: EditRecord,
    status: str,
    versions: list[Version],
    meter: ChangeMeter | None,
    mask: np.ndarray | None,
    delta: EditDelta | None,
) -> Edit:
    """One ledger entry's row: the record's figures and its candidate's."""
    version, prefix = _candidate_of(record.id, versions)
    measured = meter.norms(prefix) if meter is not None and prefix else None
    meta = delta.meta if delta is not None else {}
    after = record.metrics_after
    return Edit(
        index=index,
        id=record.id,
        cluster_id=record.cluster_id,
        night=record.run_id,
        n_samples=len(record.sample_ids),
        rho=meta.get("rho", record.settings.get("rho")),
        steps=meta.get("steps"),
        reliability=after.get("reliability"),
        generalization=after.get("generalization"),
        locality=after.get("locality"),
        status=status,
        candidate=dict(version.gate["figures"]) if version and version.gate else {},
        change_norms=measured[0] if measured else {},
        relative_change=measured[1] if measured else None,
        mask=mask,
    )


def ledger_edits(
    settings: Settings,
    records: list[EditRecord],
    versions: list[Version],
    champion: int | None,
    moves: list[ChampionMove],
    base_model: nn.Module | None,
    missing: list[str],
) -> tuple[list[Edit], float | None]:
    """Every ledger entry's row, and the champion's relative weight change (locator drift)."""
    deltas = _load_deltas(ledger_of(settings), records, missing)
    statuses = _statuses(records, versions, champion, moves)
    meter, scope = None, None
    if base_model is not None:
        scope = build_scope(base_model, settings.scope.blocks)
        meter = ChangeMeter(base_model, scope.param_names, deltas)
    edits = []
    for index, record in enumerate(records, start=1):
        delta = deltas.get(record.id)
        mask = unit_mask(scope, delta).numpy() if scope is not None and delta is not None else None
        edits.append(_edit(index, record, statuses[record.id], versions, meter, mask, delta))
    champion_ids = next((v.ledger_ids for v in versions if v.version == champion), ())
    measured = meter.norms(list(champion_ids)) if meter is not None else None
    return edits, measured[1] if measured else None
