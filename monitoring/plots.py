"""Figures of retouch (matplotlib, Agg backend): the editing benchmark's GR-vs-LR trade-off
curves, and the monitoring dashboard's panels (PNG bytes the page embeds).

Benchmark: reads the summary rows the benchmark wrote (one per method, level, k and subset; see
`core.evaluation.summarize`) and draws one curve per method: x = locality, y = generalization,
a point per level (rho for mask methods, c for FT-L1 / FT-L2). The paper's claim is that the
learned mask's curve dominates every baseline's; the figure is where to look.
"""

from __future__ import annotations

import io
from collections import defaultdict
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on the build machines; must precede pyplot
import matplotlib.pyplot as plt
import numpy as np

from core.gate import RETENTION_PREFIX

PANEL_INCHES = 3.6  # side of one panel
SINGLE_POINT_METHODS = ("ft", "lora")  # one level each: drawn as a marker, not a curve


def _curves(
    rows: Sequence[dict[str, object]], subset: str
) -> dict[tuple[str, int], list[dict[str, object]]]:
    """Summary rows of one subset grouped by (method, k), each sorted by level."""
    curves: dict[tuple[str, int], list[dict[str, object]]] = defaultdict(list)
    for row in rows:
        if row["subset"] == subset:
            curves[(str(row["method"]), int(row["k"]))].append(row)
    return {
        key: sorted(members, key=lambda r: float(r["level"])) for key, members in curves.items()
    }


def _draw_panel(
    axes: plt.Axes, curves: dict[tuple[str, int], list[dict[str, object]]], x_column: str
) -> None:
    """One curve per method (solid for k = 1, dashed for group edits)."""
    colours = plt.get_cmap("tab10")
    methods = sorted({method for method, _ in curves})
    for (method, k), members in sorted(curves.items()):
        xs = [float(row[x_column]) for row in members]
        ys = [float(row["generalization"]) for row in members]
        style = "o" if method in SINGLE_POINT_METHODS else ("o-" if k == 1 else "s--")
        label = method if k == 1 else f"{method} k={k}"
        axes.plot(xs, ys, style, color=colours(methods.index(method) % 10), label=label, ms=4)
    axes.grid(alpha=0.3)


