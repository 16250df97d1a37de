"""Micro nights end to end: real Prefect, real MLflow (SQLite), real DVC (a temp git repo).

One session-scoped build (micro world, base model, benchmark, a 2-iteration hypernetwork); each
production root gets its own data, state and MLflow store, with the simulator's flags in its inbox.
"""

from __future__ import annotations

import shutil
import subprocess
from datetime import date
from pathlib import Path

import mlflow
import numpy as np
import pytest
from safetensors.torch import load_file

from core.data import load_images
from core.errors import (
    CheckpointMismatch,
    FlowLockedError,
    LedgerIntegrityError,
    ModelError,
    RegistryError,
)
from core.metatrain import metatrain
from core.model import build_model, load_saved_model, preprocess, save_model, weights_hash
from core.scope import build_scope
from core.settings import SimulateSettings
from core.simulate import bad_rows, simulate
from core.world import build_plan
from flows import bootstrap
from flows.ingest import ingest_flow
from flows.lock import edit_lock, lock_path
from flows.nightly import (
    build_candidate,
    cache_references,
    edit_night,
    fetch_version,
    judge_candidate,
    ledger_of,
    night_folder,
    open_registry,
    register_candidate,
    run_nightly,
    start_night,
    version_ledger_ids,
)
from flows.operations import history, rerun, rollback
from flows.registry import CANDIDATE, CHAMPION, Registry, VersionTags

pytestmark = pytest.mark.slow
NIGHT = date(2026, 1, 5)
# Micro models are weak: any edit flips many clean predictions, so the gates are opened here and
# closed one at a time where a test is about a rejection.
OPEN_GATES = [
    "clusters.min_cluster_size=2",
    "gate.locality_confidence=null",
    "gate.cluster_min_locality=0.0",
    "gate.min_broad_locality_vs_base=0.0",
    "gate.min_broad_locality_vs_champion=0.0",
    "gate.min_sensitive_locality_vs_base=0.0",
    "gate.min_sensitive_locality_vs_champion=0.0",
    "gate.max_accuracy_drop=1.0",
    "gate.min_retention=0.0",
]


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory, micro_settings_factory) -> Path:
    """Micro world, base model, benchmark data and hypernetwork (2 meta-training iterations)."""
    root = tmp_path_factory.mktemp("nightly-artifacts")
    settings = micro_settings_factory(root, ["train.epochs=1", "metatrain.iterations=2"])
    bootstrap.build_world(settings)
    bootstrap.build_base(settings)
    bootstrap.build_benchmark(settings)
    model, card = load_saved_model(bootstrap.base_dir(settings))
    clean = preprocess(load_images(bootstrap.world_dir(settings) / "val.parquet").images, card)
    metatrain(
        model,
        build_scope(model, settings.scope.blocks),
        clean[:16],
        settings.metatrain,
        settings.hypernet,
        settings.paths.artifacts / "hypernet",
    )
    return settings.paths.artifacts


def production(root: Path, factory, artifacts: Path, extra=(), flags: bool = True):
    """Settings for a production root (a git repo for DVC), the inbox filled with one day."""
    subprocess.run(["git", "init", "-q", str(root)], check=True)
    settings = factory(root, [*OPEN_GATES, f"paths.artifacts={artifacts}", *extra])
    if flags:
        model, card = load_saved_model(artifacts / "base")
        stream = SimulateSettings(images_per_day=60, shift_share=0.5)
        world = build_plan(settings.world)
        simulate(model, card, world, stream, settings.paths.data / "inbox", 1, "1")
    return settings


def registry_of(settings) -> Registry:
    return Registry.connect(settings.paths.mlruns, settings.registry)


@pytest.fixture(scope="module")
def promoted(tmp_path_factory, micro_settings_factory, artifacts):
    """One night with open gates: edits accepted, candidate registered and promoted."""
    root = tmp_path_factory.mktemp("promoted")
    settings = production(root, micro_settings_factory, artifacts)
    return settings, run_nightly(settings, NIGHT)


