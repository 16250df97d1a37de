"""The monitoring dashboard: one self-contained HTML page over every night, edit and flag.

`build_dashboard(settings)` collects the `History` (monitoring/history.py), renders the page to
`paths.monitoring/dashboard.html` and logs it to MLflow with the same figures as metrics, so the
MLflow UI can chart them. The page opens from disk with no server and no internet: no script,
no external asset, figures and thumbnails embedded as base64 PNG. Sections, top to bottom:
attention list, promotion log, edit history, trends over accepted edits, failure clusters,
incoming flags, hypernetwork, missing records.
"""

from __future__ import annotations

import base64
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from html import escape
from pathlib import Path

import numpy as np

from core.settings import Settings
from monitoring import plots
from monitoring.attention import Alert, attention
from monitoring.history import collect_history
from monitoring.metrics import log_dashboard, mask_iou
from monitoring.night_report import GATE_FIGURES, STYLE, Raw, html_table
from monitoring.records import ClusterNight, History

logger = logging.getLogger(__name__)

PAGE_NAME = "dashboard.html"
DASHBOARD_STYLE = (
    "nav a{margin-right:1em}section{margin:2em 0}img.plot{max-width:100%;border:1px solid #ddd}"
    "img.thumb{width:48px;height:48px;image-rendering:pixelated;margin:1px;border:1px solid #ccc}"
    ".crossed{color:#a4161a;font-weight:bold}.near{color:#b35c00}.info{color:#555}"
    ".missing li{color:#a4161a}table{font-size:.85em}"
)
SECTIONS = (
    ("attention", "Attention"),
    ("promotions", "Promotion log"),
    ("edits", "Edit history"),
    ("trends", "Trends over accepted edits"),
    ("clusters", "Failure clusters"),
    ("flags", "Incoming flags"),
    ("hypernet", "Hypernetwork"),
    ("missing", "Missing records"),
)


@dataclass(frozen=True)
class Dashboard:
    """A built dashboard: the page, the MLflow run it was logged to, what it shows."""

    path: Path
    run_id: str
    history: History


def _png(data: bytes, alt: str, css_class: str = "plot") -> str:
    encoded = base64.b64encode(data).decode("ascii")
    return f'<img class="{css_class}" alt="{escape(alt)}" src="data:image/png;base64,{encoded}">'


def _note(text: str) -> str:
    return f'<p class="info">{escape(text)}</p>'


def _attention(alerts: Sequence[Alert]) -> str:
    if not alerts:
        return _note("Nothing needs attention: every gate figure clears its threshold.")
    items = "".join(
        f'<li class="{a.level}">{escape(a.level)}: {escape(a.text)}</li>' for a in alerts
    )
    return f"<ul>{items}</ul>"


def _reasons(gate: dict | None) -> str:
    """The why of a decision: the failed checks, or a line saying all passed."""
    if gate is None:
        return "base model: not gated"
    if gate["passed"]:
        return f"all {len(gate['reasons'])} checks passed"
    return "; ".join(gate["reasons"])


def _champion_line(history: History) -> list[tuple[datetime, int, str]]:
    """(time, version, action) of the champion alias: the base model first, every recorded
    move, and the current champion at the latest registration."""
    first, last = history.versions[0], history.versions[-1]
    line = [(datetime.fromisoformat(first.created), first.version, "base")]
    line += [(datetime.fromisoformat(m.at), m.version, m.action) for m in history.moves]
    if history.champion is not None:
        latest = max(datetime.fromisoformat(last.created), line[-1][0])
        line.append((latest, history.champion, "current"))
    return line


def _promotions(history: History) -> str:
    if not history.versions:
        return _note("The registry holds no model version yet.")
    moves = _champion_line(history)
    figure = plots.plot_promotions(
        [datetime.fromisoformat(v.created) for v in history.versions],
        [v.version for v in history.versions],
        [v.gate["passed"] if v.gate else None for v in history.versions],
        moves,
    )
    rows = [
        [
            v.version,
            v.created[:16].replace("T", " "),
            ", ".join(v.aliases) or "-",
            v.parent,
            len(v.ledger_ids),
            "-" if v.gate is None else "passed" if v.gate["passed"] else "failed",
            *[(v.gate or {}).get("figures", {}).get(name) for name in GATE_FIGURES[:5]],
            _reasons(v.gate),
        ]
        for v in history.versions
    ]
    header = ["version", "registered", "aliases", "parent", "edits", "gate", *GATE_FIGURES[:5]]
    move_rows = [[m.at, m.action, m.version, m.detail] for m in history.moves]
    return (
        _png(figure, "registry versions and champion")
        + html_table([*header, "reasons"], rows)
        + "<h3>Champion moves</h3>"
        + (html_table(["at", "action", "version", "detail"], move_rows) if move_rows else "-")
    )


