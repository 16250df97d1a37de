"""`retouch benchmark` and `retouch scope-search`: run the edit protocol, write tables and figures.

The protocol itself is core/evaluation.py; this module loads the base model and the benchmark
data built by `retouch build benchmark`, runs the paired grid with one progress bar over every
edit, and writes under the output folder:

- `edits.csv` (one row per edit), `lr_sweep.csv` / `lr_sweep_edits.csv`;
- `summary.csv` (per method, level, k and subset: context, style and all), `paired.csv`
  (learned minus saliency / random, per edit, with standard errors), `masks.csv` (mask
  localization at `iou_rho`), `runtime.csv`, `summary.json`, and `report.md` with every table;
- `tradeoff.png`, the GR-vs-LR curves.

Accuracy after an edit is measured on the broad sample (random clean validation images of the
world, labelled), not on all of val.parquet: the same forward pass then gives broad locality and
accuracy. When a tracking URI is given (or MLFLOW_TRACKING_URI is set), the run's settings,
headline metrics and the whole output folder are logged to MLflow.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from mlflow.entities import Metric, Param
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from sqlalchemy.exc import SQLAlchemyError
from torch import nn
from tqdm import tqdm

from core.data import load_images
from core.edit import Editor
from core.errors import ConfigError, DataError, ModelError, RegistryError
from core.evaluation import (
    MASK_METHODS,
    EditEvaluator,
    EditResult,
    FailureGroup,
    Level,
    LocalitySet,
    benchmark_levels,
    check_methods,
    choose_lr,
    failure_groups_from,
    locality_set_from,
    make_editor,
    mask_diagnostics,
    paired_differences,
    plan_cases,
    recommend_window,
    run_edits,
    runtime_table,
    scope_search_jobs,
    summarize,
    window_name,
)
from core.hypernet import HypernetLocator, load_hypernet
from core.model import ModelCard, load_saved_model, weights_hash
from core.scope import EditScope, build_scope
from core.settings import EditBenchmarkSettings, Settings, settings_dict
from flows.bootstrap import base_dir, benchmark_dir, hypernet_path
from monitoring.plots import plot_tradeoff

logger = logging.getLogger(__name__)

LOCALITY_SETS = ("sensitive", "broad")  # benchmark_dir files, harshest first
ACCURACY_SET = "broad"
LOCALITY_COLUMNS = tuple(f"locality_{name}" for name in LOCALITY_SETS)
DIFFERENCE_PAIRS = (("hprd", "saliency"), ("hprd", "random"), ("saliency", "random"))
DIFFERENCE_METRICS = ("generalization", *LOCALITY_COLUMNS, "accuracy")
TABLE_COLUMNS = (
    "method",
    "level",
    "k",
    "n_edits",
    "reliability",
    "generalization",
    *LOCALITY_COLUMNS,
    "accuracy",
    "steps",
    "edit_seconds",
)
MLFLOW_BATCH = 500  # metrics per log_batch call (MLflow accepts at most 1,000)


# Columns of a paired-differences table, as `paired_differences` returns its rows.
PAIRED_COLUMNS = (
    "first",
    "second",
    "level",
    "k",
    "metric",
    "n_edits",
    "mean_difference",
    "standard_error",
)


def default_out_dir(settings: Settings) -> Path:
    """The benchmark's output folder unless one is given."""
    return settings.paths.artifacts / "edit-benchmark"


def project_tracking_uri(settings: Settings) -> str:
    """The project's MLflow SQLite store (paths.mlruns), for callers that want it logged there."""
    return f"sqlite:///{settings.paths.mlruns.expanduser().resolve()}/mlflow.db"


@dataclass(frozen=True)
class BenchmarkInputs:
    """The base model and the benchmark data, preprocessed and (unless full) capped."""

    model: nn.Module
    card: ModelCard
    groups: list[FailureGroup]
    locality_sets: list[LocalitySet]


