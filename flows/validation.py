"""Validation of flag partitions: schema on the Parquet file, row rules in a GX suite.

A partition (one Parquet file of the inbox) is read as a whole or rejected as a whole: a file that
is not Parquet, lacks a required column or has a column of the wrong type raises `DataError`
naming the file and the fix. Row rules run in one GX 1.x suite over an ephemeral context. What GX
cannot see in a bytes column (does it decode? is it truncated? degenerate?) is computed per row in
Python into helper columns first (`add_helper_columns`), then asserted by GX expectations, so
GX's `unexpected_index_list` names the rows for every rule. Each expectation carries its
quarantine reason in `meta["reason"]`.

GX is imported inside functions: it takes seconds to import and only the ingest flow needs it.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, UnidentifiedImageError

from core.data import content_id
from core.errors import DataError
from core.settings import IngestSettings

if TYPE_CHECKING:
    import pandas as pd

# The flag contract (README: Flags): column -> Arrow type test and the type named in errors.
REQUIRED_COLUMNS: dict[str, tuple[Any, str]] = {
    "sample_id": (pa.types.is_string, "string"),
    "image": (pa.types.is_binary, "binary (PNG or JPEG bytes)"),
    "true_label": (lambda t: pa.types.is_string(t) or pa.types.is_integer(t), "string or integer"),
    "predicted_label": (
        lambda t: pa.types.is_string(t) or pa.types.is_integer(t),
        "string or integer",
    ),
    "model_version": (pa.types.is_string, "string"),
    "flagged_at": (pa.types.is_timestamp, "timestamp"),
    "source": (pa.types.is_string, "string"),
}
IMAGE_FORMATS = ("PNG", "JPEG")


def read_partition(path: Path) -> pd.DataFrame:
    """Read one inbox Parquet file into pandas after checking its schema against the contract.

    Large string/binary columns are read as plain ones; naive timestamps are taken as UTC.

    Raises:
        DataError: the file is not Parquet, or a required column is missing or mistyped.
    """
    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(
            f"{path} is not a readable Parquet file ({exc}); the partition is rejected and "
            "kept in the inbox: rewrite it as Parquet (README: Flags) under a new file name"
        ) from exc
    check_schema(table.schema, path)
    frame = table.to_pandas()
    stamps = frame["flagged_at"]
    frame["flagged_at"] = stamps.dt.tz_localize("UTC") if stamps.dt.tz is None else stamps
    return frame


def check_schema(schema: pa.Schema, path: Path) -> None:
    """Raise DataError naming every missing or mistyped required column of `path`."""
    problems = []
    for column, (type_ok, type_name) in REQUIRED_COLUMNS.items():
        if column not in schema.names:
            problems.append(f"missing column '{column}'")
            continue
        arrow_type = schema.field(column).type
        if pa.types.is_large_string(arrow_type) or pa.types.is_large_binary(arrow_type):
            arrow_type = pa.string() if pa.types.is_large_string(arrow_type) else pa.binary()
        if not type_ok(arrow_type):
            problems.append(f"column '{column}' is {arrow_type}, expected {type_name}")
    if problems:
        raise DataError(
            f"{path}: {'; '.join(problems)}. The partition is rejected and kept in the inbox; "
            "fix the columns (README: Flags) and write it under a new file name"
        )


def inspect_image(data: bytes | None) -> dict[str, Any]:
    """Per-row image facts for the GX suite; None where a fact cannot be known.

    Returns:
        `image_decodable` (a PNG/JPEG header PIL identifies), `image_complete` (the pixels load),
        `image_min_side` (smaller of width, height), `image_rgb` (converts to RGB).
    """
    facts: dict[str, Any] = dict.fromkeys(
        ("image_decodable", "image_complete", "image_min_side", "image_rgb")
    )
    if data is None:
        return facts
    try:
        image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        facts["image_decodable"] = False
        return facts
    except (OSError, SyntaxError, ValueError):  # a known header cut short
        facts.update(image_decodable=True, image_complete=False)
        return facts
    facts["image_decodable"] = image.format in IMAGE_FORMATS
    try:
        image.load()
    except (OSError, SyntaxError, ValueError):
        facts["image_complete"] = False
        return facts
    facts.update(image_complete=True, image_min_side=min(image.size))
    try:
        image.convert("RGB")
        facts["image_rgb"] = True
    except (OSError, ValueError):
        facts["image_rgb"] = False
    return facts


def label_index(value: Any, class_names: Sequence[str]) -> int | None:
    """Class index of a label given as a class name or an index; None if the model lacks it."""
    if isinstance(value, str):
        return class_names.index(value) if value in class_names else None
    if isinstance(value, int | np.integer) and 0 <= value < len(class_names):
        return int(value)
    return None


@dataclass(frozen=True)
class AcceptedIndex:
    """What earlier ingests accepted, for duplicates across partitions and nights."""

    content_by_sample: dict[str, str]  # sample_id -> content_id
    sample_by_key: dict[tuple[str, int], str]  # (content_id, true_index) -> sample_id

    @classmethod
    def from_frame(cls, accepted: pd.DataFrame) -> AcceptedIndex:
        """Index an accepted-flags table with columns sample_id, content_id, true_index."""
        ids, contents, labels = (
            accepted[c].tolist() for c in ("sample_id", "content_id", "true_index")
        )
        return cls(
            content_by_sample=dict(zip(ids, contents, strict=True)),
            sample_by_key={(c, int(t)): s for s, c, t in zip(ids, contents, labels, strict=True)},
        )


def add_helper_columns(
    frame: pd.DataFrame, class_names: Sequence[str], accepted: AcceptedIndex
) -> pd.DataFrame:
    """A copy of `frame` with the per-row facts the GX suite asserts and dedup needs.

    Adds the `inspect_image` columns, `content_id`, `true_index` / `predicted_index` (None for
    unknown labels), `labels_differ`, `sample_id_taken` (the id was accepted before with other
    content) and `duplicate_of` (the sample_id already holding this image and true label).
    """
    import pandas as pd

    frame = frame.reset_index(drop=True)
    facts = pd.DataFrame([inspect_image(data) for data in frame["image"]], dtype=object)
    frame = pd.concat([frame, facts], axis=1)
    frame["content_id"] = [content_id(d) if d is not None else None for d in frame["image"]]
    for column in ("true_label", "predicted_label"):
        index_column = column.replace("_label", "_index")
        frame[index_column] = pd.Series(
            [label_index(v, class_names) for v in frame[column]], dtype=object
        )
    frame["labels_differ"] = [
        None if t is None or p is None else t != p
        for t, p in zip(frame["true_index"], frame["predicted_index"], strict=True)
    ]
    frame["sample_id_taken"] = [
        sid in accepted.content_by_sample and accepted.content_by_sample[sid] != cid
        for sid, cid in zip(frame["sample_id"], frame["content_id"], strict=True)
    ]
    frame["duplicate_of"] = _duplicate_of(frame, accepted)
    return frame


def _duplicate_of(frame: pd.DataFrame, accepted: AcceptedIndex) -> list[str | None]:
    """Per row, the sample_id that already holds the same (content, true label), else None.

    A row whose true label is unknown is never a duplicate: it is left for validation to reject.
    """
    holders = dict(accepted.sample_by_key)
    duplicate_of: list[str | None] = []
    for sid, cid, label in zip(
        frame["sample_id"], frame["content_id"], frame["true_index"], strict=True
    ):
        key = (cid, label)
        known = cid is not None and label is not None
        duplicate_of.append(holders.get(key) if known else None)
        if known and key not in holders:
            holders[key] = sid
    return duplicate_of


def _expectations(class_names: Sequence[str], now: datetime, settings: IngestSettings) -> list:
    """The flag suite's expectations, each tagged with the quarantine reason it stands for."""
    import great_expectations as gx

    expect = gx.expectations
    labels = [*class_names, *range(len(class_names))]
    latest = now + timedelta(seconds=settings.future_tolerance_s)

    def reason(name: str) -> dict[str, str]:
        return {"reason": name}

    return [
        *(
            expect.ExpectColumnValuesToNotBeNull(column=column, meta=reason(f"null_{column}"))
            for column in REQUIRED_COLUMNS
        ),
        expect.ExpectColumnValueLengthsToBeBetween(
            column="sample_id", min_value=1, meta=reason("empty_sample_id")
        ),
        expect.ExpectColumnValuesToBeUnique(column="sample_id", meta=reason("duplicate_sample_id")),
        expect.ExpectColumnValuesToBeInSet(
            column="sample_id_taken", value_set=[False], meta=reason("duplicate_sample_id")
        ),
        expect.ExpectColumnValuesToBeInSet(
            column="image_decodable", value_set=[True], meta=reason("image_undecodable")
        ),
        expect.ExpectColumnValuesToBeInSet(
            column="image_complete", value_set=[True], meta=reason("image_truncated")
        ),
        expect.ExpectColumnValuesToBeBetween(
            column="image_min_side",
            min_value=settings.min_image_side,
            meta=reason("image_degenerate"),
        ),
        expect.ExpectColumnValuesToBeInSet(
            column="image_rgb", value_set=[True], meta=reason("image_degenerate")
        ),
        expect.ExpectColumnValuesToBeInSet(
            column="true_label", value_set=labels, meta=reason("unknown_true_label")
        ),
        expect.ExpectColumnValuesToBeInSet(
            column="predicted_label", value_set=labels, meta=reason("unknown_predicted_label")
        ),
        expect.ExpectColumnValuesToBeInSet(
            column="labels_differ", value_set=[True], meta=reason("true_equals_predicted")
        ),
        expect.ExpectColumnValuesToBeBetween(
            column="flagged_at", max_value=latest, meta=reason("flagged_in_future")
        ),
    ]


