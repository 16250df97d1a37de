"""The production simulator: a served model meets a drifting stream; reviewers flag its mistakes.

Each simulated day draws `images_per_day` images from the shift world: in-distribution images
(the world's `val` group) plus a share `shift_share` from shift groups (held-out colours and
backgrounds, outline / painted / stage-lit styles). Shift groups go live in a seeded order,
`n_shift_groups_first_day` on day one and `new_shift_groups_per_day` more each later day (new
failure causes appear), and each day's mix over the live groups is a fresh Dirichlet draw (the mix
drifts). The served model classifies the stream; every misclassified image becomes a flag row
(README: Flags) with the true label a reviewer would give, written to
`inbox/date=YYYY-MM-DD/flags.parquet`. The extra column `world_group` keeps the generating group:
the ground truth for clustering quality.

With `bad_rows`, each day's partition also carries one bad row of every kind the ingest validation
must catch (world_group `bad:<reason>`) and an exact duplicate, and two bad files sit beside it:
one missing a required column and one that is not Parquet.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import nn

from core.data import content_id, encode_png
from core.model import ModelCard, predict_logits, preprocess
from core.settings import SimulateSettings
from core.world import WorldPlan, generate_group

log = logging.getLogger(__name__)

_STREAM_SEED_OFFSET = 7_919  # keeps the stream apart from the world's own splits (world.seed)
FLAG_FILE = "flags.parquet"


@dataclass(frozen=True)
class DayPlan:
    """What one simulated day serves: image counts per world group."""

    day: date
    index: int  # 0 for the first simulated day
    counts: dict[str, int]  # group -> images ("val" is the in-distribution stream)


def plan_days(shift_groups: list[str], settings: SimulateSettings, n_days: int) -> list[DayPlan]:
    """Seeded day plans: live shift groups grow day by day, their mix is redrawn daily."""
    rng = np.random.default_rng(settings.seed)
    order = [shift_groups[i] for i in rng.permutation(len(shift_groups))]
    n_shift = round(settings.images_per_day * settings.shift_share)
    plans = []
    for index in range(n_days):
        n_live = min(
            len(order),
            settings.n_shift_groups_first_day + index * settings.new_shift_groups_per_day,
        )
        mix = rng.dirichlet(np.full(n_live, settings.mix_concentration))  # (n_live,)
        shift_counts = rng.multinomial(n_shift, mix)  # (n_live,)
        counts = {"val": settings.images_per_day - n_shift}
        counts.update({g: int(n) for g, n in zip(order[:n_live], shift_counts, strict=True) if n})
        plans.append(DayPlan(settings.start_date + timedelta(days=index), index, counts))
    return plans


FLAG_SCHEMA = pa.schema(
    [
        ("sample_id", pa.string()),
        ("image", pa.binary()),
        ("true_label", pa.string()),
        ("predicted_label", pa.string()),
        ("model_version", pa.string()),
        ("flagged_at", pa.timestamp("us", tz="UTC")),
        ("source", pa.string()),
        ("world_group", pa.string()),
    ]
)


@torch.no_grad()
def _predict(
    model: nn.Module, card: ModelCard, images: torch.Tensor, batch_size: int
) -> torch.Tensor:
    """Served predictions of uint8 images (N, 3, H, W) -> class indices (N,)."""
    model.eval()
    return predict_logits(model, preprocess(images, card), batch_size).argmax(dim=1)


def _flag_times(day: date, n: int, rng: np.random.Generator) -> list[datetime]:
    """n review times spread over the day, in order (UTC)."""
    start = datetime.combine(day, time(), tzinfo=UTC)
    seconds = np.sort(rng.uniform(0, 86_400, n))
    return [start + timedelta(seconds=float(s)) for s in seconds]


def serve_day(
    model: nn.Module,
    card: ModelCard,
    world: WorldPlan,
    day: DayPlan,
    settings: SimulateSettings,
    model_version: str,
) -> pa.Table:
    """Serve one day's stream and return its flags (FLAG_SCHEMA), one row per mistake."""
    names = card.class_names
    rows: list[dict] = []
    for group, n in day.counts.items():
        images = generate_group(world, group, n, settings.seed + _STREAM_SEED_OFFSET, day.index)
        predicted = _predict(model, card, images.images, settings.batch_size)  # (n,)
        for index in torch.nonzero(predicted != images.labels).flatten().tolist():
            png = encode_png(images.images[index].permute(1, 2, 0).numpy())  # (H, W, 3)
            true_label, predicted_label = int(images.labels[index]), int(predicted[index])
            rows.append(
                {
                    "sample_id": content_id(png),
                    "image": png,
                    "true_label": names[true_label],
                    "predicted_label": names[predicted_label],
                    "world_group": group,
                }
            )
    rng = np.random.default_rng([settings.seed, day.index])
    stamps = _flag_times(day.day, len(rows), rng)
    order = rng.permutation(len(rows))  # reviewers flag in no particular group order
    rows = [
        {**rows[i], "model_version": model_version, "flagged_at": stamp, "source": "simulator"}
        for i, stamp in zip(order, stamps, strict=True)
    ]
    log.info("%s: served %d images, %d flags", day.day, sum(day.counts.values()), len(rows))
    return pa.Table.from_pylist(rows, schema=FLAG_SCHEMA)