def test_night_edits_registers_promotes_and_serves(promoted):
    # Given a night with open gates (the fixture ran it)
    settings, result = promoted
    registry = registry_of(settings)

    # Then edits were accepted, registered as version 2 with provenance, and promoted
    assert result.n_accepted >= 1
    assert result.candidate_version == 2
    assert result.promoted
    assert registry.get_alias_version(CHAMPION) == registry.get_alias_version(CANDIDATE) == 2
    version = registry.versions()[1]
    assert version.tags["parent_version"] == "1"
    assert version.tags["data_version"] == result.data_version
    assert len(result.data_version) == 32
    assert version.tags["hypernet_version"] == result.hypernet_version
    assert version.ledger_ids == result.ledger_ids
    assert '"passed": true' in version.tags["gate_decision"]

    # and the version's weights are base + ledger, bit for bit
    base, _ = load_saved_model(bootstrap.base_dir(settings))
    replayed = ledger_of(settings).replay(base, version.ledger_ids)
    assert weights_hash(replayed) == version.weights_hash == result.candidate_hash

    # and the night is recorded: MLflow run with metrics and artifacts, HTML report
    run = registry.client.get_run(result.run_id)
    assert run.data.metrics["edits_accepted"] == result.n_accepted
    logged = {item.path for item in registry.client.list_artifacts(result.run_id)}
    assert {"clusters.json", "masks.safetensors", "settings.json", "edits"} <= logged
    assert f"night-{NIGHT}.html" in logged
    assert "Global gate" in Path(result.report).read_text()
    masks = load_file(str(night_folder(settings, NIGHT.isoformat()) / "masks.safetensors"))
    assert len(masks) == result.n_accepted

    # When a client outside retouch loads the champion
    mlflow.set_tracking_uri(registry.tracking_uri)  # the registry follows the tracking URI
    served = mlflow.pyfunc.load_model(registry.model_uri(CHAMPION))
    images = np.zeros((2, 16, 16, 3), dtype=np.uint8)

    # Then it predicts one class name per image
    predicted = served.predict(images)
    assert len(predicted) == 2
    assert set(predicted["label"]) <= set(
        load_saved_model(bootstrap.base_dir(settings))[1].class_names
    )


def test_finished_night_reruns_without_duplicates(promoted):
    settings, result = promoted
    again = run_nightly(settings, NIGHT)
    assert again == result
    assert [v.version for v in registry_of(settings).versions()] == [1, 2]
    assert len(ledger_of(settings).records()) == result.n_accepted


def test_rerun_reproduces_the_recorded_weights(promoted):
    settings, result = promoted
    outcome = rerun(settings, result.run_id)
    assert outcome.recorded_hash == result.candidate_hash
    assert outcome.reproduced


def test_rollback_equals_clean_replay(promoted):
    # Given the promoted candidate and one of its edits
    settings, result = promoted
    removed = result.ledger_ids[0]
    remaining = [edit_id for edit_id in result.ledger_ids if edit_id != removed]

    # When rolling it back
    outcome = rollback(settings, removed)

    # Then the new version is the clean replay without it, registered and (open gates) promoted
    base, _ = load_saved_model(bootstrap.base_dir(settings))
    clean = weights_hash(ledger_of(settings).replay(base, remaining))
    assert outcome.weights_hash == clean
    assert outcome.ledger_ids == remaining
    registry = registry_of(settings)
    version = next(v for v in registry.versions() if v.version == outcome.version)
    assert version.weights_hash == clean
    assert registry.get_alias_version(CHAMPION) == outcome.version
    rows = history(settings)
    assert any("rollback" in row["champion_moves"] for row in rows)


def test_altered_delta_is_refused(promoted):
    # Given a ledger entry whose delta file was altered after it was appended
    settings, result = promoted
    ledger = ledger_of(settings)
    entry = ledger.folder / ledger.get(result.ledger_ids[-1]).delta_path / "delta.safetensors"
    entry.write_bytes(entry.read_bytes()[:-1] + b"\x00")

    # When rebuilding any version that names it; then the ledger refuses
    with pytest.raises(LedgerIntegrityError, match="altered"):
        build_candidate.fn(settings, result.ledger_ids, result.candidate_hash)


def test_global_gate_rejection_leaves_champion(tmp_path, micro_settings_factory, artifacts):
    # Given a night whose candidate must keep every broad prediction of the champion
    strict = ["gate.min_broad_locality_vs_champion=1.0"]
    settings = production(tmp_path, micro_settings_factory, artifacts, strict)

    # When the night runs
    result = run_nightly(settings, NIGHT)

    # Then the candidate is registered and aliased, the champion stays, and the why is kept
    assert result.n_accepted >= 1
    assert not result.promoted
    registry = registry_of(settings)
    assert registry.get_alias_version(CHAMPION) == 1
    assert registry.get_alias_version(CANDIDATE) == result.candidate_version == 2
    assert any("broad_locality_vs_champion" in reason for reason in result.gate["reasons"])


def test_empty_inbox_ends_cleanly(tmp_path, micro_settings_factory, artifacts):
    settings = production(tmp_path, micro_settings_factory, artifacts, flags=False)
    result = run_nightly(settings, NIGHT)
    assert (result.flags_in, result.clusters_ready, result.candidate_version) == (0, 0, None)
    assert [v.version for v in registry_of(settings).versions()] == [1]


