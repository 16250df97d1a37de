"""Tests of the procedural shift world on micro settings (16 px, 4 classes)."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from core import world
from core.data import SCHEMA, load_images
from core.errors import ConfigError
from core.settings import Settings


@pytest.fixture(scope="module")
def micro(tmp_path_factory: pytest.TempPathFactory, micro_settings_factory) -> Settings:
    return micro_settings_factory(tmp_path_factory.mktemp("world"))


@pytest.fixture(scope="module")
def built(micro: Settings) -> Path:
    """A micro world written once for the read-only tests of this module."""
    out_dir = micro.paths.artifacts / "world"
    world.write_world(micro.world, out_dir)
    return out_dir


@pytest.fixture(scope="module")
def plan(micro: Settings) -> world.WorldPlan:
    return world.build_plan(micro.world)


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_same_settings_give_byte_identical_files(micro: Settings, built: Path, tmp_path: Path):
    # given a world already built from the micro settings
    # when it is built again into another folder
    world.write_world(micro.world, tmp_path)
    # then every file is byte-identical
    assert _digests(tmp_path) == _digests(built)
    assert set(_digests(built)) == {
        "train.parquet",
        "val.parquet",
        "minority.parquet",
        "shift.parquet",
        "world.json",
    }


def test_another_seed_gives_other_images(micro: Settings, plan: world.WorldPlan):
    # given the plan of another world seed
    other = world.build_plan(micro.world.model_copy(update={"seed": micro.world.seed + 1}))
    # when the same split is generated from both
    first = world.generate_split(plan, "train", 32, seed=0)
    second = world.generate_split(other, "train", 32, seed=1)
    # then the images differ
    assert not np.array_equal(first.images.numpy(), second.images.numpy())


def test_files_follow_the_architecture_schema(built: Path):
    # given the built split files; then each has exactly the documented columns and types
    for split in world.SPLITS:
        assert pq.read_schema(built / f"{split}.parquet").remove_metadata() == SCHEMA


def test_counts_and_world_json(micro: Settings, built: Path, plan: world.WorldPlan):
    # given the built world; when world.json is read
    record = json.loads((built / "world.json").read_text())
    n_shift = micro.world.n_per_shift_group * len(world.SHIFT_KINDS) * micro.world.n_classes
    # then counts match the settings and the files, and the plan is recorded
    assert record["counts"] == {"train": 256, "val": 64, "minority": 32, "shift": n_shift}
    assert pq.read_metadata(built / "shift.parquet").num_rows == n_shift
    assert record["class_names"] == ["circle", "square", "triangle", "star"]
    assert record["plan"]["classes"][0]["held_out_colours"] == list(
        plan.classes[0].held_out_colours
    )


def test_plan_reloads_from_world_json(built: Path, plan: world.WorldPlan):
    # given a built world; when its plan is reloaded; then it equals the plan of the settings
    assert world.load_plan(built) == plan


def test_sample_ids_are_sha1_of_the_png(built: Path):
    # given a split file; then each sample_id is the sha1 of its PNG bytes
    table = pq.read_table(built / "val.parquet", columns=["sample_id", "image"])
    for sample_id, png in zip(
        table["sample_id"].to_pylist(), table["image"].to_pylist(), strict=True
    ):
        assert sample_id == hashlib.sha1(png).hexdigest()
        assert png.startswith(b"\x89PNG")


def test_every_factor_value_appears(plan: world.WorldPlan):
    # given a modest generation of train and shift images
    tables = [
        world.generate_split(plan, "train", 1500, seed=3).table,
        world.generate_split(plan, "shift", 8, seed=3).table,
    ]
    seen = {
        column: set().union(*(set(t[column].to_pylist()) for t in tables))
        for column in ("colour", "background", "style", "n_distractors", "class_name")
    }
    # then every vocabulary value occurs somewhere
    assert seen["colour"] == set(world.COLOURS)
    assert seen["background"] == set(world.BACKGROUNDS)
    assert seen["style"] == set(world.STYLES)
    assert seen["n_distractors"] == set(range(plan.settings.n_distractors_max + 1))
    assert seen["class_name"] == set(plan.class_names)


def test_held_out_contexts_never_reach_training(plan: world.WorldPlan):
    # given in-distribution splits
    for split in ("train", "val", "minority"):
        rows = world.generate_split(plan, split, 1000, seed=4).table.to_pylist()
        # then no row shows a class with its held-out colour or background
        for row in rows:
            spec = plan.classes[row["label"]]
            assert row["colour"] not in spec.held_out_colours
            assert row["background"] not in spec.held_out_backgrounds
            assert row["style"] == "filled"


def test_main_contexts_carry_the_configured_share(plan: world.WorldPlan):
    # given many training rows; when counting rows in their class's main contexts
    rows = world.generate_split(plan, "train", 4000, seed=5).table.to_pylist()
    main = [
        r["colour"] in plan.classes[r["label"]].main_colours
        and r["background"] in plan.classes[r["label"]].main_backgrounds
        for r in rows
    ]
    # then their share is main_context_share, and minority contexts still occur
    assert np.mean(main) == pytest.approx(plan.settings.main_context_share, abs=0.03)


def test_minority_split_holds_only_rare_contexts(plan: world.WorldPlan):
    # given the minority split; then no row has both a main colour and a main background
    rows = world.generate_split(plan, "minority", 500, seed=6).table.to_pylist()
    for row in rows:
        spec = plan.classes[row["label"]]
        assert not (
            row["colour"] in spec.main_colours and row["background"] in spec.main_backgrounds
        )
    assert {row["subset"] for row in rows} == {"minority"}


def test_plan_holds_out_distinct_far_colours(plan: world.WorldPlan):
    # given the plan; then held-out colours and backgrounds differ across classes and from mains
    held_colours = [c.held_out_colours[0] for c in plan.classes]
    held_backgrounds = [c.held_out_backgrounds[0] for c in plan.classes]
    assert len(set(held_colours)) == len(held_colours)
    assert len(set(held_backgrounds)) == len(held_backgrounds)
    for spec in plan.classes:
        assert not set(spec.held_out_backgrounds) & set(spec.main_backgrounds)
        for held, main in ((h, m) for h in spec.held_out_colours for m in spec.main_colours):
            assert np.linalg.norm(np.subtract(world.COLOURS[held], world.COLOURS[main])) >= 100


def test_shift_groups_follow_their_definition(plan: world.WorldPlan):
    # given the shift split with 5 images per group
    table = world.generate_split(plan, "shift", 5, seed=7).table
    rows = table.to_pylist()
    # then each group has 5 rows of its class, with the group's context and style
    assert len(rows) == 5 * len(world.SHIFT_KINDS) * len(plan.classes)
    for row in rows:
        kind, name = row["group"].split(":")
        spec = plan.classes[row["label"]]
        assert name == row["class_name"] == spec.name
        assert row["subset"] == ("context" if kind.startswith("ctx-") else "style")
        assert (row["colour"] in spec.held_out_colours) == (kind in ("ctx-colour", "ctx-both"))
        assert (row["background"] in spec.held_out_backgrounds) == (
            kind in ("ctx-background", "ctx-both")
        )
        assert row["style"] == (
            kind.removeprefix("style-") if kind.startswith("style-") else "filled"
        )


def test_extra_validation_chunks_are_deterministic_and_distinct(plan: world.WorldPlan):
    # when the same chunk is generated twice and a second chunk once
    first = world.generate_split(plan, "val", 16, seed=11, chunk=0)
    again = world.generate_split(plan, "val", 16, seed=11, chunk=0)
    second = world.generate_split(plan, "val", 16, seed=11, chunk=1)
    # then the chunk repeats exactly and the next chunk differs
    assert np.array_equal(first.images.numpy(), again.images.numpy())
    assert first.table.equals(again.table)
    assert not np.array_equal(first.images.numpy(), second.images.numpy())


def _render(label: int, style: str = "filled", size: int = 16) -> np.ndarray:
    factors = world.Factors(
        label=label, colour="white", background="flat", style=style, size=0.8, rotation=10.0
    )
    return world.render(factors, np.random.default_rng(0), size).astype(np.int32)


def test_every_shape_is_distinct_at_16_pixels():
    # given each of the 12 shapes rendered alike (same background draw, white, centred)
    images = [_render(label) for label in range(len(world.SHAPES))]
    # then every pair differs in at least 8 pixels
    for a in range(len(images)):
        for b in range(a + 1, len(images)):
            changed = (np.abs(images[a] - images[b]).sum(axis=-1) > 60).sum()
            assert changed >= 8, (world.SHAPES[a], world.SHAPES[b], changed)


@pytest.mark.parametrize("style", ["outline", "painted", "stage_lit"])
def test_styles_differ_from_filled(style: str):
    # given a star rendered filled and in another style; then the pixels differ clearly
    difference = np.abs(_render(3, style, 32) - _render(3, "filled", 32)).mean()
    assert difference > 15


def test_render_rejects_unknown_factor_values():
    # when a factor value is outside its vocabulary; then the error names the choices
    with pytest.raises(ConfigError, match="unknown colour 'teal'"):
        _ = world.render(
            world.Factors(label=0, colour="teal", background="flat"), np.random.default_rng(0), 16
        )


def test_unknown_split_and_group_fail_early(plan: world.WorldPlan):
    with pytest.raises(ConfigError, match="unknown split"):
        world.generate_split(plan, "test", 4, seed=0)
    with pytest.raises(ConfigError, match="unknown group"):
        world.generate_group(plan, "ctx-colour:dragon", 4, seed=0)


def test_written_images_load_back(built: Path, micro: Settings):
    # given the built minority split; when loaded
    images = load_images(built / "minority.parquet")
    # then images have the configured size and labels are class indices
    assert tuple(images.images.shape) == (32, 3, 16, 16)
    assert set(images.labels.tolist()) <= set(range(micro.world.n_classes))


def test_contact_sheet_is_a_png(plan: world.WorldPlan):
    # given a few images; when a contact sheet is drawn; then it decodes as an RGB PNG
    sample = world.generate_split(plan, "val", 6, seed=0)
    sheet = Image.open(
        io.BytesIO(
            world.contact_sheet(sample.images, sample.labels.tolist(), plan.class_names, columns=3)
        )
    )
    assert sheet.mode == "RGB"
    assert sheet.size[0] > 3 * 16