def _run_suite(frame: pd.DataFrame, expectations: list) -> Any:
    """Validate `frame` with the expectations in a fresh ephemeral GX context (COMPLETE results)."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    batch = (
        context.data_sources.add_pandas("flags")
        .add_dataframe_asset("partition")
        .add_batch_definition_whole_dataframe("whole")
    )
    suite = context.suites.add(gx.ExpectationSuite(name="flag_rows"))
    for expectation in expectations:
        suite.add_expectation(expectation)
    definition = context.validation_definitions.add(
        gx.ValidationDefinition(name="flag_rows", data=batch, suite=suite)
    )
    return definition.run(batch_parameters={"dataframe": frame}, result_format="COMPLETE")


def quarantine_reasons(
    frame: pd.DataFrame,
    class_names: Sequence[str],
    settings: IngestSettings,
    now: datetime | None = None,
) -> list[list[str]]:
    """The reasons each row of a helper-column frame fails the GX suite ([] for a clean row).

    Raises:
        DataError: an expectation could not run at all (a broken frame, not a bad row).
    """
    now = now or datetime.now(UTC)
    result = _run_suite(frame, _expectations(class_names, now, settings))
    reasons: list[list[str]] = [[] for _ in range(len(frame))]
    for outcome in result.results:
        config = outcome.expectation_config
        if (outcome.exception_info or {}).get("raised_exception"):
            message = outcome.exception_info.get("exception_message")
            raise DataError(
                f"GX expectation {config.type} on column {config.kwargs.get('column')!r} "
                f"could not run: {message}"
            )
        for row in outcome.result.get("unexpected_index_list") or []:
            if config.meta["reason"] not in reasons[row]:
                reasons[row].append(config.meta["reason"])
    return reasons


def validate_rows(
    frame: pd.DataFrame,
    class_names: Sequence[str],
    accepted: AcceptedIndex,
    settings: IngestSettings,
    now: datetime | None = None,
) -> pd.DataFrame:
    """Helper columns plus `reasons` ("; "-joined, "" if clean) for one partition's rows.

    Exact duplicates (`duplicate_of` set) are not validated: they are dropped, not quarantined,
    and keeping them out of the suite stops an innocent re-send from tripping the sample_id rules.
    """
    checked = add_helper_columns(frame, class_names, accepted)
    fresh = checked.index[checked["duplicate_of"].isna()]
    reasons = quarantine_reasons(
        checked.loc[fresh].reset_index(drop=True), class_names, settings, now
    )
    checked["reasons"] = ""
    checked.loc[fresh, "reasons"] = ["; ".join(r) for r in reasons]
    return checked


def split_rows(checked: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(accepted, quarantined, duplicates) rows of a `validate_rows` frame; together, all rows."""
    duplicate = checked["duplicate_of"].notna()
    quarantined = ~duplicate & (checked["reasons"] != "")
    accepted = ~duplicate & ~quarantined
    return checked[accepted], checked[quarantined], checked[duplicate]