def plot_tradeoff(
    rows: Sequence[dict[str, object]], path: str | Path, locality_columns: Sequence[str]
) -> Path:
    """Write the GR-vs-LR figure: panels = subsets (columns) x locality sets (rows).

    Args:
        rows: summary rows with `method`, `level`, `k`, `subset`, `generalization` and the
            `locality_columns`.
        path: the PNG to write (parent folders are created).
        locality_columns: e.g. `locality_sensitive`, `locality_broad`: one panel row each.

    Returns:
        The written path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    subsets = ["all", *sorted({str(row["subset"]) for row in rows} - {"all"})]
    figure, grid = plt.subplots(
        len(locality_columns),
        len(subsets),
        figsize=(PANEL_INCHES * len(subsets), PANEL_INCHES * len(locality_columns)),
        squeeze=False,
    )
    for row_index, column in enumerate(locality_columns):
        for column_index, subset in enumerate(subsets):
            axes = grid[row_index][column_index]
            _draw_panel(axes, _curves(rows, subset), column)
            axes.set_title(f"{subset}", fontsize=9)
            axes.set_xlabel(column.replace("_", " "), fontsize=8)
            axes.set_ylabel("generalization", fontsize=8)
    handles, labels = grid[0][0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="center right", fontsize=7)
    figure.tight_layout(rect=(0, 0, 0.85, 1))
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


# ---------------------------------------------------------------- the monitoring dashboard

STATUS_COLOURS = {
    "edited": "#2b8a3e",
    "ready": "#1c7ed6",
    "waiting": "#adb5bd",
    "rejected": "#c92a2a",
}
THRESHOLD_STYLE = {"color": "#c92a2a", "linestyle": "--", "linewidth": 1}
WIDE = (9.0, 3.2)  # inches of a full-width row of panels


def figure_png(figure: plt.Figure) -> bytes:
    """The figure as PNG bytes (then closed): what the dashboard embeds as base64."""
    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png", dpi=90)
    plt.close(figure)
    return buffer.getvalue()


def _series(axes: plt.Axes, xs: Sequence[float], ys: Sequence[float | None], label: str) -> None:
    """A line of points, skipping the missing ones."""
    points = [(x, y) for x, y in zip(xs, ys, strict=True) if y is not None]
    if points:
        axes.plot(*zip(*points, strict=True), "o-", ms=3, label=label)


def _threshold(axes: plt.Axes, value: float, label: str) -> None:
    axes.axhline(value, **THRESHOLD_STYLE, label=label)


def _finish(axes: plt.Axes, title: str, xlabel: str) -> None:
    axes.set_title(title, fontsize=9)
    axes.set_xlabel(xlabel, fontsize=8)
    axes.grid(alpha=0.3)
    if axes.get_legend_handles_labels()[0]:
        axes.legend(fontsize=7)


def plot_promotions(
    created: Sequence[datetime],
    versions: Sequence[int],
    passed: Sequence[bool | None],
    champion_moves: Sequence[tuple[datetime, int, str]],
) -> bytes:
    """Registry versions over time (green: gate passed, red: failed, grey: base) and the
    champion alias as a step line; rollbacks are marked with a triangle."""
    figure, axes = plt.subplots(figsize=WIDE)
    colours = ["#adb5bd" if p is None else "#2b8a3e" if p else "#c92a2a" for p in passed]
    axes.scatter(created, versions, c=colours, s=25, zorder=3, label="version (colour: gate)")
    if champion_moves:
        moves = sorted(champion_moves)
        axes.step(
            [m[0] for m in moves],
            [m[1] for m in moves],
            where="post",
            color="#1c7ed6",
            label="champion",
        )
        rollbacks = [(t, n) for t, n, a in champion_moves if "rollback" in a]
        if rollbacks:
            axes.scatter(
                *zip(*rollbacks, strict=True),
                marker="v",
                s=60,
                color="#e8590c",
                zorder=4,
                label="rollback",
            )
    axes.set_ylabel("version", fontsize=8)
    figure.autofmt_xdate()
    _finish(axes, "registry versions and the champion", "registered at (UTC)")
    return figure_png(figure)


def plot_locality_trends(
    steps: Sequence[int], figures: Sequence[Mapping[str, float]], thresholds: Mapping[str, float]
) -> bytes:
    """Four panels over accepted edits (x: ledger index) with the gate thresholds drawn in:
    broad and sensitive locality vs the base and vs the previous champion, clean accuracy,
    and the lowest retention of an earlier edit."""
    figure, grid = plt.subplots(1, 4, figsize=(12.0, 3.0))
    for axes, population in zip(grid[:2], ("broad", "sensitive"), strict=True):
        for reference in ("base", "champion"):
            key = f"{population}_locality_vs_{reference}"
            _series(axes, steps, [f.get(key) for f in figures], f"vs {reference}")
            _threshold(axes, thresholds[f"min_{key}"], f"gate vs {reference}")
        _finish(axes, f"{population} locality (LR)", "ledger index")
    _series(grid[2], steps, [f.get("accuracy") for f in figures], "candidate")
    floors = [
        f["accuracy_base"] - thresholds["max_accuracy_drop"] if "accuracy_base" in f else None
        for f in figures
    ]
    _series(grid[2], steps, floors, "gate floor (base - max drop)")
    _finish(grid[2], "clean accuracy", "ledger index")
    lowest = [min(retentions(f).values(), default=None) for f in figures]
    _series(grid[3], steps, lowest, "lowest retention")
    _threshold(grid[3], thresholds["min_retention"], "gate")
    _finish(grid[3], "retention of earlier edits", "ledger index")
    return figure_png(figure)


def retentions(figures: Mapping[str, float]) -> dict[str, float]:
    """Ledger id -> retention figure of a candidate's earlier edit."""
    return {
        key.removeprefix(RETENTION_PREFIX): value
        for key, value in figures.items()
        if key.startswith(RETENTION_PREFIX)
    }


def plot_weight_change(
    steps: Sequence[int],
    norms: Sequence[Mapping[str, float]],
    relative: Sequence[float | None],
    max_locator_drift: float,
) -> bytes:
    """Norm of the accumulated weight change per edited matrix (the early sign of collapse),
    and the relative change of the whole scope against the locator-drift threshold."""
    figure, (left, right) = plt.subplots(1, 2, figsize=WIDE)
    for name in sorted({name for row in norms for name in row}):
        _series(left, steps, [row.get(name) for row in norms], name.removesuffix(".weight"))
    left.set_ylabel("||W - W_base||", fontsize=8)
    _finish(left, "accumulated weight change per matrix", "ledger index")
    _series(right, steps, relative, "||dW|| / ||W_base|| (scope)")
    _threshold(right, max_locator_drift, "monitoring.max_locator_drift")
    _finish(right, "relative change (locator drift)", "ledger index")
    return figure_png(figure)


