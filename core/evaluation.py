"""The editing benchmark protocol (method.md sections 1, 2, 4, 5): paired edits and their metrics.

Owns the pure part of `retouch benchmark` and `retouch scope-search`:
- failure groups and locality sets as preprocessed tensors (capped, seeded subsamples);
- the paired edit plan: every method and level edits the same samples with the same seeds, and a
  k-sample edit of a case uses the first k of its samples, so methods, levels and k compare
  edit by edit;
- `EditEvaluator`: SR, GR (edit samples excluded), LR against the pre-edit predictions on each
  locality set, and accuracy after the edit. Pre-edit predictions are computed once, and so are
  the activations entering the first edited block (`SplitForward.prefix`): an edit only re-runs
  the edited blocks and what follows them. The delta is applied, measured and restored, so the
  model is bit-identical after every edit;
- the learning-rate choice, summaries, paired differences with standard errors, gaps between
  GR-vs-LR curves at equal locality (`frontier_gaps`), mask localization diagnostics, and the
  scope search's candidates (FFN windows, and attention windows edited by `AttentionEditor`).
No files, no MLflow: flows/benchmark.py does the I/O.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from core.baselines import EDITORS, DenseDeltas
from core.data import ImageSet
from core.edit import (
    EditBatch,
    EditDelta,
    Editor,
    Locator,
    MaskedEditor,
    SplitForward,
    apply_delta,
    eval_mode,
    fit_edit_delta,
    input_spec,
    restore,
    topk_mask,
)
from core.errors import ConfigError, DataError, EditError
from core.metrics import accuracy, generalization, locality, mask_iou, reliability
from core.model import Preprocessing, predict_logits, preprocess
from core.scope import EditScope, build_scope, find_ffn_sites
from core.settings import EditSettings

logger = logging.getLogger(__name__)

MASK_METHODS = ("hprd", "random", "saliency")  # a locator and a sparsity rho; k-sample edits
PENALIZED_METHODS = ("ft-l1", "ft-l2")  # dense FT plus c * penalty; the level is c
KNOWN_METHODS = (*MASK_METHODS, "ft", *PENALIZED_METHODS, "lora")
ATTENTION_WEIGHTS = ("qkv", "proj")  # what the scope search's attention arm edits per block
ROW_METRICS = ("reliability", "generalization", "accuracy", "steps", "success")
SECONDS = ("edit_seconds", "eval_seconds")


@dataclass(frozen=True)
class FailureGroup:
    """The base model's failures of one subpopulation: edit samples and GR measurement set.

    Attributes:
        name: the group id (e.g. `style-outline:star`).
        subset: `context` or `style`.
        images: (n, 3, S, S) float, preprocessed.
        labels: (n,) int64 true labels.
        sample_ids: n content ids, to name the edit samples in the results.
    """

    name: str
    subset: str
    images: torch.Tensor
    labels: torch.Tensor
    sample_ids: tuple[str, ...]


@dataclass(frozen=True)
class LocalitySet:
    """Clean images whose predictions an edit should not move.

    Attributes:
        name: `sensitive` (right but barely: the paper's harsh set) or `broad` (random clean).
        images: (N, 3, S, S) float, preprocessed.
        labels: (N,) int64 true labels, for accuracy after the edit.
    """

    name: str
    images: torch.Tensor
    labels: torch.Tensor


def _capped(n: int, cap: int | None, seed: int) -> np.ndarray:
    """Sorted indices of a seeded random subsample of at most `cap` of n rows (all if None)."""
    if cap is None or n <= cap:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).permutation(n)[:cap])


def failure_groups_from(
    failures: ImageSet, preprocessing: Preprocessing, max_per_group: int | None, seed: int
) -> list[FailureGroup]:
    """Split a failures table (core/benchmark.py layout) into groups, sorted by name.

    Raises:
        DataError: the table lacks the `group`, `subset` or `sample_id` column.
    """
    missing = {"group", "subset", "sample_id"} - set(failures.table.column_names)
    if missing:
        raise DataError(
            f"failures table lacks columns {sorted(missing)}; rebuild it with "
            "`retouch build benchmark`"
        )
    names = np.asarray(failures.table.column("group").to_pylist())
    subsets = failures.table.column("subset").to_pylist()
    ids = failures.table.column("sample_id").to_pylist()
    groups = []
    for offset, name in enumerate(sorted(set(names.tolist()))):
        rows = np.flatnonzero(names == name)
        rows = rows[_capped(len(rows), max_per_group, seed + offset)]
        images = preprocess(failures.images[torch.as_tensor(rows)], preprocessing)  # (n, 3, S, S)
        groups.append(
            FailureGroup(
                name,
                subsets[rows[0]],
                images,
                failures.labels[torch.as_tensor(rows)],
                tuple(ids[row] for row in rows),
            )
        )
    return groups


def locality_set_from(
    name: str, images: ImageSet, preprocessing: Preprocessing, cap: int | None, seed: int
) -> LocalitySet:
    """A locality set from an image table, optionally a seeded subsample of at most `cap`."""
    rows = torch.as_tensor(_capped(len(images), cap, seed))
    return LocalitySet(name, preprocess(images.images[rows], preprocessing), images.labels[rows])


@dataclass(frozen=True)
class EditCase:
    """One paired edit request: the same samples and seed for every method and level.

    Attributes:
        case_id: index in the plan.
        group: the failure group the samples come from.
        subset: that group's subset (context / style).
        positions: `max_k` distinct positions within the group; a k-sample edit uses the first k.
        seed: the edit's seed (random masks, LoRA init).
    """

    case_id: int
    group: str
    subset: str
    positions: tuple[int, ...]
    seed: int


def _group_order(groups: Sequence[FailureGroup], rng: np.random.Generator) -> list[FailureGroup]:
    """Groups shuffled within each subset, then interleaved so subsets alternate."""
    by_subset: dict[str, list[FailureGroup]] = defaultdict(list)
    for group in groups:
        by_subset[group.subset].append(group)
    shuffled = [
        [members[i] for i in rng.permutation(len(members))]
        for _, members in sorted(by_subset.items())
    ]
    longest = max(len(members) for members in shuffled)
    return [members[i] for i in range(longest) for members in shuffled if i < len(members)]


def plan_cases(
    groups: Sequence[FailureGroup], n_cases: int, cases_per_group: int, max_k: int, seed: int
) -> list[EditCase]:
    """The paired edit plan: `cases_per_group` consecutive cases per group, subsets alternating.

    Within a group, cases walk one seeded permutation of its failures, so their samples differ
    until the group runs out; more cases than groups allow cycle through the groups again.

    Raises:
        DataError: no group has more than `max_k` failures (GR needs a held-out failure).
    """
    usable = [group for group in groups if len(group.labels) > max_k]
    if not usable:
        raise DataError(
            f"no failure group has more than {max_k} failures; lower edit_benchmark.group_sizes "
            "or rebuild the benchmark data with more shift images (world.n_per_shift_group)"
        )
    rng = np.random.default_rng(seed)
    order = _group_order(usable, rng)
    permutations = {group.name: rng.permutation(len(group.labels)) for group in order}
    used: Counter[str] = Counter()
    cases = []
    for case_id in range(n_cases):
        group = order[(case_id // cases_per_group) % len(order)]
        permutation, start = permutations[group.name], used[group.name] * max_k
        used[group.name] += 1
        positions = tuple(int(permutation[(start + t) % len(permutation)]) for t in range(max_k))
        cases.append(EditCase(case_id, group.name, group.subset, positions, seed + case_id))
    return cases


@dataclass(frozen=True)
class Level:
    """One column of the benchmark grid.

    Attributes:
        method: a name of `KNOWN_METHODS`, or `attention-ft` in the scope search.
        level: rho for mask methods, c for FT-L1 / FT-L2, 0 otherwise.
        k: edit samples per edit.
        lr: the edit learning rate.
        scope: the edited block window, e.g. `2-4` (LoRA edits every block's qkv regardless).
    """

    method: str
    level: float
    k: int
    lr: float
    scope: str


def window_name(blocks: Sequence[int]) -> str:
    """`2-4` for blocks (2, 3, 4): how results name a window."""
    return f"{blocks[0]}-{blocks[-1]}"


def benchmark_levels(
    methods: Sequence[str],
    rhos: Sequence[float],
    penalty_weights: Sequence[float],
    group_sizes: Sequence[int],
    lr: float,
    scope: EditScope,
) -> list[Level]:
    """Every method at every level: mask methods x rhos x k, FT-L1/L2 x c, FT and LoRA once.

    Raises:
        ConfigError: an unknown method name.
    """
    check_methods(methods)
    window = window_name(scope.blocks)
    levels = []
    for method in methods:
        if method in MASK_METHODS:
            levels += [Level(method, rho, k, lr, window) for k in group_sizes for rho in rhos]
        elif method in PENALIZED_METHODS:
            levels += [Level(method, c, 1, lr, window) for c in penalty_weights]
        else:
            levels.append(Level(method, 0.0, 1, lr, window))
    return levels


def check_methods(methods: Sequence[str]) -> None:
    """Raise ConfigError naming any method the benchmark does not know."""
    unknown = sorted(set(methods) - set(KNOWN_METHODS))
    if unknown or not methods:
        raise ConfigError(
            f"unknown or no benchmark methods {unknown}; choose from {list(KNOWN_METHODS)} "
            "(edit_benchmark.methods or --methods)"
        )


def make_editor(
    level: Level, scope: EditScope, settings: EditSettings, locator: Locator | None
) -> Editor:
    """The editor of one grid level: the `edit` section with the level's lr, rho or c.

    The faithful method is benchmarked: the locality term of extension (a) is switched off.

    Raises:
        ConfigError: hprd without a hypernetwork locator.
    """
    update: dict[str, float] = {"lr": level.lr, "locality_weight": 0.0}
    if level.method in MASK_METHODS:
        update["rho"] = level.level
    if level.method in PENALIZED_METHODS:
        update["penalty_weight"] = level.level
    tuned = settings.model_copy(update=update)
    if level.method != "hprd":
        return EDITORS[level.method](scope, tuned)
    if locator is None:
        raise ConfigError(
            "hprd needs the meta-trained hypernetwork: run `retouch metatrain` first, or leave "
            "hprd out (--methods random,saliency,...)"
        )
    return MaskedEditor("hprd", scope, locator, level.level, tuned)


@dataclass(frozen=True)
class Measurement:
    """What one edit did, by the metrics of method.md section 1."""

    reliability: float
    generalization: float
    locality: dict[str, float]  # locality-set name -> share of unchanged predictions
    accuracy: float


class EditEvaluator:
    """Measures edits against cached pre-edit predictions and cached prefix activations.

    The prefix cache is keyed by the first edited block and filled on first use with the
    unedited model; the delta only touches that block and later ones, so the cache stays valid.
    """

    def __init__(
        self,
        model: nn.Module,
        groups: Sequence[FailureGroup],
        locality_sets: Sequence[LocalitySet],
        accuracy_set: str,
        batch_size: int,
    ) -> None:
        """Compute the pre-edit predictions of every locality set (once).

        Args:
            model: the base model; edits are applied to it in place and restored.
            groups: the failure groups edit cases come from.
            locality_sets: sets whose predictions should not move (e.g. sensitive, broad).
            accuracy_set: the locality set whose labels measure accuracy after an edit.
            batch_size: images per forward pass.

        Raises:
            DataError: `accuracy_set` names no locality set, or a set is empty.
        """
        names = [item.name for item in locality_sets]
        if accuracy_set not in names or any(len(item.labels) == 0 for item in locality_sets):
            raise DataError(f"accuracy set '{accuracy_set}' must be a non-empty one of {names}")
        self.model = model
        self.groups = {group.name: group for group in groups}
        self.locality_sets = {item.name: item for item in locality_sets}
        self.accuracy_set = accuracy_set
        self.batch_size = batch_size
        self.pre_edit = {
            item.name: predict_logits(model, item.images, batch_size).argmax(1)  # (N,)
            for item in locality_sets
        }
        self.base_accuracy = accuracy(
            self.pre_edit[accuracy_set], self.locality_sets[accuracy_set].labels
        )
        self._prefixes: dict[int | None, dict[str, torch.Tensor]] = {}

    def edit_batch(self, case: EditCase, k: int) -> EditBatch:
        """The first k samples of `case` as an edit request."""
        group = self.groups[case.group]
        positions = torch.as_tensor(case.positions[:k])
        return EditBatch(group.images[positions], group.labels[positions])

    def _sets(self) -> dict[str, torch.Tensor]:
        images = {f"group:{name}": group.images for name, group in self.groups.items()}
        return images | {name: item.images for name, item in self.locality_sets.items()}

    def _prefix(self, forward: SplitForward) -> dict[str, torch.Tensor]:
        """Activations entering the first edited block, per set, computed once per block."""
        if forward.first_block not in self._prefixes:
            with eval_mode(self.model):
                self._prefixes[forward.first_block] = {
                    name: forward.prefix_in_batches(images, self.batch_size)
                    for name, images in self._sets().items()
                }
        return self._prefixes[forward.first_block]

    def _predict(self, forward: SplitForward, cached: torch.Tensor) -> torch.Tensor:
        """(N,) predictions of the model as it is now, from cached prefix activations."""
        with eval_mode(self.model):
            return forward.classes(cached, self.batch_size)

    def measure(self, delta: EditDelta, case: EditCase, k: int) -> Measurement:
        """Apply `delta`, measure SR / GR / LR / accuracy, restore the model bit for bit."""
        forward = SplitForward(self.model, list(delta.touched_parameters()))
        cached = self._prefix(forward)
        needed = [f"group:{case.group}", *self.locality_sets]
        undo = apply_delta(self.model, delta)
        try:
            predictions = {name: self._predict(forward, cached[name]) for name in needed}
        finally:
            restore(self.model, undo)
        group = self.groups[case.group]
        positions = torch.as_tensor(case.positions[:k])
        on_group = predictions[f"group:{case.group}"]  # (n,)
        return Measurement(
            reliability=reliability(on_group[positions], group.labels[positions]),
            generalization=generalization(on_group, group.labels, positions),
            locality={
                name: locality(predictions[name], self.pre_edit[name])
                for name in self.locality_sets
            },
            accuracy=accuracy(
                predictions[self.accuracy_set], self.locality_sets[self.accuracy_set].labels
            ),
        )


def delta_unit_mask(delta: EditDelta, scope: EditScope) -> torch.Tensor | None:
    """(n_mask_entries,) bool: the scope units a unit-sparse delta edits; None for other deltas."""
    if not delta.params or any(
        name not in scope.param_names or change.units is None
        for name, change in delta.params.items()
    ):
        return None
    parts = []
    for name, width in zip(scope.param_names, scope.mask_widths, strict=True):
        part = torch.zeros(width, dtype=torch.bool)
        if name in delta.params:
            part[delta.params[name].units] = True
        parts.append(part)
    return torch.cat(parts)


@dataclass(frozen=True)
class EditResult:
    """One edit of the grid: which, on what, how it went, how long it took.

    `unit_mask` holds the edited scope units of a unit-sparse delta (for mask diagnostics).
    """

    level: Level
    case: EditCase
    edit_ids: tuple[str, ...]
    measurement: Measurement
    steps: int
    success: bool
    edit_seconds: float
    eval_seconds: float
    unit_mask: torch.Tensor | None = None

    def row(self) -> dict[str, object]:
        """Flat, CSV-ready form: level fields, case fields, metrics, seconds."""
        measured = self.measurement
        return {
            **asdict(self.level),
            "case_id": self.case.case_id,
            "group": self.case.group,
            "subset": self.case.subset,
            "edit_ids": ";".join(self.edit_ids),
            "reliability": measured.reliability,
            "generalization": measured.generalization,
            **{f"locality_{name}": value for name, value in measured.locality.items()},
            "accuracy": measured.accuracy,
            "steps": self.steps,
            "success": int(self.success),
            "edit_seconds": round(self.edit_seconds, 4),
            "eval_seconds": round(self.eval_seconds, 4),
        }


def run_edit(
    editor: Editor,
    level: Level,
    case: EditCase,
    evaluator: EditEvaluator,
    scope: EditScope | None,
) -> EditResult:
    """Edit the evaluator's model for one case, measure, restore; time both halves."""
    batch = evaluator.edit_batch(case, level.k)
    started = time.perf_counter()
    delta = editor.edit(evaluator.model, batch, seed=case.seed)
    edited = time.perf_counter()
    measurement = evaluator.measure(delta, case, level.k)
    group = evaluator.groups[case.group]
    return EditResult(
        level=level,
        case=case,
        edit_ids=tuple(group.sample_ids[p] for p in case.positions[: level.k]),
        measurement=measurement,
        steps=int(delta.meta.get("steps", 0)),
        success=bool(delta.meta.get("success", False)),
        edit_seconds=edited - started,
        eval_seconds=time.perf_counter() - edited,
        unit_mask=None if scope is None else delta_unit_mask(delta, scope),
    )


def run_edits(
    jobs: Sequence[tuple[Level, Editor]],
    cases: Sequence[EditCase],
    evaluator: EditEvaluator,
    scope: EditScope | None = None,
    on_edit: Callable[[EditResult], None] | None = None,
) -> list[EditResult]:
    """Every (level, editor) job on every case: the paired grid.

    Args:
        jobs: grid levels and the editors that implement them.
        cases: the paired plan; every job edits exactly these.
        evaluator: measures each edit on the model it holds (restored after each edit).
        scope: the benchmark's scope, to record the units each mask edit changed; None skips.
        on_edit: called after each edit (a progress bar).
    """
    results = []
    for level, editor in jobs:
        for case in cases:
            results.append(run_edit(editor, level, case, evaluator, scope))
            if on_edit is not None:
                on_edit(results[-1])
    return results


def _mean(values: Sequence[float]) -> float:
    return float(np.mean(values)) if len(values) else math.nan


def metric_names(rows: Sequence[dict[str, object]]) -> list[str]:
    """The averaged columns of edit rows: SR, GR, each locality, accuracy, steps, seconds."""
    localities = [name for name in rows[0] if name.startswith("locality_")] if rows else []
    return [*ROW_METRICS[:2], *localities, *ROW_METRICS[2:], *SECONDS]


def summarize(
    rows: Sequence[dict[str, object]], keys: Sequence[str] = ("method", "level", "k", "lr", "scope")
) -> list[dict[str, object]]:
    """Mean of every metric per `keys` and subset, plus the subset `all` (every edit).

    Returns:
        One row per (keys..., subset) with `n_edits` and the means, in first-seen key order.
    """
    metrics = metric_names(rows)
    subsets = sorted({str(row["subset"]) for row in rows})
    summary = []
    for subset in ("all", *subsets):
        grouped: dict[tuple, list[dict[str, object]]] = defaultdict(list)
        for row in rows:
            if subset in ("all", row["subset"]):
                grouped[tuple(row[key] for key in keys)].append(row)
        for key, members in grouped.items():
            means = {name: _mean([float(m[name]) for m in members]) for name in metrics}
            summary.append(
                {**dict(zip(keys, key, strict=True)), "subset": subset, "n_edits": len(members)}
                | means
            )
    return summary


def choose_lr(
    rows: Sequence[dict[str, object]], locality_column: str, min_reliability: float
) -> tuple[float, list[dict[str, object]]]:
    """The best common edit learning rate from a sweep, and the per-lr table it was chosen from.

    Among learning rates whose mean SR over every method reaches `min_reliability`, the one with
    the highest mean GR + LR (`locality_column`); if none reaches it, the one with the best SR.
    """
    table = summarize(rows, keys=("lr",))
    overall = [row for row in table if row["subset"] == "all"]
    for row in overall:
        row["score"] = float(row["generalization"]) + float(row[locality_column])
    eligible = [row for row in overall if float(row["reliability"]) >= min_reliability]
    if eligible:
        best = max(eligible, key=lambda row: row["score"])
    else:
        best = max(overall, key=lambda row: row["reliability"])
        logger.warning(
            "no swept lr fixed %.0f%% of its edits; taking the most reliable, %g",
            100 * min_reliability,
            best["lr"],
        )
    return float(best["lr"]), overall


def _difference_row(
    pair: tuple[str, str], cell: tuple, subset: str, metric: str, differences: np.ndarray
) -> dict[str, object]:
    level, k, lr = cell
    return {
        "first": pair[0],
        "second": pair[1],
        "level": level,
        "k": k,
        "lr": lr,
        "subset": subset,
        "metric": metric,
        "n_edits": len(differences),
        "mean_difference": float(differences.mean()),
        "standard_error": float(differences.std(ddof=1) / math.sqrt(len(differences))),
    }


def paired_differences(
    rows: Sequence[dict[str, object]],
    pairs: Sequence[tuple[str, str]],
    metrics: Sequence[str],
) -> list[dict[str, object]]:
    """Mean per-edit difference (first minus second method) with its standard error.

    Edits pair on (level, k, lr, case id): both methods edited the same samples with the same
    seed. Subsets and `all` are reported; a cell needs at least two paired edits.
    """
    by_cell: dict[tuple, dict[int, dict[str, object]]] = defaultdict(dict)
    for row in rows:
        by_cell[(row["method"], row["level"], row["k"], row["lr"])][row["case_id"]] = row
    cells = sorted({cell[1:] for cell in by_cell})
    subsets = ("all", *sorted({str(row["subset"]) for row in rows}))
    out = []
    for pair in pairs:
        for cell in cells:
            first, second = by_cell.get((pair[0], *cell), {}), by_cell.get((pair[1], *cell), {})
            for subset in subsets:
                matched = [
                    (first[case], second[case])
                    for case in sorted(first.keys() & second.keys())
                    if subset in ("all", first[case]["subset"])
                ]
                if len(matched) < 2:
                    continue
                for metric in metrics:
                    differences = np.array(
                        [float(a[metric]) - float(b[metric]) for a, b in matched]
                    )
                    out.append(_difference_row(pair, cell, subset, metric, differences))
    return out


def _curve_gaps(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """Per level of `first`: its mean GR minus `second`'s mean-GR curve read at its mean
    locality (straight lines between `second`'s levels; NaN outside their locality range).

    Both are (levels, cases, 2) arrays of (generalization, locality) per edit.
    """
    first_gr, first_loc = first[..., 0].mean(axis=1), first[..., 1].mean(axis=1)  # (L1,)
    second_gr, second_loc = second[..., 0].mean(axis=1), second[..., 1].mean(axis=1)  # (L2,)
    order = np.argsort(second_loc)
    xs, ys = second_loc[order], second_gr[order]
    inside = (first_loc >= xs[0]) & (first_loc <= xs[-1])
    return np.where(inside, first_gr - np.interp(first_loc, xs, ys), np.nan)


def _gr_locality_table(
    by_level: dict[object, dict[object, dict[str, object]]],
    cases: Sequence[object],
    locality_metric: str,
) -> tuple[list[object], np.ndarray]:
    """Levels in order and their (levels, cases, 2) array of (GR, locality) per edit."""
    levels = sorted(by_level)
    values = [
        [
            (
                float(by_level[level][case]["generalization"]),
                float(by_level[level][case][locality_metric]),
            )
            for case in cases
        ]
        for level in levels
    ]
    return levels, np.array(values)


def frontier_gaps(
    rows: Sequence[dict[str, object]],
    pairs: Sequence[tuple[str, str]],
    locality_metric: str,
    n_boot: int = 1000,
    seed: int = 0,
) -> list[dict[str, object]]:
    """GR of the first method minus the second's GR *at the same locality*, with a bootstrap SE.

    A paired difference compares two locators at the same rho; when they trade GR for locality
    at different rates, that compares different points of the trade-off. Here the second
    method's mean GR-vs-locality curve (its levels joined by straight lines, same k and lr) is
    read at each level's mean locality of the first method: a positive gap means the first
    method's curve lies above the second's there. Levels outside the second curve's locality
    range are left out (no extrapolation). The standard error resamples the cases both methods
    edited at every level, together, so the pairing is kept.
    """
    cells: dict[tuple, dict[object, dict[object, dict[str, object]]]] = defaultdict(
        lambda: defaultdict(dict)
    )
    for row in rows:
        cells[(row["method"], row["k"], row["lr"])][row["level"]][row["case_id"]] = row
    rng = np.random.default_rng(seed)
    out = []
    for first, second in pairs:
        for k, lr in sorted({key[1:] for key in cells if key[0] == first}):
            a, b = cells[(first, k, lr)], cells.get((second, k, lr), {})
            if len(b) < 2:
                continue
            cases = sorted(set.intersection(*(set(level) for level in [*a.values(), *b.values()])))
            if len(cases) < 2:
                continue
            levels, first_values = _gr_locality_table(a, cases, locality_metric)
            second_values = _gr_locality_table(b, cases, locality_metric)[1]
            gaps = _curve_gaps(first_values, second_values)
            draws = rng.integers(0, len(cases), size=(n_boot, len(cases)))
            boot = np.array([_curve_gaps(first_values[:, d], second_values[:, d]) for d in draws])
            for index, level in enumerate(levels):
                if np.isnan(gaps[index]):
                    continue
                valid = boot[:, index][~np.isnan(boot[:, index])]  # draws inside the range
                out.append(
                    {
                        "first": first,
                        "second": second,
                        "k": k,
                        "lr": lr,
                        "level": level,
                        "locality": locality_metric,
                        "first_locality": float(first_values[index, :, 1].mean()),
                        "first_generalization": float(first_values[index, :, 0].mean()),
                        "gap": float(gaps[index]),
                        "standard_error": float(valid.std(ddof=1)) if len(valid) > 1 else math.nan,
                        "n_cases": len(cases),
                    }
                )
    return out


def _pairwise_iou(masks: Sequence[torch.Tensor], groups: Sequence[str]) -> tuple[float, float]:
    """Mean IoU over pairs of masks from the same group, and from different groups."""
    within, across = [], []
    for i in range(len(masks)):
        for j in range(i + 1, len(masks)):
            (within if groups[i] == groups[j] else across).append(mask_iou(masks[i], masks[j]))
    return _mean(within), _mean(across)


def block_shares(masks: torch.Tensor, scope: EditScope) -> dict[str, float]:
    """Mean share of the kept units that sit in each FFN block of the scope (fc1 + fc2)."""
    kept = masks.float().sum(dim=1).clamp_min(1)  # (M,)
    per_matrix = [part.float().sum(dim=1) for part in scope.split(masks)]  # each (M,)
    shares = {}
    for position, block in enumerate(scope.blocks):
        in_block = per_matrix[2 * position] + per_matrix[2 * position + 1]  # (M,)
        shares[f"kept_share_block_{block}"] = float((in_block / kept).mean())
    return shares


def mask_diagnostics(
    results: Sequence[EditResult], scope: EditScope, rho: float
) -> list[dict[str, object]]:
    """Does a locator localize? Per mask method, at `rho`, single-sample edits.

    Reports the mean IoU of binary masks within a group and across groups (method.md section 5:
    a localizing locator has much higher IoU within), the mean IoU with the population-mean mask
    (binarized at the same rho: high means one mask for everything), and per-block kept shares.
    """
    out = []
    for method in MASK_METHODS:
        chosen = [
            result
            for result in results
            if (result.level.method, result.level.k, result.level.level) == (method, 1, rho)
            and result.unit_mask is not None
        ]
        if len(chosen) < 2:
            continue
        masks = torch.stack([result.unit_mask for result in chosen])  # (M, n)
        within, across = _pairwise_iou(list(masks), [result.case.group for result in chosen])
        population = topk_mask(masks.float().mean(dim=0), rho)  # (n,)
        out.append(
            {
                "method": method,
                "rho": rho,
                "n_masks": len(chosen),
                "iou_within_group": within,
                "iou_across_groups": across,
                "iou_with_population_mean": _mean([mask_iou(m, population) for m in masks]),
                **block_shares(masks, scope),
            }
        )
    return out


def runtime_table(rows: Sequence[dict[str, object]]) -> list[dict[str, object]]:
    """Per method: median and mean seconds to edit and to evaluate, median steps."""
    by_method: dict[str, list[dict[str, object]]] = defaultdict(list)
    for row in rows:
        by_method[str(row["method"])].append(row)
    table = []
    for method, members in by_method.items():
        edit_s = [float(m["edit_seconds"]) for m in members]
        eval_s = [float(m["eval_seconds"]) for m in members]
        table.append(
            {
                "method": method,
                "n_edits": len(members),
                "median_edit_seconds": float(np.median(edit_s)),
                "mean_edit_seconds": _mean(edit_s),
                "median_eval_seconds": float(np.median(eval_s)),
                "median_steps": float(np.median([float(m["steps"]) for m in members])),
            }
        )
    return table


@dataclass(frozen=True)
class AttentionEditor:
    """Plain FT of the attention weights (qkv, proj; not biases) of a window of blocks.

    The scope search's comparison arm: the paper found editing attention (MSA) hurt locality.
    Deterministic: the zero-initialised dense delta needs no seed.

    Attributes:
        blocks: the window of block indices (`blocks.{i}.attn`).
        settings: learning rate and stopping rule.
    """

    blocks: tuple[int, ...]
    settings: EditSettings

    def edit(self, model: nn.Module, batch: EditBatch, *, seed: int) -> EditDelta:
        """Fine-tune the window's attention weights until the edit samples are fixed.

        Raises:
            EditError: bad batch, or the model lacks `blocks.{i}.attn.qkv/proj` weights.
        """
        batch.check(*input_spec(model))
        names = [
            f"blocks.{i}.attn.{part}.weight" for i in self.blocks for part in ATTENTION_WEIGHTS
        ]
        missing = sorted(set(names) - {name for name, _ in model.named_parameters()})
        if missing:
            raise EditError(f"attention FT needs {missing}, which {type(model).__name__} lacks")
        meta = {"method": "attention-ft", "scope_blocks": list(self.blocks), "seed": seed}
        return fit_edit_delta(model, batch, self.settings, DenseDeltas(model, names), meta)


def scope_search_jobs(
    model: nn.Module, width: int, settings: EditSettings
) -> list[tuple[Level, Editor]]:
    """Plain FT of every window of `width` consecutive FFNs, and of attention where it exists.

    FFN windows use the benchmark's FT editor (`fc1`/`fc2` weights of the window); attention
    windows use `AttentionEditor` on the same block indices (ViT-style `blocks.{i}.attn` only).
    """
    n_ffn = len(find_ffn_sites(model))
    windows = [tuple(range(start, start + width)) for start in range(n_ffn - width + 1)]
    tuned = settings.model_copy(update={"locality_weight": 0.0})
    jobs: list[tuple[Level, Editor]] = []
    for blocks in windows:
        level = Level("ft", 0.0, 1, settings.lr, window_name(blocks))
        jobs.append((level, EDITORS["ft"](build_scope(model, blocks), tuned)))
    names = {name for name, _ in model.named_parameters()}
    for blocks in windows:
        if all(f"blocks.{i}.attn.qkv.weight" in names for i in blocks):
            level = Level("attention-ft", 0.0, 1, settings.lr, window_name(blocks))
            jobs.append((level, AttentionEditor(blocks, tuned)))
    return jobs


def recommend_window(
    summary: Sequence[dict[str, object]], locality_column: str
) -> dict[str, object]:
    """The FFN window with the best trade-off: the highest mean GR + LR over every edit.

    Raises:
        DataError: the summary holds no FFN window.
    """
    ffn = [row for row in summary if row["method"] == "ft" and row["subset"] == "all"]
    if not ffn:
        raise DataError("the scope search measured no FFN window; is the model a timm ViT?")
    best = max(ffn, key=lambda row: float(row["generalization"]) + float(row[locality_column]))
    blocks = str(best["scope"]).split("-")
    return {
        "scope": best["scope"],
        "blocks": list(range(int(blocks[0]), int(blocks[1]) + 1)),
        "generalization": best["generalization"],
        locality_column: best[locality_column],
        "criterion": f"max generalization + {locality_column}",
    }
