"""`retouch benchmark` / `scope-search` on micro artifacts: outputs, restore, MLflow logging."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from core.data import write_images
from core.errors import ModelError
from core.hypernet import build_hypernet, save_hypernet
from core.model import (
    ModelCard,
    Preprocessing,
    model_create_kwargs,
    preprocess,
    save_model,
    weights_hash,
)
from core.scope import build_scope
from core.settings import Settings
from flows.benchmark import run_benchmark, run_scope_search
from flows.bootstrap import HALF, base_dir, benchmark_dir, hypernet_path

N_CLASSES = 4
GROUPS = {"ctx-a": "context", "ctx-b": "context", "style-a": "style", "style-b": "style"}
FAST = [
    "edit_benchmark.methods=[random,saliency,ft,ft-l2,lora]",
    "edit_benchmark.rhos=[0.5,0.95]",
    "edit_benchmark.penalty_weights=[0.01]",
    "edit_benchmark.group_sizes=[1,2]",
    "edit_benchmark.lrs=[0.001,0.01]",
    "edit_benchmark.n_cases=4",
    "edit_benchmark.n_sweep_cases=2",
    "edit_benchmark.num_threads=1",
    "edit_benchmark.scope_n_groups=2",
    "edit_benchmark.scope_cases_per_group=1",
    "edit.max_steps=5",
]


def uint8_images(n: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, 16, 16), generator=generator, dtype=torch.uint8)


@pytest.fixture
def settings(tmp_path: Path, micro_settings_factory, micro_vit) -> Settings:
    """Micro settings with a saved base model and hand-made benchmark data on disk."""
    settings = micro_settings_factory(tmp_path, FAST)
    model = micro_vit(head_std=0.3)
    preprocessing = Preprocessing(16, HALF, HALF, "bilinear")
    card = ModelCard(
        name=settings.model.name,
        create_kwargs=model_create_kwargs(settings.model, N_CLASSES),
        class_names=tuple(f"c{i}" for i in range(N_CLASSES)),
        preprocessing=preprocessing,
    )
    save_model(model, card, base_dir(settings))
    folder = benchmark_dir(settings)
    images = uint8_images(6 * len(GROUPS), seed=1)
    with torch.no_grad():
        predictions = model(preprocess(images, preprocessing)).argmax(1)
    write_images(
        folder / "failures.parquet",
        images,
        {
            "label": ((predictions + 1) % N_CLASSES).tolist(),  # every row a real failure
            "group": [group for group in GROUPS for _ in range(6)],
            "subset": [subset for subset in GROUPS.values() for _ in range(6)],
            "base_prediction": predictions.tolist(),
        },
    )
    for name, seed in (("sensitive", 2), ("broad", 3)):
        write_images(folder / f"{name}.parquet", uint8_images(10, seed), {"label": [0, 1] * 5})
    return settings


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open() as handle:
        return list(csv.DictReader(handle))


def test_benchmark_writes_every_output_and_leaves_the_model_alone(settings, tmp_path):
    # when the benchmark runs without hprd
    out = run_benchmark(settings, methods=None, out_dir=tmp_path / "out")
    # then every edit has a row with the protocol's columns
    edits = read_csv(out / "edits.csv")
    assert {"method", "level", "k", "group", "subset", "edit_ids", "reliability"} <= set(edits[0])
    assert {"generalization", "locality_sensitive", "locality_broad", "accuracy"} <= set(edits[0])
    assert {"steps", "edit_seconds", "eval_seconds"} <= set(edits[0])
    # 2 mask methods x 2 rhos x 2 k + ft + ft-l2 + lora = 11 levels, 4 cases each
    assert len(edits) == 11 * 4
    # paired: every level edited the same samples
    by_level: dict[tuple, list] = {}
    for row in edits:
        if row["k"] == "1":
            by_level.setdefault((row["method"], row["level"]), []).append(row["edit_ids"])
    assert len({tuple(ids) for ids in by_level.values()}) == 1
    facts = json.loads((out / "summary.json").read_text())
    assert facts["model_restored"] is True
    assert facts["chosen_lr"] in (0.001, 0.01)
    assert {row["subset"] for row in read_csv(out / "summary.csv")} == {"all", "context", "style"}
    assert {row["metric"] for row in read_csv(out / "paired.csv")} >= {"generalization"}
    assert {row["method"] for row in read_csv(out / "masks.csv")} == {"random", "saliency"}
    assert (out / "tradeoff.png").stat().st_size > 10_000
    assert "Paired differences" in (out / "report.md").read_text()


def test_benchmark_logs_params_metrics_and_artifacts_to_mlflow(settings, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    (tmp_path / "mlruns").mkdir()
    run_benchmark(settings, methods=["random", "ft"], out_dir=tmp_path / "out", tracking_uri=uri)
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(settings.edit_benchmark.experiment)
    [run] = client.search_runs([experiment.experiment_id])
    assert run.data.params["edit_benchmark.rhos"] == "[0.5, 0.95]"
    assert "chosen_lr" in run.data.metrics
    assert "generalization/random/0.95/k2" in run.data.metrics
    artifacts = {item.path for item in client.list_artifacts(run.info.run_id)}
    assert {"edits.csv", "tradeoff.png", "report.md"} <= artifacts


def test_hprd_without_a_hypernetwork_names_metatrain(settings, tmp_path):
    with pytest.raises(ModelError, match="retouch metatrain"):
        run_benchmark(settings, methods=["hprd", "random"], out_dir=tmp_path / "out")


def test_hprd_is_paired_against_random_when_its_checkpoint_exists(settings, tmp_path):
    from core.model import load_saved_model

    model, _ = load_saved_model(base_dir(settings))
    scope = build_scope(model, settings.scope.blocks)
    hypernet = build_hypernet(model, scope, settings.hypernet, seed=0)
    save_hypernet(
        hypernet_path(settings), hypernet, weights_hash(model), scope, settings.hypernet, {}
    )
    out = run_benchmark(settings, methods=["hprd", "random"], out_dir=tmp_path / "out")
    pairs = {(row["first"], row["second"]) for row in read_csv(out / "paired.csv")}
    assert pairs == {("hprd", "random")}


def test_scope_search_recommends_an_ffn_window(settings, tmp_path):
    out = run_scope_search(settings, out_dir=tmp_path / "scope")
    recommended = json.loads((out / "scope_search.json").read_text())["recommended"]
    assert recommended["blocks"] in ([0, 1, 2], [1, 2, 3])
    methods = {row["method"] for row in read_csv(out / "scope_search.csv")}
    assert methods == {"ft", "attention-ft"}
