"""Typed, frozen settings loaded from `params.yaml`, the one settings file of retouch.

Every section is a frozen pydantic model with `extra="forbid"`, so a typo in the file or in a
`--set section.key=value` override fails at load time with the offending key named.
Functions take the section they need, never the whole file.
"""

from __future__ import annotations

from datetime import date
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from core.errors import ConfigError


class Section(BaseModel):
    """Base of every settings section: immutable, strict about unknown keys."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class PathSettings(Section):
    """Where retouch reads and writes; relative paths resolve against the project root."""

    artifacts: Path = Path("artifacts")  # built world, base model, benchmark data, hypernet
    data: Path = Path("data")  # production flags (inbox, flagged, quarantine); tracked by data.dvc
    mlruns: Path = Path("mlruns")  # MLflow SQLite store and artifacts
    monitoring: Path = Path("monitoring/out")  # reports and dashboards
    # production state: edit ledger, candidates, cluster catalogue, lock
    state: Path = Path("state")
    # Outside the repo so a clone never carries it; any writable folder works offline.
    dvc_remote: Path = Path("~/.cache/retouch/dvc-remote")


class WorldSettings(Section):
    """The procedural shift world (see core/world.py for what each factor means)."""

    seed: int = 0
    image_size: int = Field(32, ge=16)
    n_classes: int = Field(10, ge=2, le=12)
    n_train: int = Field(30_000, ge=10)
    n_val: int = Field(5_000, ge=10)  # in-distribution validation, for accuracy
    n_minority_val: int = Field(2_000, ge=0)  # rare-but-present contexts, for the shortcut check
    # Share of training images in a class's main contexts (2 colours x 2 backgrounds); the rest
    # spread over the other allowed contexts. Below 1 so the model must learn shapes.
    main_context_share: float = Field(0.35, gt=0, le=1)
    n_per_shift_group: int = Field(300, ge=1)  # images per shift group in the shift pool
    n_distractors_max: int = Field(2, ge=0)
    # Shape diameter as a share of the image side: large enough to read the shape at 16 px.
    size_min: float = Field(0.55, gt=0, le=1)
    size_max: float = Field(0.8, gt=0, le=1)
    # Rotation range in degrees (+-); kept small so a rotated square never becomes a diamond.
    rotation_max: float = Field(25.0, ge=0, le=45)


class ModelSettings(Section):
    """The base model: any timm model name plus architecture overrides."""

    name: str = "vit_tiny_patch16_224"  # a timm model name; the overrides below resize it
    img_size: int = 32
    patch_size: int | None = 8
    embed_dim: int | None = 96
    depth: int | None = 4
    num_heads: int | None = 4
    mlp_ratio: float | None = 4.0
    weights: Path | None = None  # local safetensors / timm checkpoint; None = random init
    pretrained_from_hub: bool = False  # only works online


class TrainSettings(Section):
    """Base-model training (core/train.py)."""

    seed: int = 0
    # 360k samples of the 0.35-share world: 96.9 % in distribution, 95.5 % minority, inside the
    # 8-minute build (bench/build_budget.py, README); 10 epochs at a 0.65 share missed both bars.
    epochs: int = Field(12, ge=1)
    batch_size: int = Field(128, ge=1)
    lr: float = Field(2e-3, gt=0)
    weight_decay: float = Field(0.05, ge=0)
    warmup_epochs: float = Field(1.0, ge=0)
    label_smoothing: float = Field(0.1, ge=0, lt=1)
    max_shift: int = Field(2, ge=0)  # augmentation: random translation, in input pixels
    num_threads: int = Field(2, ge=1)


class BenchmarkDataSettings(Section):
    """Failure groups and locality sets, following method.md section 1."""

    seed: int = 1
    sensitive_margin: float = Field(0.05, gt=0, lt=1)  # top1 - top2 below this is "sensitive"
    min_sensitive: int = Field(300, ge=1)
    max_sensitive_pool: int = Field(400_000, ge=1)  # give up generating after this many images
    sensitive_pool_chunk: int = Field(20_000, ge=1)
    n_broad: int = Field(2_000, ge=1)  # broad random clean sample for locality
    min_group_failures: int = Field(30, ge=1)


class ScopeSettings(Section):
    """Which FFN blocks may be edited; a window of consecutive block indices."""

    blocks: tuple[int, ...] = (1, 2, 3)


class HypernetSettings(Section):
    """The mask hypernetwork (method.md section 3)."""

    n_layers: int = Field(3, ge=1)
    n_heads: int = Field(4, ge=1)
    mask_temperature: float = 3.0  # sigmoid(t * x)
    clamp: float = Field(1e-3, gt=0, lt=0.5)
    # Extension (c), off by default: "grad" also feeds the edit sample's per-unit gradient
    # magnitudes to the query tokens, so the locator can learn to refine one-gradient saliency.
    # Extension (d), with "grad": "clean" also divides that saliency by each unit's importance
    # on clean images (core.hypernet.clean_unit_importance) to the learned power below.
    inputs: tuple[Literal["cls", "grad", "clean"], ...] = ("cls",)
    clean_exponent: float = Field(0.5, ge=0)  # start of the learned power; README: locator study
    clean_images: int = Field(512, ge=1)  # clean images the importance is measured on


class MetatrainSettings(Section):
    """Decoupled bi-level meta-training of the hypernetwork (method.md section 3)."""

    seed: int = 0
    iterations: int = Field(400, ge=1)  # about 12 min on one core here (findings: 1.45 s each)
    batch_size: int = Field(8, ge=1)
    inner_steps: int = Field(5, ge=1)
    inner_lr: float = Field(0.1, gt=0)  # 1e-3 (ViT-B) barely moves a small model: findings.md
    outer_steps: int = Field(10, ge=1)
    outer_lr: float = Field(0.1, gt=0)
    sparsity_weight: float = Field(1.0, ge=0)
    # Free mask logits start as U[-r, r]; r = 1 is the paper's. At a short budget the random
    # start dominates the targets (findings in README), r = 0 makes them a function of x.
    initial_logit_range: float = Field(1.0, ge=0)
    logit_scale: float = 10.0  # soft mask during the outer loop: sigmoid(scale * z)
    target_scale: float = 3.0  # distillation target: sigmoid(scale * z)
    distill_steps: int = Field(4, ge=1)
    distill_lr: float = Field(1e-4, gt=0)
    distill_weight: float = Field(0.1, gt=0)
    temperature: float = Field(5.0, gt=0)
    cutmix_min: float = Field(0.2, gt=0, le=1)  # pasted rectangle side, share of the token grid
    cutmix_max: float = Field(0.6, gt=0, le=1)
    # cutmix is the paper's; recolour, style and background are extension (b) (core/metatrain.py)
    pseudo_failures: tuple[str, ...] = ("cutmix",)
    checkpoint_every: int = Field(50, ge=1)
    # Extension, beyond the paper (0 = faithful): the outer objective also scores each sample's
    # edit on a sibling (same corruption, another clean image) and on a clean replay image.
    sibling_weight: float = Field(0.0, ge=0)
    replay_weight: float = Field(0.0, ge=0)
    # Target bank: the decoupled targets never depend on the hypernetwork, so after the last
    # iteration the distillation can take extra passes over all of them (0 = online steps only).
    bank_epochs: int = Field(0, ge=0)
    bank_lr: float = Field(1e-3, gt=0)
    bank_batch_size: int = Field(64, ge=1)
    bank_holdout: float = Field(0.1, ge=0, lt=1)  # share kept out to report held-out BCE


class EditSettings(Section):
    """Test-time editing (method.md section 4) and its production extensions."""

    rho: float = Field(0.9, ge=0, lt=1)  # sparsity: share of mask entries NOT edited
    lr: float = Field(1e-3, gt=0)
    max_steps: int = Field(100, ge=1)
    ce_stop: float = Field(0.01, gt=0)
    seed: int = 0
    locality_weight: float = Field(0.0, ge=0)  # extension: KL on a replay batch of clean images
    replay_size: int = Field(64, ge=0)
    # Replay images per fine-tuning step, drawn afresh each step (0 = the whole batch each step):
    # a large replay batch covers more of the clean data at the per-step cost of a small one.
    replay_batch_size: int = Field(0, ge=0)
    # Weight of CE on earlier edits' samples (EditBatch.retain_*), kept apart from the locality
    # term so retained samples do not dilute the clean images' share of its KL mean.
    retention_weight: float = Field(0.0, ge=0)
    # Retained samples per step, drawn afresh (0 = all): a night's cost stays flat as edits pile up.
    retention_batch_size: int = Field(0, ge=0)
    # c of FT-L1 (c * |W - W0|_1) and FT-L2 (c / 2 * |W - W0|^2); method.md sweeps 0.1 .. 0.001, 0.
    penalty_weight: float = Field(0.01, ge=0)
    lora_rank: int = Field(4, ge=1)  # LoRA baseline on attention qkv of every block
    lora_alpha: float = Field(4.0, gt=0)  # LoRA delta = (alpha / rank) * B @ A


class EditBenchmarkSettings(Section):
    """The editing benchmark and scope search (core/evaluation.py, flows/benchmark.py).

    The default run subsamples edits and locality sets to finish in about 15 minutes on two
    cores; `--full` lifts the caps and runs `n_cases_full` edits per method and level.
    """

    seed: int = 0
    methods: tuple[str, ...] = ("hprd", "random", "saliency", "ft", "ft-l1", "ft-l2", "lora")
    rhos: tuple[float, ...] = (0.25, 0.5, 0.75, 0.9, 0.95)  # mask methods' sparsity levels
    # FT-L1 / FT-L2 weight c, method.md section 5.
    penalty_weights: tuple[float, ...] = (0.1, 0.05, 0.025, 0.01, 0.005, 0.001, 0.0)
    group_sizes: tuple[int, ...] = (1, 2, 3)  # samples per edit; k > 1 for mask methods only
    # Edit learning rates swept on separate edits; the main grid runs every method at the best.
    lrs: tuple[float, ...] = (3e-4, 1e-3, 3e-3)
    sweep_rho: float = Field(0.9, ge=0, lt=1)
    sweep_methods: tuple[str, ...] = ("hprd", "random", "saliency", "ft")
    n_sweep_cases: int = Field(4, ge=1)
    min_sweep_reliability: float = Field(0.9, ge=0, le=1)  # an lr must fix this share of edits
    n_cases: int = Field(8, ge=1)  # edits per method and level, default run (paired)
    n_cases_full: int = Field(48, ge=1)  # findings.md: standard errors of 1-2 points at 32-50
    # Edits drawn from each chosen group: at least 2, so mask IoU within a group is measurable.
    cases_per_group: int = Field(2, ge=1)
    max_sensitive: int = Field(300, ge=1)  # default run's caps on the locality sets
    max_broad: int = Field(500, ge=1)
    max_group_failures: int = Field(100, ge=2)  # default run's cap on the failures kept per group
    iou_rho: float = Field(0.95, ge=0, lt=1)  # mask localization diagnostics at this rho
    eval_batch_size: int = Field(256, ge=1)
    num_threads: int = Field(2, ge=1)
    experiment: str = "retouch-benchmark"  # MLflow experiment, when a tracking URI is set
    # Scope search (method.md section 2): windows of `scope_width` consecutive blocks.
    scope_width: int = Field(3, ge=1)
    scope_n_groups: int = Field(4, ge=1)
    scope_cases_per_group: int = Field(3, ge=1)

    @model_validator(mode="after")
    def _check_levels(self) -> EditBenchmarkSettings:
        if self.iou_rho not in self.rhos:
            raise ValueError(f"edit_benchmark.iou_rho={self.iou_rho} must be one of rhos")
        if not self.group_sizes or min(self.group_sizes) < 1:
            raise ValueError("edit_benchmark.group_sizes must hold sizes >= 1")
        return self


class ClusterSettings(Section):
    """Failure clustering (core/clusters.py)."""

    distance_threshold: float = Field(0.8, gt=0)
    min_cluster_size: int = Field(5, ge=1)
    n_edit_samples: int = Field(3, ge=1)
    match_threshold: float = Field(
        0.5, gt=0
    )  # centroid distance under which a cluster keeps its id
    # "average" on unit vectors: the threshold bounds the mean pairwise distance inside a cluster.
    linkage: Literal["average", "complete", "single"] = "average"


class SimulateSettings(Section):
    """The production simulator (core/simulate.py)."""

    seed: int = 0
    images_per_day: int = Field(3_000, ge=1)
    shift_share: float = Field(0.5, ge=0, le=1)
    bad_rows: bool = False
    start_date: date = date(2026, 1, 5)  # the first simulated day's inbox partition
    n_shift_groups_first_day: int = Field(4, ge=1)  # failure causes live on day one
    new_shift_groups_per_day: int = Field(1, ge=0)  # failure causes that appear each later day
    # Dirichlet concentration of each day's mix over live shift groups: low = a few dominate.
    mix_concentration: float = Field(1.0, gt=0)
    batch_size: int = Field(256, ge=1)  # inference batch of the served model


class IngestSettings(Section):
    """Flag ingestion and validation (flows/ingest.py, flows/validation.py)."""

    min_image_side: int = Field(2, ge=1)  # narrower images are degenerate: nothing to preprocess
    future_tolerance_s: float = Field(300.0, ge=0)  # clock skew allowed on flagged_at
    batch_size: int = Field(256, ge=1)  # inference batch for the still-wrong check and features


class GateSettings(Section):
    """Promotion gates; thresholds calibrated from the editing benchmark (README)."""

    cluster_min_locality: float = Field(0.95, ge=0, le=1)
    min_broad_locality_vs_base: float = Field(0.9, ge=0, le=1)
    min_broad_locality_vs_champion: float = Field(0.95, ge=0, le=1)
    min_sensitive_locality_vs_base: float = Field(0.3, ge=0, le=1)
    min_sensitive_locality_vs_champion: float = Field(0.4, ge=0, le=1)
    max_accuracy_drop: float = Field(0.01, ge=0, le=1)
    min_retention: float = Field(0.95, ge=0, le=1)
    # One-sided confidence of the Wilson lower bound that locality figures are gated on (so a
    # small set cannot pass by luck); null gates the point estimates.
    locality_confidence: float | None = Field(0.95, gt=0.5, lt=1)


class RegistrySettings(Section):
    """MLflow tracking and the model registry."""

    experiment: str = "retouch"
    model_name: str = "retouch-vit"
    serve_batch_size: int = Field(64, ge=1)  # images per forward pass of the served pyfunc model


class NightlySettings(Section):
    """The nightly continual-editing flow (flows/nightly.py)."""

    # Fine-tuning steps of a cluster's first try (the paper's edit.max_steps is 100): with the
    # base-anchored replay, 60 keep as much clean accuracy at 60 % of the cost (README).
    max_steps: int = Field(60, ge=1)
    # A cluster whose edit fails its gate is retried once with more units and more steps.
    fallback_rho: float = Field(0.8, ge=0, lt=1)
    fallback_max_steps: int = Field(200, ge=1)
    # How long a second nightly run waits for the edit lock before FlowLockedError; 0 = exit now.
    lock_timeout_s: float = Field(0.0, ge=0)
    lock_poll_s: float = Field(1.0, gt=0)  # how often a waiting run retries the lock
    inference_batch_size: int = Field(256, ge=1)  # reference predictions, gates, retention
    # Training images scored to pick the locality term's replay batch (lowest margins first).
    replay_pool: int = Field(30_000, ge=1)
    # Retention: each earlier accepted edit lends this many of its samples to every later edit,
    # which keeps them right with weight `edit.retention_weight` (0 = no retention term). 3 =
    # every edit sample of a cluster (clusters.n_edit_samples), all of which the gate checks.
    retention_replay_per_edit: int = Field(3, ge=0)
    # Torch threads of a night (and of its rerun): another count sums floats in another order,
    # so the candidate's weights hash, and even which try of a cluster passes, would change.
    num_threads: int = Field(2, ge=1)


class MonitoringSettings(Section):
    """The monitoring dashboard (monitoring/dashboard.py): what it flags and how much it shows."""

    after_night: bool = True  # the nightly flow rebuilds the dashboard after each night
    # A gate figure within this distance of its threshold is "nearly crossed" (attention list).
    near_margin: float = Field(0.02, ge=0, le=1)
    max_rejections: int = Field(2, ge=1)  # a cluster rejected this often needs a person
    # Champion's relative weight change vs the base model (which the hypernetwork was meta-trained
    # on), ||W_champion - W_base|| / ||W_base|| over the edit scope, past which masks may misfire.
    max_locator_drift: float = Field(0.05, ge=0)
    drift_reference_size: int = Field(512, ge=16)  # training images: the feature reference
    drift_alpha: float = Field(0.01, gt=0, lt=1)  # significance drawn on the drift plot
    thumbnails_per_cluster: int = Field(8, ge=1)
    # Waiting clusters of the latest night listed on the dashboard, largest first; the rest are
    # counted (a 1,000-flag night holds hundreds, each with thumbnails).
    waiting_clusters_listed: int = Field(20, ge=0)


class Settings(Section):
    """All of params.yaml."""

    seed: int = 0
    paths: PathSettings = PathSettings()
    world: WorldSettings = WorldSettings()
    model: ModelSettings = ModelSettings()
    train: TrainSettings = TrainSettings()
    benchmark_data: BenchmarkDataSettings = BenchmarkDataSettings()
    scope: ScopeSettings = ScopeSettings()
    hypernet: HypernetSettings = HypernetSettings()
    metatrain: MetatrainSettings = MetatrainSettings()
    edit: EditSettings = EditSettings()
    edit_benchmark: EditBenchmarkSettings = EditBenchmarkSettings()
    clusters: ClusterSettings = ClusterSettings()
    simulate: SimulateSettings = SimulateSettings()
    ingest: IngestSettings = IngestSettings()
    gate: GateSettings = GateSettings()
    registry: RegistrySettings = RegistrySettings()
    nightly: NightlySettings = NightlySettings()
    monitoring: MonitoringSettings = MonitoringSettings()
    profile: Literal["default", "quick", "micro"] = "default"

    @model_validator(mode="after")
    def _check_cutmix(self) -> Settings:
        if self.metatrain.cutmix_min > self.metatrain.cutmix_max:
            raise ValueError("metatrain.cutmix_min must not exceed metatrain.cutmix_max")
        return self

    @model_validator(mode="after")
    def _check_scope_fits_depth(self) -> Settings:
        depth = self.model.depth
        if depth is not None and self.scope.blocks and max(self.scope.blocks) >= depth:
            raise ValueError(
                f"scope.blocks {list(self.scope.blocks)} reach past model.depth {depth}; pick a "
                "window inside 0..depth-1 (`retouch scope-search` recommends one)"
            )
        return self


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {dotted}: '{key}' is a value, not a section")
        node = child
    node[keys[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """Split `section.key=value` into the dotted key and a YAML-parsed value."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like section.key=value")
    key, raw = text.split("=", 1)
    return key.strip(), yaml.safe_load(raw)


def load_settings(path: str | Path | None = "params.yaml", overrides: list[str] = ()) -> Settings:
    """Load params.yaml (or defaults when path is None), apply `section.key=value` overrides.

    Raises:
        ConfigError: the file is missing or unreadable, or a key or value is invalid.
    """
    tree: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(
                f"settings file {path} not found; run from the project root or pass --params"
            )
        try:
            tree = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path} is not valid YAML: {exc}") from exc
    for text in overrides:
        _set_dotted(tree, *parse_override(text))
    try:
        return Settings.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(f"invalid settings ({path or 'defaults'}):\n{exc}") from exc


def settings_dict(settings: Settings) -> dict[str, Any]:
    """JSON-ready form of the settings, for run logs and model cards."""
    return settings.model_dump(mode="json")
