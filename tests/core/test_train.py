"""core.train on a micro ViT (16 px, patch 4, dim 32, depth 4) and separable synthetic data."""

from __future__ import annotations

import itertools

import pytest
import torch

from core.errors import ConfigError, DataError
from core.model import Preprocessing, build_model, preprocess, weights_hash
from core.train import evaluate_accuracy, lr_factor, shift_images, train_model

N_CLASSES = 4
HALF = (0.5, 0.5, 0.5)
PREPROCESSING = Preprocessing(16, HALF, HALF, "bilinear")
CLASS_COLOURS = torch.tensor([[230, 40, 40], [40, 200, 40], [40, 60, 230], [230, 220, 40]])


def coloured_squares(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images (n, 3, 16, 16): a 6 px square of the class colour at a random place on noise."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % N_CLASSES  # (n,)
    images = torch.randint(0, 90, (n, 3, 16, 16), generator=generator, dtype=torch.uint8)
    corners = torch.randint(0, 11, (n, 2), generator=generator)
    for image, label, (row, col) in zip(images, labels, corners, strict=True):
        image[:, row : row + 6, col : col + 6] = CLASS_COLOURS[label].view(3, 1, 1)
    return images, labels


@pytest.fixture
def train_settings(micro_settings):
    """Micro training settings on one thread (tests share the machine's cores)."""
    return micro_settings.train.model_copy(update={"num_threads": 1, "epochs": 3})


@pytest.fixture
def data():
    return coloured_squares(256, seed=0)


def trained_hash(micro_settings, settings, data) -> str:
    model = build_model(micro_settings.model, N_CLASSES, seed=0)
    train_model(model, *data, PREPROCESSING, settings)
    return weights_hash(model)


def test_training_lowers_the_loss_and_learns_the_colours(micro_settings, train_settings, data):
    # Given a random micro model and class-coloured squares
    model = build_model(micro_settings.model, N_CLASSES, seed=0)
    val_images, val_labels = coloured_squares(64, seed=1)
    # When training for 3 short epochs with validation data
    report = train_model(model, *data, PREPROCESSING, train_settings, val=(val_images, val_labels))
    # Then the loss falls, validation is scored per epoch and beats chance
    assert len(report.train_loss) == len(report.val_accuracy) == 3
    assert report.train_loss[-1] < report.train_loss[0]
    assert report.val_accuracy[-1] > 1 / N_CLASSES + 0.1
    assert report.n_steps == 3 * (256 // train_settings.batch_size)
    assert report.images_per_second > 0
    assert not model.training


def test_same_seed_gives_identical_weights(micro_settings, train_settings, data):
    # Given the same data and settings / When training twice, then with another seed
    first = trained_hash(micro_settings, train_settings, data)
    second = trained_hash(micro_settings, train_settings, data)
    other_seed = trained_hash(micro_settings, train_settings.model_copy(update={"seed": 1}), data)
    # Then one seed gives bit-identical weights, another seed other weights
    assert first == second
    assert other_seed != first


def test_training_restores_thread_count_and_global_rng(micro_settings, train_settings, data):
    # Given a thread count other than the settings' (1) and a known global RNG state
    original_threads = torch.get_num_threads()
    torch.set_num_threads(3)
    state = torch.get_rng_state()
    model = build_model(micro_settings.model, N_CLASSES, seed=0)
    try:
        # When training
        train_model(model, *data, PREPROCESSING, train_settings)
        # Then neither leaks out of train_model
        assert torch.get_num_threads() == 3
        assert torch.equal(torch.get_rng_state(), state)
    finally:
        torch.set_num_threads(original_threads)


@pytest.mark.parametrize(
    ("mutate", "error", "message"),
    [
        (lambda x, y: (x.float(), y), DataError, r"training images must be uint8"),
        (lambda x, y: (x, y[:-1]), DataError, r"one per image"),
        (lambda x, y: (x, y.int()), DataError, r"int64"),
        (
            lambda x, y: (x, y + 1),
            DataError,
            r"labels range over 1\.\.4 but the model has 4 classes",
        ),
        (lambda x, y: (x[:10], y[:10]), ConfigError, r"train\.batch_size 64 exceeds the 10"),
    ],
    ids=["float-images", "short-labels", "int32-labels", "label-out-of-range", "batch-too-big"],
)
def test_bad_data_fails_before_training(
    micro_settings, train_settings, data, mutate, error, message
):
    model = build_model(micro_settings.model, N_CLASSES, seed=0)
    with pytest.raises(error, match=message):
        train_model(model, *mutate(*data), PREPROCESSING, train_settings)


def test_bad_validation_data_is_named(micro_settings, train_settings, data):
    model = build_model(micro_settings.model, N_CLASSES, seed=0)
    with pytest.raises(DataError, match="validation labels"):
        train_model(model, *data, PREPROCESSING, train_settings, val=(data[0], data[1][:5]))


def test_diverging_training_names_the_learning_rate(micro_settings, train_settings, data):
    model = build_model(micro_settings.model, N_CLASSES, seed=0)
    with pytest.raises(ConfigError, match=r"train\.lr"):
        train_model(model, *data, PREPROCESSING, train_settings.model_copy(update={"lr": 1e30}))


def test_schedule_warms_up_linearly_then_decays_to_zero():
    factors = [lr_factor(step, warmup_steps=4, total_steps=20) for step in range(20)]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0]
    assert factors[4] == 1.0
    assert all(a >= b for a, b in itertools.pairwise(factors[4:]))
    assert factors[-1] < 0.01


def test_shift_moves_each_image_within_the_limit_and_keeps_shape():
    # Given images with one bright pixel in the middle
    images = torch.zeros(64, 3, 16, 16)
    images[:, :, 8, 8] = 1.0
    # When shifting by at most 2 pixels
    shifted = shift_images(images, 2, torch.Generator().manual_seed(0))
    # Then each image still holds its pixel, moved by at most 2, and offsets vary
    assert shifted.shape == images.shape
    rows, cols = (shifted[:, 0] == 1.0).nonzero()[:, 1:].T  # (64,), (64,)
    assert len(rows) == 64
    assert (rows - 8).abs().max() <= 2
    assert (cols - 8).abs().max() <= 2
    assert len(set(zip(rows.tolist(), cols.tolist(), strict=True))) > 5
    assert torch.equal(shift_images(images, 0, torch.Generator()), images)


def test_evaluate_accuracy_counts_top1_hits(micro_settings):
    model = build_model(micro_settings.model, N_CLASSES, seed=0)
    images, _ = coloured_squares(8, seed=2)
    inputs = preprocess(images, PREPROCESSING)
    predictions = model(inputs).argmax(dim=1)
    assert evaluate_accuracy(model, inputs, predictions) == 1.0
    assert evaluate_accuracy(model, inputs, (predictions + 1) % N_CLASSES) == 0.0
