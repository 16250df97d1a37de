"""The `retouch` command line: arguments -> settings -> one call into flows/.

Only this module prints or configures logging. Every RetouchError ends as one clear line on
stderr and exit code 1, not a traceback. Handlers import their flow lazily so `--help` is fast.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date
from pathlib import Path

from core.errors import RetouchError
from core.settings import Settings, load_settings

QUIET_ENVIRONMENT = {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    "DVC_NO_ANALYTICS": "1",
    "GX_ANALYTICS_ENABLED": "false",
    "PREFECT_LOGGING_EXTRA_LOGGERS": "core,flows,monitoring",
    "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "ignore",  # core logs outside a flow stay local
}


def _build(args: argparse.Namespace, settings: Settings) -> int:
    from flows import bootstrap

    steps = {
        "world": bootstrap.build_world,
        "base": bootstrap.build_base,
        "benchmark": bootstrap.build_benchmark,
        "hypernet": bootstrap.build_hypernet,
    }
    for step in steps if args.step == "all" else [args.step]:
        steps[step](settings)
    return 0


def _metatrain(args: argparse.Namespace, settings: Settings) -> int:
    from flows import bootstrap

    report = bootstrap.build_hypernet(settings)
    print(f"hypernetwork written to {report.hypernet_path}")
    return 0


def _simulate(args: argparse.Namespace, settings: Settings) -> int:
    from flows.demo import serve_days

    for path in serve_days(settings, args.first_day, args.days):
        print(path)
    return 0


def _ingest(args: argparse.Namespace, settings: Settings) -> int:
    import tempfile

    from flows import bootstrap
    from flows.demo import champion_folder
    from flows.ingest import ingest_flow

    with tempfile.TemporaryDirectory() as scratch:
        champion, _ = champion_folder(settings, Path(scratch))
        base = bootstrap.base_dir(settings)
        result = ingest_flow(settings, champion, base, args.night, not args.no_version)
    print(
        f"{result.rows_in} rows in = {result.accepted} accepted + {result.quarantined} quarantined"
        f" + {result.duplicates} duplicates; data version {result.data_version}"
    )
    for partition, error in result.rejected.items():
        print(f"rejected partition {partition}: {error}")
    return 0


def _benchmark(args: argparse.Namespace, settings: Settings) -> int:
    from flows.benchmark import project_tracking_uri, run_benchmark

    out = run_benchmark(
        settings,
        full=args.full,
        out_dir=args.out,
        methods=args.methods.split(",") if args.methods else None,
        tracking_uri=project_tracking_uri(settings) if args.mlflow else None,
    )
    print(f"editing benchmark written to {out} (report.md, tradeoff.png, edits.csv)")
    return 0


def _scope_search(args: argparse.Namespace, settings: Settings) -> int:
    from flows.benchmark import project_tracking_uri, run_scope_search

    out = run_scope_search(
        settings,
        out_dir=args.out,
        tracking_uri=project_tracking_uri(settings) if args.mlflow else None,
    )
    print(f"scope search written to {out} (scope_search.json holds the recommended window)")
    return 0


def _nightly(args: argparse.Namespace, settings: Settings) -> int:
    from flows.nightly import format_night_table, run_nightly

    print(format_night_table(run_nightly(settings, args.night)))
    return 0


def _rollback(args: argparse.Namespace, settings: Settings) -> int:
    from flows.operations import rollback

    result = rollback(settings, args.edit_id)
    verdict = "promoted to champion" if result.promoted else "NOT promoted"
    print(f"version {result.version} without edit {result.removed_edit}: {verdict}")
    print(f"ledger ids: {', '.join(result.ledger_ids) or '(base model)'}")
    print(f"weights hash: {result.weights_hash}")
    print("gate: " + "; ".join(result.gate.reasons))
    return 0


def _promote(args: argparse.Namespace, settings: Settings) -> int:
    from flows.operations import promote

    print(f"champion is now version {promote(settings, args.version)}")
    return 0


def _history(args: argparse.Namespace, settings: Settings) -> int:
    from flows.benchmark import markdown_table
    from flows.operations import history

    rows = history(settings)
    print(markdown_table(rows, list(rows[0]) if rows else []), end="")
    return 0


def _rerun(args: argparse.Namespace, settings: Settings) -> int:
    from flows.operations import rerun

    result = rerun(settings, args.run_id)
    print(f"night {result.night} (run {result.run_id})")
    print(f"recorded weights hash: {result.recorded_hash}")
    print(f"rerun weights hash:    {result.rerun_hash}")
    print("reproduced bit for bit" if result.reproduced else "NOT reproduced")
    return 0 if result.reproduced else 1


def _demo(args: argparse.Namespace, settings: Settings) -> int:
    from flows import bootstrap
    from flows.demo import run_demo
    from flows.nightly import format_night_table

    result = run_demo(settings, args.nights)
    print(f"embedded default built (dvc repro: {result.build_seconds:.0f} s)")
    print(json.dumps(bootstrap.load_summary(settings)["base_model"], indent=2))
    for night in result.nights:
        print(f"\n{format_night_table(night)}")
    print(f"\n{len(result.nights)} nights in {result.nights_seconds:.0f} s.")
    print(f"Reports: {settings.paths.monitoring / 'nights'}")
    print(
        "MLflow UI: mlflow ui --backend-store-uri "
        f"sqlite:///{settings.paths.mlruns.resolve()}/mlflow.db"
    )
    return 0


def _report(args: argparse.Namespace, settings: Settings) -> int:
    from monitoring.dashboard import build_dashboard

    built = build_dashboard(settings, log_to_mlflow=not args.no_mlflow)
    logged = f" (MLflow run {built.run_id})" if built.run_id else ""
    print(f"dashboard written to {built.path}{logged}")
    for line in built.history.missing:
        print(f"missing: {line}")
    return 0


def _add_build_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "step",
        choices=["world", "base", "benchmark", "hypernet", "all"],
        help="which artifact to (re)build; dvc.yaml runs one stage per step",
    )


def _add_simulate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--days", type=int, default=1, help="days of traffic to serve")
    parser.add_argument(
        "--first-day", type=int, default=0, help="index of the first day (continue a stream)"
    )


def _add_ingest_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--night", type=date.fromisoformat, help="the night (YYYY-MM-DD)")
    parser.add_argument("--no-version", action="store_true", help="skip dvc add / push")


def _add_output_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, help="output folder (default under artifacts/)")
    parser.add_argument("--mlflow", action="store_true", help="log to the project's MLflow store")


def _add_benchmark_arguments(parser: argparse.ArgumentParser) -> None:
    _add_output_arguments(parser)
    parser.add_argument("--full", action="store_true", help="every edit case (hours, not 15 min)")
    parser.add_argument("--methods", help="comma-separated subset, e.g. hprd,saliency,random")


def _add_nightly_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--night", type=date.fromisoformat, help="the night (default: today)")


def _add_rollback_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("edit_id", help="a ledger id (see `retouch history`)")


def _add_promote_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("version", type=int, help="the registry version to make champion")


def _add_rerun_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_id", help="the MLflow run id of the night")


def _add_report_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--no-mlflow", action="store_true", help="write the page only; log nothing to MLflow"
    )


def _add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--nights", type=int, default=3, help="simulated nights after the build")


@dataclass(frozen=True)
class Command:
    """One `retouch` sub-command."""

    summary: str
    handler: Callable[[argparse.Namespace, Settings], int]
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None


COMMANDS: dict[str, Command] = {
    "build": Command(
        "build one step of the embedded default: world, base model, benchmark data, hypernet",
        _build,
        _add_build_arguments,
    ),
    "metatrain": Command(
        "meta-train the mask hypernetwork on the base model (resumes from its checkpoint)",
        _metatrain,
    ),
    "benchmark": Command(
        "the editing benchmark: every method and level on paired edits, GR-vs-LR curves",
        _benchmark,
        _add_benchmark_arguments,
    ),
    "scope-search": Command(
        "greedy search of the edit window (FFN vs attention blocks) with plain fine-tuning",
        _scope_search,
        _add_output_arguments,
    ),
    "simulate": Command(
        "serve the model on drifting world traffic; write its mistakes as flags to data/inbox",
        _simulate,
        _add_simulate_arguments,
    ),
    "ingest": Command(
        "validate new inbox partitions, quarantine bad rows, version data/, cluster failures",
        _ingest,
        _add_ingest_arguments,
    ),
    "nightly": Command(
        "one night: ingest, cluster, edit each ready cluster, gate, register, maybe promote",
        _nightly,
        _add_nightly_arguments,
    ),
    "rollback": Command(
        "build a version without one edit (ledger replay), gate it, promote it if it passes",
        _rollback,
        _add_rollback_arguments,
    ),
    "promote": Command(
        "point the champion alias at a version (manual, no gate)", _promote, _add_promote_arguments
    ),
    "history": Command("every registry version with its provenance and champion moves", _history),
    "rerun": Command(
        "re-run a night from its recorded data version; check the weights hash reproduces",
        _rerun,
        _add_rerun_arguments,
    ),
    "report": Command(
        "the monitoring dashboard: one HTML page over every night, edit and flag; logged to MLflow",
        _report,
        _add_report_arguments,
    ),
    "demo": Command(
        "build the embedded default (DVC-cached), then simulate and edit three nights",
        _demo,
        _add_demo_arguments,
    ),
}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with one sub-parser (and --help) per command."""
    parser = argparse.ArgumentParser(
        prog="retouch",
        description="Turn flagged misclassifications into gated, reversible model edits.",
    )
    parser.add_argument("--params", default="params.yaml", help="settings file (params.yaml)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one setting, validated like the file (repeatable)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, command in COMMANDS.items():
        sub = commands.add_parser(name, help=command.summary, description=command.summary)
        if command.add_arguments is not None:
            command.add_arguments(sub)
        sub.set_defaults(handler=command.handler)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `retouch` command."""
    for key, value in QUIET_ENVIRONMENT.items():
        os.environ.setdefault(key, value)
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)  # Prefect's API calls, one per line
    try:
        settings = load_settings(args.params, args.set)
        return args.handler(args, settings)
    except RetouchError as exc:
        print(f"retouch {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
