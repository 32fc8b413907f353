"""`--sampling random|epoch`: how TrainBatches picks a step's windows. Epoch mode covers every
non-overlapping window once an epoch, in an order that changes with the epoch and the seed, from
(seed, step) alone: a fresh reader, W ranks of B and one process of W * B all see the same
windows, across an epoch's end too. Random mode draws as it always did. Through the CLI: refused
on a text, kept on resume, and a resumed epoch run ends where an uninterrupted one does."""
import json
import struct
from array import array

import h5py
import numpy as np
import pytest

from npgpt.cli import main
from npgpt.data.shards import TokenDir, TrainBatches
from npgpt.weights.checkpoint import _digest, read_checkpoint

T = 8
LENGTHS = (161, 95, 10, 5, 64)          # 20 + 11 + 1 + 0 + 7 = 39 windows of T + 1 at multiples of T


def synthetic(lengths=LENGTHS):
    """Shards whose tokens name their place: shard i, position p holds 10000 * i + p."""
    return [(10000 * i + np.arange(n)).astype(np.uint16) for i, n in enumerate(lengths)]


def every_window(lengths=LENGTHS):
    """The non-overlapping windows, enumerated here: (shard, start) for starts 0, T, 2T, ... whose
    window of T + 1 tokens fits in the shard."""
    return [(i, start) for i, n in enumerate(lengths) for start in range(0, n - T, T)]


def run_windows(batches, steps):
    """The (shard, start) of this reader's windows over steps 0 .. steps - 1, in order."""
    return [(int(s), int(o)) for step in range(steps) for s, o in zip(*batches.starts(step))]


