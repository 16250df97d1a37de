"""A short HTML page per night: what came in, what was edited, what the gates decided.

Reads the night's record as the nightly flow wrote it (`NightResult.to_dict()` in
flows/nightly.py, also `state/nights/<date>/record.json`), so a page can be rebuilt from the
record alone. One self-contained file, no scripts, no external assets.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from html import escape
from pathlib import Path
from typing import Any

STYLE = (
    "body{font-family:sans-serif;max-width:70em;margin:2em auto}"
    "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #bbb;padding:.3em .6em}"
    ".pass{color:#176a2c}.fail{color:#a4161a}"
)
GATE_FIGURES = (
    "broad_locality_vs_champion",
    "broad_locality_vs_base",
    "sensitive_locality_vs_champion",
    "sensitive_locality_vs_base",
    "accuracy",
    "accuracy_base",
    "accuracy_drop",
)


class Raw(str):
    """Cell content that is already HTML (a link, an image): `html_cell` writes it as is."""


def html_cell(value: Any) -> str:
    """A table cell's text: `-` for None, three decimals for floats, HTML-escaped."""
    if isinstance(value, Raw):
        return str(value)
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}"
    return escape(str(value))


def html_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """An HTML table (cells through `html_cell`); shared with the monitoring dashboard."""
    head = "".join(f"<th>{escape(name)}</th>" for name in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{html_cell(v)}</td>" for v in row) + "</tr>" for row in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _counts(record: Mapping[str, Any]) -> str:
    accepted = sum(row["accepted"] for row in record["clusters"])
    header = [
        "flags in",
        "quarantined",
        "duplicates",
        "clusters ready",
        "waiting",
        "accepted",
        "rejected",
        "candidate",
        "promoted",
    ]
    row = [
        record["flags_in"],
        record["quarantined"],
        record["duplicates"],
        record["clusters_ready"],
        record["clusters_waiting"],
        accepted,
        len(record["clusters"]) - accepted,
        record["candidate_version"],
        "yes" if record["promoted"] else "no",
    ]
    return html_table(header, [row])


def _clusters(record: Mapping[str, Any]) -> str:
    header = ["cluster", "edit", "tries", "rho", "reliability", "GR", "LR", "reasons"]
    rows = [
        [
            row["cluster_id"],
            f"accepted {row['ledger_id']}" if row["accepted"] else "rejected",
            row["tries"],
            row["rho"],
            row["reliability"],
            row["generalization"],
            row["locality"],
            row["reasons"],
        ]
        for row in record["clusters"]
    ]
    return html_table(header, rows) if rows else "<p>No ready cluster tonight.</p>"


def _gate(record: Mapping[str, Any]) -> str:
    gate = record.get("gate")
    if gate is None:
        return "<p>No candidate tonight: nothing was judged or registered.</p>"
    verdict = "pass" if gate["passed"] else "fail"
    reasons = "".join(f"<li>{escape(reason)}</li>" for reason in gate["reasons"])
    figures = [[name, gate["figures"].get(name)] for name in GATE_FIGURES]
    return (
        f'<p class="{verdict}">Global gate: {"passed" if gate["passed"] else "failed"}</p>'
        f"<ul>{reasons}</ul>{html_table(['figure', 'value'], figures)}"
    )


def render_night_report(record: Mapping[str, Any]) -> str:
    """The HTML page of one night's record."""
    title = f"retouch night {record['night']}"
    provenance = (
        f"parent version {record['parent_version']}, champion after the night "
        f"{record['champion_version']}, data version {record['data_version'] or '-'}, "
        f"hypernetwork {record['hypernet_version']}, MLflow run {record['run_id'] or '-'}"
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{escape(title)}</title>"
        f"<style>{STYLE}</style></head><body><h1>{escape(title)}</h1>"
        f"<p>{escape(provenance)}</p>{_counts(record)}<h2>Clusters</h2>{_clusters(record)}"
        f"<h2>Promotion</h2>{_gate(record)}</body></html>"
    )


def write_night_report(record: Mapping[str, Any], folder: Path) -> Path:
    """Write `night-<date>.html` into `folder` (created if missing); return its path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"night-{record['night']}.html"
    path.write_text(render_night_report(record))
    return path
