"""Checkpoint folders: atomic publish, manifest verification with fallback, pruning, RNG round trip."""

import random

import numpy as np
import pytest
import torch

from pipeline import checkpoint as ckpt


def _payload(step: int) -> ckpt.CheckpointPayload:
    return ckpt.CheckpointPayload(
        trainer_state={"step": step, "position": 8 * step}, rng=ckpt.rng_state(),
        model_state={"w": torch.full((3, 2), float(step))}, optimizer_state={"state": {}, "param_groups": []},
        scheduler_state={"last_epoch": step})


def test_save_keeps_the_last_k_and_loads_the_newest(tmp_path):
    for step in (1, 2, 3):
        ckpt.save_checkpoint(tmp_path, step, _payload(step), keep=2)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [2, 3]
    found = ckpt.load_latest(tmp_path)
    assert found.step == 3 and found.trainer_state["position"] == 24
    assert torch.equal(found.model_state()["w"], torch.full((3, 2), 3.0))
    assert found.scheduler_state() == {"last_epoch": 3}
    assert sorted(p.name for p in found.path.iterdir()) == [
        "manifest.json", "model.safetensors", "optimizer.pt", "rng-rank0.pt", "scheduler.pt", "trainer.json"]


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete", "no_manifest"])
def test_a_corrupt_newest_checkpoint_falls_back_to_the_previous(tmp_path, damage, caplog):
    for step in (1, 2):
        ckpt.save_checkpoint(tmp_path, step, _payload(step), keep=3)
    newest = tmp_path / ckpt.step_dir_name(2)
    model = newest / "model.safetensors"
    if damage == "truncate":
        model.write_bytes(model.read_bytes()[:-7])
    elif damage == "flip":
        data = bytearray(model.read_bytes())
        data[-1] ^= 0xFF
        model.write_bytes(bytes(data))
    elif damage == "delete":
        model.unlink()
    else:
        (newest / "manifest.json").unlink()
    found = ckpt.load_latest(tmp_path)
    assert found.step == 1
    assert "skipped" in caplog.text and ckpt.step_dir_name(2) in caplog.text


def test_an_unfinished_temp_folder_is_never_loaded_and_is_cleaned(tmp_path):
    ckpt.save_checkpoint(tmp_path, 1, _payload(1))
    tmp = tmp_path / (ckpt.TMP_PREFIX + "0000002")
    tmp.mkdir()
    (tmp / "model.safetensors").write_bytes(b"half")
    assert ckpt.load_latest(tmp_path).step == 1
    ckpt.save_checkpoint(tmp_path, 3, _payload(3))
    assert not tmp.exists()


def test_saving_the_same_step_again_replaces_it(tmp_path):
    ckpt.save_checkpoint(tmp_path, 4, _payload(4))
    payload = _payload(4)
    payload.model_state = {"w": torch.zeros(1)}
    ckpt.save_checkpoint(tmp_path, 4, payload)
    assert torch.equal(ckpt.load_latest(tmp_path).model_state()["w"], torch.zeros(1))


def test_rng_state_round_trip_through_weights_only_files(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    ckpt.save_checkpoint(tmp_path, 1, _payload(1))
    expected = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    ckpt.set_rng_state(ckpt.load_latest(tmp_path).rng_state(0))
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == expected


def test_a_write_error_is_one_clear_checkpoint_error(tmp_path):
    blocker = tmp_path / "checkpoints"
    blocker.write_text("a file where the folder should be")
    with pytest.raises(ckpt.CheckpointError, match="cannot write checkpoint"):
        ckpt.save_checkpoint(blocker, 1, _payload(1))
