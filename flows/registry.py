"""The MLflow model registry of retouch: versions, aliases, provenance tags, and the served model.

A version is a saved model folder (`model.safetensors` + `model_card.json`, see
`core.model.save_model`) logged as an MLflow pyfunc model: `RetouchClassifier` rebuilds the
timm model from the card, so a client outside retouch serves the champion with

    mlflow.pyfunc.load_model("models:/<model_name>@champion").predict(images)

The store is SQLite (`<mlruns>/mlflow.db`, artifacts under `<mlruns>/artifacts`); aliases
(`champion`, `candidate`) replace the deprecated stages. Version 1 is the base model and the
first champion. Registering weights already registered returns the existing version, so a night
that crashed after registering can rerun. Every MLflow or SQLite failure surfaces as a
`RegistryError` naming the store and the fix.
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Any

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one bar per file: noise

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from PIL import Image, UnidentifiedImageError
from sqlalchemy.exc import SQLAlchemyError

import core
import flows
from core.errors import DataError, RegistryError
from core.gate import GateResult
from core.model import load_saved_model, predict_logits, preprocess
from core.settings import RegistrySettings

logger = logging.getLogger(__name__)

CHAMPION = "champion"
CANDIDATE = "candidate"
WEIGHTS_ARTIFACT = "weights"  # the saved model folder inside the pyfunc model's artifacts
# What the served model imports; pinned to the versions that logged it.
SERVING_PACKAGES = (
    "mlflow",
    "torch",
    "timm",
    "safetensors",
    "numpy",
    "pandas",
    "pillow",
    "pydantic",
    "pyyaml",
)


@dataclass(frozen=True)
class VersionTags:
    """Provenance of a model version, stored as MLflow model-version tags.

    Attributes:
        parent_version: the version it was built from (the champion of the night), None for
            the base model.
        data_version: md5 of the DVC-tracked flags data it was edited on.
        hypernet_version: version (hash) of the mask hypernetwork that located the edits.
        ledger_ids: ordered ledger ids: the version is the base plus these edits.
        gate_decision: the global gate's decision (`gate_json` of its `GateResult`).
    """

    parent_version: int | None
    data_version: str
    hypernet_version: str
    ledger_ids: tuple[str, ...]
    gate_decision: str

    @staticmethod
    def gate_json(result: GateResult) -> str:
        """A gate decision as the `gate_decision` tag value."""
        return json.dumps(asdict(result), sort_keys=True)

    @classmethod
    def base(cls, data_version: str = "") -> VersionTags:
        """Tags of the base model: no parent, no edits, no gate."""
        return cls(None, data_version, "", (), "base model: not gated")

    def to_tags(self, weights: str) -> dict[str, str]:
        """MLflow tag values (strings), with the weights hash that makes registration idempotent."""
        return {
            "parent_version": "" if self.parent_version is None else str(self.parent_version),
            "data_version": self.data_version,
            "hypernet_version": self.hypernet_version,
            "ledger_ids": json.dumps(list(self.ledger_ids)),
            "gate_decision": self.gate_decision,
            "weights_hash": weights,
        }


@dataclass(frozen=True)
class VersionInfo:
    """One registered version, as `Registry.versions` lists it."""

    version: int
    aliases: tuple[str, ...]
    tags: dict[str, str]
    created_ms: int  # creation time, milliseconds since the epoch
    run_id: str

    @property
    def ledger_ids(self) -> list[str]:
        """The ordered ledger ids of the version (empty for the base model)."""
        return json.loads(self.tags.get("ledger_ids", "[]"))

    @property
    def weights_hash(self) -> str:
        """`core.model.weights_hash` of the version's weights."""
        return self.tags.get("weights_hash", "")


@contextmanager
def _registry_errors(action: str, tracking_uri: str) -> Iterator[None]:
    """Turn MLflow, SQLAlchemy and file-system failures into a RegistryError with the fix."""
    try:
        yield
    except (MlflowException, SQLAlchemyError, OSError) as exc:
        detail = str(exc).splitlines()[0]
        if "locked" in detail:
            fix = "another process holds the SQLite store: wait for it to finish, then rerun"
        else:
            fix = (
                "check that paths.mlruns points to a writable folder holding an MLflow SQLite store"
            )
        raise RegistryError(f"{action} failed on {tracking_uri}: {detail}; {fix}") from exc


class Registry:
    """A thin wrapper over one registered model in one MLflow SQLite store; see `connect`."""

    def __init__(
        self,
        client: MlflowClient,
        settings: RegistrySettings,
        tracking_uri: str,
        experiment_id: str,
    ) -> None:
        self.client = client
        self.settings = settings
        self.tracking_uri = tracking_uri
        self.experiment_id = experiment_id

    @classmethod
    def connect(cls, mlruns_path: str | Path, settings: RegistrySettings) -> Registry:
        """Open (or create) the store in `mlruns_path` and the settings' experiment.

        Raises:
            RegistryError: the folder's parent is missing or not writable, or the database is
                locked or not an MLflow SQLite store.
        """
        mlruns = Path(mlruns_path).expanduser().resolve()
        tracking_uri = f"sqlite:///{mlruns}/mlflow.db"
        with _registry_errors("opening the MLflow store", tracking_uri):
            mlruns.mkdir(exist_ok=True)
            client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
            experiment = client.get_experiment_by_name(settings.experiment)
            experiment_id = (
                experiment.experiment_id
                if experiment is not None
                else client.create_experiment(
                    settings.experiment, artifact_location=(mlruns / "artifacts").as_uri()
                )
            )
        return cls(client, settings, tracking_uri, experiment_id)

    @property
    def model_name(self) -> str:
        """Name of the registered model."""
        return self.settings.model_name

    def model_uri(self, alias: str = CHAMPION) -> str:
        """The `models:/` URI a client loads: `mlflow.pyfunc.load_model(registry.model_uri())`."""
        return f"models:/{self.model_name}@{alias}"

    def versions(self) -> list[VersionInfo]:
        """Every version of the model, oldest first (the model's history)."""
        with _registry_errors("listing model versions", self.tracking_uri):
            found = self.client.search_model_versions(f"name='{self.model_name}'")
            aliases = self._aliases() if found else {}
        infos = [
            VersionInfo(
                int(item.version),
                tuple(
                    sorted(name for name, target in aliases.items() if target == int(item.version))
                ),
                dict(item.tags),
                int(item.creation_timestamp),
                item.run_id or "",
            )
            for item in found
        ]
        return sorted(infos, key=lambda info: info.version)

    def register_version(self, model_folder: str | Path, tags: VersionTags) -> int:
        """Register a saved model folder as a new version; return its number.

        Idempotent: if a version with the same weights hash exists, it is returned and nothing
        is logged (a crashed night reruns without making a duplicate).

        Raises:
            RegistryError: the store fails.
        """
        model_folder = Path(model_folder)
        weights = _verified_weights_hash(model_folder)
        for info in self.versions():
            if info.weights_hash == weights:
                logger.info(
                    "weights %s already registered as version %d", weights[:12], info.version
                )
                return info.version
        all_tags = tags.to_tags(weights)
        with _registry_errors(f"registering {model_folder}", self.tracking_uri):
            run = self.client.create_run(
                self.experiment_id, run_name=f"register-{weights[:12]}", tags=all_tags
            )
            with tempfile.TemporaryDirectory(prefix="retouch-pyfunc-") as scratch:
                pyfunc_folder = _save_pyfunc(model_folder, Path(scratch), self.settings)
                self.client.log_artifacts(run.info.run_id, str(pyfunc_folder), "model")
            self.client.set_terminated(run.info.run_id)
            self._ensure_registered_model()
            created = self.client.create_model_version(
                self.model_name,
                source=f"{run.info.artifact_uri}/model",
                run_id=run.info.run_id,
                tags=all_tags,
            )
        logger.info(
            "registered %s as %s version %s", model_folder, self.model_name, created.version
        )
        return int(created.version)

    def _ensure_registered_model(self) -> None:
        try:
            self.client.get_registered_model(self.model_name)
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            self.client.create_registered_model(self.model_name)

    def ensure_base(self, model_folder: str | Path, tags: VersionTags | None = None) -> int:
        """Make the base model version 1 and, if no champion exists yet, the champion.

        Raises:
            RegistryError: the store already holds a version 1 with other weights.
        """
        existing = self.versions()
        if existing:
            weights = _verified_weights_hash(Path(model_folder))
            base = existing[0]
            if base.weights_hash != weights:
                raise RegistryError(
                    f"{self.tracking_uri} already holds {self.model_name} version {base.version} "
                    f"with weights {base.weights_hash[:12]}, not the base model in {model_folder} "
                    f"({weights[:12]}); point paths.mlruns at a fresh folder for a new base model"
                )
            version = base.version
        else:
            version = self.register_version(model_folder, tags or VersionTags.base())
        if self.get_alias_version(CHAMPION) is None:
            self.set_alias(CHAMPION, version)
        return version

    def set_alias(self, alias: str, version: int) -> None:
        """Point `alias` at `version` (one atomic update of the store)."""
        with _registry_errors(f"setting alias {alias} to version {version}", self.tracking_uri):
            self.client.set_registered_model_alias(self.model_name, alias, str(version))
        logger.info("%s@%s -> version %d", self.model_name, alias, version)

    def get_alias_version(self, alias: str) -> int | None:
        """The version `alias` points at, or None when unset (or no model is registered yet)."""
        with _registry_errors(f"reading alias {alias}", self.tracking_uri):
            return self._aliases().get(alias)

    def _aliases(self) -> dict[str, int]:
        """Alias -> version of the registered model; empty before the first registration."""
        try:
            model = self.client.get_registered_model(self.model_name)
        except MlflowException as exc:
            if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
                return {}
            raise
        return {alias: int(version) for alias, version in model.aliases.items()}

    def load_version_folder(self, version: int, destination: str | Path | None = None) -> Path:
        """Download a version's saved model folder (weights + card); return its local path.

        Args:
            version: the version number.
            destination: an existing folder to download into; a new temporary folder if None.
        """
        destination = Path(destination or tempfile.mkdtemp(prefix=f"retouch-v{version}-"))
        with _registry_errors(f"downloading version {version}", self.tracking_uri):
            source = self.client.get_model_version(self.model_name, str(version)).source
            local = mlflow.artifacts.download_artifacts(
                artifact_uri=f"{source}/artifacts/{WEIGHTS_ARTIFACT}", dst_path=str(destination)
            )
        return Path(local)