def plot_cluster_map(
    clusters: Sequence[str], nights: Sequence[int], cells: Mapping[tuple[str, int], tuple[int, str]]
) -> bytes:
    """Clusters (rows) x nights (columns): colour = status, number = size of the cluster."""
    height = 1.0 + 0.22 * len(clusters)
    figure, axes = plt.subplots(figsize=(max(7.0, 0.3 * len(nights) + 3.0), height))
    for (cluster, night), (size, status) in cells.items():
        row, column = clusters.index(cluster), nights.index(night)
        axes.add_patch(
            plt.Rectangle((column - 0.5, row - 0.5), 1, 1, color=STATUS_COLOURS.get(status, "#000"))
        )
        axes.text(column, row, str(size), ha="center", va="center", fontsize=6, color="white")
    axes.set_xlim(-0.5, len(nights) - 0.5)
    axes.set_ylim(len(clusters) - 0.5, -0.5)
    axes.set_xticks(range(len(nights)), [str(n) for n in nights], fontsize=6)
    axes.set_yticks(range(len(clusters)), clusters, fontsize=6)
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in STATUS_COLOURS.values()]
    axes.legend(
        handles, list(STATUS_COLOURS), fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0)
    )
    _finish(axes, "failure clusters: size (number) and status (colour) per night", "night index")
    return figure_png(figure)


def _stacked_bars(
    axes: plt.Axes, positions: np.ndarray, series: Mapping[str, Sequence[float]]
) -> np.ndarray:
    """One stacked bar per position, a colour per series; returns the stack heights."""
    bottom = np.zeros(len(positions))
    for label, values in series.items():
        axes.bar(positions, values, bottom=bottom, label=label)
        bottom += np.asarray(values, dtype=float)
    return bottom


def plot_flags(
    days: Sequence[str],
    volumes: Mapping[str, Sequence[int]],
    reason_shares: Mapping[str, Sequence[float]],
    drift: Sequence[tuple[float, float] | None],
    drift_alpha: float,
) -> bytes:
    """Incoming flags per day: volume (stacked by outcome), share quarantined by reason
    (stacked), and the KS drift statistic of flagged features against training features
    (filled marker: p-value below `drift_alpha`)."""
    figure, grid = plt.subplots(1, 3, figsize=(13.0, 3.2))
    positions = np.arange(len(days))
    _stacked_bars(grid[0], positions, volumes)
    _finish(grid[0], "flags per day", "day")
    total = _stacked_bars(grid[1], positions, reason_shares)
    grid[1].set_ylim(0, max(0.05, float(total.max(initial=0)) * 1.2))
    _finish(grid[1], "share of rows quarantined, by reason", "day")
    if reason_shares:
        grid[1].legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    tested = [(i, test) for i, test in enumerate(drift) if test is not None]
    if tested:
        xs, tests = zip(*tested, strict=True)
        grid[2].plot(xs, [t[0] for t in tests], "-", color="#495057")
        significant = ["#c92a2a" if t[1] < drift_alpha else "white" for t in tests]
        grid[2].scatter(
            xs,
            [t[0] for t in tests],
            c=significant,
            edgecolors="#c92a2a",
            zorder=3,
            label=f"filled: p < {drift_alpha:g}",
        )
    grid[2].set_ylim(0, 1)
    _finish(grid[2], "drift: KS statistic vs training features", "day")
    every = max(1, len(days) // 10)  # at most ~10 readable labels
    for axes in grid:
        axes.set_xticks(positions[::every], [day[5:] for day in days[::every]], fontsize=7)
    return figure_png(figure)


def plot_masks(edit_labels: Sequence[int], sparsity: Sequence[float], iou: np.ndarray) -> bytes:
    """Mask sparsity (share of scope units left untouched) per accepted edit, and the overlap
    (IoU (E, E)) of every pair of masks: high overlap means edits compete for the same units."""
    figure, (left, right) = plt.subplots(1, 2, figsize=WIDE)
    left.plot(edit_labels, sparsity, "o-", ms=3)
    left.set_ylim(0, 1)
    _finish(left, "mask sparsity (share of units untouched)", "ledger index")
    image = right.imshow(iou, vmin=0, vmax=1, cmap="viridis")
    ticks = list(range(0, len(edit_labels), max(1, len(edit_labels) // 10)))
    right.set_xticks(ticks, [str(edit_labels[i]) for i in ticks], fontsize=6)
    right.set_yticks(ticks, [str(edit_labels[i]) for i in ticks], fontsize=6)
    figure.colorbar(image, ax=right, fraction=0.046)
    _finish(right, "mask IoU between accepted edits", "ledger index")
    return figure_png(figure)
