"""Data versions with a real DVC repository in a temporary git repository."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from core.errors import DataError
from flows.versioning import data_version, read_version_file, version_data

pytestmark = pytest.mark.slow  # each DVC command is a subprocess of about a second


def _git(root: Path, *args: str) -> str:
    done = subprocess.run(["git", *args], cwd=root, check=True, capture_output=True, text=True)
    return done.stdout.strip()


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A fresh git repository with a data/ folder holding one flagged file."""
    root = tmp_path / "project"
    (root / "data" / "flagged").mkdir(parents=True)
    _git(root, "init", "-q")
    _git(root, "config", "user.email", "test@example.com")
    _git(root, "config", "user.name", "test")
    (root / "data" / "flagged" / "part.parquet").write_bytes(b"night one")
    return root


def test_an_earlier_version_reads_back_by_md5_and_by_git_revision(repo: Path, tmp_path: Path):
    # Given a first version, committed to git, then a second version with the file changed
    remote = tmp_path / "remote"
    first = version_data(repo / "data", remote)
    _git(repo, "add", "data.dvc", ".gitignore", ".dvc")
    _git(repo, "commit", "-q", "-m", "data v1")
    first_commit = _git(repo, "rev-parse", "HEAD")
    (repo / "data" / "flagged" / "part.parquet").write_bytes(b"night two")
    second = version_data(repo / "data", remote)

    # When reading the file at each version
    by_md5 = read_version_file(repo / "data", "flagged/part.parquet", version=first)
    by_rev = read_version_file(repo / "data", "flagged/part.parquet", rev=first_commit)
    latest = read_version_file(repo / "data", "flagged/part.parquet", version=second)

    # Then the versions differ, data.dvc names the latest, and each read gives its own bytes
    assert first != second
    assert data_version(repo / "data.dvc") == second
    assert (by_md5, by_rev, latest) == (b"night one", b"night one", b"night two")


def test_a_pushed_version_reads_back_from_the_remote_alone(repo: Path, tmp_path: Path):
    # Given a pushed version whose local cache is then lost
    version = version_data(repo / "data", tmp_path / "remote")
    subprocess.run(["rm", "-rf", str(repo / ".dvc" / "cache")], check=True)

    # When reading by md5; then the remote serves it
    assert read_version_file(repo / "data", "flagged/part.parquet", version=version) == b"night one"


def test_unknown_file_or_ambiguous_request_fails_clearly(repo: Path, tmp_path: Path):
    version = version_data(repo / "data", tmp_path / "remote")
    with pytest.raises(DataError, match="not in data version"):
        read_version_file(repo / "data", "flagged/absent.parquet", version=version)
    with pytest.raises(DataError, match="exactly one"):
        read_version_file(repo / "data", "flagged/part.parquet")
