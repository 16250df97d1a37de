"""Shared fixtures: micro settings and a micro ViT that keep tests fast; a quiet environment."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Real components, no telemetry, no network: set before any of them is imported.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")

from core.settings import Settings, load_settings

MICRO_OVERRIDES = [
    "profile=micro",
    "world.image_size=16",
    "world.n_classes=4",
    "world.n_train=256",
    "world.n_val=64",
    "world.n_minority_val=32",
    "world.n_per_shift_group=16",
    "model.img_size=16",
    "model.patch_size=4",
    "model.embed_dim=32",
    "model.depth=4",
    "model.num_heads=2",
    "train.epochs=2",
    "train.batch_size=64",
    "benchmark_data.min_sensitive=4",
    "benchmark_data.sensitive_pool_chunk=256",
    "benchmark_data.max_sensitive_pool=2048",
    "benchmark_data.n_broad=64",
    "benchmark_data.min_group_failures=2",
    "scope.blocks=[1,2]",
    "metatrain.iterations=4",
    "metatrain.batch_size=4",
    "metatrain.checkpoint_every=2",
    "nightly.num_threads=1",  # what `one_torch_thread` gives every other test
]


@pytest.fixture(autouse=True)
def one_torch_thread():
    """One torch thread per test: on 2 shared cores, 2 threads ran small ops ~30x slower."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def micro_settings_factory():
    """Build micro settings rooted at a folder; extra overrides win."""

    def make(root: Path, extra: list[str] = ()) -> Settings:
        paths = [
            f"paths.artifacts={root / 'artifacts'}",
            f"paths.data={root / 'data'}",
            f"paths.mlruns={root / 'mlruns'}",
            f"paths.monitoring={root / 'monitoring'}",
            f"paths.state={root / 'state'}",
            f"paths.dvc_remote={root / 'dvc-remote'}",
        ]
        return load_settings(None, [*MICRO_OVERRIDES, *paths, *extra])

    return make


@pytest.fixture
def micro_settings(tmp_path: Path, micro_settings_factory) -> Settings:
    """Micro settings (16 px, 4 classes, ViT dim 32, depth 4) with every path under tmp_path."""
    return micro_settings_factory(tmp_path)


@pytest.fixture(scope="session")
def micro_vit():
    """Build the micro settings' ViT (16 px, patch 4, dim 32, depth 4, 4 classes), random init.

    Seeds the global RNG (as the tests did by hand), so what a test draws afterwards stays
    reproducible. `head_std` redraws the head weights with that spread: timm's random head gives
    logits of ~0, a trained model's are spread out.
    """
    import timm
    import torch

    from core.model import model_create_kwargs

    settings = load_settings(None, MICRO_OVERRIDES)

    def make(head_std: float | None = None, seed: int = 0) -> torch.nn.Module:
        torch.manual_seed(seed)
        create_kwargs = model_create_kwargs(settings.model, settings.world.n_classes)
        model = timm.create_model(settings.model.name, pretrained=False, **create_kwargs).eval()
        if head_std is not None:
            with torch.no_grad():
                model.head.weight.normal_(std=head_std)
        return model

    return make


@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory):
    """A real, temporary Prefect API (SQLite), started once for every test that runs flows."""
    os.environ["PREFECT_HOME"] = str(tmp_path_factory.mktemp("prefect-home"))
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield
