"""The typed records the dashboard shows: one `History` of nights, versions, edits, clusters
and flags, as monitoring/history.py collects them from what the flows wrote.

`attempt` is how every reader treats a record that may be missing: the gap becomes a line of
`History.missing` (naming the file or run and the fix) instead of an exception.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

import numpy as np

from core.errors import RetouchError
from monitoring.drift import DriftTest

logger = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class Night:
    """One night: its index (1-based, date order), its record, its MLflow run."""

    index: int
    night: str
    record: dict[str, Any] | None  # `NightResult.to_dict()`; None: the night did not finish
    run_id: str = ""


@dataclass(frozen=True)
class Version:
    """One registered model version and the gate decision it was registered with."""

    version: int
    aliases: tuple[str, ...]
    created: str  # ISO time
    parent: int | None
    ledger_ids: tuple[str, ...]
    gate: dict[str, Any] | None  # asdict(GateResult); None for the base model


@dataclass(frozen=True)
class ChampionMove:
    """One line of `state/audit.jsonl`: promote, rollback or manual promote."""

    at: str
    action: str
    version: int
    detail: str


@dataclass(frozen=True)
class Edit:
    """One ledger entry, with the figures of the candidate it first joined.

    Attributes:
        index: 1-based append order: the MLflow step of edit-level metrics.
        status: `in champion`, `rolled back` (was in a champion, no longer) or `not promoted`.
        candidate: global gate figures of the first registered version holding the edit.
        change_norms: Frobenius norm of the accumulated weight change (that version's edits up to
            this one, minus the base model) per edited matrix.
        relative_change: the same over the whole edit scope, divided by the base weights' norm.
        mask: the scope's units the delta changes (n_mask_entries,), None when unreadable.
    """

    index: int
    id: str
    cluster_id: str
    night: str
    n_samples: int
    rho: float | None
    steps: int | None
    reliability: float | None
    generalization: float | None
    locality: float | None
    status: str
    candidate: dict[str, float] = field(default_factory=dict)
    change_norms: dict[str, float] = field(default_factory=dict)
    relative_change: float | None = None
    mask: np.ndarray | None = None


@dataclass(frozen=True)
class ClusterNight:
    """One failure cluster on one night: size and status (ready/waiting/edited/rejected)."""

    night_index: int
    night: str
    cluster_id: str
    label: int
    size: int
    status: str
    new: bool  # not seen on any earlier night


@dataclass(frozen=True)
class FlagDay:
    """Incoming flags of one day (inbox partition date) and their drift test."""

    day: str
    rows_in: int
    accepted: int
    quarantined: int
    duplicates: int
    partitions_rejected: int  # files rejected whole (not Parquet, schema): rows unknown
    reasons: dict[str, int]  # quarantine reason -> rows (a row may have several)
    drift: DriftTest | None = None


@dataclass(frozen=True)
class HypernetInfo:
    """The mask hypernetwork's header: which base model it belongs to."""

    version: str  # short content hash of header and tensors (core.hypernet.hypernet_version)
    base_weights_hash: str
    matches_base: bool | None  # None when the base model card is unreadable
    meta: dict[str, Any]


@dataclass(frozen=True)
class History:
    """Everything the dashboard shows; `missing` says what could not be read."""

    nights: list[Night]
    versions: list[Version]
    champion: int | None
    moves: list[ChampionMove]
    edits: list[Edit]
    clusters: list[ClusterNight]
    flag_days: list[FlagDay]
    hypernet: HypernetInfo | None
    locator_drift: float | None  # the champion's relative weight change vs the base model
    thresholds: dict[str, float]  # the gate settings, drawn on the trend plots
    thumbnails: dict[str, list[bytes]]  # cluster id -> PNG bytes of some of its flags
    missing: list[str]
    built_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))


def attempt(what: str, missing: list[str], read: Callable[[], T], default: T) -> T:
    """`read()`, or `default` with a line in `missing` when a record is absent or broken."""
    try:
        return read()
    except (RetouchError, OSError, ValueError, KeyError) as exc:
        missing.append(f"{what}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")
        logger.warning("dashboard: %s unreadable (%s)", what, exc)
        return default