def _edits(history: History) -> str:
    if not history.edits:
        return _note("The ledger holds no accepted edit yet.")
    rows = [
        [
            e.index,
            e.id,
            e.night,
            Raw(f'<a href="#cluster-{escape(e.cluster_id)}">{escape(e.cluster_id)}</a>'),
            e.n_samples,
            e.rho,
            e.steps,
            e.generalization,
            e.locality,
            e.status,
        ]
        for e in history.edits
    ]
    header = ["#", "ledger id", "night", "cluster", "samples", "rho", "steps", "GR", "LR"]
    return html_table([*header, "status"], rows)


def _trends(history: History, settings: Settings) -> str:
    judged = [e for e in history.edits if e.candidate]
    parts = []
    if judged:
        parts.append(
            _png(
                plots.plot_locality_trends(
                    [e.index for e in judged], [e.candidate for e in judged], history.thresholds
                ),
                "locality, accuracy and retention over accepted edits",
            )
        )
    measured = [e for e in history.edits if e.relative_change is not None]
    if measured:
        figure = plots.plot_weight_change(
            [e.index for e in measured],
            [e.change_norms for e in measured],
            [e.relative_change for e in measured],
            settings.monitoring.max_locator_drift,
        )
        parts.append(_png(figure, "accumulated weight change"))
    return "".join(parts) or _note("No registered candidate holds an edit yet: nothing to trend.")


def _nights_of_clusters(history: History) -> dict[str, list[ClusterNight]]:
    """Cluster id -> its records, night by night."""
    nights_of: dict[str, list[ClusterNight]] = {}
    for record in history.clusters:
        nights_of.setdefault(record.cluster_id, []).append(record)
    return nights_of


def _cluster_row(seen: list[ClusterNight], history: History) -> list[object]:
    """Label, first night, nights seen, rejections, latest status and size, thumbnails."""
    cluster_id = seen[0].cluster_id
    thumbs = "".join(
        _png(image, f"flag of {cluster_id}", "thumb")
        for image in history.thumbnails.get(cluster_id, [])
    )
    return [
        Raw(f'<span id="cluster-{escape(cluster_id)}">{escape(cluster_id)}</span>'),
        seen[0].label,
        seen[0].night,
        len(seen),
        sum(c.status == "rejected" for c in seen),
        f"{seen[-1].status} ({seen[-1].night})",
        seen[-1].size,
        Raw(thumbs or "-"),
    ]


def _cluster_map(history: History, reached: set[str], waiting_only: int) -> str:
    """The map of the clusters that ever reached the edit stage; a night can hold hundreds of
    small clusters that only wait, which the map only counts."""
    nights = sorted({c.night_index for c in history.clusters})
    counted = f"{waiting_only} clusters that only waited (too small to edit so far) are not drawn."
    if not reached:
        return _note(f"No cluster has been ready yet. {counted}")
    cells = {
        (c.cluster_id, c.night_index): (c.size, c.status)
        for c in history.clusters
        if c.cluster_id in reached
    }
    figure = plots.plot_cluster_map(sorted(reached), nights, cells)
    return _png(figure, "failure clusters per night") + f"<p>{escape(counted)}</p>"


def _clusters(history: History, settings: Settings) -> str:
    """Map and table of the clusters that reached the edit stage, then the latest night's
    largest waiting clusters: the waiting ones run to hundreds a night, and their thumbnails
    would grow the page with every flag (0.7 MB of the demo's 1.8 MB page after 3 nights)."""
    if not history.clusters:
        return _note("No failure cluster recorded yet.")
    nights_of = _nights_of_clusters(history)
    reached = {
        cluster_id
        for cluster_id, seen in nights_of.items()
        if any(c.status != "waiting" for c in seen)
    }
    latest = max(c.night_index for c in history.clusters)
    waiting_now = sorted(
        (
            seen
            for cluster_id, seen in nights_of.items()
            if cluster_id not in reached and seen[-1].night_index == latest
        ),
        key=lambda seen: (-seen[-1].size, seen[0].cluster_id),
    )
    listed = waiting_now[: settings.monitoring.waiting_clusters_listed]
    unlisted = len(nights_of) - len(reached) - len(listed)
    new = {}
    for c in history.clusters:
        new[c.night] = new.get(c.night, 0) + c.new
    new_line = ", ".join(f"{night}: {count}" for night, count in new.items() if count)
    header = [
        "cluster",
        "label",
        "first night",
        "nights",
        "rejections",
        "latest",
        "size",
        "examples",
    ]
    folder = settings.paths.data / "clusters"
    return (
        _cluster_map(history, reached, len(nights_of) - len(reached))
        + f"<p>New clusters per night: {escape(new_line or 'none')}</p>"
        + "<h3>Clusters that reached the edit stage</h3>"
        + html_table(header, [_cluster_row(nights_of[c], history) for c in sorted(reached)])
        + f"<h3>Largest clusters still waiting ({len(listed)} of {len(waiting_now)})</h3>"
        + (html_table(header, [_cluster_row(seen, history) for seen in listed]) if listed else "")
        + f"<p>{unlisted} more clusters only waited and are not listed; every night's clusters "
        + f"are in {escape(str(folder))}/night=*.parquet.</p>"
    )


