"""The edit ledger: append, idempotency, bit-exact replay, rollback, tamper and loss detection."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from core.edit import EditDelta, ParamDelta, apply_delta
from core.errors import EditError, LedgerIntegrityError
from core.ledger import EditRecord, Ledger, record_id


@pytest.fixture(scope="module")
def base_model(micro_vit) -> torch.nn.Module:
    return micro_vit()


def make_delta(seed: int) -> EditDelta:
    """A sparse delta on a few fc1 rows and fc2 columns of blocks 1-2 (hidden 128, dim 32)."""
    generator = torch.Generator().manual_seed(seed)
    fc1, fc2 = "blocks.1.mlp.fc1.weight", "blocks.2.mlp.fc2.weight"
    params = {
        fc1: ParamDelta(torch.tensor([3, 17, 64]), 0, torch.randn(3, 32, generator=generator)),
        fc2: ParamDelta(torch.tensor([3, 17, 64]), 1, torch.randn(32, 3, generator=generator)),
    }
    return EditDelta(params, {"method": "test", "mask_sha256": f"mask{seed}", "seed": seed})


def make_record(delta: EditDelta, cluster_id: str, parent: str = "parent-hash") -> EditRecord:
    return EditRecord.from_delta(
        delta,
        cluster_id=cluster_id,
        sample_ids=["s1", "s2", "s3"],
        parent_model_hash=parent,
        metrics_before={"reliability": 0.0},
        metrics_after={"reliability": 1.0, "locality": 0.99},
        settings={"edit": {"rho": 0.9}},
        seed=0,
        run_id="2026-11-29",
    )


def state_bytes(model: torch.nn.Module) -> dict[str, bytes]:
    return {name: t.detach().numpy().tobytes() for name, t in model.state_dict().items()}


def test_record_derives_id_hashes_and_touched_parameters_from_the_delta():
    delta = make_delta(1)
    record = make_record(delta, "c1")
    assert record.id == record_id("parent-hash", "c1", delta.sha256())
    assert record.delta_sha256 == delta.sha256()
    assert record.mask_hash == "mask1"
    assert record.touched_parameters == ("blocks.1.mlp.fc1.weight", "blocks.2.mlp.fc2.weight")
    assert record.delta_path == f"entries/{record.id}"


def test_append_then_read_back(tmp_path: Path):
    # Given an empty ledger
    ledger = Ledger(tmp_path / "ledger")
    delta = make_delta(1)
    record = make_record(delta, "c1")
    # When an edit is appended
    ledger.append(record, delta)
    # Then a fresh Ledger on the folder sees it and its delta, bit for bit
    reopened = Ledger(tmp_path / "ledger")
    assert reopened.records() == [record]
    assert reopened.get(record.id) == record
    assert reopened.load_delta(record.id).sha256() == delta.sha256()


def test_append_same_content_is_a_no_op_even_with_a_later_timestamp(tmp_path: Path):
    ledger = Ledger(tmp_path)
    delta = make_delta(1)
    first = make_record(delta, "c1")
    ledger.append(first, delta)
    index_before = ledger.index_path.read_bytes()
    # When a crashed night reruns and rebuilds the same record at another time
    rerun = EditRecord(**{**first.to_dict(), "created_at": "2030-01-01T00:00:00+00:00"})
    stored = ledger.append(rerun, delta)
    # Then nothing is written and the original record comes back
    assert stored == first
    assert ledger.index_path.read_bytes() == index_before


def test_a_later_night_re_making_the_same_edit_reuses_the_entry(tmp_path: Path):
    # Given an edit made on one night whose candidate was not promoted
    ledger = Ledger(tmp_path)
    delta = make_delta(1)
    first = make_record(delta, "c1")
    ledger.append(first, delta)
    # When the next night edits the same cluster on the same parent, giving the same delta
    later = EditRecord(**{**first.to_dict(), "run_id": "night-2", "created_at": "2030-01-02"})
    stored = ledger.append(later, delta)
    # Then it is the same entry, still naming the night that first made it
    assert stored == first
    assert len(ledger.records()) == 1


def test_append_same_id_with_other_content_is_refused(tmp_path: Path):
    ledger = Ledger(tmp_path)
    delta = make_delta(1)
    record = make_record(delta, "c1")
    ledger.append(record, delta)
    changed = EditRecord(**{**record.to_dict(), "metrics_after": {"reliability": 0.5}})
    with pytest.raises(LedgerIntegrityError, match=f"entry {record.id} already exists"):
        ledger.append(changed, delta)


def test_append_refuses_a_record_of_another_delta(tmp_path: Path):
    record = make_record(make_delta(1), "c1")
    with pytest.raises(LedgerIntegrityError, match=r"EditRecord\.from_delta"):
        Ledger(tmp_path).append(record, make_delta(2))


def test_replay_is_bit_exact_and_leaves_the_base_untouched(tmp_path: Path, base_model):
    # Given two edits applied in sequence by hand
    ledger = Ledger(tmp_path)
    deltas = [make_delta(1), make_delta(2)]
    ids = [ledger.append(make_record(d, f"c{i}"), d).id for i, d in enumerate(deltas)]
    by_hand = copy.deepcopy(base_model)
    for delta in deltas:
        apply_delta(by_hand, delta)
    base_before = state_bytes(base_model)
    # When the ledger replays them from the base, twice
    first, second = ledger.replay(base_model, ids), ledger.replay(base_model, ids)
    # Then every weight is bit-identical to the hand-built model, and the base did not move
    assert state_bytes(first) == state_bytes(by_hand) == state_bytes(second)
    assert state_bytes(base_model) == base_before
    assert state_bytes(first) != base_before


def test_rollback_equals_a_clean_replay_without_the_edit(tmp_path: Path, base_model):
    ledger = Ledger(tmp_path)
    deltas = [make_delta(1), make_delta(2), make_delta(3)]
    ids = [ledger.append(make_record(d, f"c{i}"), d).id for i, d in enumerate(deltas)]
    # When the middle edit is rolled back
    kept = ledger.without(ids, ids[1])
    # Then the order is kept and the weights equal base + edits 0 and 2
    assert kept == [ids[0], ids[2]]
    clean = copy.deepcopy(base_model)
    apply_delta(clean, deltas[0])
    apply_delta(clean, deltas[2])
    assert state_bytes(ledger.replay(base_model, kept)) == state_bytes(clean)


def test_without_refuses_an_edit_not_in_the_version(tmp_path: Path):
    ledger = Ledger(tmp_path)
    delta = make_delta(1)
    entry_id = ledger.append(make_record(delta, "c1"), delta).id
    with pytest.raises(EditError, match="is not in this model version"):
        ledger.without([], entry_id)


def test_tampered_delta_is_detected_naming_entry_and_file(tmp_path: Path, base_model):
    # Given a stored edit whose weights file is altered afterwards
    ledger = Ledger(tmp_path)
    delta = make_delta(1)
    entry_id = ledger.append(make_record(delta, "c1"), delta).id
    weights = tmp_path / "entries" / entry_id / "delta.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-1] ^= 0x01
    weights.write_bytes(bytes(raw))
    # When it is loaded or replayed, Then the entry and the file are named
    with pytest.raises(LedgerIntegrityError, match=rf"{entry_id}.*delta.safetensors was altered"):
        ledger.load_delta(entry_id)
    with pytest.raises(LedgerIntegrityError, match=entry_id):
        ledger.replay(base_model, [entry_id])


def test_missing_delta_file_is_detected(tmp_path: Path):
    ledger = Ledger(tmp_path)
    delta = make_delta(1)
    entry_id = ledger.append(make_record(delta, "c1"), delta).id
    (tmp_path / "entries" / entry_id / "delta.json").unlink()
    with pytest.raises(LedgerIntegrityError, match=rf"{entry_id}.*delta.json is missing"):
        ledger.load_delta(entry_id)


def test_altered_index_line_is_detected(tmp_path: Path):
    # Given an index whose record was edited by hand (the cluster id changed)
    ledger = Ledger(tmp_path)
    delta = make_delta(1)
    ledger.append(make_record(delta, "c1"), delta)
    line = json.loads(ledger.index_path.read_text())
    line["record"]["cluster_id"] = "c2"
    ledger.index_path.write_text(json.dumps(line) + "\n")
    # Then reading the ledger names the line
    with pytest.raises(LedgerIntegrityError, match="line 1"):
        ledger.records()


def test_unknown_id_is_an_integrity_error(tmp_path: Path, base_model):
    with pytest.raises(LedgerIntegrityError, match="has no entry nope"):
        Ledger(tmp_path).replay(base_model, ["nope"])