def test_one_epoch_takes_every_non_overlapping_window_once():
    every = every_window()
    n = len(every)
    assert n == 39
    for B in (3, 4, 13):                        # 13 divides n; 3 and 4 cross the epoch's end in a step
        batches = TrainBatches(synthetic(), B, T, seed=1, sampling="epoch")
        assert batches.num_windows == n
        taken = run_windows(batches, -(-2 * n // B))[:2 * n]
        for epoch in (taken[:n], taken[n:]):
            assert sorted(epoch) == sorted(every) and len(set(epoch)) == n
    shards = synthetic()
    x, y = batches.batch(2)
    for row, (s, o) in enumerate(zip(*batches.starts(2))):
        assert np.array_equal(x[row], shards[s][o:o + T]) and np.array_equal(y[row], shards[s][o + 1:o + T + 1])


def test_the_order_changes_with_the_epoch_and_the_seed_and_a_fresh_reader_repeats_it():
    n, B = 39, 3
    taken = run_windows(TrainBatches(synthetic(), B, T, seed=1, sampling="epoch"), 3 * n // B)
    assert taken[:n] != taken[n:2 * n] != taken[2 * n:]
    other = run_windows(TrainBatches(synthetic(), B, T, seed=2, sampling="epoch"), n // B)
    assert other != taken[:n]
    kept = TrainBatches(synthetic(), B, T, seed=1, sampling="epoch")
    for step in (25, 0, 13, 12, 38):            # a new reader at that step, as after a resume; one reader
        fresh = TrainBatches(synthetic(), B, T, seed=1, sampling="epoch")      # going back and forth
        for batches in (fresh, kept):
            assert [(int(s), int(o)) for s, o in zip(*batches.starts(step))] == taken[step * B:(step + 1) * B]


@pytest.mark.parametrize("sampling", ["epoch", "random"])
def test_ranks_of_b_take_the_windows_of_one_process_of_w_b(sampling):
    """8 windows a step as 1 x 8, 2 x 4 and 4 x 2: step by step the same, in rank order, over
    three epochs (an epoch's end falls inside steps 4, 9 and 14)."""
    whole = TrainBatches(synthetic(), 8, T, seed=3, sampling=sampling)
    for W in (2, 4):
        ranks = [TrainBatches(synthetic(), 8 // W, T, seed=3, rank=r, world_size=W, sampling=sampling)
                 for r in range(W)]
        for step in range(16):
            joined = [(int(s), int(o)) for r in ranks for s, o in zip(*r.starts(step))]
            assert joined == [(int(s), int(o)) for s, o in zip(*whole.starts(step))]
            rows = np.concatenate([r.batch(step)[0] for r in ranks])
            assert np.array_equal(rows, whole.batch(step)[0])


def test_random_sampling_draws_as_before():
    """The default: W * B distinct starts from default_rng([seed, step]) among every start whose
    window fits in a shard, rank r the r-th B, re-implemented here."""
    shards, B, W, seed = synthetic(), 3, 2, 11
    starts = [(i, p) for i, n in enumerate(LENGTHS) for p in range(max(n - T, 0))]
    ranks = [TrainBatches(shards, B, T, seed=seed, rank=r, world_size=W) for r in range(W)]
    assert all(r.sampling == "random" for r in ranks)
    for step in (0, 1, 7, 1000):
        drawn = np.random.default_rng([seed, step]).choice(len(starts), W * B, replace=False)
        for r, batches in enumerate(ranks):
            x, _ = batches.batch(step)
            for row, k in enumerate(drawn[r * B:(r + 1) * B]):
                s, p = starts[k]
                assert np.array_equal(x[row], shards[s][p:p + T])


def test_epoch_sampling_refuses_fewer_windows_than_a_step_and_an_unknown_mode():
    TrainBatches(synthetic(), 40, T, sampling="random")          # 298 starts at random, 39 in an epoch
    with pytest.raises(ValueError, match="hold 39 non-overlapping windows .* a step needs 40"):
        TrainBatches(synthetic(), 20, T, world_size=2, sampling="epoch")
    TrainBatches(synthetic(), 39, T, sampling="epoch")
    with pytest.raises(ValueError, match="sampling must be one of random, epoch"):
        TrainBatches(synthetic(), 2, T, sampling="shuffle")


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """An llm.c-format folder: 600 val and 300 train tokens (18 windows of 17 at T 16)."""
    folder = tmp_path_factory.mktemp("shards")
    rng = np.random.default_rng(9)
    for name, n in (("e_val_000000.bin", 600), ("e_train_000001.bin", 300)):
        tokens = rng.integers(0, 1000, n).tolist()
        (folder / name).write_bytes(struct.pack("<256i", 20240520, 1, n, *[0] * 253) + array("H", tokens).tobytes())
    return folder


def train(shards, out, *extra):
    return main(["train", "--preset", "tiny", "--dtype", "float64", "--drop-rate", "0", "--data", str(shards),
                 "--max-length", "16", "--batch-size", "4", "--eval-every", "3", "--eval-iter", "1",
                 "--no-progress", "--out", str(out), *extra])


def refused(capsys, argv, *words):
    """argv exits 2 with one line naming each of words."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and all(w in err[0] for w in words), err


def test_the_cli_takes_sampling_on_shards_only_and_keeps_it_on_resume(shards, tmp_path, capsys, verdict_start):
    assert TokenDir(shards).train_batches(4, 16, sampling="epoch").num_windows == 18
    refused(capsys, ["train", "--data", str(verdict_start(2000)), "--sampling", "epoch", "--out", str(tmp_path)],
            "--sampling", "does not apply")
    assert train(shards, tmp_path / "whole", "--sampling", "epoch", "--max-steps", "7") == 0   # epoch ends in step 4
    assert "an epoch every 4.5 steps" in capsys.readouterr().err
    assert train(shards, tmp_path / "split", "--sampling", "epoch", "--max-steps", "3") == 0
    ckpt = tmp_path / "split" / "checkpoint.h5"
    capsys.readouterr()
    refused(capsys, ["train", "--resume", str(ckpt), "--max-steps", "7", "--sampling", "random"],
            "--sampling epoch", "same batches")
    assert main(["train", "--resume", str(ckpt), "--max-steps", "7", "--no-progress"]) == 0
    whole, split = (read_checkpoint(tmp_path / run / "checkpoint.h5") for run in ("whole", "split"))
    assert split["run"]["sampling"] == "epoch" and split["state"].global_step == whole["state"].global_step == 6
    for name, p in whole["params"].items():
        assert np.array_equal(split["params"][name], p), name
    assert train(shards, tmp_path / "random", "--max-steps", "7") == 0
    drawn = read_checkpoint(tmp_path / "random" / "checkpoint.h5")
    assert drawn["run"]["sampling"] == "random"
    assert not all(np.array_equal(drawn["params"][name], p) for name, p in whole["params"].items())


def test_a_checkpoint_saved_before_sampling_resumes_at_random(shards, tmp_path, capsys):
    out = tmp_path / "run"
    assert train(shards, out, "--max-steps", "2") == 0
    with h5py.File(out / "checkpoint.h5", "r+") as f:                 # as saved before --sampling
        run = json.loads(f["train_state"].attrs["run"])
        del run["sampling"]
        f["train_state"].attrs["run"] = np.bytes_(json.dumps(run))
        f.attrs["checksum"] = _digest(f)
    capsys.readouterr()
    refused(capsys, ["train", "--resume", str(out / "checkpoint.h5"), "--max-steps", "3", "--sampling", "epoch"],
            "--sampling random")
    assert main(["train", "--resume", str(out / "checkpoint.h5"), "--max-steps", "3", "--no-progress"]) == 0
    assert read_checkpoint(out / "checkpoint.h5")["run"]["sampling"] == "random"
