"""The dashboard's figures as MLflow metrics with a step, and the dashboard run that holds them.

Each build logs one MLflow run (`run_name` `dashboard-<time>`, tag `retouch.kind=dashboard`) in
the registry's experiment, holding the page (`dashboard.html`) and every series of the page:
night-level figures at step = night index (1-based, date order), edit-level figures at step =
ledger index (1-based, append order). The README (Monitoring) says which to watch.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from core.errors import RegistryError
from core.settings import Settings
from flows.registry import Registry
from monitoring.plots import retentions
from monitoring.records import History

KIND_TAG = "retouch.kind"
BATCH = 1000  # MLflow's limit of metrics per log_batch call
EDIT_FIGURES = (
    "broad_locality_vs_base",
    "broad_locality_vs_champion",
    "sensitive_locality_vs_base",
    "sensitive_locality_vs_champion",
    "accuracy",
    "accuracy_drop",
)


def mask_iou(masks: np.ndarray) -> np.ndarray:
    """Intersection over union of every pair of binary masks: (E, n) -> (E, E)."""
    binary = masks.astype(float)  # (E, n)
    intersection = binary @ binary.T  # (E, E)
    sizes = binary.sum(axis=1)  # (E,)
    union = sizes[:, None] + sizes[None, :] - intersection  # (E, E)
    return np.divide(intersection, union, out=np.zeros_like(union), where=union > 0)


def night_metrics(history: History) -> list[tuple[str, float, int]]:
    """(key, value, night index) of every finished night, its clusters and its flags."""
    metrics = []
    index_of = {night.night: night.index for night in history.nights}
    for night in history.nights:
        record = night.record
        if record is None:
            continue
        accepted = sum(row["accepted"] for row in record["clusters"])
        values = {
            "night/flags_in": record["flags_in"],
            "night/quarantined": record["quarantined"],
            "night/edits_accepted": accepted,
            "night/edits_rejected": len(record["clusters"]) - accepted,
            "night/promoted": float(record["promoted"]),
            "night/champion_version": record["champion_version"],
            "night/clusters_new": sum(c.new for c in history.clusters if c.night == night.night),
        }
        metrics += [(key, float(value), night.index) for key, value in values.items()]
    for day in history.flag_days:
        if day.day not in index_of:
            continue
        step = index_of[day.day]
        metrics.append(("flags/quarantined_share", day.quarantined / max(day.rows_in, 1), step))
        if day.drift is not None:
            metrics.append(("drift/ks_statistic", day.drift.statistic, step))
            metrics.append(("drift/ks_pvalue", day.drift.pvalue, step))
    return metrics


def edit_metrics(history: History) -> list[tuple[str, float, int]]:
    """(key, value, ledger index) of every accepted edit: gate trends, weight change, masks."""
    metrics = []
    masked = [edit for edit in history.edits if edit.mask is not None]
    iou = mask_iou(np.stack([edit.mask for edit in masked])) if masked else np.zeros((0, 0))
    for row, edit in enumerate(masked):
        metrics.append(("hypernet/mask_sparsity", 1 - float(edit.mask.mean()), edit.index))
        if row:
            metrics.append(("hypernet/mask_iou_max", float(iou[row, :row].max()), edit.index))
    for edit in history.edits:
        figures = {f"trend/{k}": edit.candidate[k] for k in EDIT_FIGURES if k in edit.candidate}
        lowest = min(retentions(edit.candidate).values(), default=None)
        if lowest is not None:
            figures["trend/retention_min"] = lowest
        figures |= {f"trend/change_norm/{k}": v for k, v in edit.change_norms.items()}
        if edit.relative_change is not None:
            figures["trend/relative_change"] = edit.relative_change
        metrics += [(key, float(value), edit.index) for key, value in figures.items()]
    return metrics


def log_dashboard(settings: Settings, history: History, page: Path) -> str:
    """Log the page and every metric series to a new dashboard run; return its id.

    Raises:
        RegistryError: the MLflow store cannot be opened or written.
    """
    from mlflow.entities import Metric
    from mlflow.exceptions import MlflowException

    registry = Registry.connect(settings.paths.mlruns, settings.registry)
    now = int(datetime.now(UTC).timestamp() * 1000)
    metrics = [
        Metric(key, value, now, step)
        for key, value, step in night_metrics(history) + edit_metrics(history)
        if np.isfinite(value)
    ]
    if history.locator_drift is not None and history.nights:
        metrics.append(
            Metric("locator_drift", history.locator_drift, now, history.nights[-1].index)
        )
    client = registry.client
    try:
        run = client.create_run(
            registry.experiment_id,
            run_name=f"dashboard-{history.built_at}",
            tags={KIND_TAG: "dashboard", "missing_records": str(len(history.missing))},
        )
        for start in range(0, len(metrics), BATCH):
            client.log_batch(run.info.run_id, metrics[start : start + BATCH])
        client.log_artifact(run.info.run_id, str(page))
        client.set_terminated(run.info.run_id)
    except MlflowException as exc:
        raise RegistryError(
            f"logging the dashboard to {registry.tracking_uri} failed: {exc}; the page is "
            f"written at {page}; check paths.mlruns, then run `retouch report` again"
        ) from exc
    return run.info.run_id
