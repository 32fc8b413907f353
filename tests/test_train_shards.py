"""Training by steps from token shards through the command line: a resumed run equals an
uninterrupted one, both backends take the same steps, the options that apply to one kind of data
are refused for the other, and `npgpt eval --data DIR` reports the val shard's loss."""
import json
import math
import struct
from array import array

import numpy as np
import pytest

import npgpt
from npgpt.cli import main

T, B = 16, 2


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """An llm.c-format folder written here, not by npgpt: 600 val and 3,000 train tokens."""
    folder = tmp_path_factory.mktemp("shards")
    rng = np.random.default_rng(5)
    for name, n in (("t_val_000000.bin", 600), ("t_train_000001.bin", 3000)):
        tokens = rng.integers(0, 1000, n).tolist()
        (folder / name).write_bytes(struct.pack("<256i", 20240520, 1, n, *[0] * 253) + array("H", tokens).tobytes())
    return folder


def train(shards, out, *extra):
    return main(["train", "--preset", "tiny", "--drop-rate", "0.1", "--dtype", "float64", "--data", str(shards),
                 "--max-length", str(T), "--batch-size", str(B), "--eval-every", "3", "--eval-iter", "2",
                 "--no-progress", "--out", str(out), *extra])


def history(out):
    return json.loads((out / "history.json").read_text())


def test_resumed_run_equals_the_uninterrupted_one(shards, tmp_path, one_thread):
    assert train(shards, tmp_path / "whole", "--max-steps", "12") == 0
    assert train(shards, tmp_path / "split", "--max-steps", "7") == 0
    assert main(["train", "--resume", str(tmp_path / "split" / "checkpoint.h5"), "--max-steps", "12",
                 "--no-progress"]) == 0
    whole, split = history(tmp_path / "whole"), history(tmp_path / "split")
    assert whole["global_step"] == split["global_step"] == 11
    assert whole["lrs"] == split["lrs"] and len(whole["lrs"]) == 12
    assert whole["steps"] == split["steps"] == [0, 3, 6, 9, 11]         # every 3 steps, and the last
    assert split["val_losses"] == whole["val_losses"]                   # float64, dropout on: exactly
    assert split["train_losses"] == whole["train_losses"]


def test_both_backends_take_the_same_steps(shards, tmp_path, one_thread):
    for backend in ("numpy", "torch"):
        assert train(shards, tmp_path / backend, "--max-steps", "6", "--drop-rate", "0", "--backend",
                     backend) == 0
    a, b = history(tmp_path / "numpy"), history(tmp_path / "torch")
    np.testing.assert_allclose(a["val_losses"], b["val_losses"], rtol=1e-9)
    np.testing.assert_allclose(a["train_losses"], b["train_losses"], rtol=1e-9)


@pytest.mark.parametrize("extra, message", [
    (["--epochs", "2", "--max-steps", "5"], "--epochs does not apply: a folder of token shards trains by --max-steps"),
    (["--eval-freq", "2", "--max-steps", "5"], "--eval-freq does not apply"),
    ([], "is a folder of token shards: give the run's length with --max-steps N"),
])
def test_options_of_the_other_kind_of_data_are_refused(shards, tmp_path, capsys, extra, message):
    assert train(shards, tmp_path / "out", *extra) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_max_steps_with_a_text_file_is_refused(tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("word " * 500, encoding="utf-8")
    assert main(["train", "--preset", "tiny", "--data", str(text), "--max-steps", "5", "--out",
                 str(tmp_path / "out")]) == 2
    assert "--max-steps does not apply: a text file trains by --epochs" in capsys.readouterr().err


def test_eval_reports_the_val_shards_loss(shards, tmp_path, capsys, one_thread):
    assert train(shards, tmp_path / "run", "--max-steps", "2") == 0
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(tmp_path / "run" / "checkpoint.h5"), "--data", str(shards),
                 "--max-length", str(T), "--batch-size", "4"]) == 0
    line = capsys.readouterr().out.strip()
    # the reference: every window of T + 1 tokens, advancing by T, read from the file by hand
    stream = np.frombuffer((shards / "t_val_000000.bin").read_bytes()[1024:], dtype="<u2").astype(np.int64)
    model, _, _ = npgpt.load_checkpoint(tmp_path / "run" / "checkpoint.h5")
    model.eval()
    n = (len(stream) - 1) // T
    windows = np.stack([stream[i * T:i * T + T + 1] for i in range(n)])
    losses = [model.loss(windows[i:i + 4, :-1], windows[i:i + 4, 1:]) for i in range(0, n, 4)]
    loss = float(np.mean(losses))              # calc_loss_loader averages the batches
    assert line == f"val loss {loss:.4f}  perplexity {math.exp(loss):.2f}"
