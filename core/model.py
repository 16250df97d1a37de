"""timm models for retouch: building, loading, saving with a model card, hashing, inference.

One module owns every way a model enters retouch: `build_model` (the settings' model: random
init, a local weights file or the hub), `load_model` (any timm model by name, the real-user
path), and `load_saved_model` (a folder written by `save_model`, checked against its card's
weights hash). Every failure a user can cause (a typo in the name, a missing or mismatched
weights file) raises `ModelError` naming the fix before anything deep in timm or torch fails.
It also owns the model's input contract (`preprocess`), batched inference, and the thread count
a model's numbers depend on (`torch_threads`).
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import logging
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import safetensors.torch
import timm
import timm.data
import timm.models
import torch
import torch.nn.functional as F
from torch import nn

from core.errors import CheckpointMismatch, DataError, ModelError
from core.settings import ModelSettings

logger = logging.getLogger(__name__)

WEIGHTS_FILE = "model.safetensors"
CARD_FILE = "model_card.json"
RETIRED_CARD_KEY = "created_at"
ARCHITECTURE_OVERRIDES = ("img_size", "patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio")
RESIZE_MODES = ("bilinear", "bicubic")  # modes torch can resize with antialiasing
N_LISTED_KEYS = 5  # keys shown per kind of mismatch in an error message


@dataclass(frozen=True)
class Preprocessing:
    """How raw uint8 images become model input: square resize, scale to [0, 1], normalise."""

    input_size: int  # S: the model sees (N, 3, S, S)
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"  # resize mode when images are not S x S

    def __post_init__(self) -> None:
        if self.interpolation not in RESIZE_MODES:
            raise ModelError(
                f"preprocessing interpolation '{self.interpolation}' is not supported; "
                f"use one of {RESIZE_MODES}"
            )
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ModelError(
                f"preprocessing needs 3 means and 3 positive stds, got {self.mean} / {self.std}"
            )


@dataclass(frozen=True)
class ModelCard:
    """Everything needed to rebuild, feed and trust a saved model.

    `create_kwargs` are the keyword arguments of `timm.create_model(name, pretrained=False, ...)`
    that rebuild the architecture; `weights_hash` is `weights_hash(model)` of the saved weights.
    `data_hash` and `seed` are None for a model retouch did not train. The card holds nothing
    that changes between two builds of the same weights (no clock, no timing), so a rebuilt
    model has a byte-identical card and DVC sees nothing new downstream.
    """

    name: str
    create_kwargs: dict[str, Any]
    class_names: tuple[str, ...]
    preprocessing: Preprocessing
    metrics: dict[str, float] = field(default_factory=dict)
    data_hash: str | None = None
    seed: int | None = None
    weights_hash: str = ""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (tuples become lists)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "model card") -> ModelCard:
        """Inverse of `to_dict`; `source` names the file in errors."""
        expected = {f.name for f in dataclasses.fields(cls)}
        # Cards written before the card became clock-free carry their build time; it is dropped.
        data = {key: value for key, value in data.items() if key != RETIRED_CARD_KEY}
        missing = sorted(
            name
            for name in ("name", "create_kwargs", "class_names", "preprocessing")
            if name not in data
        )
        unknown = sorted(set(data) - expected)
        if missing or unknown:
            raise ModelError(
                f"{source}: missing keys {missing}, unknown keys {unknown}; "
                "write it again with core.model.save_model"
            )
        prep = data["preprocessing"]
        try:
            preprocessing = Preprocessing(
                int(prep["input_size"]),
                tuple(prep["mean"]),
                tuple(prep["std"]),
                prep["interpolation"],
            )
        except (KeyError, TypeError) as exc:
            raise ModelError(f"{source}: preprocessing {prep} is incomplete ({exc})") from exc
        return cls(
            **{**data, "class_names": tuple(data["class_names"]), "preprocessing": preprocessing}
        )

    def write(self, path: Path) -> None:
        """Write the card as indented JSON."""
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def read(cls, path: Path) -> ModelCard:
        """Read a card written by `write`."""
        if not path.is_file():
            raise ModelError(f"model card {path} not found; a saved model folder holds {CARD_FILE}")
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ModelError(f"model card {path} is not readable JSON: {exc}") from exc
        return cls.from_dict(data, source=str(path))


def _check_name(name: str) -> None:
    """Raise ModelError for a name timm does not know, suggesting the closest registered names."""
    if name.startswith(("hf-hub:", "hf_hub:")) or timm.is_model(name):
        return
    close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
    hint = (
        f"did you mean {', '.join(close)}?" if close else "see timm.list_models() for valid names"
    )
    raise ModelError(f"unknown timm model '{name}': {hint}")


def _create(name: str, **create_kwargs: Any) -> nn.Module:
    """timm.create_model with retouch errors for unknown names and unaccepted arguments."""
    _check_name(name)
    try:
        return timm.create_model(name, **create_kwargs)
    except TypeError as exc:
        raise ModelError(
            f"timm model '{name}' does not accept the arguments {sorted(create_kwargs)}: {exc}; "
            "set the overrides it does not take to null (model.* in params.yaml)"
        ) from exc


def model_create_kwargs(settings: ModelSettings, num_classes: int) -> dict[str, Any]:
    """The timm.create_model arguments of the settings' architecture (non-null overrides only)."""
    overrides = {key: getattr(settings, key) for key in ARCHITECTURE_OVERRIDES}
    return {"num_classes": num_classes, **{k: v for k, v in overrides.items() if v is not None}}


