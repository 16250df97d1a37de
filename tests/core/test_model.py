"""core.model: building, loading real timm architectures, saving with a card, hashing, inference.

The 224 px architectures (vit_small_patch16_224, deit_tiny_patch16_224) are randomly
initialised (nothing is downloaded) and fed one image at a time to stay fast.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch

from core.errors import CheckpointMismatch, DataError, ModelError
from core.model import (
    ModelCard,
    Preprocessing,
    build_model,
    load_model,
    load_saved_model,
    model_create_kwargs,
    pooled_features,
    predict_logits,
    preprocess,
    preprocessing_for,
    read_state_dict,
    save_model,
    torch_threads,
    weights_hash,
)
from core.settings import ModelSettings

REAL_ARCHITECTURES = ("vit_small_patch16_224", "deit_tiny_patch16_224")
N_CLASSES = 7


@pytest.fixture(scope="module", params=REAL_ARCHITECTURES)
def real_model(request):
    """(name, random-init 224 px model with 7 classes, its logits on one fixed image)."""
    torch.manual_seed(0)
    model = timm.create_model(request.param, pretrained=False, num_classes=N_CLASSES).eval()
    image = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    return request.param, model, image, predict_logits(model, image)


def write_weights(model: torch.nn.Module, path: Path) -> Path:
    """Save like a user would: safetensors, or a timm training checkpoint dict."""
    state_dict = model.state_dict()
    if path.suffix == ".safetensors":
        safetensors.torch.save_file({k: v.contiguous() for k, v in state_dict.items()}, str(path))
    else:
        torch.save({"epoch": 3, "arch": "x", "state_dict": state_dict}, path)
    return path


def micro_model(micro_settings, seed: int = 0) -> torch.nn.Module:
    return build_model(micro_settings.model, 4, seed=seed)


def micro_card(model: torch.nn.Module, micro_settings) -> ModelCard:
    return ModelCard(
        name=micro_settings.model.name,
        create_kwargs=model_create_kwargs(micro_settings.model, 4),
        class_names=("circle", "square", "star", "triangle"),
        preprocessing=preprocessing_for(model),
        metrics={"accuracy": 0.5},
        data_hash="abc",
        seed=0,
    )


@pytest.mark.slow
@pytest.mark.parametrize("file_name", ["weights.safetensors", "checkpoint.pth.tar"])
def test_load_model_reads_safetensors_and_timm_checkpoints(real_model, tmp_path, file_name):
    # Given a real architecture's weights written as a user would save them
    name, model, image, logits = real_model
    path = write_weights(model, tmp_path / file_name)
    # When loading them by name, the class count taken from the file
    loaded = load_model(name, path, num_classes=None)
    # Then the loaded model predicts exactly like the saved one
    assert loaded.num_classes == N_CLASSES
    assert not loaded.training
    torch.testing.assert_close(predict_logits(loaded, image), logits, rtol=0, atol=0)


def test_unknown_name_suggests_the_closest_timm_names():
    # Given a typo in a model name / When loading / Then the error suggests the real name
    with pytest.raises(ModelError, match="vit_small_patch16_224"):
        load_model("vit_smal_patch16_224", None, num_classes=3)


def test_weights_of_another_architecture_name_the_file_and_the_mismatch(micro_settings, tmp_path):
    # Given the weights of a micro ViT (width 32, depth 4)
    path = write_weights(micro_model(micro_settings), tmp_path / "micro.safetensors")
    # When loading them as deit_tiny (width 192, depth 12)
    with pytest.raises(ModelError) as caught:
        load_model("deit_tiny_patch16_224", path, num_classes=4)
    # Then the message names the file, missing keys, shape mismatches and the fix
    message = str(caught.value)
    assert str(path) in message
    assert "missing keys (" in message
    assert "blocks.10.attn.proj.bias" in message
    assert "blocks.0.attn.proj.bias: file (32,) vs model (192,)" in message
    assert "model name" in message


def test_explicit_num_classes_that_disagree_with_the_file_are_refused(tmp_path):
    # Given a 7-class checkpoint / When asking for 3 classes / Then the head mismatch is named
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False, num_classes=N_CLASSES)
    path = write_weights(model, tmp_path / "deit.pth")
    with pytest.raises(ModelError, match=r"head\.weight: file \(7, 192\) vs model \(3, 192\)"):
        load_model("deit_tiny_patch16_224", path, num_classes=3)


def test_missing_and_unreadable_weights_files_are_named(tmp_path):
    # Given a path that does not exist and a file that is not a checkpoint
    missing = tmp_path / "nope.safetensors"
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    # When reading them / Then each error names its file
    with pytest.raises(ModelError, match=f"{missing}.*not found"):
        read_state_dict(missing)
    with pytest.raises(ModelError, match=f"{garbage}.*not a readable"):
        read_state_dict(garbage)


def test_override_the_architecture_does_not_take_says_set_it_to_null():
    # Given ConvNeXt with a ViT-only override / When building / Then the fix is named
    settings = ModelSettings(name="convnext_atto", img_size=32, patch_size=None, depth=None)
    with pytest.raises(ModelError, match="null"):
        build_model(settings, 4)


def test_default_model_is_the_small_vit_with_half_normalisation():
    # Given the default settings / When building the model
    model = build_model(ModelSettings(), 10)
    preprocessing = preprocessing_for(model)
    # Then it is the ~0.47 M parameter (width 96, depth 4), 32 px, patch 8 ViT normalised by 0.5
    assert 0.4e6 < sum(p.numel() for p in model.parameters()) < 0.55e6
    assert preprocessing.input_size == 32
    assert preprocessing.mean == preprocessing.std == (0.5, 0.5, 0.5)


def test_same_seed_same_hash_and_a_changed_weight_changes_it(micro_settings):
    # Given two models built with one seed and one with another
    first, second = micro_model(micro_settings, seed=3), micro_model(micro_settings, seed=3)
    other = micro_model(micro_settings, seed=4)
    # Then hashes follow the weights
    assert weights_hash(first) == weights_hash(second) != weights_hash(other)
    # When one weight moves by one ulp-ish step
    with torch.no_grad():
        second.blocks[1].mlp.fc1.weight[0, 0] += 1e-6
    # Then the hash changes
    assert weights_hash(second) != weights_hash(first)


def test_saved_model_and_card_round_trip(micro_settings, tmp_path):
    # Given a micro model and its card
    model = micro_model(micro_settings)
    card = micro_card(model, micro_settings)
    # When saving and loading the folder
    written = save_model(model, card, tmp_path / "base")
    loaded, loaded_card = load_saved_model(tmp_path / "base")
    # Then the card survives JSON exactly and the weights hash matches
    assert written.weights_hash == weights_hash(model) == weights_hash(loaded)
    assert loaded_card == written
    assert ModelCard.from_dict(json.loads(json.dumps(written.to_dict()))) == written
    images = torch.randn(3, 3, 16, 16)
    torch.testing.assert_close(predict_logits(loaded, images), predict_logits(model, images))


def test_changed_weights_file_is_caught_by_the_card_hash(micro_settings, tmp_path):
    # Given a saved model whose weights file is replaced by another model's
    model = micro_model(micro_settings)
    save_model(model, micro_card(model, micro_settings), tmp_path / "base")
    other = micro_model(micro_settings, seed=9)
    safetensors.torch.save_file(
        {k: v.contiguous() for k, v in other.state_dict().items()},
        str(tmp_path / "base" / "model.safetensors"),
    )
    # When loading / Then the mismatch is refused
    with pytest.raises(CheckpointMismatch, match=r"model\.safetensors"):
        load_saved_model(tmp_path / "base")


def test_saving_the_same_weights_twice_writes_byte_identical_files(micro_settings, tmp_path):
    # Given one model saved twice with the same card
    model = micro_model(micro_settings)
    for folder in ("first", "second"):
        save_model(model, micro_card(model, micro_settings), tmp_path / folder)
    # Then both files are byte-identical (no clock in the card), so DVC sees no change downstream
    for name in ("model.safetensors", "model_card.json"):
        assert (tmp_path / "first" / name).read_bytes() == (tmp_path / "second" / name).read_bytes()


def test_a_card_written_with_a_build_time_still_reads(micro_settings, tmp_path):
    # Given a card written before the card dropped its build time
    model = micro_model(micro_settings)
    written = save_model(model, micro_card(model, micro_settings), tmp_path / "base")
    path = tmp_path / "base" / "model_card.json"
    path.write_text(json.dumps({**written.to_dict(), "created_at": "2026-11-01T00:00:00+00:00"}))
    # When loading / Then it reads as the card without it
    assert load_saved_model(tmp_path / "base")[1] == written


def test_card_with_unknown_keys_is_refused(micro_settings, tmp_path):
    model = micro_model(micro_settings)
    save_model(model, micro_card(model, micro_settings), tmp_path / "base")
    path = tmp_path / "base" / "model_card.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "colour": "red"}))
    with pytest.raises(ModelError, match="colour"):
        load_saved_model(tmp_path / "base")


def test_preprocess_scales_normalises_and_resizes():
    # Given white and black 8 px images and a 16 px, half-normalised model
    preprocessing = Preprocessing(16, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bilinear")
    images = torch.zeros(2, 3, 8, 8, dtype=torch.uint8)
    images[0] = 255
    # When preprocessing
    inputs = preprocess(images, preprocessing)
    # Then they are resized to 16 px and mapped to +1 / -1
    assert inputs.shape == (2, 3, 16, 16)
    assert inputs.dtype == torch.float32
    torch.testing.assert_close(inputs[0], torch.ones(3, 16, 16))
    torch.testing.assert_close(inputs[1], -torch.ones(3, 16, 16))


@pytest.mark.parametrize(
    "images",
    [
        torch.zeros(2, 4, 8, 8, dtype=torch.uint8),
        torch.zeros(3, 8, 8, dtype=torch.uint8),
        torch.zeros(2, 3, 8, 8),
    ],
    ids=["rgba", "no-batch-dim", "float"],
)
def test_preprocess_refuses_malformed_images(images):
    with pytest.raises(DataError, match=r"uint8 RGB images \(N, 3, H, W\)"):
        preprocess(images, Preprocessing(16, (0.5,) * 3, (0.5,) * 3))


def test_batched_inference_matches_one_batch_and_restores_the_mode(micro_settings):
    # Given a micro model in training mode and 5 images
    model = micro_model(micro_settings).train()
    images = torch.randn(5, 3, 16, 16)
    # When predicting in batches of 2 and of 5
    logits, features = (
        predict_logits(model, images, batch_size=2),
        pooled_features(model, images, 2),
    )
    # Then batching changes nothing, shapes are (N, C) / (N, D), and the mode is restored
    torch.testing.assert_close(logits, predict_logits(model, images, batch_size=5))
    assert logits.shape == (5, 4)
    assert features.shape == (5, 32)
    torch.testing.assert_close(model.get_classifier()(features), logits)
    assert model.training


def test_inference_refuses_uint8_input(micro_settings):
    with pytest.raises(DataError, match="preprocess"):
        predict_logits(micro_model(micro_settings), torch.zeros(1, 3, 16, 16, dtype=torch.uint8))


def test_card_preprocessing_with_unsupported_interpolation_is_refused():
    with pytest.raises(ModelError, match="nearest"):
        dataclasses.replace(Preprocessing(16, (0.5,) * 3, (0.5,) * 3), interpolation="nearest")


def test_settings_weights_file_is_loaded_by_build_model(micro_settings, tmp_path):
    # Given a micro model's weights saved as a user file and named in the model settings
    model = micro_model(micro_settings, seed=5)
    path = write_weights(model, tmp_path / "user.pth")
    settings = micro_settings.model.model_copy(update={"weights": path})
    # When building from the settings / Then the file's weights are used, not a fresh init
    assert weights_hash(build_model(settings, 4, seed=0)) == weights_hash(model)


def test_torch_threads_pins_the_count_and_restores_it_even_on_error():
    # Given a caller on one thread
    assert torch.get_num_threads() == 1

    # When a block runs pinned to two threads, and another fails
    with torch_threads(2):
        inside = torch.get_num_threads()
    after = torch.get_num_threads()
    with pytest.raises(RuntimeError, match="inside"), torch_threads(2):
        raise RuntimeError("inside")

    # Then each ran on two threads and the caller's count is back
    assert (inside, after) == (2, 1)
    assert torch.get_num_threads() == 1
