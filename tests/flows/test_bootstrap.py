"""The embedded default's build: `dvc repro` of a micro pipeline in a temp git repo."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import MICRO_OVERRIDES

PROJECT = Path(__file__).resolve().parents[2]


def micro_params() -> dict:
    """The project's params.yaml with the micro overrides applied (every stage finds its keys)."""
    tree = yaml.safe_load((PROJECT / "params.yaml").read_text())
    for override in MICRO_OVERRIDES:
        key, value = override.split("=", 1)
        *sections, leaf = key.split(".")
        node = tree
        for section in sections:
            node = node.setdefault(section, {})
        node[leaf] = yaml.safe_load(value)
    return tree


def run(command: list[str], cwd: Path) -> str:
    """Run a command with the test interpreter's scripts first on PATH; return its output."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout + done.stderr


@pytest.fixture(scope="module")
def micro_repo(tmp_path_factory) -> Path:
    """A git + DVC repo holding the project's dvc.yaml, its code deps and micro params."""
    repo = tmp_path_factory.mktemp("repo")
    shutil.copy(PROJECT / "dvc.yaml", repo / "dvc.yaml")
    shutil.copytree(PROJECT / "core", repo / "core", ignore=shutil.ignore_patterns("__pycache__"))
    (repo / "params.yaml").write_text(yaml.safe_dump(micro_params()))
    run(["git", "init", "-q"], repo)
    run([sys.executable, "-m", "dvc", "init", "-q"], repo)
    return repo


@pytest.mark.slow
def test_dvc_repro_builds_the_micro_default_then_does_nothing(micro_repo: Path):
    # Given a fresh repo, when the pipeline is reproduced
    run([sys.executable, "-m", "dvc", "repro"], micro_repo)
    # then every stage's output exists and the benchmark summary names its sizes
    summary = json.loads((micro_repo / "artifacts/benchmark/summary.json").read_text())
    assert summary["n_broad"] == 64
    assert summary["n_sensitive"] >= 1
    assert (micro_repo / "artifacts/base/model_card.json").is_file()
    assert (micro_repo / "artifacts/hypernet/hypernet.safetensors").is_file()
    # and each training step left its record (DVC metrics) beside its model
    training = json.loads((micro_repo / "artifacts/base/training.json").read_text())
    metatraining = json.loads((micro_repo / "artifacts/hypernet/metatrain.json").read_text())
    assert training["n_steps"] > 0
    assert metatraining["iterations"] > 0
    # and a second repro finds nothing to do
    second = run([sys.executable, "-m", "dvc", "repro"], micro_repo)
    assert "didn't change, skipping" in second
    assert "Running stage" not in second


@pytest.mark.slow
def test_retraining_the_same_base_model_reruns_nothing_downstream(micro_repo: Path):
    # Given a built pipeline, when the base stage is forced to train again
    lock_before = yaml.safe_load((micro_repo / "dvc.lock").read_text())["stages"]
    forced = run(
        [sys.executable, "-m", "dvc", "repro", "--force", "--single-item", "base"], micro_repo
    )
    assert "Running stage 'base'" in forced
    # then the same weights give byte-identical model files (the timing lives in training.json)
    lock_after = yaml.safe_load((micro_repo / "dvc.lock").read_text())["stages"]
    model_files = {"artifacts/base/model.safetensors", "artifacts/base/model_card.json"}
    outs_before, outs_after = (
        [out for out in lock["base"]["outs"] if out["path"] in model_files]
        for lock in (lock_before, lock_after)
    )
    assert len(outs_after) == 2
    assert outs_after == outs_before
    # and nothing downstream reruns
    output = run([sys.executable, "-m", "dvc", "repro"], micro_repo)
    assert "Running stage" not in output


@pytest.mark.slow
def test_changing_a_stage_param_reruns_only_that_stage_and_later(micro_repo: Path):
    # Given a built pipeline, when a benchmark-only setting changes
    params = yaml.safe_load((micro_repo / "params.yaml").read_text())
    params["benchmark_data"]["n_broad"] = 32
    (micro_repo / "params.yaml").write_text(yaml.safe_dump(params))
    output = run([sys.executable, "-m", "dvc", "repro"], micro_repo)
    # then the world and base stages are skipped and the benchmark reruns
    assert "Running stage 'benchmark'" in output
    assert "Running stage 'world'" not in output
    assert "Running stage 'base'" not in output
    summary = json.loads((micro_repo / "artifacts/benchmark/summary.json").read_text())
    assert summary["n_broad"] == 32