def build_model(settings: ModelSettings, num_classes: int, *, seed: int = 0) -> nn.Module:
    """The model the settings describe, in eval mode.

    Random init (seeded, without touching the global RNG) unless `settings.weights` names a local
    file or `settings.pretrained_from_hub` asks for the hub; then `load_model` does the work.

    Raises:
        ModelError: unknown name, an override the architecture does not take, or bad weights.
    """
    create_kwargs = model_create_kwargs(settings, num_classes)
    if settings.weights is not None or settings.pretrained_from_hub:
        create_kwargs.pop("num_classes")
        return load_model(
            settings.name,
            settings.weights,
            num_classes,
            pretrained=settings.pretrained_from_hub,
            **create_kwargs,
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _create(settings.name, pretrained=False, **create_kwargs)
    return model.eval()


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file or a timm / torch checkpoint (.pth, .pth.tar, .bin).

    A checkpoint dict's weights may sit under 'state_dict_ema' / 'model_ema' (preferred, as timm
    does), 'state_dict' or 'model'; DDP / torch.compile prefixes are stripped.

    Raises:
        ModelError: the file is missing, unreadable, or holds no tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelError(
            f"weights file {path} not found; check the path (model.weights in params.yaml)"
        )
    try:
        state_dict = timm.models.load_state_dict(str(path), use_ema=True, device="cpu")
    except Exception as exc:  # torch, pickle and safetensors raise many types for a bad file
        raise ModelError(
            f"weights file {path} is not a readable safetensors file or torch checkpoint: {exc}"
        ) from exc
    tensors = {k: v for k, v in state_dict.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise ModelError(
            f"weights file {path} holds no tensors; pass a model state dict or checkpoint"
        )
    return tensors


def _classes_in_file(name: str, state_dict: Mapping[str, torch.Tensor]) -> int | None:
    """Rows of the file's classifier weight, located by timm's pretrained config of `name`."""
    config = timm.models.get_pretrained_cfg(name)
    classifier = getattr(config, "classifier", None)
    if isinstance(classifier, (tuple, list)):  # distilled models: (head, head_dist)
        classifier = classifier[0]
    head = state_dict.get(f"{classifier}.weight")
    return head.shape[0] if head is not None and head.dim() >= 1 else None


def state_dict_mismatch(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor]
) -> dict[str, list[str]]:
    """Missing keys, unexpected keys and shape mismatches of `state_dict` against `model`."""
    expected = model.state_dict()
    return {
        "missing keys": sorted(set(expected) - set(state_dict)),
        "unexpected keys": sorted(set(state_dict) - set(expected)),
        "shape mismatches": [
            f"{key}: file {tuple(state_dict[key].shape)} vs model {tuple(expected[key].shape)}"
            for key in sorted(set(expected) & set(state_dict))
            if state_dict[key].shape != expected[key].shape
        ],
    }


