"""Checkpoints kept (training/keep.py): numbered saves pruned to the newest keep_last plus every
keep_every-th for good, checkpoint.h5 the latest and checkpoint_best.h5 the lowest validation
loss (each read back and compared with the state saved), disk use counted once per file;
find_resume taking the newest whole checkpoint and passing over a truncated newest one and a
corrupted one for the one before; the DONE marker."""
import os

import h5py
import pytest

import npgpt
from npgpt.run_state import TrainState
from npgpt.training.keep import Keeper, disk_use, done, find_resume, mark_done
from npgpt.weights.checkpoint import CheckpointError, read_checkpoint

CFG = npgpt.GPTConfig(vocab_size=32, context_length=8, emb_dim=8, n_heads=2, n_layers=1)


def names(out):
    return sorted(p.name for p in out.iterdir() if not p.name.startswith("."))


def saves(out, steps, keeper, val=None):
    """Save after each step count in steps (global_step = steps - 1), its parameters marked by it;
    val(steps) -> that save's validation loss (evaluated there), or None."""
    model = npgpt.build_model(CFG)
    opt = npgpt.AdamW(model)
    records = []
    for s in steps:
        model.param_views()["wpe"][0, 0] = s
        state = TrainState(global_step=s - 1)
        if val is not None and val(s) is not None:
            state.track_steps, state.val_losses = [s - 1], [val(s)]
        records.append(keeper.save(model, opt, state))
    return records


def saved_step(path):
    ckpt = read_checkpoint(path)
    assert ckpt["params"]["wpe"][0, 0] == ckpt["state"].global_step + 1      # the file of that step, whole
    return ckpt["state"].global_step + 1


def test_keep_last_and_keep_every(tmp_path):
    records = saves(tmp_path, range(100, 1100, 100), Keeper(tmp_path, keep_last=2, keep_every=500))
    assert names(tmp_path) == ["checkpoint.h5", "checkpoint_00000500.h5", "checkpoint_00000900.h5",
                               "checkpoint_00001000.h5"]
    assert saved_step(tmp_path / "checkpoint.h5") == 1000
    for s in (500, 900, 1000):
        assert saved_step(tmp_path / f"checkpoint_{s:08d}.h5") == s
    assert records[2]["removed"] == [str(tmp_path / "checkpoint_00000100.h5")]
    size = os.path.getsize(tmp_path / "checkpoint_00000500.h5")
    assert records[-1]["disk_bytes"] == 3 * size       # checkpoint.h5 is checkpoint_00001000.h5's second name


def test_only_the_latest_without_keep_settings(tmp_path):
    saves(tmp_path, [1, 2, 3], Keeper(tmp_path))
    assert names(tmp_path) == ["checkpoint.h5"] and saved_step(tmp_path / "checkpoint.h5") == 3


def test_keep_best(tmp_path):
    vals = {1: 3.0, 2: 2.5, 3: None, 4: 2.7, 5: 2.4, 6: 2.6}
    records = saves(tmp_path, vals, Keeper(tmp_path, keep_best=True), val=vals.get)
    assert [r["best"] for r in records] == [True, True, False, False, True, False]
    assert saved_step(tmp_path / "checkpoint_best.h5") == 5 and saved_step(tmp_path / "checkpoint.h5") == 6
    saves(tmp_path, [7, 8], Keeper(tmp_path, keep_best=True), val={7: 2.45, 8: 2.3}.get)   # a restarted run
    assert saved_step(tmp_path / "checkpoint_best.h5") == 8


def test_find_resume_passes_over_a_truncated_or_corrupted_newest(tmp_path):
    assert find_resume(tmp_path) is None
    saves(tmp_path, [1, 2, 3], Keeper(tmp_path, keep_last=3))
    assert find_resume(tmp_path) == tmp_path / "checkpoint.h5" and saved_step(find_resume(tmp_path)) == 3
    newest = tmp_path / "checkpoint_00000003.h5"
    with open(newest, "r+b") as f:                 # a kill in the middle of a copy: half the file
        f.truncate(os.path.getsize(newest) // 2)
    said = []
    assert find_resume(tmp_path, say=said.append) == tmp_path / "checkpoint_00000002.h5"
    assert any("checkpoint_00000003.h5" in line for line in said)
    middle = tmp_path / "checkpoint_00000002.h5"
    with h5py.File(middle, "r") as f:                 # one flipped byte in a moment's data: only its crc32 sees it
        offset = f["optimizer/exp_avg/wte"].id.get_offset()
    with open(middle, "r+b") as f:
        f.seek(offset + 5)
        byte = f.read(1)[0]
        f.seek(offset + 5)
        f.write(bytes([byte ^ 0xFF]))
    with pytest.raises(CheckpointError):
        read_checkpoint(middle)
    assert find_resume(tmp_path) == tmp_path / "checkpoint_00000001.h5"
    for p in tmp_path.glob("checkpoint*.h5"):
        p.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="none of its 4 checkpoints is whole"):
        find_resume(tmp_path)


def test_done_marker(tmp_path):
    assert not done(tmp_path, 10)
    mark_done(tmp_path, TrainState(global_step=9), 10)
    assert done(tmp_path, 10) and not done(tmp_path, 20)        # a longer run carries on
    (tmp_path / "DONE").write_text("yes")
    with pytest.raises(ValueError, match="not npgpt's DONE marker"):
        done(tmp_path, 10)


def test_bad_settings(tmp_path):
    with pytest.raises(ValueError, match="keep_last must be an integer >= 0, got -1"):
        Keeper(tmp_path, keep_last=-1)
