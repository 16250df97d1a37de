"""Build the embedded default: shift world -> base model -> benchmark data -> hypernetwork.

Each step is one `dvc.yaml` stage (`retouch build world|base|benchmark|hypernet`), so `dvc repro`
rebuilds exactly what changed and caches the rest. The steps only read and write files under
`settings.paths.artifacts`; the science lives in core/.
"""

from __future__ import annotations

import json
import logging
import statistics
import subprocess
import sys
import time
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path

from core.benchmark import BenchmarkSummary, build_benchmark_data, model_probs
from core.data import file_hash, load_images
from core.errors import ModelError
from core.metatrain import HYPERNET_NAME, MetatrainReport, metatrain
from core.model import (
    CARD_FILE,
    ModelCard,
    Preprocessing,
    build_model,
    load_saved_model,
    model_create_kwargs,
    preprocess,
    save_model,
)
from core.scope import build_scope
from core.settings import Settings
from core.train import evaluate_accuracy, train_model
from core.world import build_plan, class_names, write_world
from flows.versioning import ensure_dvc_repo, version_data

logger = logging.getLogger(__name__)

HALF = (0.5, 0.5, 0.5)  # the embedded model's normalisation: [0, 1] -> [-1, 1]
# How the base model's training went (time, speed, loss per epoch): a DVC metrics file beside
# the model, apart from the card, so a rebuild of the same weights changes nothing downstream.
TRAINING_FILE = "training.json"
METATRAIN_FILE = "metatrain.json"  # the same for meta-training, beside the hypernetwork


def _write_build_record(path: Path, record: dict[str, object]) -> None:
    """Write how a build step went (time, speed), stamped with when it finished."""
    finished = datetime.now(UTC).isoformat(timespec="seconds")
    path.write_text(json.dumps({**record, "finished_at": finished}, indent=2) + "\n")


def world_dir(settings: Settings) -> Path:
    """Folder of the generated world (train/val/minority/shift.parquet, world.json)."""
    return settings.paths.artifacts / "world"


def base_dir(settings: Settings) -> Path:
    """Folder of the base model (model.safetensors, model_card.json, training.json)."""
    return settings.paths.artifacts / "base"


def hypernet_dir(settings: Settings) -> Path:
    """Folder of the meta-training checkpoint and the final hypernet.safetensors."""
    return settings.paths.artifacts / "hypernet"


def hypernet_path(settings: Settings) -> Path:
    """The meta-trained hypernetwork of the base model (written by `retouch metatrain`)."""
    return hypernet_dir(settings) / HYPERNET_NAME


def benchmark_dir(settings: Settings) -> Path:
    """Folder of the benchmark data (failures, sensitive, broad, summary.json)."""
    return settings.paths.artifacts / "benchmark"


def build_world(settings: Settings) -> dict[str, int]:
    """Generate the shift world's Parquet files; returns image counts per split."""
    counts = write_world(settings.world, world_dir(settings))
    logger.info("world: %s", counts)
    return counts


def build_base(settings: Settings) -> ModelCard:
    """Train the base model on the world's train split and save it with its model card."""
    folder = world_dir(settings)
    train, val, minority = (
        load_images(folder / f"{s}.parquet") for s in ("train", "val", "minority")
    )
    names = class_names(settings.world.n_classes)
    model = build_model(settings.model, num_classes=len(names), seed=settings.train.seed)
    preprocessing = Preprocessing(settings.model.img_size, HALF, HALF, "bilinear")
    report = train_model(model, train.images, train.labels, preprocessing, settings.train)
    metrics = {
        "accuracy_in_distribution": evaluate_accuracy(
            model, preprocess(val.images, preprocessing), val.labels
        ),
        "accuracy_minority": evaluate_accuracy(
            model, preprocess(minority.images, preprocessing), minority.labels
        ),
    }
    card = ModelCard(
        name=settings.model.name,
        create_kwargs=model_create_kwargs(settings.model, len(names)),
        class_names=tuple(names),
        preprocessing=preprocessing,
        metrics=metrics,
        data_hash=file_hash([folder / "train.parquet"]),
        seed=settings.train.seed,
    )
    card = save_model(model, card, base_dir(settings))
    _write_build_record(
        base_dir(settings) / TRAINING_FILE,
        {**report.to_dict(), "num_threads": settings.train.num_threads},
    )
    logger.info("base model: %s", json.dumps(metrics))
    return card


def build_benchmark(settings: Settings) -> BenchmarkSummary:
    """Failure groups, sensitive set and broad sample from the base model."""
    model, card = load_saved_model(base_dir(settings))
    summary = build_benchmark_data(
        model_probs(model, card.preprocessing),
        build_plan(settings.world),
        world_dir(settings),
        settings.benchmark_data,
        benchmark_dir(settings),
    )
    logger.info("benchmark data: %s", json.dumps(asdict(summary)))
    return summary


def build_hypernet(settings: Settings) -> MetatrainReport:
    """Meta-train the mask hypernetwork on clean training images of the base model."""
    model, card = load_saved_model(base_dir(settings))
    train = load_images(world_dir(settings) / "train.parquet")
    report = metatrain(
        model,
        build_scope(model, settings.scope.blocks),
        preprocess(train.images, card.preprocessing),
        settings.metatrain,
        settings.hypernet,
        hypernet_dir(settings),
    )
    seconds = [stats.seconds for stats in report.history]
    _write_build_record(
        hypernet_dir(settings) / METATRAIN_FILE,
        {
            "iterations": len(seconds),
            "resumed_from": report.resumed_from,
            "seconds": sum(seconds),
            "median_seconds_per_iteration": statistics.median(seconds) if seconds else 0.0,
        },
    )
    return report


def load_summary(settings: Settings) -> dict:
    """The saved benchmark summary and base-model card metrics, for printing."""
    summary_path = benchmark_dir(settings) / "summary.json"
    if not summary_path.is_file():
        raise ModelError(
            f"{summary_path} missing: build the default first (`dvc repro` or `retouch build all`)"
        )
    card = json.loads((base_dir(settings) / CARD_FILE).read_text())
    return {"base_model": card["metrics"], "benchmark": json.loads(summary_path.read_text())}


def prepare_data(settings: Settings) -> str:
    """Create the production data folders if new, version `data/` with DVC; return its md5."""
    for name in ("inbox", "flagged", "quarantine"):
        folder = settings.paths.data / name
        folder.mkdir(parents=True, exist_ok=True)
        (folder / ".gitkeep").touch()
    return version_data(settings.paths.data, settings.paths.dvc_remote)


def reproduce(settings: Settings) -> float:
    """`dvc repro --pull`: stages whose outputs the remote holds are pulled, the rest run.

    On a machine that built the default before (its local remote has the outputs), a fresh
    clone gets the whole build back in seconds. Returns wall seconds.
    """
    started = time.perf_counter()
    ensure_dvc_repo(Path.cwd(), settings.paths.dvc_remote)
    subprocess.run([sys.executable, "-m", "dvc", "repro", "--pull"], check=True)
    return time.perf_counter() - started
