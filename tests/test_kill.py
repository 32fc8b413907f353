"""Real kills of `python -m npgpt train` over token shards: SIGKILL after the first checkpoint
appears, in the middle of a checkpoint write (caught by its temporary file), and between two
saves. A shards run saves at every evaluation by default, so the kill loses at most the steps
since the last one: the checkpoint left loads, log.jsonl parses line by line, and `--resume`
finishes the run with exactly the parameters and optimizer state of a run never interrupted
(float64, no dropout, the numpy backend; a step's batch depends on (seed, step) alone)."""
import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from npgpt.cli import main
from npgpt.weights.checkpoint import read_checkpoint

from child_runs import CHILD_ENV, write_shards

STEPS, EVERY = 30, 4
EVALS = sorted({*range(0, STEPS, EVERY), STEPS - 1})
pytestmark = pytest.mark.usefixtures("one_thread")   # see conftest.py


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_shards(tmp_path_factory.mktemp("shards"), seed=5)


def args(shards, out):
    return ["train", "--preset", "tiny", "--dtype", "float64", "--drop-rate", "0", "--data", str(shards),
            "--max-steps", str(STEPS), "--eval-every", str(EVERY), "--eval-iter", "1", "--max-length", "16",
            "--batch-size", "2", "--lr", "1e-3", "--warmup", "3", "--cosine", "--clip", "1.0", "--seed", "7",
            "--no-progress", "--out", str(out)]


@pytest.fixture(scope="module")
def uninterrupted(shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("whole")
    assert main(args(shards, out)) == 0
    return read_checkpoint(out / "checkpoint.h5")


def log_lines(out) -> list[dict]:
    """log.jsonl, every line parsed on its own."""
    text = (out / "log.jsonl").read_text()
    assert text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


def saved_steps(out) -> list[int]:
    path = out / "log.jsonl"
    if not path.exists():
        return []
    return [r["step"] for r in map(json.loads, path.read_text().splitlines()) if r["kind"] == "save"]


def logged_step(out) -> int:
    path = out / "log.jsonl"
    if not path.exists():
        return -1
    return max([r["step"] for r in map(json.loads, path.read_text().splitlines()) if r["kind"] == "step"],
               default=-1)


def saving(out) -> bool:
    """A checkpoint write in progress: atomic_write's temporary file, filled past its first bytes."""
    try:
        return any(p.stat().st_size > 1 << 16 for p in out.glob(".checkpoint.h5.*.tmp"))
    except FileNotFoundError:                     # renamed between the listing and the stat
        return False


MOMENTS = {
    "after the first checkpoint": lambda out: bool(saved_steps(out)),
    "while a save is written": lambda out: bool(saved_steps(out)) and saving(out),
    "between two saves": lambda out: logged_step(out) >= 10 and logged_step(out) % EVERY == 2,
}


@pytest.mark.parametrize("moment", list(MOMENTS))
def test_a_killed_run_resumes_to_the_uninterrupted_ones_parameters(shards, tmp_path, uninterrupted, moment):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "npgpt", *args(shards, out)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env=CHILD_ENV)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None and not MOMENTS[moment](out):
            time.sleep(0.001)
        proc.kill()
    finally:
        proc.kill()
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, f"the run ended before the moment came: {err.decode()}"
    if moment == "while a save is written":
        assert list(out.glob(".checkpoint.h5.*.tmp")), "the temporary file of the write killed stays"

    records = log_lines(out)                       # whole lines only, though the run was killed
    saves = [r["step"] for r in records if r["kind"] == "save"]
    assert saves and set(saves) <= set(EVALS)
    kept = read_checkpoint(out / "checkpoint.h5")                       # reads every tensor, checks every crc32
    # the save the log names last, or the next one if the kill came between its rename and its log line
    assert kept["state"].global_step in [saves[-1], *[s for s in EVALS if s > saves[-1]][:1]]
    lost = max(r["step"] for r in records if r["kind"] == "step") - kept["state"].global_step
    assert 0 <= lost <= EVERY

    assert main(["train", "--resume", str(out / "checkpoint.h5"), "--no-progress"]) == 0
    got = read_checkpoint(out / "checkpoint.h5")
    assert got["state"].global_step == STEPS - 1
    for name, p in uninterrupted["params"].items():
        assert np.array_equal(got["params"][name], p), name
    for key in ("exp_avg", "exp_avg_sq"):
        for name, p in uninterrupted["optimizer"][key].items():
            assert np.array_equal(got["optimizer"][key][name], p), (key, name)
    assert got["state"] == uninterrupted["state"] and got["rng"] == uninterrupted["rng"]

    records = log_lines(out)
    runs = [r for r in records if r["kind"] == "run"]
    assert [r["first_step"] for r in runs] == [0, kept["state"].global_step + 1]
    after = records[records.index(runs[1]):]
    assert [r["step"] for r in after if r["kind"] == "step"] == list(range(kept["state"].global_step + 1, STEPS))
