"""Figures of the editing benchmark: the GR-vs-LR trade-off curves (matplotlib, Agg backend).

Reads the summary rows the benchmark wrote (one per method, level, k and subset; see
`core.evaluation.summarize`) and draws one curve per method: x = locality, y = generalization,
a point per level (rho for mask methods, c for FT-L1 / FT-L2). The paper's claim is that the
learned mask's curve dominates every baseline's; the figure is where to look.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on the build machines; must precede pyplot
import matplotlib.pyplot as plt

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