def load_inputs(settings: Settings, full: bool) -> BenchmarkInputs:
    """Load the base model, failure groups and locality sets.

    Raises:
        DataError: a benchmark file is missing (names `retouch build benchmark`).
    """
    folder, config = benchmark_dir(settings), settings.edit_benchmark
    for name in ("failures", *LOCALITY_SETS):
        if not (folder / f"{name}.parquet").is_file():
            raise DataError(
                f"{folder / name}.parquet not found; build the benchmark data first "
                "(`retouch build benchmark`; no sensitive set means raise "
                "benchmark_data.max_sensitive_pool)"
            )
    model, card = load_saved_model(base_dir(settings))
    caps = {
        "group": None if full else config.max_group_failures,
        "sensitive": None if full else config.max_sensitive,
        "broad": None if full else config.max_broad,
    }
    groups = failure_groups_from(
        load_images(folder / "failures.parquet"), card.preprocessing, caps["group"], config.seed
    )
    locality_sets = [
        locality_set_from(
            name,
            load_images(folder / f"{name}.parquet"),
            card.preprocessing,
            caps[name],
            config.seed,
        )
        for name in LOCALITY_SETS
    ]
    return BenchmarkInputs(model, card, groups, locality_sets)


def load_locator(settings: Settings, model: nn.Module, scope: EditScope) -> HypernetLocator:
    """The meta-trained hypernetwork of `model` as a locator.

    Raises:
        ModelError: no checkpoint (names `retouch metatrain` and `--methods`).
        CheckpointMismatch: the checkpoint belongs to other base weights.
        ConfigError: it was meta-trained for another scope than scope.blocks.
    """
    path = hypernet_path(settings)
    if not path.is_file():
        raise ModelError(
            f"hprd needs the hypernetwork {path}, which does not exist: run `retouch metatrain` "
            "first, or benchmark without it (--methods random,saliency,ft,ft-l1,ft-l2,lora)"
        )
    hypernet = load_hypernet(path, model)
    if hypernet.scope_blocks != scope.blocks:
        raise ConfigError(
            f"{path} was meta-trained for blocks {list(hypernet.scope_blocks)}, scope.blocks is "
            f"{list(scope.blocks)}; set scope.blocks to match or re-run `retouch metatrain`"
        )
    return HypernetLocator(hypernet)


def write_csv(rows: Sequence[dict[str, object]], path: Path) -> Path:
    """Write dict rows as CSV (columns of the first row; an empty file for no rows)."""
    with path.open("w", newline="") as handle:
        if rows:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return path


def _cell(value: object) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def markdown_table(rows: Sequence[dict[str, object]], columns: Sequence[str]) -> str:
    """A GitHub markdown table of `columns` (those present in the rows)."""
    present = [column for column in columns if rows and column in rows[0]]
    if not present:
        return "(no rows)\n"
    lines = ["| " + " | ".join(present) + " |", "|" + " --- |" * len(present)]
    lines += ["| " + " | ".join(_cell(row[c]) for c in present) + " |" for row in rows]
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class _Run:
    """What every edit of one run shares: settings, data, scope, locator, evaluator."""

    settings: Settings
    inputs: BenchmarkInputs
    scope: EditScope
    locator: HypernetLocator | None
    evaluator: EditEvaluator

    def editor(self, level: Level) -> Editor:
        """The editor of one grid level."""
        return make_editor(level, self.scope, self.settings.edit, self.locator)

    def level(self, method: str, level: float, k: int, lr: float) -> Level:
        """A grid level on this run's scope."""
        return Level(method, level, k, lr, window_name(self.scope.blocks))


def _prepare(settings: Settings, full: bool, with_hprd: bool) -> _Run:
    """Load everything and cache the pre-edit predictions."""
    config = settings.edit_benchmark
    torch.set_num_threads(config.num_threads)
    inputs = load_inputs(settings, full)
    scope = build_scope(inputs.model, settings.scope.blocks)
    locator = load_locator(settings, inputs.model, scope) if with_hprd else None
    evaluator = EditEvaluator(
        inputs.model, inputs.groups, inputs.locality_sets, ACCURACY_SET, config.eval_batch_size
    )
    return _Run(settings, inputs, scope, locator, evaluator)


def _sweep_jobs(run: _Run, methods: Sequence[str]) -> list[tuple[Level, Editor]]:
    """The requested sweep methods at `sweep_rho` (or their own level), at every swept lr."""
    config = run.settings.edit_benchmark
    chosen = [method for method in config.sweep_methods if method in methods] or list(methods)
    own_level = {
        "ft-l1": run.settings.edit.penalty_weight,
        "ft-l2": run.settings.edit.penalty_weight,
    }
    levels = [
        run.level(m, config.sweep_rho if m in MASK_METHODS else own_level.get(m, 0.0), 1, lr)
        for lr in config.lrs
        for m in chosen
    ]
    return [(level, run.editor(level)) for level in levels]


@dataclass(frozen=True)
class _Grid:
    """What the sweep and the main grid produced."""

    sweep_rows: list[dict[str, object]]
    sweep_table: list[dict[str, object]]
    lr: float
    cases: int
    results: list[EditResult]


