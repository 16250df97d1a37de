"""The procedural shift world: seeded shape images with controlled subpopulation shifts.

Each image shows one object class (a shape) with generating factors: colour, background kind,
rendering style, size, position, rotation and a few distractor strokes. A `WorldPlan`
(deterministic from `world.seed`) gives each class a spurious context: two main colours and two
main backgrounds carry `main_context_share` of its training images, one colour and one
background are held out (never seen with that class in training, each held out for one class
only), and every other combination appears rarely ("minority contexts").

Splits: `train`, `val` (same distribution), `minority` (only rare contexts) and the shift pool,
per class: `ctx-colour`, `ctx-background`, `ctx-both` (held-out contexts, filled style) and
`style-outline`, `style-painted`, `style-stage_lit` (main contexts, shifted rendering).

Rendering works on batches. A shape is an inside test against a signed distance field (SDF) of
the canonical shape, looked up at the inverse-rotated, -scaled and -translated coordinates of a
2x supersampled pixel grid, then averaged 2 x 2 (anti-aliasing). Coordinates: the image spans
[-1, 1] ("frame units", y down); factor columns store x, y as shares of the image side, size as
the shape's diameter share, rotation in degrees (clockwise). Every random draw comes from one
numpy Generator seeded by (seed, group, chunk), so chunks are independent and reproducible.
"""

from __future__ import annotations

import json
import logging
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from functools import lru_cache, partial
from pathlib import Path

import numpy as np
import pyarrow as pa
import skimage.data
import torch
from PIL import Image, ImageDraw
from tqdm import tqdm

from core.data import ImageSet, ImageWriter, concat_image_sets, encode_png
from core.errors import ConfigError, DataError
from core.settings import WorldSettings

logger = logging.getLogger(__name__)

# Twelve shapes, distinct at 16 px; world.n_classes takes the first N.
SHAPES = (
    "circle", "square", "triangle", "star", "cross", "ring",
    "crescent", "heart", "arrow", "bolt", "hexagon", "diamond",
)  # fmt: skip
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (250, 140, 0),
    "yellow": (245, 225, 30),
    "lime": (150, 230, 40),
    "green": (20, 140, 50),
    "cyan": (30, 210, 230),
    "blue": (30, 60, 230),
    "purple": (130, 40, 200),
    "magenta": (230, 40, 200),
    "pink": (255, 150, 200),
    "white": (250, 250, 250),
    "brown": (130, 75, 30),
}
PHOTOS = ("brick", "grass", "gravel", "coffee", "camera", "rocket", "chelsea", "astronaut", "moon")
BACKGROUNDS = ("flat", "gradient", "noise", *PHOTOS)  # photos ship with scikit-image (no download)
STYLES = ("filled", "outline", "painted", "stage_lit")
SHIFT_KINDS = (
    "ctx-colour", "ctx-background", "ctx-both",
    "style-outline", "style-painted", "style-stage_lit",
)  # fmt: skip
SPLITS = ("train", "val", "minority", "shift")

_PALETTE = np.array(list(COLOURS.values()), np.float32)  # (n_colours, 3)
_LUMA = np.array([0.299, 0.587, 0.114], np.float32)
_MIN_HELD_OUT_COLOUR_DISTANCE = 100.0  # RGB distance: a held-out colour must look different
_MIN_CONTRAST = 70.0  # luma gap between shape and background below which the background dims
_SDF_EXTENT = 1.6  # the SDF table covers [-extent, extent] canonical units (shapes fit in 1)
_SDF_CELLS = 192
# Images rendered at once: arrays stay cache-sized (128 measured fastest). Changing it changes
# the images, since the batches draw from one random stream in turn.
_RENDER_BATCH = 128
_CHUNK = 2048  # images per independently seeded chunk of a written split (one row group)
_OUTLINE_WIDTH_PX = 1.5
_PAINT_JAG_PX = 1.5  # amplitude of the painted style's edge displacement
_STAGE_CASTS = np.array(
    [[1.0, 0.6, 0.25], [1.0, 0.3, 0.3], [0.35, 0.5, 1.0], [0.4, 1.0, 0.45], [0.95, 0.35, 1.0]],
    np.float32,
)  # amber, red, blue, green, magenta gels


def class_names(n: int) -> list[str]:
    """The first `n` shape names: the class names of a world with `n` classes."""
    if not 2 <= n <= len(SHAPES):
        raise ConfigError(f"world.n_classes={n}: choose 2..{len(SHAPES)}")
    return list(SHAPES[:n])


# ---------------------------------------------------------------------------------------------
# The plan: which contexts each class gets
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClassPlan:
    """The contexts of one class."""

    name: str
    main_colours: tuple[str, ...]
    main_backgrounds: tuple[str, ...]
    held_out_colours: tuple[str, ...]  # never with this class in train / val / minority
    held_out_backgrounds: tuple[str, ...]


@dataclass(frozen=True)
class WorldPlan:
    """Everything that decides the world's distributions; deterministic from the settings."""

    settings: WorldSettings
    classes: tuple[ClassPlan, ...]

    @property
    def class_names(self) -> list[str]:
        """Class names in label order."""
        return [c.name for c in self.classes]

    def shift_groups(self) -> list[str]:
        """Group ids of the shift pool, e.g. `ctx-colour:star`, kind-major then class."""
        return [f"{kind}:{c.name}" for kind in SHIFT_KINDS for c in self.classes]

    def to_dict(self) -> dict:
        """JSON-ready form (world.json)."""
        return {
            "settings": self.settings.model_dump(mode="json"),
            "classes": [asdict(c) for c in self.classes],
        }


