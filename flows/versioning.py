"""Data versions: `data/` tracked as one DVC output, pushed to a local remote after each ingest.

The data version is the md5 of the `.dir` object in `data.dvc`: it names the whole folder (inbox,
flagged, quarantine, clusters) at one moment, and an edit records it. Any file of an earlier
version reads back by that md5 (from the local cache, else the remote) or by a git revision of
`data.dvc` (`dvc.api.read`). The repository root is the folder that holds `data/`; it is a git
repository in production, and `dvc init --no-scm` is used where there is none.

DVC is driven through its CLI (`python -m dvc`, the interpreter running retouch) for writes and its
Python API for reads.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import yaml

from core.errors import DataError

log = logging.getLogger(__name__)


class DvcCommandError(DataError):
    """A `dvc` command failed; the message carries its stderr."""


def _dvc(args: list[str], root: Path) -> str:
    """Run `dvc ARGS` in `root` (analytics off) and return stdout; raise DvcCommandError."""
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "dvc", *args], cwd=root, env=env, capture_output=True, text=True
    )
    if done.returncode != 0:
        raise DvcCommandError(
            f"`dvc {' '.join(args)}` failed in {root} (exit {done.returncode}): "
            f"{done.stderr.strip() or done.stdout.strip()}"
        )
    return done.stdout


def ensure_dvc_repo(root: Path, remote: Path) -> None:
    """Initialise DVC in `root` if needed and make `remote` (a folder) its default remote.

    The remote goes to `.dvc/config.local` (not committed): it is a path on this machine.
    """
    if not (root / ".dvc").is_dir():
        _dvc(["init", "-q"] if (root / ".git").exists() else ["init", "-q", "--no-scm"], root)
    remote = remote.expanduser().resolve()
    remote.mkdir(parents=True, exist_ok=True)
    _dvc(["remote", "add", "--local", "--default", "--force", "local", str(remote)], root)


def data_version(dvc_file: Path) -> str:
    """The md5 of the tracked folder in a `.dvc` file (without DVC's `.dir` suffix).

    Raises:
        DataError: the file is missing or does not track one output.
    """
    if not dvc_file.is_file():
        raise DataError(f"{dvc_file} not found; run an ingest (it runs `dvc add`) first")
    outs = (yaml.safe_load(dvc_file.read_text()) or {}).get("outs") or []
    if len(outs) != 1 or "md5" not in outs[0]:
        raise DataError(f"{dvc_file} must track exactly one output with an md5; re-run `dvc add`")
    return outs[0]["md5"].removesuffix(".dir")


def version_data(data_dir: Path, remote: Path) -> str:
    """`dvc add` the data folder, push it to `remote`, and return the new data version (md5).

    The `.dvc` file is written beside the folder (`data.dvc` for `data/`); committing it to git is
    the caller's choice (a git revision then also names the version).
    """
    data_dir = data_dir.resolve()
    root = data_dir.parent
    ensure_dvc_repo(root, remote)
    _dvc(["add", "-q", data_dir.name], root)
    dvc_file = root / f"{data_dir.name}.dvc"
    _dvc(["push", "-q", dvc_file.name], root)
    version = data_version(dvc_file)
    log.info("data version %s pushed to %s", version, remote)
    return version


def _object_path(root: Path, md5: str) -> Path:
    """Where the object `md5` lies: the local cache, else the default remote (a local folder)."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        cached = Path(repo.cache.local.oid_to_path(md5))
        if cached.is_file():
            return cached
        remote = Path(repo.cloud.get_remote_odb().oid_to_path(md5))
    if not remote.is_file():
        raise DataError(
            f"data object {md5} is in neither the DVC cache of {root} nor its remote; "
            "check the version id, or `dvc pull` from the remote that holds it"
        )
    return remote


def read_version_file(
    data_dir: Path, relpath: str, *, version: str | None = None, rev: str | None = None
) -> bytes:
    """Bytes of `data_dir/relpath` as it was in an earlier data version.

    Args:
        data_dir: the tracked folder (its parent is the repository root).
        relpath: the file's path inside the folder, e.g. "flagged/date=2026-01-05/part.parquet".
        version: a data version (md5) returned by `version_data`; or
        rev: a git revision whose `data.dvc` names the version.

    Raises:
        DataError: neither or both of version and rev given, or the file is not in that version.
    """
    if (version is None) == (rev is None):
        raise DataError("read_version_file needs exactly one of version (md5) or rev (git)")
    data_dir = data_dir.resolve()
    root = data_dir.parent
    if rev is not None:
        import dvc.api

        return dvc.api.read(f"{data_dir.name}/{relpath}", repo=str(root), rev=rev, mode="rb")
    listing = json.loads(_object_path(root, f"{version}.dir").read_text())
    entry = next((item for item in listing if item["relpath"] == relpath), None)
    if entry is None:
        raise DataError(f"{relpath} is not in data version {version} of {data_dir}")
    return _object_path(root, entry["md5"]).read_bytes()