def test_every_flag_quarantined(tmp_path, micro_settings_factory, artifacts):
    # Given an inbox of bad rows only
    settings = production(tmp_path, micro_settings_factory, artifacts, flags=False)
    names = load_saved_model(artifacts / "base")[1].class_names
    folder = settings.paths.data / "inbox" / f"date={NIGHT}"
    folder.mkdir(parents=True)
    table = bad_rows(NIGHT, list(names), np.random.default_rng(0))
    import pyarrow.parquet as pq

    pq.write_table(
        table.filter(
            np.array(
                [g not in ("clean", "bad:duplicate") for g in table["world_group"].to_pylist()]
            )
        ),
        folder / "flags.parquet",
    )

    # When the night runs; then nothing reaches the edit stage
    result = run_nightly(settings, NIGHT)
    assert result.flags_in == result.quarantined > 0
    assert result.clusters == []
    assert [v.version for v in registry_of(settings).versions()] == [1]


def test_cluster_that_cannot_be_edited_is_rejected_and_left(
    tmp_path, micro_settings_factory, artifacts
):
    # Given edits too weak to fix anything, even with the fallback
    weak = ["edit.lr=1e-9", "nightly.max_steps=1", "nightly.fallback_max_steps=1"]
    settings = production(tmp_path, micro_settings_factory, artifacts, weak)

    # When the night runs
    result = run_nightly(settings, NIGHT)

    # Then every cluster was tried twice and rejected with its reason; nothing was registered
    assert result.clusters
    assert not any(row.accepted for row in result.clusters)
    assert all(row.tries == 2 and "reliability" in row.reasons for row in result.clusters)
    assert result.candidate_version is None
    assert [v.version for v in registry_of(settings).versions()] == [1]
    assert ledger_of(settings).records() == []


def test_second_run_meets_the_lock(tmp_path, micro_settings_factory, artifacts):
    settings = production(tmp_path, micro_settings_factory, artifacts, flags=False)
    with (
        edit_lock(lock_path(settings.paths.state), "a first night"),
        pytest.raises(FlowLockedError, match="a first night"),
    ):
        run_nightly(settings, NIGHT)


def test_crash_between_register_and_alias_then_rerun(tmp_path, micro_settings_factory, artifacts):
    # Given a night that registered its candidate and died before moving any alias
    settings = production(tmp_path, micro_settings_factory, artifacts)
    night = NIGHT.isoformat()
    parent = start_night.fn(settings, night, open_registry.fn(settings))
    parent_dir = fetch_version.fn(settings, parent, night_folder(settings, night) / "parent")
    ingested = ingest_flow(settings, parent_dir, bootstrap.base_dir(settings), NIGHT)
    references = cache_references.fn(settings, parent_dir, night_folder(settings, night))
    parent_ids = version_ledger_ids.fn(settings, parent)
    edits = edit_night.fn(settings, night, ingested.clusters.table, parent_dir, parent_ids)
    ids = parent_ids + edits.new_ids
    candidate = build_candidate.fn(settings, ids, edits.candidate_hash)
    decision = judge_candidate.fn(settings, candidate, references, ids)
    tags = VersionTags(
        parent, ingested.data_version, "h", tuple(ids), VersionTags.gate_json(decision)
    )
    register_candidate.fn(settings, candidate, tags)
    assert registry_of(settings).get_alias_version(CHAMPION) == 1

    # When the night is run again
    result = run_nightly(settings, NIGHT)

    # Then it completes: one new version, aliases moved once, no duplicate ledger entry
    registry = registry_of(settings)
    assert [v.version for v in registry.versions()] == [1, 2]
    assert registry.get_alias_version(CHAMPION) == 2
    assert len(ledger_of(settings).records()) == len(edits.new_ids) == result.n_accepted


def test_unreachable_store_fails_before_any_edit(tmp_path, micro_settings_factory, artifacts):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the MLflow folder should be")
    settings = production(
        tmp_path, micro_settings_factory, artifacts, [f"paths.mlruns={blocker}"], flags=False
    )
    with pytest.raises(RegistryError, match=r"paths\.mlruns"):
        run_nightly(settings, NIGHT)
    assert not (settings.paths.state / "ledger").exists()


def test_hypernet_missing_or_of_another_model(tmp_path, micro_settings_factory, artifacts):
    # Given artifacts without a hypernetwork, and artifacts whose base model is another one
    missing, other = tmp_path / "missing", tmp_path / "other"
    for folder in (missing, other):
        folder.mkdir()
        for name in ("world", "benchmark", "base"):
            shutil.copytree(artifacts / name, folder / name)
    shutil.copytree(artifacts / "hypernet", other / "hypernet")
    card = load_saved_model(artifacts / "base")[1]
    other_settings = micro_settings_factory(tmp_path / "x")
    save_model(
        build_model(other_settings.model, len(card.class_names), seed=7), card, other / "base"
    )

    # When a night starts on each; then it stops with a clear error before any edit
    for folder, error in ((missing, ModelError), (other, CheckpointMismatch)):
        root = tmp_path / f"root-{folder.name}"
        settings = production(
            root, micro_settings_factory, artifacts, [f"paths.artifacts={folder}"], flags=False
        )
        with pytest.raises(error, match="metatrain"):
            run_nightly(settings, NIGHT)
        assert not (settings.paths.state / "ledger").exists()
