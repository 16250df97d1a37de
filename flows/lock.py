"""The edit lock (one process edits the production state at once) and when a busy store retries.

The edit lock guards the ledger and registry aliases: an exclusive `fcntl.flock` on
`<state>/edit.lock`. The kernel drops it when the holding process dies, so a crashed night never
leaves a stale lock behind; the file's text (pid, start time, what holds it) is only there to
name the holder in the error message.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

from core.errors import FlowLockedError

logger = logging.getLogger(__name__)

LOCK_NAME = "edit.lock"


def lock_path(state_dir: Path) -> Path:
    """Where the edit lock of a production state folder lives."""
    return Path(state_dir) / LOCK_NAME


def _try_lock(descriptor: int) -> bool:
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


@contextmanager
def edit_lock(
    path: Path, purpose: str, timeout_s: float = 0.0, poll_s: float = 1.0
) -> Iterator[None]:
    """Hold the edit lock for the body of a `with` block.

    Args:
        path: the lock file (created if missing).
        purpose: what takes the lock (e.g. "nightly 2026-01-05"), written for the next waiter.
        timeout_s: how long to wait for a held lock; 0 gives up at once.
        poll_s: how often to retry while waiting.

    Raises:
        FlowLockedError: the lock is still held by another run after `timeout_s`.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + timeout_s
        while not _try_lock(descriptor):
            if time.monotonic() >= deadline:
                raise FlowLockedError(
                    f"{path} is held by another run ({path.read_text().strip() or 'unknown'}); "
                    "wait for it to finish (nightly.lock_timeout_s waits for it), then rerun"
                )
            time.sleep(poll_s)
        holder = {"pid": os.getpid(), "purpose": purpose, "since": datetime.now(UTC).isoformat()}
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, json.dumps(holder).encode(), 0)
        logger.info("edit lock taken: %s", purpose)
        yield
    finally:
        os.close(descriptor)  # closing releases the flock


def retry_when_busy(error_types: tuple[type[Exception], ...], marker: str) -> Callable[..., bool]:
    """A Prefect retry_condition_fn that retries only what a second try can fix.

    That is a busy file system (any OSError) or an error of `error_types` whose message holds
    `marker` (case-insensitive): a held DVC lock, a locked SQLite store. Anything else is a real
    failure and fails the task at once.
    """

    def is_busy(task, task_run, state) -> bool:  # Prefect's protocol; only `state` is read
        try:
            state.result()
        except (*error_types, OSError) as error:
            return isinstance(error, OSError) or marker in str(error).lower()
        return False

    return is_busy