def load_weights(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor], path: Path, name: str, fix: str
) -> None:
    """Copy `state_dict` (read from `path`) into `model` after checking every key and shape.

    Raises:
        ModelError: keys or shapes differ; the message lists a few of each and ends with `fix`.
    """
    mismatch = state_dict_mismatch(model, state_dict)
    if any(mismatch.values()):
        lines = [f"weights file {path} does not match timm model '{name}':"]
        for kind, keys in mismatch.items():
            if keys:
                more = " ..." if len(keys) > N_LISTED_KEYS else ""
                shown = ", ".join(keys[:N_LISTED_KEYS]) + more
                lines.append(f"  {kind} ({len(keys)}): {shown}")
        raise ModelError("\n".join([*lines, f"Fix: {fix}"]))
    model.load_state_dict(state_dict, strict=True)


def load_model(
    name: str,
    weights: Path | None,
    num_classes: int | None,
    *,
    pretrained: bool = False,
    **create_kwargs: Any,
) -> nn.Module:
    """Any timm model by name, with weights from a local file, the hub, or random init; eval mode.

    Args:
        name: a timm model name (or `hf-hub:org/repo` with `pretrained=True`).
        weights: a local safetensors file or timm / torch checkpoint; None for hub or random init.
        num_classes: classifier outputs; None takes them from the weights file's classifier
            (or timm's default without a file).
        pretrained: download timm's pretrained weights from the hub (needs network).
        **create_kwargs: further timm.create_model arguments (img_size, patch_size, ...).

    Raises:
        ModelError: unknown name, missing / unreadable / mismatched weights, hub unreachable.
    """
    if weights is not None and pretrained:
        raise ModelError("pass either a weights file or pretrained=True (the hub), not both")
    if num_classes is not None:
        create_kwargs["num_classes"] = num_classes
    if pretrained:
        return _load_from_hub(name, **create_kwargs).eval()
    if weights is None:
        return _create(name, pretrained=False, **create_kwargs).eval()
    _check_name(name)
    state_dict = read_state_dict(weights)
    if num_classes is None and (file_classes := _classes_in_file(name, state_dict)) is not None:
        create_kwargs["num_classes"] = file_classes
    model = _create(name, pretrained=False, **create_kwargs)
    fix = (
        "pass the model name the file was trained with, and num_classes / architecture "
        "overrides (img_size, patch_size, ...) that match it"
    )
    load_weights(model, state_dict, Path(weights), name, fix)
    return model.eval()


def _load_from_hub(name: str, **create_kwargs: Any) -> nn.Module:
    """timm's pretrained weights of `name`, with the offline fix named when the hub fails."""
    try:
        return _create(name, pretrained=True, **create_kwargs)
    except ModelError:
        raise
    except (OSError, RuntimeError, ValueError) as exc:  # network, hub and cache failures
        raise ModelError(
            f"could not load pretrained weights of '{name}' from the hub ({exc}); when offline, "
            "download them once and pass the file as weights (model.weights in params.yaml)"
        ) from exc


def preprocessing_for(model: nn.Module) -> Preprocessing:
    """The model's input contract: its real input size, timm's mean / std / interpolation.

    The input size comes from the patch embedding when there is one, because architecture
    overrides (img_size=32) do not update timm's pretrained config (which still says 224).
    """
    config = timm.data.resolve_model_data_config(model)
    size = (
        getattr(getattr(model, "patch_embed", None), "img_size", None) or config["input_size"][1:]
    )
    height, width = (size, size) if isinstance(size, int) else size
    if height != width:
        raise ModelError(
            f"{type(model).__name__} expects {height}x{width} input; retouch needs square input"
        )
    # timm may say 'nearest' or 'random'; torch antialiases only bilinear / bicubic resizes.
    interpolation = (
        config["interpolation"] if config["interpolation"] in RESIZE_MODES else "bicubic"
    )
    return Preprocessing(int(height), tuple(config["mean"]), tuple(config["std"]), interpolation)


def weights_hash(model: nn.Module) -> str:
    """`tensors_hash` of the model's state dict: the identity of its weights."""
    return tensors_hash(model.state_dict())


