"""The MLflow registry on a real SQLite store, and the served pyfunc model used as a client would.

One store per module: connecting and logging models is slow-ish, so the base (v1) and one
candidate (v2) are registered once; each test sets the aliases it relies on.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from core.errors import DataError, RegistryError
from core.gate import GateResult
from core.model import (
    ModelCard,
    build_model,
    load_saved_model,
    model_create_kwargs,
    preprocessing_for,
    save_model,
    weights_hash,
)
from core.settings import RegistrySettings
from flows.registry import CANDIDATE, CHAMPION, Registry, VersionTags, images_from_input

pytestmark = pytest.mark.slow
CLASS_NAMES = ("circle", "square", "star", "triangle")


def save_tiny_model(folder: Path, settings, seed: int) -> str:
    """Save a random-init 16 px ViT (dim 32, depth 4) with its card; return its weights hash."""
    model = build_model(settings.model, len(CLASS_NAMES), seed=seed)
    card = ModelCard(
        name=settings.model.name,
        create_kwargs=model_create_kwargs(settings.model, len(CLASS_NAMES)),
        class_names=CLASS_NAMES,
        preprocessing=preprocessing_for(model),
    )
    return save_model(model, card, folder).weights_hash


@pytest.fixture(scope="module")
def store(tmp_path_factory, micro_settings_factory):
    """A registry with the base as v1 (champion) and a candidate as v2."""
    root = tmp_path_factory.mktemp("registry")
    settings = micro_settings_factory(root)
    base_hash = save_tiny_model(root / "base", settings, seed=0)
    candidate_hash = save_tiny_model(root / "candidate", settings, seed=1)
    registry = Registry.connect(settings.paths.mlruns, settings.registry)
    base_version = registry.ensure_base(root / "base", VersionTags.base("data-md5"))
    decision = VersionTags.gate_json(GateResult(True, ["all checks passed"], {"accuracy": 0.9}))
    tags = VersionTags(base_version, "data-md5", "hypernet-1", ("e1", "e2"), decision)
    candidate_version = registry.register_version(root / "candidate", tags)
    return {
        "registry": registry,
        "root": root,
        "versions": (base_version, candidate_version),
        "hashes": (base_hash, candidate_hash),
    }


def png_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def test_base_is_version_one_and_first_champion(store):
    registry = store["registry"]
    assert store["versions"][0] == 1
    assert registry.get_alias_version(CHAMPION) in (1, 2)  # other tests may move it
    base = registry.versions()[0]
    assert base.version == 1
    assert base.weights_hash == store["hashes"][0]
    assert base.ledger_ids == []
    assert base.tags["data_version"] == "data-md5"


def test_ensure_base_again_registers_nothing(store):
    registry = store["registry"]
    before = len(registry.versions())
    assert registry.ensure_base(store["root"] / "base") == 1
    assert len(registry.versions()) == before


def test_ensure_base_refuses_a_different_base(store):
    with pytest.raises(RegistryError, match="fresh folder"):
        store["registry"].ensure_base(store["root"] / "candidate")


def test_candidate_carries_its_provenance_tags(store):
    candidate = store["registry"].versions()[1]
    assert candidate.version == store["versions"][1] == 2
    assert candidate.tags["parent_version"] == "1"
    assert candidate.tags["hypernet_version"] == "hypernet-1"
    assert json.loads(candidate.tags["gate_decision"])["passed"] is True
    assert candidate.ledger_ids == ["e1", "e2"]
    assert candidate.weights_hash == store["hashes"][1]


def test_aliases_move_between_versions(store):
    registry = store["registry"]
    # Given the candidate alias on v2 and the champion on v1
    registry.set_alias(CANDIDATE, 2)
    registry.set_alias(CHAMPION, 1)
    assert (registry.get_alias_version(CANDIDATE), registry.get_alias_version(CHAMPION)) == (2, 1)
    # When the candidate is promoted
    registry.set_alias(CHAMPION, 2)
    # Then the champion points at v2 and versions() shows it
    assert registry.get_alias_version(CHAMPION) == 2
    assert CHAMPION in registry.versions()[1].aliases
    assert registry.get_alias_version("never-set") is None


def test_registering_the_same_weights_again_returns_the_existing_version(store):
    # Given the candidate's weights copied to another folder (a rerun after a crash)
    registry = store["registry"]
    copy = shutil.copytree(store["root"] / "candidate", store["root"] / "candidate-rerun")
    before = len(registry.versions())
    # When registered again
    version = registry.register_version(copy, VersionTags.base())
    # Then the existing version comes back and no version is added
    assert version == 2
    assert len(registry.versions()) == before


def test_load_version_folder_gives_back_the_weights(store, tmp_path):
    folder = store["registry"].load_version_folder(2, tmp_path)
    model, card = load_saved_model(folder)
    assert weights_hash(model) == store["hashes"][1]
    assert card.class_names == CLASS_NAMES


@pytest.fixture(scope="module")
def served(store):
    """What a client needs: the tracking URI and model name; and the expected answers."""
    registry = store["registry"]
    registry.set_alias(CHAMPION, 2)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(3, 16, 16, 3), dtype=np.uint8)  # (N, H, W, 3)
    return {"uri": registry.tracking_uri, "name": registry.model_name, "images": images}


def test_champion_serves_png_bytes_like_a_client_would(served):
    # Given only MLflow and a store URI, as a client outside retouch has
    import mlflow

    mlflow.set_tracking_uri(served["uri"])
    model = mlflow.pyfunc.load_model(f"models:/{served['name']}@champion")
    batch = pd.DataFrame({"image": [png_bytes(image) for image in served["images"]]})
    # When it predicts a DataFrame of PNG bytes
    answer = model.predict(batch)
    # Then each row has a class name, its index and a probability vector summing to one
    assert list(answer.columns) == ["label", "label_index", "probabilities"]
    assert len(answer) == 3
    for _, row in answer.iterrows():
        assert row["label"] == CLASS_NAMES[row["label_index"]]
        assert len(row["probabilities"]) == len(CLASS_NAMES)
        assert sum(row["probabilities"]) == pytest.approx(1.0, abs=1e-5)
        assert int(np.argmax(row["probabilities"])) == row["label_index"]
    # And arrays in either layout give the same answer as the (lossless) PNG bytes
    channels_last = model.predict(served["images"])
    channels_first = model.predict(np.ascontiguousarray(served["images"].transpose(0, 3, 1, 2)))
    for other in (channels_last, channels_first):
        assert other["label_index"].tolist() == answer["label_index"].tolist()
        np.testing.assert_allclose(
            np.stack(other["probabilities"]), np.stack(answer["probabilities"]), atol=1e-6
        )


def test_served_model_is_the_candidate_weights(store, served, tmp_path):
    # Given the champion's probabilities, served through MLflow
    import mlflow

    mlflow.set_tracking_uri(served["uri"])
    served_probs = mlflow.pyfunc.load_model(f"models:/{served['name']}@champion").predict(
        served["images"]
    )["probabilities"]
    # Then they match the candidate model run directly
    from core.model import predict_logits, preprocess

    model, card = load_saved_model(store["root"] / "candidate")
    images = torch.from_numpy(served["images"]).permute(0, 3, 1, 2)
    expected = torch.softmax(predict_logits(model.eval(), preprocess(images, card), 8), dim=1)
    np.testing.assert_allclose(np.stack(served_probs), expected.numpy(), atol=1e-5)


def test_connect_to_a_folder_without_parent_raises_registry_error(tmp_path):
    with pytest.raises(RegistryError, match=r"paths\.mlruns"):
        Registry.connect(tmp_path / "missing" / "mlruns", RegistrySettings())


def test_connect_to_a_corrupt_database_raises_registry_error(tmp_path):
    (tmp_path / "mlruns").mkdir()
    (tmp_path / "mlruns" / "mlflow.db").write_bytes(b"this is not a database" * 100)
    with pytest.raises(RegistryError, match="not a database"):
        Registry.connect(tmp_path / "mlruns", RegistrySettings())


@pytest.mark.parametrize(
    ("model_input", "message"),
    [
        (np.zeros((2, 16, 16, 3), dtype=np.float32), "uint8"),
        (np.zeros((2, 16, 16, 4), dtype=np.uint8), "uint8"),
        (pd.DataFrame({"pixels": [b"x"]}), "lack 'image'"),
        (pd.DataFrame({"image": [b"not a png"]}), "row 0"),
    ],
)
def test_bad_served_input_fails_with_a_data_error(model_input, message):
    with pytest.raises(DataError, match=message):
        images_from_input(model_input)