def _run_grid(run: _Run, methods: Sequence[str], full: bool) -> _Grid:
    """Sweep the edit lr on its own cases, then run every level at the chosen lr."""
    config = run.settings.edit_benchmark
    groups = run.inputs.groups
    n_cases = config.n_cases_full if full else config.n_cases
    cases = plan_cases(
        groups, n_cases, config.cases_per_group, max(config.group_sizes), config.seed
    )
    # Other samples than the main grid's (another seed), so the lr is not tuned on the test edits.
    sweep_cases = plan_cases(
        groups, config.n_sweep_cases, config.cases_per_group, 1, config.seed + 1
    )
    sweep_jobs = _sweep_jobs(run, methods)

    def levels(lr: float) -> list[Level]:
        grid = (config.rhos, config.penalty_weights, config.group_sizes, lr, run.scope)
        return benchmark_levels(methods, *grid)

    total = len(sweep_jobs) * len(sweep_cases) + len(levels(0.0)) * len(cases)
    with tqdm(total=total, desc="edits", unit="edit", disable=None) as bar:
        sweep = run_edits(sweep_jobs, sweep_cases, run.evaluator, on_edit=lambda _: bar.update())
        sweep_rows = [result.row() for result in sweep]
        lr, table = choose_lr(sweep_rows, LOCALITY_COLUMNS[0], config.min_sweep_reliability)
        jobs = [(level, run.editor(level)) for level in levels(lr)]
        results = run_edits(jobs, cases, run.evaluator, run.scope, lambda _: bar.update())
    return _Grid(sweep_rows, table, lr, len(cases), results)


def run_benchmark(
    settings: Settings,
    full: bool = False,
    out_dir: Path | None = None,
    methods: Sequence[str] | None = None,
    tracking_uri: str | None = None,
) -> Path:
    """Run the editing benchmark; return the output folder.

    Args:
        settings: all settings; reads `edit_benchmark`, `edit`, `scope`, `paths`.
        full: every locality image and failure, and `n_cases_full` edits per level, instead of
            the capped default run (about 15 minutes on two cores).
        out_dir: output folder; default `<artifacts>/edit-benchmark`.
        methods: a subset of edit_benchmark.methods (e.g. without hprd before meta-training).
        tracking_uri: MLflow tracking URI to log to; default MLFLOW_TRACKING_URI, else no logging.

    Raises:
        ConfigError: unknown method. DataError / ModelError: missing benchmark data, base model
            or (with hprd) hypernetwork, each naming the command that builds it.
    """
    methods = list(methods or settings.edit_benchmark.methods)
    check_methods(methods)
    run = _prepare(settings, full, with_hprd="hprd" in methods)
    weights_before = weights_hash(run.inputs.model)
    started = time.perf_counter()
    grid = _run_grid(run, methods, full)
    seconds = time.perf_counter() - started
    if weights_hash(run.inputs.model) != weights_before:
        raise ModelError("the base model changed during the benchmark: an editor broke restore")
    n_edits = len(grid.sweep_rows) + len(grid.results)
    facts = {
        "full": full,
        "methods": methods,
        "chosen_lr": grid.lr,
        "swept_lrs": list(settings.edit_benchmark.lrs),
        "n_cases": grid.cases,
        "n_groups_used": len({result.case.group for result in grid.results}),
        "locality_set_sizes": {s.name: len(s.labels) for s in run.inputs.locality_sets},
        "accuracy_set": ACCURACY_SET,
        "base_accuracy": run.evaluator.base_accuracy,
        "scope_blocks": list(run.scope.blocks),
        "base_weights_hash": weights_before,
        "model_restored": True,
        "n_edits": n_edits,
        "wall_seconds": round(seconds, 1),
        "seconds_per_edit": round(seconds / max(1, n_edits), 4),
    }
    out = Path(out_dir or default_out_dir(settings))
    tables = _write_benchmark(out, facts, grid, run.scope, settings.edit_benchmark)
    _log_if_tracking(
        tracking_uri, settings, "edit-benchmark", out, _headline_metrics(facts, tables)
    )
    return out


def _report(title: str, facts: dict[str, object], sections: dict[str, str]) -> str:
    """A markdown report: the run's facts, then one titled section per table."""
    lines = [f"# {title}", ""]
    lines += [f"- {key}: {json.dumps(value)}" for key, value in facts.items()]
    for heading, body in sections.items():
        lines += ["", f"## {heading}", "", body]
    return "\n".join(lines) + "\n"


