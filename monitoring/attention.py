"""The dashboard's attention list: what a person should look at first this morning.

- gate thresholds the latest judged candidate crossed, or came within `monitoring.near_margin`
  of (a locality figure is read at its Wilson lower bound when the gate used one);
- clusters rejected `monitoring.max_rejections` times or more (the editor cannot fix them: they
  need data or a person);
- locator drift: the champion's weights have moved more than `monitoring.max_locator_drift`
  (relative, over the edit scope) from the base model the hypernetwork was meta-trained on, so
  its masks may no longer point at the right units;
- a hypernetwork that belongs to another base model, and records that are missing.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from core.gate import RETENTION_PREFIX
from core.settings import GateSettings, MonitoringSettings
from monitoring.records import History

CROSSED = "crossed"
NEAR = "near"
INFO = "info"
LOCALITY_GATES = tuple(
    f"{population}_locality_vs_{reference}"
    for population in ("broad", "sensitive")
    for reference in ("champion", "base")
)


@dataclass(frozen=True)
class Alert:
    """One line of the attention list; `level` is crossed, near or info."""

    level: str
    text: str


def _check(name: str, value: float, threshold: float, margin: float, at_most: bool) -> Alert | None:
    """An alert when `value` fails its threshold or is within `margin` of it."""
    slack = threshold - value if at_most else value - threshold
    sign = "<=" if at_most else ">="
    if slack < 0:
        return Alert(CROSSED, f"{name} {value:.4f} fails the gate ({sign} {threshold:.4f})")
    if slack <= margin:
        return Alert(NEAR, f"{name} {value:.4f} is within {margin:g} of its gate ({threshold:.4f})")
    return None


def gate_alerts(history: History, gate: GateSettings, margin: float) -> list[Alert]:
    """Thresholds the latest judged candidate crossed or nearly crossed."""
    judged = [v for v in history.versions if v.gate is not None]
    if not judged:
        return []
    latest = judged[-1]
    figures = latest.gate["figures"]
    checks = [
        (key, figures.get(f"{key}_lower", figures.get(key)), getattr(gate, f"min_{key}"), False)
        for key in LOCALITY_GATES
    ]
    checks.append(("accuracy_drop", figures.get("accuracy_drop"), gate.max_accuracy_drop, True))
    checks += [
        (key, value, gate.min_retention, False)
        for key, value in figures.items()
        if key.startswith(RETENTION_PREFIX)
    ]
    alerts = [
        _check(f"version {latest.version}: {key}", value, threshold, margin, at_most)
        for key, value, threshold, at_most in checks
        if value is not None and threshold != (1.0 if at_most else 0.0)  # 0 / 1: gate is off
    ]
    return [alert for alert in alerts if alert is not None]


def cluster_alerts(history: History, max_rejections: int) -> list[Alert]:
    """Clusters rejected at least `max_rejections` times."""
    rejected = Counter(c.cluster_id for c in history.clusters if c.status == "rejected")
    return [
        Alert(CROSSED, f"cluster {cluster_id} rejected {count} times: it needs a person")
        for cluster_id, count in sorted(rejected.items())
        if count >= max_rejections
    ]


def locator_alerts(history: History, settings: MonitoringSettings) -> list[Alert]:
    """Locator drift, and a hypernetwork that belongs to another base model."""
    alerts = []
    drift = history.locator_drift
    if drift is not None and drift > settings.max_locator_drift:
        alerts.append(
            Alert(
                CROSSED,
                f"locator drift: the champion's scope weights moved {drift:.3f} (relative) from "
                f"the base model the hypernetwork was trained on (> {settings.max_locator_drift:g}"
                "): re-run `retouch metatrain` on the champion",
            )
        )
    if history.hypernet is not None and history.hypernet.matches_base is False:
        alerts.append(Alert(CROSSED, "the hypernetwork belongs to another base model"))
    return alerts


def attention(history: History, gate: GateSettings, settings: MonitoringSettings) -> list[Alert]:
    """The whole attention list, most severe first."""
    alerts = [
        *gate_alerts(history, gate, settings.near_margin),
        *cluster_alerts(history, settings.max_rejections),
        *locator_alerts(history, settings),
    ]
    if history.missing:
        alerts.append(Alert(INFO, f"{len(history.missing)} records missing or unreadable: below"))
    order = {CROSSED: 0, NEAR: 1, INFO: 2}
    return sorted(alerts, key=lambda alert: order[alert.level])
