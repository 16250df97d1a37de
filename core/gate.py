"""Promotion gates: whether one cluster's edit may join the candidate, and whether the candidate
may replace the champion.

A gate is a pure function of measured figures and `GateSettings`; a rejection is a value
(`GateResult(passed=False, ...)`), never an exception, so the nightly flow can record it and go
on. Gates fail closed: a figure that is missing or not finite rejects with a reason naming it.

Figure names (shares in [0, 1] unless said otherwise):
- cluster gate: `reliability` (edit samples right after the edit), `generalization` (held-out
  samples of the cluster right; recorded, not gated), `locality` (broad clean sample, agreement
  with the model before this cluster's edit) and its sample count `n_locality`, and
  `retained_broken` (earlier edits' samples right before this edit and wrong after it).
- global gate: `broad_locality_vs_champion`, `broad_locality_vs_base` (count `n_broad`),
  `sensitive_locality_vs_champion`, `sensitive_locality_vs_base` (count `n_sensitive`),
  `accuracy` and `accuracy_base` (clean validation accuracy of the candidate and of the original
  base model), and `retention/<ledger id>` for every earlier accepted edit (`retention_key`).

With `locality_confidence` set, a locality figure passes only if its one-sided Wilson lower
bound clears the threshold, so a small sample cannot pass by luck; the bound is added to the
figures as `<name>_lower`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from statistics import NormalDist

from core.settings import GateSettings

RETENTION_PREFIX = "retention/"
# Rounding noise of a difference of two shares (0.95 - 0.94 > 0.01 in floats); far below any
# threshold a setting can meaningfully hold.
_FLOAT_SLACK = 1e-9


@dataclass(frozen=True)
class GateResult:
    """One gate decision.

    Attributes:
        passed: whether every check passed.
        reasons: the failed checks when rejected, else every passed check: always the why.
        figures: the input figures plus derived ones (`accuracy_drop`, `<locality>_lower`).
    """

    passed: bool
    reasons: list[str]
    figures: dict[str, float]


def retention_key(edit_id: str) -> str:
    """Figure name of the retention of an earlier edit's samples."""
    return f"{RETENTION_PREFIX}{edit_id}"


def wilson_lower_bound(share: float, n: int, confidence: float) -> float:
    """One-sided Wilson score lower bound of a binomial share.

    Args:
        share: observed share of successes, in [0, 1].
        n: number of trials (>= 1).
        confidence: one-sided confidence level, e.g. 0.95 (z = 1.645).

    Returns:
        The lower bound; below `share` except at share 0, and closer to it as n grows.
    """
    z = NormalDist().inv_cdf(confidence)
    z2_per_n = z * z / n
    centre = share + z2_per_n / 2
    spread = z * math.sqrt(share * (1 - share) / n + z2_per_n / (4 * n))
    return (centre - spread) / (1 + z2_per_n)


