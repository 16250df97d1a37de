"""Benchmark data built from a base model, following method.md section 1.

- Failure groups: only shift-pool samples the base model gets wrong; a group counts when it has
  at least `min_group_failures` failures. Each failure can serve as an edit sample; the rest of
  its group measure generalization.
- Sensitive set: in-distribution images the base model gets right, but only barely
  (top1 - top2 < margin). They flip first when an edit spills over, and a confident model has
  few of them, so validation images are generated chunk by chunk until enough are found.
- Broad sample: random clean validation images, for the locality production cares about.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from tqdm import tqdm

from core.data import ImageSet, concat_image_sets, load_images, write_images
from core.metrics import sensitive_mask
from core.model import Preprocessing, predict_logits, preprocess
from core.settings import BenchmarkDataSettings
from core.world import WorldPlan, generate_split, subset_of

logger = logging.getLogger(__name__)

ProbsFn = Callable[[ImageSet], torch.Tensor]  # uint8 images -> (N, C) probabilities


def failure_groups(
    predictions: np.ndarray, labels: np.ndarray, groups: np.ndarray, min_failures: int
) -> dict[str, np.ndarray]:
    """Indices of misclassified samples per group, for groups with at least `min_failures`.

    Args:
        predictions: (N,) predicted labels of the base model.
        labels: (N,) true labels.
        groups: (N,) group id of each sample.
        min_failures: groups with fewer failures are dropped (too few to edit and measure).

    Returns:
        group id -> sorted indices into the inputs, groups in sorted order.
    """
    wrong = predictions != labels
    selected: dict[str, np.ndarray] = {}
    for group in sorted(set(groups.tolist())):
        indices = np.flatnonzero(wrong & (groups == group))
        if len(indices) >= min_failures:
            selected[group] = indices
    return selected


def group_accuracy(
    predictions: np.ndarray, labels: np.ndarray, groups: np.ndarray
) -> dict[str, float]:
    """Accuracy per group id."""
    return {
        group: float((predictions[groups == group] == labels[groups == group]).mean())
        for group in sorted(set(groups.tolist()))
    }


def collect_sensitive(
    chunks: Iterable[ImageSet],
    probs_of: ProbsFn,
    margin: float,
    min_sensitive: int,
    max_scanned: int,
) -> tuple[ImageSet | None, int]:
    """Scan image chunks until `min_sensitive` sensitive images are found (or `max_scanned`).

    Returns:
        (the sensitive images found, or None if none; how many images were scanned).
    """
    found: list[ImageSet] = []
    n_found = n_scanned = 0
    with tqdm(desc="sensitive set", unit="img", disable=None) as bar:
        for chunk in chunks:
            rows = torch.nonzero(sensitive_mask(probs_of(chunk), chunk.labels, margin)).flatten()
            found.append(chunk.take(rows))
            n_found, n_scanned = n_found + len(rows), n_scanned + len(chunk)
            bar.update(len(chunk))
            bar.set_postfix(found=n_found)
            if n_found >= min_sensitive or n_scanned >= max_scanned:
                break
    logger.info(
        "sensitive set: %d of %d images (%.2f%%)",
        n_found,
        n_scanned,
        100 * n_found / max(n_scanned, 1),
    )
    return (concat_image_sets(found) if n_found else None), n_scanned


@dataclass(frozen=True)
class BenchmarkSummary:
    """What the benchmark build found; saved as summary.json."""

    accuracy_in_distribution: float
    accuracy_minority: float
    accuracy_per_group: dict[str, float]
    failures_per_group: dict[str, int]  # qualifying groups only
    groups_per_subset: dict[str, int]  # context / style -> number of qualifying groups
    n_sensitive: int
    n_sensitive_scanned: int
    n_broad: int


def model_probs(model: torch.nn.Module, preprocessing: Preprocessing) -> ProbsFn:
    """A function from uint8 images to the model's class probabilities."""
    return lambda images: predict_logits(model, preprocess(images.images, preprocessing)).softmax(
        dim=1
    )


def _column(images: ImageSet, name: str) -> np.ndarray:
    return np.asarray(images.table.column(name).to_pylist())


def _write_failures(
    shift: ImageSet, predictions: np.ndarray, groups: dict[str, np.ndarray], path: Path
) -> None:
    """Shift-pool rows the base model gets wrong, in qualifying groups, with its prediction."""
    rows = np.sort(np.concatenate(list(groups.values()))) if groups else np.zeros(0, np.int64)
    failures = shift.take(rows)
    table = failures.table.append_column(
        "base_prediction", pa.array(predictions[rows].astype(np.int32))
    )
    write_images(path, failures.images, table)


def build_benchmark_data(
    probs_of: ProbsFn,
    plan: WorldPlan,
    world_dir: Path,
    settings: BenchmarkDataSettings,
    out_dir: Path,
) -> BenchmarkSummary:
    """Write failures.parquet, sensitive.parquet, broad.parquet and summary.json under out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    val, minority, shift = (
        load_images(world_dir / f"{split}.parquet") for split in ("val", "minority", "shift")
    )
    accuracy = {
        name: float((probs_of(images).argmax(1) == images.labels).float().mean())
        for name, images in (("val", val), ("minority", minority))
    }
    shift_predictions = probs_of(shift).argmax(1).numpy()
    shift_labels, shift_groups = shift.labels.numpy(), _column(shift, "group")
    groups = failure_groups(
        shift_predictions, shift_labels, shift_groups, settings.min_group_failures
    )
    _write_failures(shift, shift_predictions, groups, out_dir / "failures.parquet")
    chunks = (
        generate_split(plan, "val", settings.sensitive_pool_chunk, settings.seed, chunk=i)
        for i in range(-(-settings.max_sensitive_pool // settings.sensitive_pool_chunk))
    )
    sensitive, n_scanned = collect_sensitive(
        chunks,
        probs_of,
        settings.sensitive_margin,
        settings.min_sensitive,
        settings.max_sensitive_pool,
    )
    if sensitive is not None:
        write_images(out_dir / "sensitive.parquet", sensitive.images, sensitive.table)
    broad = val.take(np.random.default_rng(settings.seed).permutation(len(val))[: settings.n_broad])
    write_images(out_dir / "broad.parquet", broad.images, broad.table)
    subsets = [subset_of(group) for group in groups]
    summary = BenchmarkSummary(
        accuracy_in_distribution=accuracy["val"],
        accuracy_minority=accuracy["minority"],
        accuracy_per_group=group_accuracy(shift_predictions, shift_labels, shift_groups),
        failures_per_group={group: len(rows) for group, rows in groups.items()},
        groups_per_subset={subset: subsets.count(subset) for subset in ("context", "style")},
        n_sensitive=0 if sensitive is None else len(sensitive),
        n_sensitive_scanned=n_scanned,
        n_broad=len(broad),
    )
    (out_dir / "summary.json").write_text(json.dumps(asdict(summary), indent=2))
    return summary