def _flags(history: History, settings: Settings) -> str:
    days = history.flag_days
    if not days:
        return _note("No flag has been ingested yet.")
    reasons = sorted({reason for day in days for reason in day.reasons})
    figure = plots.plot_flags(
        [d.day for d in days],
        {
            "accepted": [d.accepted for d in days],
            "quarantined": [d.quarantined for d in days],
            "duplicates": [d.duplicates for d in days],
        },
        {r: [d.reasons.get(r, 0) / max(d.rows_in, 1) for d in days] for r in reasons},
        [(d.drift.statistic, d.drift.pvalue) if d.drift else None for d in days],
        settings.monitoring.drift_alpha,
    )
    rows = [
        [
            d.day,
            d.rows_in,
            d.accepted,
            d.quarantined,
            d.duplicates,
            d.partitions_rejected,
            d.drift.statistic if d.drift else None,
            d.drift.pvalue if d.drift else None,
        ]
        for d in days
    ]
    header = ["day", "rows in", "accepted", "quarantined", "duplicates", "files rejected"]
    header += ["KS drift", "p-value"]
    return _png(figure, "incoming flags") + html_table(header, rows)


def _hypernet(history: History) -> str:
    info = history.hypernet
    facts = [
        ["version", info.version if info else "missing"],
        ["base model weights hash", info.base_weights_hash if info else "-"],
        ["belongs to the registry's base model", "-" if not info else info.matches_base],
        ["meta-training iterations", info.meta.get("iterations") if info else None],
        ["locator drift (champion vs base, relative)", history.locator_drift],
    ]
    masked = [e for e in history.edits if e.mask is not None]
    if not masked:
        return html_table(["fact", "value"], facts) + _note("No readable edit mask yet.")
    masks = np.stack([e.mask for e in masked])  # (E, n_mask_entries)
    figure = plots.plot_masks([e.index for e in masked], 1 - masks.mean(axis=1), mask_iou(masks))
    return html_table(["fact", "value"], facts) + _png(figure, "edit masks")


def _missing(history: History) -> str:
    if not history.missing:
        return _note("Every record was found.")
    items = "".join(f"<li>{escape(line)}</li>" for line in history.missing)
    return f'<ul class="missing">{items}</ul>'


def render_dashboard(history: History, settings: Settings) -> str:
    """The dashboard page of `history` (one HTML string, no script, no external asset)."""
    bodies = {
        "attention": _attention(attention(history, settings.gate, settings.monitoring)),
        "promotions": _promotions(history),
        "edits": _edits(history),
        "trends": _trends(history, settings),
        "clusters": _clusters(history, settings),
        "flags": _flags(history, settings),
        "hypernet": _hypernet(history),
        "missing": _missing(history),
    }
    navigation = "".join(f'<a href="#{key}">{escape(title)}</a>' for key, title in SECTIONS)
    sections = "".join(
        f'<section id="{key}"><h2>{escape(title)}</h2>{bodies[key]}</section>'
        for key, title in SECTIONS
    )
    summary = (
        f"{len(history.nights)} nights, {len(history.versions)} versions, champion version "
        f"{history.champion or '-'}, {len(history.edits)} ledger entries; built {history.built_at}"
    )
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>retouch dashboard</title>"
        f"<style>{STYLE}{DASHBOARD_STYLE}</style></head><body><h1>retouch dashboard</h1>"
        f"<p>{escape(summary)}</p><nav>{navigation}</nav>{sections}</body></html>"
    )


def build_dashboard(settings: Settings, log_to_mlflow: bool = True) -> Dashboard:
    """Collect the history, write `paths.monitoring/dashboard.html`, log it to MLflow.

    Missing records do not stop the build: the page lists them.

    Raises:
        RegistryError: logging to the MLflow store failed (the page is written first).
    """
    history = collect_history(settings)
    folder = Path(settings.paths.monitoring)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / PAGE_NAME
    path.write_text(render_dashboard(history, settings))
    run_id = log_dashboard(settings, history, path) if log_to_mlflow else ""
    logger.info("dashboard written to %s (MLflow run %s)", path, run_id or "-")
    return Dashboard(path, run_id, history)
