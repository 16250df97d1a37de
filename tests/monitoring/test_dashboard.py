"""The dashboard's history, metrics and page, from records two real micro nights left; and the
page still builds, saying what is missing, when records are lost."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from core.settings import Settings
from flows.cli import main
from flows.nightly import NIGHT_TAG, ledger_of, night_folder
from flows.registry import CHAMPION, Registry
from monitoring.attention import CROSSED, attention
from monitoring.dashboard import SECTIONS, build_dashboard, render_dashboard
from monitoring.history import collect_history

pytestmark = pytest.mark.slow


def settings_at(settings: Settings, **paths: Path) -> Settings:
    """`settings` with some paths replaced (e.g. a copied state folder)."""
    return settings.model_copy(update={"paths": settings.paths.model_copy(update=paths)})


def test_history_reads_every_record_of_real_nights(two_nights):
    # Given two real nights (a promotion, then a rejected candidate)
    registry = Registry.connect(two_nights.paths.mlruns, two_nights.registry)

    # When the history is collected
    history = collect_history(two_nights)

    # Then nights, versions, champion and ledger match what the flows recorded
    assert history.missing == []
    assert [n.index for n in history.nights] == [1, 2]
    assert all(n.record is not None and n.run_id for n in history.nights)
    assert [v.version for v in history.versions] == [1, 2, 3]
    assert history.champion == registry.get_alias_version(CHAMPION) == 2
    assert [v.gate["passed"] for v in history.versions[1:]] == [True, False]
    assert [e.id for e in history.edits] == [r.id for r in ledger_of(two_nights).records()]
    first = history.edits[0]
    assert first.status == "in champion"
    assert first.candidate["accuracy"] >= 0
    assert all(norm > 0 for norm in first.change_norms.values())
    assert first.mask is not None
    assert 0 < first.mask.mean() < 1
    assert history.edits[-1].status == "not promoted"  # only in the rejected version 3

    # and clusters, flag days with a library drift test, and the hypernetwork's base
    assert {c.status for c in history.clusters} <= {"ready", "waiting", "edited", "rejected"}
    assert any(c.status == "edited" for c in history.clusters)
    assert [d.day for d in history.flag_days] == [n.night for n in history.nights]
    assert all(d.quarantined > 0 and d.reasons for d in history.flag_days)  # bad rows are on
    drift = history.flag_days[0].drift
    assert 0 <= drift.statistic <= 1
    assert 0 <= drift.pvalue <= 1
    assert history.hypernet.matches_base is True
    assert history.thumbnails
    assert all(history.thumbnails.values())


def test_dashboard_is_logged_with_metrics_at_steps(two_nights):
    # When the dashboard is built
    built = build_dashboard(two_nights)

    # Then the page exists with every section, and MLflow holds it with stepped metrics
    page = built.path.read_text()
    assert all(f'id="{key}"' in page for key, _ in SECTIONS)
    assert "http://" not in page
    assert "https://" not in page
    assert "<script" not in page
    client = Registry.connect(two_nights.paths.mlruns, two_nights.registry).client
    assert "dashboard.html" in {item.path for item in client.list_artifacts(built.run_id)}
    flags = client.get_metric_history(built.run_id, "night/flags_in")
    assert sorted(m.step for m in flags) == [1, 2]
    change = client.get_metric_history(built.run_id, "trend/relative_change")
    assert sorted(m.step for m in change) == [e.index for e in built.history.edits]
    assert client.get_metric_history(built.run_id, "drift/ks_statistic")

    # and each night run's own metrics carry its night index as the step
    for night in built.history.nights:
        history = client.get_metric_history(night.run_id, "flags_in")
        assert [m.step for m in history] == [night.index]
        assert client.get_run(night.run_id).data.tags[NIGHT_TAG] == night.night


def test_clusters_section_lists_edited_and_the_largest_waiting_clusters(two_nights):
    # Given the real history of two nights, plus three clusters that only waited on the latest
    # night (sizes 1, 2, 3) and one that only waited on the first
    history = collect_history(two_nights)
    latest = max(history.clusters, key=lambda c: c.night_index)
    first = min(history.clusters, key=lambda c: c.night_index)
    assert first.night_index < latest.night_index
    waiting = [
        replace(latest, cluster_id=f"small-{size}", size=size, status="waiting", new=True)
        for size in (1, 2, 3)
    ]
    old = replace(first, cluster_id="old-waiting", size=4, status="waiting", new=True)
    history = replace(history, clusters=[*history.clusters, *waiting, old])
    reached = {c.cluster_id for c in history.clusters if c.status != "waiting"}
    waiting_only = {c.cluster_id for c in history.clusters} - reached
    assert reached

    # When the page is rendered with room for two waiting clusters
    monitoring = two_nights.monitoring.model_copy(update={"waiting_clusters_listed": 2})
    page = render_dashboard(history, two_nights.model_copy(update={"monitoring": monitoring}))

    # Then every cluster that reached the edit stage is listed (edit rows link there), and of
    # the waiting ones only the latest night's two largest; the map and a line count the rest
    assert all(f'id="cluster-{cluster_id}"' in page for cluster_id in reached)
    assert 'id="cluster-small-3"' in page
    assert 'id="cluster-small-2"' in page
    assert 'id="cluster-small-1"' not in page
    assert 'id="cluster-old-waiting"' not in page
    latest_waiting = {
        c.cluster_id
        for c in history.clusters
        if c.cluster_id in waiting_only and c.night_index == latest.night_index
    }
    assert f"Largest clusters still waiting (2 of {len(latest_waiting)})" in page
    assert f"{len(waiting_only) - 2} more clusters only waited" in page
    assert f"{len(waiting_only)} clusters that only waited" in page


def test_attention_lists_crossed_gate_and_repeated_rejections(two_nights):
    # Given the real history and a gate that the latest candidate fails
    history = collect_history(two_nights)
    strict = two_nights.gate.model_copy(update={"min_broad_locality_vs_champion": 1.0})
    monitoring = two_nights.monitoring.model_copy(update={"max_rejections": 1})

    # When the attention list is made
    alerts = attention(history, strict, monitoring)

    # Then the crossed threshold comes first, naming the figure
    assert alerts[0].level == CROSSED
    assert any("broad_locality_vs_champion" in a.text and "fails" in a.text for a in alerts)


def test_lost_records_are_listed_not_raised(two_nights, tmp_path):
    # Given copies of the state and data with a crashed night, a lost delta and a lost cluster
    # table, and an empty MLflow store
    state, data = tmp_path / "state", tmp_path / "data"
    shutil.copytree(two_nights.paths.state, state)
    shutil.copytree(two_nights.paths.data, data)
    settings = settings_at(two_nights, state=state, data=data, mlruns=tmp_path / "mlruns")
    (night_folder(settings, "2026-01-06") / "record.json").unlink()
    lost = ledger_of(settings).records()[0]
    (ledger_of(settings).folder / lost.delta_path / "delta.safetensors").unlink()
    (data / "clusters" / "night=2026-01-05.parquet").unlink()

    # When the dashboard is built
    built = build_dashboard(settings, log_to_mlflow=False)

    # Then the page exists and says what is missing
    missing = "\n".join(built.history.missing)
    assert "holds no model version" in missing
    assert "night 2026-01-06 did not finish" in missing
    assert f"ledger entry {lost.id}" in missing
    assert "night=2026-01-05.parquet is missing" in missing
    page = built.path.read_text()
    assert "did not finish" in page
    assert lost.id in page


def test_deleted_night_artifact_is_listed(two_nights):
    # Given a night run whose report artifact was deleted
    history = collect_history(two_nights)
    night = history.nights[0]
    client = Registry.connect(two_nights.paths.mlruns, two_nights.registry).client
    folder = Path(client.get_run(night.run_id).info.artifact_uri.removeprefix("file://"))
    report = folder / f"night-{night.night}.html"
    kept = report.read_bytes()
    report.unlink()
    try:
        # When the history is collected; then the gap is named
        missing = collect_history(two_nights).missing
    finally:
        report.write_bytes(kept)
    assert missing == [
        f"night {night.night}: artifact {report.name} missing from run {night.run_id}"
    ]


def test_empty_production_root_renders(micro_settings, tmp_path):
    # Given nothing at all: no model, no registry, no night, no flag
    # When the dashboard is rendered without MLflow
    history = collect_history(micro_settings)
    page = render_dashboard(history, micro_settings)

    # Then every section is there, and the missing records are named
    assert all(f'id="{key}"' in page for key, _ in SECTIONS)
    assert "no night recorded" in page
    assert "The registry holds no model version yet." in page


def test_report_command_on_an_empty_root(tmp_path, capsys):
    # Given a root where nothing has been built or run
    paths = [f"paths.{name}={tmp_path / name}" for name in ("artifacts", "data", "state")]
    paths += [f"paths.mlruns={tmp_path / 'mlruns'}", f"paths.monitoring={tmp_path / 'out'}"]
    overrides = [item for path in paths for item in ("--set", path)]

    # When `retouch report` runs
    code = main([*overrides, "report", "--no-mlflow"])

    # Then it writes the page and names what is missing
    out = capsys.readouterr().out
    assert code == 0
    assert f"dashboard written to {tmp_path / 'out' / 'dashboard.html'}" in out
    assert "missing: no night recorded" in out