def _balanced_pairs(rng: np.random.Generator, n_classes: int, n_options: int) -> np.ndarray:
    """(n_classes, 2) option indices, each class taking the least-used options so far."""
    usage = np.zeros(n_options, np.int64)
    pairs = np.empty((n_classes, 2), np.int64)
    for label in range(n_classes):
        order = rng.permutation(n_options)
        pairs[label] = order[np.argsort(usage[order], kind="stable")[:2]]
        usage[pairs[label]] += 1
    return pairs


def _held_out(rng: np.random.Generator, forbidden: np.ndarray, what: str) -> np.ndarray:
    """One option per class, distinct across classes, avoiding `forbidden` (n_classes, options)."""
    n_classes, n_options = forbidden.shape
    for _ in range(10_000):
        choice = rng.permutation(n_options)[:n_classes]
        if not forbidden[np.arange(n_classes), choice].any():
            return choice
    raise ConfigError(f"world: no held-out {what} per class fits; lower world.n_classes")


def build_plan(settings: WorldSettings) -> WorldPlan:
    """Draw each class's main and held-out colours and backgrounds from `settings.seed`.

    Held-out colours differ from the class's main colours by at least
    `_MIN_HELD_OUT_COLOUR_DISTANCE` in RGB, so a held-out context is a visible shift.
    """
    if settings.size_min > settings.size_max:
        raise ConfigError(
            f"world.size_min={settings.size_min} exceeds world.size_max={settings.size_max}"
        )
    names = class_names(settings.n_classes)
    rng = np.random.default_rng([settings.seed, zlib.crc32(b"plan")])
    main_colours = _balanced_pairs(rng, len(names), len(COLOURS))
    main_backgrounds = _balanced_pairs(rng, len(names), len(BACKGROUNDS))
    distance = np.linalg.norm(_PALETTE[:, None] - _PALETTE[None], axis=-1)  # (n_colours, n_colours)
    near_main = (distance[main_colours] < _MIN_HELD_OUT_COLOUR_DISTANCE).any(axis=1)
    held_colours = _held_out(rng, near_main, "colour")
    used = np.zeros((len(names), len(BACKGROUNDS)), bool)
    used[np.arange(len(names))[:, None], main_backgrounds] = True
    held_backgrounds = _held_out(rng, used, "background")
    colour_names, classes = list(COLOURS), []
    for label, name in enumerate(names):
        classes.append(
            ClassPlan(
                name=name,
                main_colours=tuple(colour_names[i] for i in main_colours[label]),
                main_backgrounds=tuple(BACKGROUNDS[i] for i in main_backgrounds[label]),
                held_out_colours=(colour_names[held_colours[label]],),
                held_out_backgrounds=(BACKGROUNDS[held_backgrounds[label]],),
            )
        )
    return WorldPlan(settings, tuple(classes))


def load_plan(world_dir: str | Path) -> WorldPlan:
    """The plan of a built world, rebuilt from the settings recorded in its world.json.

    Raises:
        DataError: world.json is missing; build the world first.
    """
    path = Path(world_dir) / "world.json"
    if not path.is_file():
        raise DataError(f"{path} not found; build the world first (retouch build)")
    recorded = json.loads(path.read_text())["plan"]["settings"]
    return build_plan(WorldSettings.model_validate(recorded))


# ---------------------------------------------------------------------------------------------
# Factors: what each image shows
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Factors:
    """The generating factors of one image (see the module docstring for units)."""

    label: int  # index into SHAPES
    colour: str
    background: str
    style: str = "filled"
    size: float = 0.65
    x: float = 0.5
    y: float = 0.5
    rotation: float = 0.0
    n_distractors: int = 0


@dataclass(frozen=True)
class _FactorArrays:
    """Factors of a batch, one array of length B per factor; names are vocabulary indices."""

    label: np.ndarray
    colour: np.ndarray
    background: np.ndarray
    style: np.ndarray
    size: np.ndarray
    x: np.ndarray
    y: np.ndarray
    rotation: np.ndarray
    n_distractors: np.ndarray

    def take(self, index: np.ndarray) -> _FactorArrays:
        return _FactorArrays(**{f.name: getattr(self, f.name)[index] for f in fields(self)})


def _index_of(vocabulary: Sequence[str], value: str, factor: str) -> int:
    if value not in vocabulary:
        raise ConfigError(f"unknown {factor} '{value}'; choose one of {list(vocabulary)}")
    return list(vocabulary).index(value)


def _factor_arrays(factors: Factors) -> _FactorArrays:
    """A batch of one from a Factors record, names checked against the vocabularies."""
    if not 0 <= factors.label < len(SHAPES):
        raise ConfigError(f"label {factors.label} is not a shape index 0..{len(SHAPES) - 1}")
    return _FactorArrays(
        label=np.array([factors.label]),
        colour=np.array([_index_of(list(COLOURS), factors.colour, "colour")]),
        background=np.array([_index_of(BACKGROUNDS, factors.background, "background")]),
        style=np.array([_index_of(STYLES, factors.style, "style")]),
        size=np.array([factors.size], np.float32),
        x=np.array([factors.x], np.float32),
        y=np.array([factors.y], np.float32),
        rotation=np.array([factors.rotation], np.float32),
        n_distractors=np.array([factors.n_distractors]),
    )


# ---------------------------------------------------------------------------------------------
# Canonical shapes as signed distance fields (negative inside), on a fixed table
# ---------------------------------------------------------------------------------------------


def _disc(x: np.ndarray, y: np.ndarray, cx: float, cy: float, radius: float) -> np.ndarray:
    return np.hypot(x - cx, y - cy) - radius