def _verified_weights_hash(model_folder: Path) -> str:
    """Weights hash of a saved model folder, checked against the weights by `load_saved_model`.

    Raises:
        ModelError: the folder is not a saved model or its weights differ from its card.
    """
    return load_saved_model(model_folder)[1].weights_hash


def _save_pyfunc(model_folder: Path, scratch: Path, settings: RegistrySettings) -> Path:
    """Write the pyfunc model of `model_folder` under `scratch`; return its folder.

    The retouch packages travel with the model (`code_paths`), so a client needs only the
    pinned pip requirements, not a retouch checkout.
    """
    weights_folder = shutil.copytree(model_folder, scratch / WEIGHTS_ARTIFACT)
    pyfunc_folder = scratch / "model"
    mlflow.pyfunc.save_model(
        str(pyfunc_folder),
        python_model=RetouchClassifier(),
        artifacts={WEIGHTS_ARTIFACT: str(weights_folder)},
        code_paths=[str(Path(core.__file__).parent), str(Path(flows.__file__).parent)],
        pip_requirements=[f"{name}=={package_version(name)}" for name in SERVING_PACKAGES],
        model_config={"batch_size": settings.serve_batch_size},
    )
    return pyfunc_folder


def _decode_image(data: Any, row: int) -> torch.Tensor:
    """(3, H, W) uint8 from PNG or JPEG bytes."""
    if not isinstance(data, bytes | bytearray):
        raise DataError(f"row {row}: column 'image' holds {type(data).__name__}, not image bytes")
    try:
        with Image.open(io.BytesIO(data)) as image:
            pixels = np.asarray(image.convert("RGB"))  # (H, W, 3)
    except (UnidentifiedImageError, OSError) as exc:
        raise DataError(f"row {row}: column 'image' is not a readable PNG or JPEG ({exc})") from exc
    return torch.from_numpy(pixels.copy()).permute(2, 0, 1)


def images_from_input(model_input: pd.DataFrame | np.ndarray) -> list[torch.Tensor]:
    """Batches of (n, 3, H, W) uint8 images from what a client passes to `predict`.

    A DataFrame gives one batch per row (images may differ in size); an array of shape
    (N, H, W, 3) or (N, 3, H, W) gives one batch.

    Raises:
        DataError: no `image` column, undecodable bytes, or an array of the wrong dtype or shape.
    """
    if isinstance(model_input, pd.DataFrame):
        if "image" not in model_input.columns:
            raise DataError(
                f"input columns {list(model_input.columns)} lack 'image'; pass a DataFrame with an "
                "'image' column of PNG/JPEG bytes, or a uint8 array (N, H, W, 3)"
            )
        return [_decode_image(data, row)[None] for row, data in enumerate(model_input["image"])]
    array = np.asarray(model_input)
    if array.dtype != np.uint8 or array.ndim != 4 or 3 not in (array.shape[1], array.shape[3]):
        raise DataError(
            f"image array has dtype {array.dtype} and shape {array.shape}; pass uint8 "
            "(N, H, W, 3) or (N, 3, H, W)"
        )
    images = torch.from_numpy(np.ascontiguousarray(array))
    return [images if array.shape[1] == 3 else images.permute(0, 3, 1, 2)]


class RetouchClassifier(mlflow.pyfunc.PythonModel):
    """The served model: images in, class name, index and probabilities out."""

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        """Rebuild the timm model from the saved folder's card and weights."""
        self.model, self.card = load_saved_model(context.artifacts[WEIGHTS_ARTIFACT])
        self.model.eval()
        self.batch_size = int(context.model_config["batch_size"])

    def predict(
        self,
        context: mlflow.pyfunc.PythonModelContext,
        model_input,  # no hint on purpose: MLflow would read one as an input schema and warn
        params: dict | None = None,
    ) -> pd.DataFrame:
        """Classify images.

        Args:
            context: MLflow's model context (unused after `load_context`).
            model_input: a DataFrame with an `image` column of PNG/JPEG bytes, or a uint8 array
                (N, H, W, 3) or (N, 3, H, W).
            params: unused; MLflow's inference parameters.

        Returns:
            One row per image: `label` (class name), `label_index`, `probabilities` (list).
        """
        batches = images_from_input(model_input)
        images = torch.cat([preprocess(batch, self.card) for batch in batches])  # (N, 3, S, S)
        with torch.no_grad():
            logits = predict_logits(self.model, images, self.batch_size)  # (N, C)
        probabilities = torch.softmax(logits.float(), dim=1)  # (N, C)
        indices = probabilities.argmax(dim=1).tolist()
        return pd.DataFrame(
            {
                "label": [self.card.class_names[index] for index in indices],
                "label_index": indices,
                "probabilities": probabilities.tolist(),
            }
        )