class _Judge:
    """Collects the checks of one gate decision over a copy of the figures."""

    def __init__(self, figures: Mapping[str, float], settings: GateSettings) -> None:
        self.figures: dict[str, float] = dict(figures)
        self.settings = settings
        self.passes: list[str] = []
        self.failures: list[str] = []

    def value(self, key: str) -> float | None:
        """The figure, or None (recorded as a failure) when missing or not a finite number."""
        value = self.figures.get(key)
        is_number = isinstance(value, int | float) and not isinstance(value, bool)
        if not is_number or not math.isfinite(value):
            state = "missing" if value is None else f"not a finite number ({value!r})"
            self.failures.append(f"{key} is {state}: cannot judge, failing closed")
            return None
        return float(value)

    def compare(self, what: str, value: float, setting: str, *, at_most: bool = False) -> None:
        """Record `value` >= (or <= with `at_most`) the threshold named `setting`."""
        threshold = getattr(self.settings, setting)
        if at_most:
            passed, sign = value <= threshold + _FLOAT_SLACK, ("<=", ">")
        else:
            passed, sign = value >= threshold - _FLOAT_SLACK, (">=", "<")
        line = f"{what} {value:.4f} {sign[0] if passed else sign[1]} {threshold:.4f}"
        (self.passes if passed else self.failures).append(f"{line} (gate.{setting})")

    def at_least(self, key: str, setting: str) -> None:
        """Check figure `key` >= the threshold named `setting`."""
        value = self.value(key)
        if value is not None:
            self.compare(key, value, setting)

    def locality_at_least(self, key: str, n_key: str, setting: str) -> None:
        """Like `at_least`, on the Wilson lower bound when `locality_confidence` is set."""
        confidence = self.settings.locality_confidence
        if confidence is None:
            self.at_least(key, setting)
            return
        share, n = self.value(key), self.value(n_key)
        if share is None or n is None:
            return
        if n < 1:
            self.failures.append(f"{n_key} is {n:g}: a locality share needs at least one image")
            return
        bound = wilson_lower_bound(share, round(n), confidence)
        self.figures[f"{key}_lower"] = bound
        what = f"{key} {share:.4f} over {n:g} images, {confidence:.0%} lower bound"
        self.compare(what, bound, setting)

    def result(self) -> GateResult:
        return GateResult(not self.failures, self.failures or self.passes, self.figures)


def cluster_gate(figures: Mapping[str, float], settings: GateSettings) -> GateResult:
    """Judge one cluster's edit against the model it was applied to.

    Every edit sample must be right (reliability 1), locality on the broad clean sample must
    reach `cluster_min_locality`, and no earlier edit's sample may be undone (the global gate
    would fail the whole night's candidate on it; here only this cluster is turned away).
    Held-out generalization is only recorded, because a cluster of a few samples says little
    about unseen ones and gating on it would reject useful edits.
    """
    judge = _Judge(figures, settings)
    reliability = judge.value("reliability")
    if reliability is not None and reliability < 1 - _FLOAT_SLACK:
        judge.failures.append(f"reliability {reliability:.4f} < 1: an edit sample is still wrong")
    elif reliability is not None:
        judge.passes.append("reliability 1: every edit sample right")
    judge.locality_at_least("locality", "n_locality", "cluster_min_locality")
    broken = judge.value("retained_broken")
    if broken is not None and broken > 0:
        judge.failures.append(f"retained_broken {broken:g}: this edit undoes earlier edits")
    elif broken is not None:
        judge.passes.append("retained_broken 0: every earlier edit sample still right")
    return judge.result()


def global_gate(
    figures: Mapping[str, float],
    settings: GateSettings,
    earlier_edit_ids: Sequence[str] = (),
) -> GateResult:
    """Judge the candidate (champion plus tonight's accepted edits) for promotion.

    Locality is checked against the champion (tonight's change) and against the original base
    model (drift accumulated over all nights), on the broad clean sample and on the sensitive
    set; clean accuracy may not drop more than `max_accuracy_drop` below the base model's; every
    earlier accepted edit must keep `min_retention` of its samples right.

    Args:
        figures: measured figures, named as in the module docstring.
        settings: the gate thresholds.
        earlier_edit_ids: ledger ids of the edits already in the champion; a retention figure
            missing for any of them fails closed.
    """
    judge = _Judge(figures, settings)
    for population, n_key in (("broad", "n_broad"), ("sensitive", "n_sensitive")):
        for reference in ("champion", "base"):
            key = f"{population}_locality_vs_{reference}"
            judge.locality_at_least(key, n_key, f"min_{key}")
    accuracy, accuracy_base = judge.value("accuracy"), judge.value("accuracy_base")
    if accuracy is not None and accuracy_base is not None:
        judge.figures["accuracy_drop"] = accuracy_base - accuracy
        judge.compare("accuracy_drop", accuracy_base - accuracy, "max_accuracy_drop", at_most=True)
    present = [key for key in figures if key.startswith(RETENTION_PREFIX)]
    for key in dict.fromkeys([*map(retention_key, earlier_edit_ids), *present]):
        judge.at_least(key, "min_retention")
    return judge.result()