def _convex(x: np.ndarray, y: np.ndarray, vertices: Sequence[tuple[float, float]]) -> np.ndarray:
    """Distance to a convex polygon: the max over its edges' outward half-plane distances."""
    corners = np.asarray(vertices, np.float64)
    centroid = corners.mean(axis=0)
    distance = np.full(x.shape, -np.inf)
    for start, end in zip(corners, np.roll(corners, -1, axis=0), strict=True):
        normal = np.array([end[1] - start[1], start[0] - end[0]]) / np.linalg.norm(end - start)
        if normal @ (centroid - start) > 0:
            normal = -normal
        distance = np.maximum(distance, (x - start[0]) * normal[0] + (y - start[1]) * normal[1])
    return distance


def _regular(
    n_corners: int, radius: float, phase_degrees: float, dy: float = 0.0
) -> list[tuple[float, float]]:
    angles = np.deg2rad(phase_degrees + 360.0 * np.arange(n_corners) / n_corners)
    return [(radius * np.cos(a), radius * np.sin(a) + dy) for a in angles]


def _box(half_width: float, half_height: float) -> list[tuple[float, float]]:
    return [
        (-half_width, -half_height),
        (half_width, -half_height),
        (half_width, half_height),
        (-half_width, half_height),
    ]


def _star(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Five-pointed star as the union of five convex kites (centre, inner, tip, inner)."""
    tips, inner = _regular(5, 1.0, -90.0, 0.08), _regular(5, 0.42, -54.0, 0.08)
    kites = [[(0.0, 0.08), inner[i - 1], tips[i], inner[i]] for i in range(5)]
    return np.min([_convex(x, y, kite) for kite in kites], axis=0)


_SHAPE_SDFS: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "circle": lambda x, y: _disc(x, y, 0.0, 0.0, 0.85),
    "square": lambda x, y: _convex(x, y, _box(0.72, 0.72)),
    "triangle": lambda x, y: _convex(x, y, _regular(3, 1.0, -90.0, 0.22)),
    "star": _star,
    "cross": lambda x, y: np.minimum(
        _convex(x, y, _box(0.92, 0.27)), _convex(x, y, _box(0.27, 0.92))
    ),
    "ring": lambda x, y: np.abs(np.hypot(x, y) - 0.66) - 0.26,
    "crescent": lambda x, y: np.maximum(
        _disc(x, y, 0.2, 0.0, 0.85), -_disc(x, y, 0.62, -0.05, 0.68)
    ),
    "heart": lambda x, y: np.min(
        [
            _disc(x, y, -0.42, -0.32, 0.46),
            _disc(x, y, 0.42, -0.32, 0.46),
            _convex(x, y, [(-0.84, -0.2), (0.0, -0.35), (0.84, -0.2), (0.0, 0.92)]),
        ],
        axis=0,
    ),
    "arrow": lambda x, y: np.minimum(
        _convex(x, y, [(-0.95, -0.2), (0.05, -0.2), (0.05, 0.2), (-0.95, 0.2)]),
        _convex(x, y, [(0.0, -0.65), (0.97, 0.0), (0.0, 0.65)]),
    ),
    "bolt": lambda x, y: np.minimum(
        _convex(x, y, [(0.1, -0.97), (0.62, -0.97), (0.12, 0.12), (-0.45, 0.12)]),
        _convex(x, y, [(-0.12, -0.12), (0.5, -0.12), (-0.28, 0.97)]),
    ),
    "hexagon": lambda x, y: _convex(x, y, _regular(6, 0.92, 0.0)),
    "diamond": lambda x, y: _convex(x, y, [(0.0, -0.97), (0.58, 0.0), (0.0, 0.97), (-0.58, 0.0)]),
}


@lru_cache(maxsize=1)
def _sdf_table() -> np.ndarray:
    """Canonical SDFs of all shapes on a (_SDF_CELLS, _SDF_CELLS) grid: (n_shapes, T, T)."""
    axis = np.linspace(-_SDF_EXTENT, _SDF_EXTENT, _SDF_CELLS)
    y, x = np.meshgrid(axis, axis, indexing="ij")
    return np.stack([_SHAPE_SDFS[name](x, y) for name in SHAPES]).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Rendering primitives (float32 images 0..255, (B, S, S, 3))
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Grid:
    """Pixel-centre coordinates of an image of side `size`, in frame units."""

    size: int
    coarse: np.ndarray  # (S,)
    fine: np.ndarray  # (2S,): the 2x supersampled grid

    @property
    def pixel(self) -> float:
        """One pixel in frame units."""
        return 2.0 / self.size


@lru_cache(maxsize=8)
def _grid(size: int) -> _Grid:
    def centres(n: int) -> np.ndarray:
        return ((np.arange(n) + 0.5) / n * 2.0 - 1.0).astype(np.float32)

    return _Grid(size, centres(size), centres(2 * size))


def _shape_sdf(factors: _FactorArrays, grid: _Grid) -> np.ndarray:
    """Signed distance to each image's shape on the supersampled grid, frame units: (B, 2S, 2S)."""
    table = _sdf_table()
    cells = table.shape[-1]
    per_unit = (cells - 1) / (2 * _SDF_EXTENT)  # table cells per canonical unit
    radius = factors.size.astype(np.float32)  # frame units per canonical unit
    theta = np.deg2rad(factors.rotation).astype(np.float32)
    scale = (per_unit / radius)[:, None, None]
    cos, sin = np.cos(theta)[:, None, None] * scale, np.sin(theta)[:, None, None] * scale
    dx = grid.fine[None, None, :] - (2 * factors.x - 1)[:, None, None]  # (B, 1, 2S)
    dy = grid.fine[None, :, None] - (2 * factors.y - 1)[:, None, None]  # (B, 2S, 1)
    offset = per_unit * _SDF_EXTENT + 0.5  # +0.5: round to the nearest cell
    column = np.clip(cos * dx + sin * dy + offset, 0, cells - 1).astype(np.intp)  # (B, 2S, 2S)
    row = np.clip(cos * dy - sin * dx + offset, 0, cells - 1).astype(np.intp)
    flat = (factors.label[:, None, None] * cells + row) * cells + column
    return table.ravel()[flat] * radius[:, None, None]


def _coverage(inside: np.ndarray) -> np.ndarray:
    """2 x 2 average of a supersampled inside test: (B, 2S, 2S) bool -> (B, S, S) in [0, 1]."""
    inside = inside.astype(np.float32)
    return 0.25 * (
        inside[:, ::2, ::2] + inside[:, 1::2, ::2] + inside[:, ::2, 1::2] + inside[:, 1::2, 1::2]
    )


def _over(base: np.ndarray, paint: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Paint (B, 3) or (B, S, S, 3) over base (B, S, S, 3) with coverage alpha (B, S, S).

    Writes into `base` (callers pass arrays they own) and returns it.
    """
    if paint.ndim == 2:
        paint = paint[:, None, None, :]
    base += (paint - base) * alpha[..., None]
    return base


@lru_cache(maxsize=32)
def _interpolation(n_knots: int, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Linear interpolation from n_knots spanning the image to `size` pixel centres."""
    position = (np.arange(size) + 0.5) / size * (n_knots - 1)
    left = np.minimum(np.floor(position).astype(np.intp), n_knots - 2)
    return left, left + 1, (position - left).astype(np.float32)


def _upsample(knots: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear upsampling of (B, h, w, ...) knots to (B, height, width, ...), elementwise only."""
    top, bottom, weight_y = _interpolation(knots.shape[1], height)
    left, right, weight_x = _interpolation(knots.shape[2], width)
    extra = (None,) * (knots.ndim - 3)
    rows = (
        knots[:, top]
        + (knots[:, bottom] - knots[:, top]) * weight_y[(None, slice(None), None, *extra)]
    )
    return (
        rows[:, :, left]
        + (rows[:, :, right] - rows[:, :, left]) * weight_x[(None, None, slice(None), *extra)]
    )


def _noise(
    rng: np.random.Generator, n: int, knots: int, size: int, channels: tuple[int, ...] = ()
) -> np.ndarray:
    """Smooth noise in [-1, 1]: (n, size, size, *channels) from a knots x knots random lattice."""
    return _upsample(
        rng.uniform(-1, 1, (n, knots, knots, *channels)).astype(np.float32), size, size
    )


def _streaks(rng: np.random.Generator, n: int, size: int) -> np.ndarray:
    """Brush-stroke texture: noise stretched along a random axis per image, (n, S, S) in [-1, 1]."""
    lattice = rng.uniform(-1, 1, (n, 3, 2 * size // 3)).astype(np.float32)
    streaks = _upsample(lattice, size, size)
    vertical = rng.random(n) < 0.5
    return np.where(vertical[:, None, None], streaks.transpose(0, 2, 1), streaks)


def _box_blur(alpha: np.ndarray) -> np.ndarray:
    """3 x 3 mean filter of (B, S, S) with edge padding."""
    padded = np.pad(alpha, ((0, 0), (1, 1), (1, 1)), mode="edge")
    rows = padded[:, :-2] + padded[:, 1:-1] + padded[:, 2:]
    return (rows[:, :, :-2] + rows[:, :, 1:-1] + rows[:, :, 2:]) / 9.0


# ---------------------------------------------------------------------------------------------
# Backgrounds
# ---------------------------------------------------------------------------------------------


def _flat(n: int, rng: np.random.Generator, grid: _Grid) -> np.ndarray:
    colour = rng.uniform(25, 230, (n, 1, 1, 3)).astype(np.float32)
    return np.broadcast_to(colour, (n, grid.size, grid.size, 3)).copy()


def _gradient(n: int, rng: np.random.Generator, grid: _Grid) -> np.ndarray:
    start, end = rng.uniform(15, 240, (2, n, 1, 1, 3)).astype(np.float32)
    angle = rng.uniform(0, 2 * np.pi, n).astype(np.float32)[:, None, None]
    along = np.cos(angle) * grid.coarse[None, None, :] + np.sin(angle) * grid.coarse[None, :, None]
    share = along * np.float32(0.5**1.5) + 0.5  # (n, S, S) in [0, 1]
    return start + (end - start) * share[..., None]


def _colour_noise(n: int, rng: np.random.Generator, grid: _Grid) -> np.ndarray:
    return 127.5 + 110 * _noise(rng, n, 5, grid.size, (3,))


_PHOTO_ZOOMS = (1.25, 1.5, 1.75, 2.0)  # a crop of S pixels shows 1 / zoom of the photo's side


@lru_cache(maxsize=len(PHOTOS))
def _photo_square(name: str) -> Image.Image:
    """A scikit-image sample photo (shipped with the package), centre-cropped square, RGB."""
    pixels = getattr(skimage.data, name)()
    if pixels.ndim == 2:
        pixels = np.repeat(pixels[..., None], 3, axis=-1)
    height, width = pixels.shape[:2]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    return Image.fromarray(np.ascontiguousarray(pixels[top : top + side, left : left + side, :3]))


@lru_cache(maxsize=64)
def _photo_windows(name: str, side: int, crop: int) -> np.ndarray:
    """All (crop, crop) windows of a photo resized to `side`: (k, k, crop, crop, 3) float32.

    The photo is resized (Lanczos, anti-aliased) once; cutting thousands of crops is then a
    plain gather.
    """
    photo = _photo_square(name).resize((side, side), Image.Resampling.LANCZOS)
    windows = np.lib.stride_tricks.sliding_window_view(
        np.asarray(photo, np.float32), (crop, crop, 3)
    )
    return windows[:, :, 0]


def _photo_crops(name: str, n: int, rng: np.random.Generator, grid: _Grid) -> np.ndarray:
    """Random S x S crops of the photo at a random zoom, randomly mirrored: (n, S, S, 3)."""
    zoom = rng.integers(0, len(_PHOTO_ZOOMS), n)
    corner = rng.random((n, 2))
    mirrored = rng.random(n) < 0.5
    out = np.empty((n, grid.size, grid.size, 3), np.float32)
    for level, factor in enumerate(_PHOTO_ZOOMS):
        index = np.flatnonzero(zoom == level)
        windows = _photo_windows(name, round(factor * grid.size), grid.size)
        offsets = (corner[index] * windows.shape[0]).astype(np.intp)  # (m, 2) in 0..k-1
        out[index] = windows[offsets[:, 1], offsets[:, 0]]
    out[mirrored] = out[mirrored, :, ::-1]
    return out


_BACKGROUND_MAKERS: dict[str, Callable[[int, np.random.Generator, _Grid], np.ndarray]] = {
    "flat": _flat,
    "gradient": _gradient,
    "noise": _colour_noise,
    **{name: partial(_photo_crops, name) for name in PHOTOS},
}


def _backgrounds(kinds: np.ndarray, rng: np.random.Generator, grid: _Grid) -> np.ndarray:
    """Backgrounds for background indices `kinds` (B,): (B, S, S, 3)."""
    out = np.empty((len(kinds), grid.size, grid.size, 3), np.float32)
    for kind in np.unique(kinds):
        index = np.flatnonzero(kinds == kind)
        out[index] = _BACKGROUND_MAKERS[BACKGROUNDS[kind]](len(index), rng, grid)
    return out


def _ensure_contrast(scene: np.ndarray, colour: np.ndarray) -> np.ndarray:
    """Dim (or lighten) backgrounds whose mean luma is too close to the shape colour's."""
    scene_luma = scene.mean(axis=(1, 2)) @ _LUMA  # (B,)
    shape_luma = colour @ _LUMA
    close = np.abs(scene_luma - shape_luma) < _MIN_CONTRAST
    dark_shape = shape_luma < 128
    scene[close & dark_shape] = scene[close & dark_shape] * 0.4 + 150
    scene[close & ~dark_shape] *= 0.4
    return scene


def _segment_distance(grid: _Grid, start: np.ndarray, end: np.ndarray) -> np.ndarray:
    """Distance from each coarse pixel to segments start-end (m, 2): (m, S, S)."""
    px = grid.coarse[None, None, :] - start[:, 0, None, None]  # (m, 1, S)
    py = grid.coarse[None, :, None] - start[:, 1, None, None]  # (m, S, 1)
    direction = end - start
    length2 = (direction**2).sum(axis=1) + 1e-6
    along = np.clip(
        (px * direction[:, 0, None, None] + py * direction[:, 1, None, None])
        / length2[:, None, None],
        0,
        1,
    )
    return np.hypot(
        px - along * direction[:, 0, None, None], py - along * direction[:, 1, None, None]
    )


def _draw_distractors(
    scene: np.ndarray, counts: np.ndarray, rng: np.random.Generator, grid: _Grid
) -> np.ndarray:
    """Add `counts` (B,) short strokes and dots of random colour: no class looks like them."""
    for slot in range(int(counts.max(initial=0))):
        index = np.flatnonzero(counts > slot)
        start = rng.uniform(-0.9, 0.9, (len(index), 2)).astype(np.float32)
        angle = rng.uniform(0, 2 * np.pi, len(index))
        length = rng.uniform(0.0, 0.5, len(index))[:, None]
        end = start + (length * np.stack([np.cos(angle), np.sin(angle)], axis=1)).astype(np.float32)
        radius = rng.uniform(0.03, 0.09, len(index)).astype(np.float32)[:, None, None]
        colour = rng.uniform(0, 255, (len(index), 3)).astype(np.float32)
        distance = _segment_distance(grid, start, end) - radius
        scene[index] = _over(scene[index], colour, np.clip(0.5 - distance / grid.pixel, 0, 1))
    return scene


def _scene(factors: _FactorArrays, rng: np.random.Generator, grid: _Grid) -> np.ndarray:
    """Background with enough contrast to the shape colour, plus distractors: (B, S, S, 3)."""
    scene = _ensure_contrast(_backgrounds(factors.background, rng, grid), _PALETTE[factors.colour])
    return _draw_distractors(scene, factors.n_distractors, rng, grid)


# ---------------------------------------------------------------------------------------------
# Styles
# ---------------------------------------------------------------------------------------------


def _render_filled(factors: _FactorArrays, rng: np.random.Generator, grid: _Grid) -> np.ndarray:
    """The training style: a flat-coloured, anti-aliased shape."""
    scene = _scene(factors, rng, grid)
    alpha = _coverage(_shape_sdf(factors, grid) < 0)
    return _over(scene, _PALETTE[factors.colour], alpha)


def _render_outline(factors: _FactorArrays, rng: np.random.Generator, grid: _Grid) -> np.ndarray:
    """A thin, slightly wobbly contour in the shape colour; the inside shows the background."""
    scene = _scene(factors, rng, grid)
    wobble = _noise(rng, len(factors.label), 6, 2 * grid.size) * (0.35 * grid.pixel)
    half_width = 0.5 * _OUTLINE_WIDTH_PX * grid.pixel
    alpha = _coverage(np.abs(_shape_sdf(factors, grid) + wobble) < half_width)
    return _over(scene, _PALETTE[factors.colour], alpha)


def _brush_fill(factors: _FactorArrays, rng: np.random.Generator, grid: _Grid) -> np.ndarray:
    """Paint of the shape: its colour blotched with a second colour, hue noise and streaks."""
    n = len(factors.label)
    base = _PALETTE[factors.colour][:, None, None, :]
    second = _PALETTE[rng.integers(0, len(_PALETTE), n)][:, None, None, :]
    mix = np.clip(_noise(rng, n, 4, grid.size) + 0.2, 0, 1)[..., None] * 0.5  # (n, S, S, 1)
    blotches = 55 * _noise(rng, n, 6, grid.size, (3,))
    texture = 1 + 0.25 * _streaks(rng, n, grid.size)[..., None]
    return (base + (second - base) * mix + blotches) * texture


def _painterly(scene: np.ndarray, rng: np.random.Generator, grid: _Grid) -> np.ndarray:
    """Repaint a scene: a colour wash, posterized to a few tones, brush-streaked."""
    washed = 0.7 * scene + 0.3 * _colour_noise(len(scene), rng, grid)
    posterized = np.round(washed / 64) * 64
    return posterized * (1 + 0.2 * _streaks(rng, len(scene), grid.size))[..., None]


def _render_painted(factors: _FactorArrays, rng: np.random.Generator, grid: _Grid) -> np.ndarray:
    """Brush-stroke look: blotchy multi-colour paint, jagged blurred edges, painterly scene."""
    scene = _painterly(_scene(factors, rng, grid), rng, grid)
    jag = _noise(rng, len(factors.label), 10, 2 * grid.size) * (_PAINT_JAG_PX * grid.pixel)
    alpha = _box_blur(_coverage(_shape_sdf(factors, grid) + jag < 0))
    return _over(scene, _brush_fill(factors, rng, grid), alpha)


def _spotlight(factors: _FactorArrays, rng: np.random.Generator, grid: _Grid) -> np.ndarray:
    """Light intensity (B, S, S): a cone from above aimed off-centre, a hard shadow, ambient."""
    n = len(factors.label)
    centre = np.stack([2 * factors.x - 1, 2 * factors.y - 1], axis=1)  # (n, 2)
    aim = rng.uniform(0, 2 * np.pi, n)
    target = centre + (factors.size * rng.uniform(0.3, 0.6, n))[:, None] * np.stack(
        [np.cos(aim), np.sin(aim)], 1
    )
    apex = np.stack([rng.uniform(-1, 1, n), np.full(n, -1.6)], axis=1)
    beam = target - apex
    reach = np.linalg.norm(beam, axis=1)
    beam /= reach[:, None]
    half_angle = np.arctan(0.9 * factors.size / reach)
    px = grid.coarse[None, None, :] - apex[:, 0, None, None]  # (n, 1, S)
    py = grid.coarse[None, :, None] - apex[:, 1, None, None]  # (n, S, 1)
    cos_angle = (px * beam[:, 0, None, None] + py * beam[:, 1, None, None]) / np.hypot(px, py)
    inner, outer = np.cos(0.7 * half_angle)[:, None, None], np.cos(1.3 * half_angle)[:, None, None]
    cone = np.clip((cos_angle - outer) / (inner - outer), 0, 1)
    cut = rng.uniform(0, 2 * np.pi, n)
    side = np.cos(cut)[:, None, None] * (
        grid.coarse[None, None, :] - centre[:, 0, None, None]
    ) + np.sin(cut)[:, None, None] * (grid.coarse[None, :, None] - centre[:, 1, None, None])
    shadow = np.where(side > 0.1 * factors.size[:, None, None], 0.5, 1.0)
    return (0.3 + 1.4 * cone * shadow).astype(np.float32)


def _render_stage_lit(factors: _FactorArrays, rng: np.random.Generator, grid: _Grid) -> np.ndarray:
    """A dark stage: low-contrast filled scene lit by a coloured spotlight, partly in shadow."""
    image = _render_filled(factors, rng, grid)
    mean = image.mean(axis=(1, 2, 3), keepdims=True)
    image = mean + (image - mean) * 0.7
    light = _spotlight(factors, rng, grid)
    cast = _STAGE_CASTS[rng.integers(0, len(_STAGE_CASTS), len(image))]
    return image * light[..., None] * cast[:, None, None, :]


_STYLE_RENDERERS: dict[str, Callable[[_FactorArrays, np.random.Generator, _Grid], np.ndarray]] = {
    "filled": _render_filled,
    "outline": _render_outline,
    "painted": _render_painted,
    "stage_lit": _render_stage_lit,
}


def _render_batch(factors: _FactorArrays, rng: np.random.Generator, image_size: int) -> np.ndarray:
    """Render a batch, style by style: (B, S, S, 3) uint8."""
    grid = _grid(image_size)
    out = np.empty((len(factors.label), image_size, image_size, 3), np.uint8)
    for style in np.unique(factors.style):
        index = np.flatnonzero(factors.style == style)
        image = _STYLE_RENDERERS[STYLES[style]](factors.take(index), rng, grid)
        out[index] = np.clip(image + 0.5, 0, 255).astype(np.uint8)
    return out


def render(factors: Factors, rng: np.random.Generator, image_size: int) -> np.ndarray:
    """Render one image: (image_size, image_size, 3) uint8.

    `rng` draws what the factors leave open (background crop, distractor strokes, paint).
    """
    return _render_batch(_factor_arrays(factors), rng, image_size)[0]


# ---------------------------------------------------------------------------------------------
# Sampling factors per group
# ---------------------------------------------------------------------------------------------


def _indices(names: Sequence[str], vocabulary: Sequence[str]) -> np.ndarray:
    return np.array([list(vocabulary).index(name) for name in names])


def _minority_contexts(plan: WorldPlan, label: int) -> np.ndarray:
    """(m, 2) allowed (colour, background) pairs of a class outside its main contexts."""
    spec = plan.classes[label]
    colours = [c for c in COLOURS if c not in spec.held_out_colours]
    backgrounds = [b for b in BACKGROUNDS if b not in spec.held_out_backgrounds]
    pairs = [
        (list(COLOURS).index(c), BACKGROUNDS.index(b))
        for c in colours
        for b in backgrounds
        if not (c in spec.main_colours and b in spec.main_backgrounds)
    ]
    return np.array(pairs)


def _in_distribution_contexts(
    plan: WorldPlan, labels: np.ndarray, main_share: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Colour and background indices (B,): main contexts with probability main_share, else rare."""
    colours, backgrounds = np.empty(len(labels), np.int64), np.empty(len(labels), np.int64)
    is_main = rng.random(len(labels)) < main_share
    for label in range(len(plan.classes)):
        spec = plan.classes[label]
        main = np.flatnonzero((labels == label) & is_main)
        colours[main] = rng.choice(_indices(spec.main_colours, COLOURS), len(main))
        backgrounds[main] = rng.choice(_indices(spec.main_backgrounds, BACKGROUNDS), len(main))
        rare = np.flatnonzero((labels == label) & ~is_main)
        pairs = _minority_contexts(plan, label)
        chosen = pairs[rng.integers(0, len(pairs), len(rare))]  # (len(rare), 2)
        colours[rare], backgrounds[rare] = chosen[:, 0], chosen[:, 1]
    return colours, backgrounds


def _shift_contexts(
    plan: WorldPlan, kind: str, label: int, n: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Colour, background and style indices (n,) of one shift group."""
    spec = plan.classes[label]
    held_colour = kind in ("ctx-colour", "ctx-both")
    held_background = kind in ("ctx-background", "ctx-both")
    colour_pool = spec.held_out_colours if held_colour else spec.main_colours
    background_pool = spec.held_out_backgrounds if held_background else spec.main_backgrounds
    style = kind.removeprefix("style-") if kind.startswith("style-") else "filled"
    colours = rng.choice(_indices(colour_pool, COLOURS), n)
    backgrounds = rng.choice(_indices(background_pool, BACKGROUNDS), n)
    return colours, backgrounds, np.full(n, STYLES.index(style))


def _geometry(settings: WorldSettings, n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Size, centre, rotation and distractor count per image; the shape always fits inside."""
    size = rng.uniform(settings.size_min, settings.size_max, n).astype(np.float32)
    slack = (1 - size) / 2  # the centre may move this far from the middle
    return {
        "size": size,
        "x": (0.5 + rng.uniform(-1, 1, n) * slack).astype(np.float32),
        "y": (0.5 + rng.uniform(-1, 1, n) * slack).astype(np.float32),
        "rotation": rng.uniform(-settings.rotation_max, settings.rotation_max, n).astype(
            np.float32
        ),
        "n_distractors": rng.integers(0, settings.n_distractors_max + 1, n),
    }


def subset_of(group: str) -> str:
    """The `subset` column of a group: train, val, minority, context or style."""
    if group in ("train", "val", "minority"):
        return group
    return "context" if group.startswith("ctx-") else "style"


def _sample_group(plan: WorldPlan, group: str, n: int, rng: np.random.Generator) -> _FactorArrays:
    """Factors of n images of `group` (train, val, minority or a shift group id)."""
    if group in ("train", "val", "minority"):
        labels = rng.integers(0, len(plan.classes), n)
        share = 0.0 if group == "minority" else plan.settings.main_context_share
        colours, backgrounds = _in_distribution_contexts(plan, labels, share, rng)
        styles = np.zeros(n, np.int64)
    else:
        kind, _, name = group.partition(":")
        if kind not in SHIFT_KINDS or name not in plan.class_names:
            raise ConfigError(
                f"unknown group '{group}'; use train, val, minority or a shift group "
                f"such as {plan.shift_groups()[0]}"
            )
        labels = np.full(n, plan.class_names.index(name))
        colours, backgrounds, styles = _shift_contexts(plan, kind, int(labels[0]), n, rng)
    return _FactorArrays(labels, colours, backgrounds, styles, **_geometry(plan.settings, n, rng))


def _factor_table(plan: WorldPlan, group: str, factors: _FactorArrays) -> pa.Table:
    """The non-image columns of a generated batch (data.SCHEMA order, without ids)."""
    names = np.array(plan.class_names, dtype=object)
    n = len(factors.label)
    return pa.table(
        {
            "label": pa.array(factors.label, pa.int32()),
            "class_name": pa.array(names[factors.label], pa.string()),
            "group": pa.array([group] * n, pa.string()),
            "subset": pa.array([subset_of(group)] * n, pa.string()),
            "colour": pa.array(np.array(list(COLOURS), dtype=object)[factors.colour], pa.string()),
            "background": pa.array(
                np.array(BACKGROUNDS, dtype=object)[factors.background], pa.string()
            ),
            "style": pa.array(np.array(STYLES, dtype=object)[factors.style], pa.string()),
            "size": pa.array(factors.size, pa.float32()),
            "x": pa.array(factors.x, pa.float32()),
            "y": pa.array(factors.y, pa.float32()),
            "rotation": pa.array(factors.rotation, pa.float32()),
            "n_distractors": pa.array(factors.n_distractors, pa.int32()),
        }
    )


# ---------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------


def generate_group(plan: WorldPlan, group: str, n: int, seed: int, chunk: int = 0) -> ImageSet:
    """Generate n images of one group; (seed, group, chunk) fixes every pixel.

    Args:
        plan: the world plan.
        group: `train`, `val`, `minority` or a shift group id such as `style-painted:star`.
        n: number of images.
        seed: the sampling seed (write_world uses world.seed; use another for extra data).
        chunk: index of an independent chunk of the same group and seed.

    Returns:
        ImageSet (images (n, 3, S, S) uint8) whose table has every column but sample_id / image.
    """
    rng = np.random.default_rng([seed, zlib.crc32(group.encode()), chunk])
    factors = _sample_group(plan, group, n, rng)
    pixels = np.empty((n, plan.settings.image_size, plan.settings.image_size, 3), np.uint8)
    for start in range(0, n, _RENDER_BATCH):
        index = np.arange(start, min(n, start + _RENDER_BATCH))
        pixels[index] = _render_batch(factors.take(index), rng, plan.settings.image_size)
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous()  # (n, 3, S, S)
    return ImageSet(
        images,
        torch.as_tensor(factors.label, dtype=torch.int64),
        _factor_table(plan, group, factors),
    )


def generate_split(plan: WorldPlan, split: str, n: int, seed: int, chunk: int = 0) -> ImageSet:
    """Generate a split: `train`, `val`, `minority` (n images) or `shift` (n images per group).

    Extra in-distribution validation data for the sensitive-set search:
    `generate_split(plan, "val", n, seed, chunk=i)` for i = 0, 1, ...; every chunk is
    deterministic and, for a seed other than world.seed, distinct from the written val split.
    """
    if split == "shift":
        return concat_image_sets(
            [generate_group(plan, group, n, seed, chunk) for group in plan.shift_groups()]
        )
    if split not in SPLITS:
        raise ConfigError(f"unknown split '{split}'; choose one of {SPLITS}")
    return generate_group(plan, split, n, seed, chunk)


def _jobs(plan: WorldPlan) -> dict[str, list[tuple[str, int, int]]]:
    """Per split file, the (group, n, chunk) pieces write_world generates, in order."""
    settings = plan.settings

    def chunks(group: str, total: int) -> list[tuple[str, int, int]]:
        return [
            (group, min(_CHUNK, total - start), i)
            for i, start in enumerate(range(0, total, _CHUNK))
        ]

    return {
        "train": chunks("train", settings.n_train),
        "val": chunks("val", settings.n_val),
        "minority": chunks("minority", settings.n_minority_val),
        "shift": [
            job
            for group in plan.shift_groups()
            for job in chunks(group, settings.n_per_shift_group)
        ],
    }


def write_world(settings: WorldSettings, out_dir: str | Path) -> dict[str, int]:
    """Build the world: train/val/minority/shift.parquet and world.json under out_dir.

    Returns:
        Image counts per split (the shift split counted over all its groups).
    """
    out_dir = Path(out_dir)
    plan = build_plan(settings)
    jobs = _jobs(plan)
    counts = {split: sum(n for _, n, _ in pieces) for split, pieces in jobs.items()}
    started = time.perf_counter()
    with tqdm(total=sum(counts.values()), desc="world", unit="img", disable=None) as bar:
        for split, pieces in jobs.items():
            with ImageWriter(out_dir / f"{split}.parquet") as writer:
                for group, n, chunk in pieces:
                    batch = generate_group(plan, group, n, settings.seed, chunk)
                    writer.write(batch.images, batch.table)
                    bar.update(n)
    elapsed = time.perf_counter() - started
    logger.info(
        "world: %d images in %.1f s (%.0f images/s)",
        sum(counts.values()),
        elapsed,
        sum(counts.values()) / elapsed,
    )
    groups = {group: n for pieces in jobs.values() for group, n, _ in pieces}
    (out_dir / "world.json").write_text(json.dumps(_world_record(plan, counts, groups), indent=2))
    return counts


def _world_record(plan: WorldPlan, counts: dict[str, int], groups: dict[str, int]) -> dict:
    """world.json: the plan, class names, counts and factor vocabularies."""
    return {
        "class_names": plan.class_names,
        "plan": plan.to_dict(),
        "counts": counts,
        "group_counts": groups,
        "vocabulary": {
            "colours": {name: list(rgb) for name, rgb in COLOURS.items()},
            "backgrounds": list(BACKGROUNDS),
            "styles": list(STYLES),
            "shift_kinds": list(SHIFT_KINDS),
        },
        "files": {split: f"{split}.parquet" for split in SPLITS},
    }


def contact_sheet(
    images: torch.Tensor | np.ndarray,
    labels: Sequence[int],
    class_names: Sequence[str],
    columns: int = 12,
) -> bytes:
    """PNG bytes of a captioned grid of images (tensor (N, 3, H, W) or array (N, H, W, 3))."""
    pixels = (
        images.permute(0, 2, 3, 1).numpy()
        if isinstance(images, torch.Tensor)
        else np.asarray(images)
    )
    zoom = max(1, 64 // pixels.shape[1])
    tile, caption = pixels.shape[1] * zoom, 12
    rows = max(1, -(-len(pixels) // columns))
    sheet = Image.new("RGB", (columns * (tile + 2), rows * (tile + caption + 2)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for i, (image, label) in enumerate(zip(pixels, labels, strict=True)):
        left, top = (i % columns) * (tile + 2), (i // columns) * (tile + caption + 2)
        sheet.paste(
            Image.fromarray(image).resize((tile, tile), Image.Resampling.NEAREST), (left, top)
        )
        draw.text((left + 1, top + tile), str(class_names[label])[:10], fill=(0, 0, 0))
    return encode_png(np.asarray(sheet))