def _subset_tables(summary: Sequence[dict[str, object]]) -> dict[str, str]:
    """One markdown table per subset (all first), every method, level and k."""
    subsets = dict.fromkeys(str(row["subset"]) for row in summary)
    return {
        f"Summary: {subset} edits": markdown_table(
            [row for row in summary if row["subset"] == subset], TABLE_COLUMNS
        )
        for subset in subsets
    }


def _report_sections(
    tables: dict[str, list[dict[str, object]]], grid: _Grid, config: EditBenchmarkSettings
) -> dict[str, str]:
    """The report's markdown sections, in reading order."""
    return {
        "Learning-rate sweep (chosen: highest GR + sensitive LR among reliable lrs)": (
            markdown_table(tables["lr_sweep"], ("lr", "n_edits", *TABLE_COLUMNS[4:], "score"))
        ),
        "Learning-rate sweep per method": markdown_table(
            [
                row
                for row in summarize(grid.sweep_rows, ("lr", *TABLE_COLUMNS[:2]))
                if row["subset"] == "all"
            ],
            ("lr", *TABLE_COLUMNS),
        ),
        **_subset_tables(tables["summary"]),
        "Paired differences (first minus second, same edits)": markdown_table(
            [row for row in tables["paired"] if row["subset"] == "all"],
            PAIRED_COLUMNS,
        ),
        f"Mask localization at rho = {config.iou_rho}": markdown_table(
            tables["masks"], list(tables["masks"][0]) if tables["masks"] else ()
        ),
        "Runtime per method": markdown_table(
            tables["runtime"], list(tables["runtime"][0]) if tables["runtime"] else ()
        ),
        "Figure": "![GR vs LR](tradeoff.png)",
    }


def _write_benchmark(
    out: Path,
    facts: dict[str, object],
    grid: _Grid,
    scope: EditScope,
    config: EditBenchmarkSettings,
) -> dict[str, list[dict[str, object]]]:
    """Write every table (CSV), the figure, summary.json and report.md; return the tables."""
    out.mkdir(parents=True, exist_ok=True)
    rows = [result.row() for result in grid.results]
    summary = summarize(rows)
    present = {str(row["method"]) for row in rows}
    pairs = [pair for pair in DIFFERENCE_PAIRS if set(pair) <= present]
    tables = {
        "edits": rows,
        "lr_sweep_edits": grid.sweep_rows,
        "lr_sweep": grid.sweep_table,
        "summary": summary,
        "paired": paired_differences(rows, pairs, DIFFERENCE_METRICS),
        "masks": mask_diagnostics(grid.results, scope, config.iou_rho),
        "runtime": runtime_table(rows),
    }
    for name, table in tables.items():
        write_csv(table, out / f"{name}.csv")
    plot_tradeoff(summary, out / "tradeoff.png", LOCALITY_COLUMNS)
    (out / "summary.json").write_text(json.dumps(facts, indent=2) + "\n")
    sections = _report_sections(tables, grid, config)
    (out / "report.md").write_text(_report("Editing benchmark", facts, sections))
    return tables


def _headline_metrics(
    facts: dict[str, object], tables: dict[str, list[dict[str, object]]]
) -> dict[str, float]:
    """MLflow metrics: run facts, every level's means over all edits, paired differences."""
    metrics = {key: float(facts[key]) for key in ("chosen_lr", "base_accuracy", "seconds_per_edit")}
    for row in tables["summary"]:
        if row["subset"] == "all":
            for name in ("reliability", "generalization", *LOCALITY_COLUMNS, "accuracy"):
                metrics[f"{name}/{row['method']}/{row['level']:g}/k{row['k']}"] = float(row[name])
    for row in tables["paired"]:
        if row["subset"] == "all":
            pair = f"{row['first']}-{row['second']}"
            key = f"paired/{pair}/{row['level']:g}/k{row['k']}/{row['metric']}"
            metrics[key] = float(row["mean_difference"])
            metrics[f"{key}/se"] = float(row["standard_error"])
    for row in tables["masks"]:
        for name in ("iou_within_group", "iou_across_groups", "iou_with_population_mean"):
            metrics[f"masks/{row['method']}/{name}"] = float(row[name])
    for row in tables["runtime"]:
        metrics[f"seconds/{row['method']}/median_edit"] = float(row["median_edit_seconds"])
    return metrics


