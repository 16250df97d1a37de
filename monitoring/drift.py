"""Drift of the flagged images against the training distribution, in the base model's features.

The base model's pooled features are the space the flags are clustered in and the hypernetwork
reads. Each image is scored by its Mahalanobis distance to the training features (Ledoit-Wolf
covariance, scikit-learn, fitted on one half of a training sample); a day's flags are compared
with the other half by a two-sample Kolmogorov-Smirnov test (`scipy.stats.ks_2samp`). The KS
statistic is the gap between the two distance distributions (0: alike, 1: disjoint): a rising
statistic means the mistakes come from further outside what the model was trained on.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy.stats import ks_2samp
from sklearn.covariance import LedoitWolf

from core.data import iter_batches
from core.model import load_saved_model, pooled_features, preprocess
from core.settings import Settings
from flows.bootstrap import base_dir, world_dir
from flows.ingest import features

MIN_FLAGS = 2  # a KS test needs a few flags; a day with fewer is not tested


@dataclass(frozen=True)
class DriftTest:
    """One day's two-sample KS test of flag distances against training distances."""

    statistic: float
    pvalue: float
    n_flags: int
    n_reference: int


def reference_features(settings: Settings) -> np.ndarray:
    """Base-model features (M, D) of the first `drift_reference_size` training images."""
    model, card = load_saved_model(base_dir(settings))
    size = settings.monitoring.drift_reference_size
    images = next(iter_batches(world_dir(settings) / "train.parquet", size)).images  # (M, 3, H, W)
    with torch.no_grad():
        inputs = preprocess(images, card)
        return pooled_features(model.eval(), inputs, settings.ingest.batch_size).numpy()


def drift_by_day(
    reference: np.ndarray, flag_features: np.ndarray, days: np.ndarray
) -> dict[str, DriftTest]:
    """KS test per day of the flags' Mahalanobis distances against held-out training ones.

    Args:
        reference: training features (M, D); the first half fits the covariance, the second
            half gives the reference distances.
        flag_features: flag features (N, D).
        days: the day (ISO date) of each flag (N,).
    """
    half = len(reference) // 2
    covariance = LedoitWolf().fit(reference[:half])
    reference_distances = covariance.mahalanobis(reference[half:])  # (M - half,)
    flag_distances = covariance.mahalanobis(flag_features) if len(flag_features) else np.zeros(0)
    tests = {}
    for day in sorted(set(days)):
        distances = flag_distances[days == day]
        if len(distances) >= MIN_FLAGS:
            result = ks_2samp(distances, reference_distances)
            tests[str(day)] = DriftTest(
                float(result.statistic),
                float(result.pvalue),
                len(distances),
                len(reference_distances),
            )
    return tests


def flag_drift(settings: Settings, flags: pd.DataFrame) -> dict[str, DriftTest]:
    """Day -> drift test of the accepted flags (`sample_id`, `image`, `day` columns)."""
    if flags.empty:
        return {}
    flag_features = features(
        base_dir(settings),
        flags["image"].tolist(),
        settings.ingest.batch_size,
        Path(settings.paths.data) / "flagged",
    )  # (N, D)
    return drift_by_day(reference_features(settings), flag_features, flags["day"].to_numpy())
