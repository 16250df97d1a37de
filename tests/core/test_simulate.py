"""The production simulator: drifting day plans, flags only for mistakes, bad rows on request."""

from __future__ import annotations

from datetime import date

import numpy as np
import pyarrow.parquet as pq
import pytest

from core.model import ModelCard, model_create_kwargs, preprocessing_for
from core.settings import SimulateSettings
from core.simulate import FLAG_SCHEMA, bad_rows, plan_days, simulate
from core.world import build_plan

GROUPS = [f"style-outline:{c}" for c in "abcdef"]


def test_day_plans_grow_new_causes_and_keep_the_day_size():
    # Given 6 shift groups, 2 live on day one and 1 more per day
    settings = SimulateSettings(
        images_per_day=100, shift_share=0.4, seed=3, n_shift_groups_first_day=2
    )

    # When planning 4 days
    plans = plan_days(GROUPS, settings, n_days=4)

    # Then every day serves 100 images, 60 in-distribution, and later days bring new groups
    assert [sum(p.counts.values()) for p in plans] == [100] * 4
    assert all(p.counts["val"] == 60 for p in plans)
    live = [set(p.counts) - {"val"} for p in plans]
    assert len(live[0]) <= 2
    assert set().union(*live) - live[0], "no new failure cause appeared after day one"
    assert [p.day for p in plans] == [date(2026, 1, 5 + i) for i in range(4)]
    assert plan_days(GROUPS, settings, n_days=4) == plans


def test_bad_rows_cover_every_kind_with_the_flag_schema():
    table = bad_rows(date(2026, 1, 5), ["a", "b"], np.random.default_rng(0))
    kinds = {g.removeprefix("bad:") for g in table.column("world_group").to_pylist()}
    assert table.schema == FLAG_SCHEMA
    assert kinds >= {
        "null_image", "image_undecodable", "image_truncated", "image_degenerate",
        "unknown_true_label", "true_equals_predicted", "duplicate_sample_id",
        "flagged_in_future", "empty_sample_id", "duplicate",
    }  # fmt: skip


@pytest.fixture
def tiny_served_model(micro_settings, micro_vit):
    """The random-init micro ViT with its card; it gets most images wrong."""
    world = build_plan(micro_settings.world)
    model = micro_vit()
    kwargs = model_create_kwargs(micro_settings.model, len(world.class_names))
    card = ModelCard(
        micro_settings.model.name, kwargs, tuple(world.class_names), preprocessing_for(model)
    )
    return model, card, world


def test_simulate_writes_only_mistakes_with_reviewer_labels(
    tiny_served_model, micro_settings, tmp_path
):
    # Given a served model and a 2-day stream of 40 images a day, with bad rows on
    model, card, world = tiny_served_model
    settings = SimulateSettings(images_per_day=40, shift_share=0.5, bad_rows=True)

    # When simulating
    paths = simulate(model, card, world, settings, tmp_path / "inbox", 2, model_version="3")

    # Then each day has a flag file of mistakes plus the two partition-level bad files
    assert [p.parent.name for p in paths] == ["date=2026-01-05", "date=2026-01-06"]
    assert {p.name for p in paths[0].parent.iterdir()} == {
        "flags.parquet", "missing-column.parquet", "not-parquet.parquet",
    }  # fmt: skip
    flags = pq.read_table(paths[0]).to_pandas()
    served = flags[~flags["world_group"].str.startswith("bad:") & (flags["world_group"] != "clean")]
    assert len(served) > 0
    assert (served["true_label"] != served["predicted_label"]).all()
    assert set(served["true_label"]) <= set(world.class_names)
    assert set(served["world_group"]) <= {"val", *world.shift_groups()}
    assert (served["model_version"] == "3").all()
    assert served["sample_id"].is_unique
