"""Manual control on a real MLflow store: promote, history, the edit lock.

Rollback and rerun need a night's ledger and data version: tests/flows/test_nightly.py runs them
on a real night.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from core.errors import FlowLockedError, RegistryError
from core.model import ModelCard, build_model, model_create_kwargs, preprocessing_for, save_model
from flows.lock import edit_lock
from flows.operations import history, promote
from flows.registry import CHAMPION, Registry, VersionTags

CLASS_NAMES = ("circle", "square", "star", "triangle")


def save_tiny_model(folder: Path, settings, seed: int) -> None:
    model = build_model(settings.model, len(CLASS_NAMES), seed=seed)
    card = ModelCard(
        settings.model.name,
        model_create_kwargs(settings.model, len(CLASS_NAMES)),
        CLASS_NAMES,
        preprocessing_for(model),
    )
    save_model(model, card, folder)


def test_lock_refuses_a_second_holder_and_names_the_first(tmp_path):
    path = tmp_path / "edit.lock"
    with (
        edit_lock(path, "night A"),
        pytest.raises(FlowLockedError, match="night A"),
        edit_lock(path, "night B"),
    ):
        pass  # pragma: no cover - never reached


def test_lock_waits_for_the_holder_within_its_timeout(tmp_path):
    # Given a lock released by another thread after 0.3 s
    path, released = tmp_path / "edit.lock", threading.Event()

    def hold() -> None:
        with edit_lock(path, "night A"):
            released.wait(5)
            time.sleep(0.3)

    holder = threading.Thread(target=hold)
    holder.start()
    time.sleep(0.1)
    released.set()

    # When a second run waits up to 5 s; then it gets the lock
    with edit_lock(path, "night B", timeout_s=5, poll_s=0.05):
        assert "night B" in path.read_text()
    holder.join()


@pytest.mark.slow
def test_promote_moves_champion_and_history_records_it(tmp_path, micro_settings):
    # Given a store with the base (v1, champion) and a second version
    save_tiny_model(tmp_path / "base", micro_settings, seed=0)
    save_tiny_model(tmp_path / "other", micro_settings, seed=1)
    registry = Registry.connect(micro_settings.paths.mlruns, micro_settings.registry)
    registry.ensure_base(tmp_path / "base")
    tags = VersionTags(1, "md5", "hypernet", ("e1",), "{}")
    second = registry.register_version(tmp_path / "other", tags)

    # When promoting it by hand
    promote(micro_settings, second)

    # Then it serves, and the history shows both versions and the move
    assert registry.get_alias_version(CHAMPION) == second
    rows = history(micro_settings)
    assert [row["version"] for row in rows] == [1, 2]
    assert rows[1]["aliases"] == CHAMPION
    assert rows[1]["ledger_ids"] == "e1"
    assert "manual promote" in rows[1]["champion_moves"]
    with pytest.raises(RegistryError, match="no version 9"):
        promote(micro_settings, 9)
