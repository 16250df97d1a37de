"""core.benchmark: the failure-group and sensitive-set rules on hand-made cases."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

from core.benchmark import collect_sensitive, failure_groups
from core.data import ImageSet


def image_set(labels: list[int]) -> ImageSet:
    """Blank 4 px images with the given labels and a row index column."""
    n = len(labels)
    return ImageSet(
        torch.zeros((n, 3, 4, 4), dtype=torch.uint8),
        torch.tensor(labels, dtype=torch.int64),
        pa.table({"row": list(range(n))}),
    )


def test_failure_groups_keep_only_wrong_samples_of_large_enough_groups():
    # Given group a with 2 failures, group b with 1 failure and group c with none
    predictions = np.array([0, 1, 1, 0, 2, 2])
    labels = np.array([1, 0, 1, 1, 2, 2])
    groups = np.array(["a", "a", "a", "b", "c", "c"])
    # When failure groups need at least 2 failures
    selected = failure_groups(predictions, labels, groups, min_failures=2)
    # Then only group a stays, holding exactly its misclassified rows
    assert list(selected) == ["a"]
    assert selected["a"].tolist() == [0, 1]


def test_sensitive_search_stops_once_enough_near_ties_are_found():
    # Given chunks whose probabilities give one right near-tie each (row 0), one confident right
    # answer (row 1) and one wrong near-tie (row 2)
    probs = torch.tensor([[0.52, 0.48], [0.9, 0.1], [0.49, 0.51]])
    chunks = [image_set([0, 0, 0]) for _ in range(5)]
    # When 2 sensitive images are wanted
    found, scanned = collect_sensitive(
        iter(chunks), lambda _: probs, margin=0.05, min_sensitive=2, max_scanned=100
    )
    # Then the search stops after the second chunk and keeps only the right near-ties
    assert scanned == 6
    assert found.table.column("row").to_pylist() == [0, 0]


def test_sensitive_search_gives_up_at_the_scan_limit_without_a_match():
    # Given chunks holding only confident answers
    chunks = [image_set([0, 1]) for _ in range(5)]
    probs = torch.tensor([[0.9, 0.1], [0.2, 0.8]])
    # When at most 4 images may be scanned
    found, scanned = collect_sensitive(
        iter(chunks), lambda _: probs, margin=0.05, min_sensitive=1, max_scanned=4
    )
    # Then nothing is found and the search stopped at the limit
    assert found is None
    assert scanned == 4
