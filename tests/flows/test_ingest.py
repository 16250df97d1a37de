"""The ingest flow on simulated flags: quarantine reasons, conservation, idempotency, clusters."""

from __future__ import annotations

from datetime import date
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from core.errors import DataError
from core.model import (
    ModelCard,
    load_saved_model,
    model_create_kwargs,
    preprocessing_for,
    save_model,
)
from core.settings import IngestSettings, SimulateSettings
from core.simulate import simulate
from core.world import build_plan
from flows.ingest import ingest_flow, route_partition
from flows.validation import AcceptedIndex, check_schema, validate_rows

NIGHT = date(2026, 1, 6)


def _save_tiny_model(folder: Path, model, settings, class_names: list[str]) -> None:
    """Save a random-init micro ViT with its card."""
    kwargs = model_create_kwargs(settings.model, len(class_names))
    card = ModelCard(settings.model.name, kwargs, tuple(class_names), preprocessing_for(model))
    save_model(model, card, folder)


@pytest.fixture
def production(tmp_path: Path, micro_settings_factory, micro_vit):
    """Settings under tmp_path, a base model (seed 0), a champion (seed 1), one simulated day."""
    settings = micro_settings_factory(tmp_path, ["clusters.min_cluster_size=2"])
    world = build_plan(settings.world)
    for name, seed in (("base", 0), ("champion", 1)):
        _save_tiny_model(tmp_path / name, micro_vit(seed=seed), settings, world.class_names)
    model, card = load_saved_model(tmp_path / "base")
    stream = SimulateSettings(images_per_day=40, shift_share=0.5, bad_rows=True)
    simulate(model, card, world, stream, settings.paths.data / "inbox", 1, model_version="1")
    return settings, world.class_names, tmp_path


def test_every_bad_kind_is_quarantined_with_its_reason(production):
    # Given a simulated partition holding one bad row of every kind and an exact duplicate
    settings, class_names, _ = production
    data_dir = settings.paths.data

    # When routing the partition (no Prefect needed)
    counts = route_partition(
        "date=2026-01-05/flags.parquet", data_dir, class_names, settings.ingest
    )

    # Then each bad row sits in quarantine with its own reason, the copy is a duplicate, and
    # the row counts are conserved
    quarantined = pd.read_parquet(data_dir / "quarantine" / "date=2026-01-05" / "flags.parquet")
    for group, reasons in zip(quarantined["world_group"], quarantined["reasons"], strict=True):
        assert group.startswith("bad:"), f"a served flag was quarantined: {reasons}"
        assert group.removeprefix("bad:") in reasons.split("; ")
    expected = {"null_image", "image_undecodable", "image_truncated", "image_degenerate",
                "unknown_true_label", "true_equals_predicted", "duplicate_sample_id",
                "flagged_in_future", "empty_sample_id"}  # fmt: skip
    assert {g.removeprefix("bad:") for g in quarantined["world_group"]} == expected
    duplicates = pd.read_parquet(data_dir / "duplicates" / "date=2026-01-05" / "flags.parquet")
    assert duplicates["duplicate_of"].tolist() == ["original-2026-01-05"]
    assert counts.rows_in == counts.accepted + counts.quarantined + counts.duplicates
    assert counts.quarantined == len(expected) + 1  # the shared id quarantines both rows


@pytest.mark.parametrize("name", ["missing-column.parquet", "not-parquet.parquet"])
def test_unreadable_partition_is_rejected_whole_and_kept(production, name):
    settings, class_names, _ = production
    partition = f"date=2026-01-05/{name}"
    with pytest.raises(DataError, match=r"missing column 'true_label'|not a readable Parquet"):
        route_partition(partition, settings.paths.data, class_names, settings.ingest)
    assert (settings.paths.data / "inbox" / partition).is_file()


def test_mistyped_column_names_the_column():
    schema = pa.schema([(c, pa.string()) for c in ("sample_id", "image", "true_label")])
    with pytest.raises(DataError, match=r"column 'image' is string, expected binary"):
        check_schema(schema, Path("inbox/x.parquet"))


def test_image_of_any_size_and_mode_is_accepted():
    # Given a 24 x 20 palette-mode JPEG-free PNG, label by index, naive-free UTC timestamp
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.arange(480, dtype=np.uint8).reshape(20, 24)).convert("P").save(buffer, "PNG")
    frame = pd.DataFrame({
        "sample_id": ["s1"], "image": [buffer.getvalue()], "true_label": [1],
        "predicted_label": [0], "model_version": ["1"], "source": ["test"],
        "flagged_at": [pd.Timestamp("2026-01-05", tz="UTC")],
    })  # fmt: skip
    empty = AcceptedIndex({}, {})

    # When validating; then the row is clean
    checked = validate_rows(frame, ["a", "b"], empty, IngestSettings())
    assert checked["reasons"].tolist() == [""]


@pytest.mark.slow
def test_flow_counts_clusters_versions_and_is_idempotent(production):
    # Given one simulated day in the inbox, a base model and a different champion
    settings, _, root = production
    data_dir = settings.paths.data

    # When ingesting twice (the second night finds nothing new)
    first = ingest_flow(settings, root / "champion", root / "base", night=date(2026, 1, 5))
    flagged = (data_dir / "flagged" / "date=2026-01-05" / "flags.parquet").read_bytes()
    second = ingest_flow(settings, root / "champion", root / "base", night=NIGHT)

    # Then the first run ingested the flag file, rejected the two bad files and kept them
    assert [p.partition for p in first.partitions] == ["date=2026-01-05/flags.parquet"]
    assert sorted(first.rejected) == [
        "date=2026-01-05/missing-column.parquet",
        "date=2026-01-05/not-parquet.parquet",
    ]
    assert first.rows_in == first.accepted + first.quarantined + first.duplicates
    assert len(first.data_version) == 32
    # and the second changed no ingested row
    assert second.partitions == []
    assert second.rejected == {}  # an unchanged rejected file is not retried
    assert (data_dir / "flagged" / "date=2026-01-05" / "flags.parquet").read_bytes() == flagged
    assert second.data_version != first.data_version  # only the new night's cluster table

    # Then fixed flags are not clustered; the rest carry a status, id and role on both nights
    for summary in (first.clusters, second.clusters):
        table = pd.read_parquet(summary.table)
        fixed = table["status"] == "fixed"
        assert (table.loc[fixed, "champion_prediction"] == table.loc[fixed, "true_index"]).all()
        assert table.loc[fixed, "cluster_id"].isna().all()
        assert set(table.loc[~fixed, "status"]) <= {"ready", "waiting"}
        assert set(table.loc[~fixed, "role"]) <= {"edit", "held_out"}
    night_one = pd.read_parquet(first.clusters.table).set_index("sample_id")
    night_two = pd.read_parquet(second.clusters.table).set_index("sample_id")
    assert night_two.index.equals(night_one.index)  # waiting flags carried, nothing lost
    assert night_two["cluster_id"].fillna("").equals(night_one["cluster_id"].fillna(""))
