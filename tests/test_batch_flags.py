"""Batch sizes as nanoGPT and llm.c users mean them: --batch-size is the micro-batch, --grad-accum
multiplies it, --tokens-per-step (llm.c's -d) derives the accumulation. On the numpy backend, a step
of 2 micro-batches of 2 trains the same 4 windows as one batch of 4 (float64: the same parameters to
rounding); the run's first lines say micro x accumulation x processes x T; a checkpoint saved when
--batch-size meant a whole step's windows resumes with the same step."""
import json
import struct
from array import array

import h5py
import numpy as np
import pytest

from npgpt.cli import build_parser, main
from npgpt.cli.resolve import resolve
from npgpt.weights.checkpoint import _digest, read_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")   # see conftest.py


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """An llm.c-format folder (header packed with struct): 600 val and 3,000 train tokens."""
    folder = tmp_path_factory.mktemp("shards")
    rng = np.random.default_rng(3)
    for name, n in (("b_val_000000.bin", 600), ("b_train_000001.bin", 3000)):
        tokens = rng.integers(0, 1000, n).tolist()
        (folder / name).write_bytes(struct.pack("<256i", 20240520, 1, n, *[0] * 253) + array("H", tokens).tobytes())
    return folder


def train(shards, out, *extra):
    return main(["train", "--preset", "tiny", "--dtype", "float64", "--drop-rate", "0", "--data", str(shards),
                 "--max-steps", "3", "--eval-every", "2", "--eval-iter", "1", "--max-length", "8", "--no-progress",
                 "--sample-tokens", "0", "--out", str(out), *extra])


def test_accumulated_micro_batches_train_as_one_batch_on_numpy(shards, tmp_path, capsys):
    runs = {"one batch of 4": ["--batch-size", "4"], "2 x 2": ["--batch-size", "2", "--grad-accum", "2"],
            "1 x 4 from -d": ["--batch-size", "1", "--tokens-per-step", "32"]}
    params = {}
    for name, extra in runs.items():
        assert train(shards, tmp_path / name, *extra) == 0
        params[name] = read_checkpoint(tmp_path / name / "checkpoint.h5")["params"]
        err = capsys.readouterr().err
        b, k = {"one batch of 4": (4, 1), "2 x 2": (2, 2), "1 x 4 from -d": (1, 4)}[name]
        assert f"npgpt: batch: micro {b} x accumulation {k} x processes 1 x T 8 = 32 tokens a step\n" in err
        assert "batches of 4x8" in err
    for name in ("2 x 2", "1 x 4 from -d"):
        for key, p in params["one batch of 4"].items():
            np.testing.assert_allclose(params[name][key], p, rtol=1e-10, atol=1e-13, err_msg=f"{name} {key}")


def test_a_checkpoint_of_the_old_batch_meaning_resumes_with_the_same_step(shards, tmp_path):
    """Saved before tokens_per_step existed, batch_size 4 with grad_accum 2 was 4 windows a step in
    2 micro-batches of 2: resumed, the micro-batch is 2 and the step still 4 windows."""
    out = tmp_path / "old"
    assert train(shards, out, "--batch-size", "2", "--grad-accum", "2") == 0
    with h5py.File(out / "checkpoint.h5", "r+") as f:                 # as the older npgpt wrote it
        run = json.loads(f["train_state"].attrs["run"])
        del run["tokens_per_step"]
        f["train_state"].attrs["run"] = np.bytes_(json.dumps({**run, "batch_size": 4}))
        f.attrs["checksum"] = _digest(f)
    s = resolve(build_parser().parse_args(["train", "--resume", str(out / "checkpoint.h5"), "--max-steps", "4"]), {})
    assert (s.batch_size, s.grad_accum, s.step_windows, s.tokens_per_step) == (2, 2, 4, 32)