def bad_rows(day: date, class_names: list[str], rng: np.random.Generator) -> pa.Table:
    """One row of every row-level kind the ingest must quarantine, plus an exact duplicate.

    `world_group` is `bad:<expected quarantine reason>` (`bad:duplicate` for the exact copy, which
    ingest drops rather than quarantines). Every row has its own image unless it is meant to share
    one; two rows share the id `dup-<day>` with different images.
    """

    def noise_png(width: int = 8) -> bytes:
        return encode_png(rng.integers(0, 256, (8, width, 3), dtype=np.uint8))  # (H, W, 3)

    def row(reason: str, **change: object) -> dict:
        return {"sample_id": f"bad-{reason}-{day}", "image": noise_png(),
                "true_label": class_names[0], "predicted_label": class_names[1],
                "model_version": "simulator", "flagged_at": datetime.combine(day, time(12), UTC),
                "source": "simulator", "world_group": f"bad:{reason}", **change}  # fmt: skip

    truncated, copied = noise_png(), noise_png()
    rows = [
        row("null_image", image=None),
        row("image_undecodable", image=b"these bytes are not an image"),
        row("image_truncated", image=truncated[: len(truncated) // 2]),
        row("image_degenerate", image=noise_png(width=1)),
        row("unknown_true_label", true_label="no-such-class"),
        row("true_equals_predicted", predicted_label=class_names[0]),
        row("duplicate_sample_id", sample_id=f"dup-{day}"),
        row("duplicate_sample_id", sample_id=f"dup-{day}"),
        row("flagged_in_future", flagged_at=datetime(2999, 1, 1, tzinfo=UTC)),
        row("empty_sample_id", sample_id=""),
        row("duplicate", sample_id=f"original-{day}", image=copied, world_group="clean"),
        row("duplicate", sample_id=f"copy-{day}", image=copied),
    ]
    return pa.Table.from_pylist(rows, schema=FLAG_SCHEMA)


def _write_bad_files(folder: Path, table: pa.Table) -> None:
    """A partition missing `true_label`, and one file that is not Parquet at all."""
    pq.write_table(table.drop_columns(["true_label"]), folder / "missing-column.parquet")
    (folder / "not-parquet.parquet").write_text("sample_id,image\nthis,is not parquet\n")


def simulate(
    model: nn.Module,
    card: ModelCard,
    world: WorldPlan,
    settings: SimulateSettings,
    inbox: Path,
    n_days: int,
    model_version: str,
    first_day: int = 0,
) -> list[Path]:
    """Serve `n_days` of drifting traffic and write each day's flags into the inbox.

    Args:
        model: the served model (the champion; the base model before any edit).
        card: its model card (class names, preprocessing).
        world: the shift world plan the stream is drawn from.
        settings: stream size, drift and bad-row settings.
        inbox: the inbox folder; day partitions go to `inbox/date=YYYY-MM-DD/`.
        n_days: number of days to simulate.
        model_version: registry version of the served model, recorded on every flag.
        first_day: index of the first day to serve (days before it were served earlier), so a
            stream can be served one night at a time by the model that is champion that night.

    Returns:
        The flag files written, one per day.
    """
    paths = []
    for day in plan_days(world.shift_groups(), settings, first_day + n_days)[first_day:]:
        table = serve_day(model, card, world, day, settings, model_version)
        folder = inbox / f"date={day.day.isoformat()}"
        folder.mkdir(parents=True, exist_ok=True)
        if settings.bad_rows:
            bad = bad_rows(
                day.day, card.class_names, np.random.default_rng([settings.seed, day.index, 1])
            )
            table = pa.concat_tables([table, bad])
            _write_bad_files(folder, bad)
        pq.write_table(table, folder / FLAG_FILE)
        paths.append(folder / FLAG_FILE)
    return paths