def tensors_hash(tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 over named tensors: names sorted, then each tensor's name, dtype, shape, raw bytes.

    Equal tensors give equal hashes on any machine; any changed value changes the hash.
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(tensors.items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Run with `count` torch threads, then restore the caller's count.

    The thread count changes how float sums are split, so the same training or edit on another
    count gives other weights (and a different weights hash); pinning it from the settings keeps
    a run and its rerun bit-identical on one machine, whatever the shell's OMP_NUM_THREADS.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def save_model(model: nn.Module, card: ModelCard, folder: Path) -> ModelCard:
    """Write `model.safetensors` and `model_card.json` into `folder`.

    Returns:
        The card as written, its `weights_hash` set to the saved weights' hash.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    # Cloned so that tensors sharing storage are saved as separate entries.
    tensors = {k: v.detach().cpu().clone().contiguous() for k, v in model.state_dict().items()}
    safetensors.torch.save_file(tensors, str(folder / WEIGHTS_FILE))
    card = dataclasses.replace(card, weights_hash=weights_hash(model))
    card.write(folder / CARD_FILE)
    return card


def load_saved_model(folder: Path) -> tuple[nn.Module, ModelCard]:
    """Rebuild a model written by `save_model` and check its weights against the card.

    Raises:
        ModelError: the folder, card or weights file is missing or does not fit the card.
        CheckpointMismatch: the weights' hash differs from the card's `weights_hash`.
    """
    folder = Path(folder)
    card = ModelCard.read(folder / CARD_FILE)
    model = _create(card.name, pretrained=False, **card.create_kwargs)
    weights_path = folder / WEIGHTS_FILE
    fix = f"{CARD_FILE} does not describe these weights; save the model again with save_model"
    load_weights(model, read_state_dict(weights_path), weights_path, card.name, fix)
    actual = weights_hash(model)
    if actual != card.weights_hash:
        raise CheckpointMismatch(
            f"{weights_path} has weights hash {actual[:12]}..., but its card says "
            f"{card.weights_hash[:12]}...; the file was changed after saving: save the model again"
        )
    return model.eval(), card


def preprocess(images: torch.Tensor, preprocessing: Preprocessing | ModelCard) -> torch.Tensor:
    """uint8 images (N, 3, H, W) -> float32 model input (N, 3, S, S).

    Resizes (antialiased) to S x S when H, W differ, scales to [0, 1], normalises by mean / std.

    Raises:
        DataError: not a uint8 (N, 3, H, W) tensor.
    """
    if isinstance(preprocessing, ModelCard):
        preprocessing = preprocessing.preprocessing
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
        raise DataError(
            f"preprocess expects uint8 RGB images (N, 3, H, W), got {images.dtype} "
            f"{tuple(images.shape)}; convert greyscale / RGBA images to RGB before preprocessing"
        )
    size = preprocessing.input_size
    pixels = images.float() / 255.0  # (N, 3, H, W)
    if pixels.shape[-2:] != (size, size):
        pixels = F.interpolate(
            pixels,
            size=(size, size),
            mode=preprocessing.interpolation,
            antialias=True,
            align_corners=False,
        ).clamp_(0.0, 1.0)  # (N, 3, S, S)
    mean = torch.tensor(preprocessing.mean).view(1, 3, 1, 1)
    std = torch.tensor(preprocessing.std).view(1, 3, 1, 1)
    return (pixels - mean) / std


def _batched_eval(
    model: nn.Module,
    images: torch.Tensor,
    batch_size: int,
    forward: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """Run `forward` over `images` in batches, without gradients, in eval mode (mode restored)."""
    if not images.is_floating_point() or images.dim() != 4 or images.shape[1] != 3:
        raise DataError(
            f"model input must be float (N, 3, S, S), got {images.dtype} {tuple(images.shape)}; "
            "pass images through core.model.preprocess first"
        )
    if batch_size < 1:
        raise DataError(f"batch_size must be at least 1, got {batch_size}")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            outputs = [forward(batch) for batch in torch.split(images, batch_size)]
    finally:
        model.train(was_training)
    return torch.cat(outputs)


def predict_logits(model: nn.Module, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Logits (N, C) of preprocessed images (N, 3, S, S)."""
    return _batched_eval(model, images, batch_size, model)


def pooled_features(model: nn.Module, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Pooled pre-logits features (N, D): the CLS / pooled token after the final norm."""

    def features(batch: torch.Tensor) -> torch.Tensor:
        return model.forward_head(model.forward_features(batch), pre_logits=True)  # (B, D)

    return _batched_eval(model, images, batch_size, features)