def _experiment_id(client: MlflowClient, name: str, tracking_uri: str) -> str:
    """The experiment's id, created on first use (artifacts beside a SQLite store)."""
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    location = None
    if tracking_uri.startswith("sqlite:///"):
        database = Path(tracking_uri.removeprefix("sqlite:///")).resolve()
        location = (database.parent / "artifacts").as_uri()
    return client.create_experiment(name, artifact_location=location)


def _params(settings: Settings) -> list[Param]:
    """The settings sections the benchmark reads, flattened to `section.key` params."""
    tree = settings_dict(settings)
    return [
        Param(f"{section}.{key}", json.dumps(value))
        for section in ("edit_benchmark", "edit", "scope")
        for key, value in tree[section].items()
    ]


def _log_if_tracking(
    tracking_uri: str | None,
    settings: Settings,
    run_name: str,
    out: Path,
    metrics: dict[str, float],
) -> str | None:
    """Log params, metrics and the output folder as one MLflow run; return its id (or None).

    Raises:
        RegistryError: the tracking store is unreachable or refuses the run.
    """
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        logger.info("no MLflow tracking URI set: results are only in %s", out)
        return None
    stamp = int(time.time() * 1000)
    entries = [Metric(key, value, stamp, 0) for key, value in sorted(metrics.items())]
    try:
        client = MlflowClient(tracking_uri=uri)
        run_id = client.create_run(
            _experiment_id(client, settings.edit_benchmark.experiment, uri), run_name=run_name
        ).info.run_id
        client.log_batch(run_id, params=_params(settings))
        for start in range(0, len(entries), MLFLOW_BATCH):
            client.log_batch(run_id, metrics=entries[start : start + MLFLOW_BATCH])
        client.log_artifacts(run_id, str(out))
        client.set_terminated(run_id)
    except (MlflowException, SQLAlchemyError, OSError) as exc:
        raise RegistryError(
            f"logging {run_name} to MLflow at {uri} failed: {str(exc).splitlines()[0]}; "
            "check the tracking URI (or unset MLFLOW_TRACKING_URI to skip logging)"
        ) from exc
    logger.info("logged %s to MLflow run %s", run_name, run_id)
    return run_id


def run_scope_search(
    settings: Settings, out_dir: Path | None = None, tracking_uri: str | None = None
) -> Path:
    """Plain FT of every window of FFN blocks (and attention blocks) on a few groups.

    Every window edits the same cases at `edit.lr` (set it to the benchmark's chosen lr); the
    recommended window is the FFN window with the highest mean GR + sensitive LR.

    Args:
        settings: reads `edit_benchmark` (scope_* keys, caps), `edit`, `paths`.
        out_dir: output folder; default `<artifacts>/scope-search`.
        tracking_uri: as for `run_benchmark`.

    Returns:
        The output folder: scope_search.csv / .md / .json, scope_search_edits.csv.
    """
    config = settings.edit_benchmark
    run = _prepare(settings, full=False, with_hprd=False)
    per_group = config.scope_cases_per_group
    cases = plan_cases(
        run.inputs.groups, config.scope_n_groups * per_group, per_group, 1, config.seed + 2
    )
    jobs = scope_search_jobs(run.inputs.model, config.scope_width, settings.edit)
    with tqdm(total=len(jobs) * len(cases), desc="scope search", disable=None) as bar:
        results = run_edits(jobs, cases, run.evaluator, on_edit=lambda _: bar.update())
    rows = [result.row() for result in results]
    summary = summarize(rows)
    recommended = recommend_window(summary, LOCALITY_COLUMNS[0])
    out = Path(out_dir or settings.paths.artifacts / "scope-search")
    out.mkdir(parents=True, exist_ok=True)
    write_csv(rows, out / "scope_search_edits.csv")
    write_csv(summary, out / "scope_search.csv")
    facts = {"recommended": recommended, "lr": settings.edit.lr, "n_cases": len(cases)}
    (out / "scope_search.json").write_text(json.dumps(facts, indent=2) + "\n")
    table = markdown_table(summary, ("method", "scope", "subset", *TABLE_COLUMNS[3:]))
    (out / "scope_search.md").write_text(_report("Scope search", facts, {"Windows": table}))
    metrics = {
        f"{name}/{row['method']}/{row['scope']}": float(row[name])
        for row in summary
        if row["subset"] == "all"
        for name in ("generalization", *LOCALITY_COLUMNS)
    }
    _log_if_tracking(tracking_uri, settings, "scope-search", out, metrics)
    return out
