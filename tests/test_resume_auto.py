"""The restart loop a week-long run is left to: `until npgpt train ... --resume auto; do sleep 1; done`.
A real `python -m npgpt train` over token shards, saving every 2 steps and keeping numbered
checkpoints, is SIGKILLed at random moments and started again with the same command until it exits
0; it must end with exactly the parameters, optimizer state and TrainState of a run never
interrupted (float64, no dropout, the numpy backend), leave OUT/DONE, and the numbered files
--keep-last and --keep-every say. Then the loop's next start trains nothing and writes nothing,
and an explicit --resume that would train nothing is refused in one line."""
import json
import os
import random
import subprocess
import sys
import time

import numpy as np
import pytest

from npgpt.cli import main
from npgpt.weights.checkpoint import read_checkpoint

from child_runs import CHILD_ENV, write_shards

STEPS = 30
pytestmark = pytest.mark.usefixtures("one_thread")   # see conftest.py


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_shards(tmp_path_factory.mktemp("shards"), seed=11)


def args(shards, out, *extra):
    return ["train", "--preset", "tiny", "--dtype", "float64", "--drop-rate", "0", "--data", str(shards),
            "--max-steps", str(STEPS), "--eval-every", "5", "--eval-iter", "1", "--max-length", "16",
            "--batch-size", "2", "--lr", "1e-3", "--warmup", "3", "--schedule", "wsd", "--seed", "3",
            "--no-progress", "--sample-tokens", "0", "--out", str(out), *extra]


def steps_logged(out) -> int:
    path = out / "log.jsonl"
    if not path.exists():
        return 0
    return sum(1 for line in path.read_text().splitlines() if '"kind": "step"' in line)


def test_a_restart_loop_killed_at_random_ends_as_the_uninterrupted_run(shards, tmp_path):
    assert main(args(shards, tmp_path / "whole")) == 0
    whole = read_checkpoint(tmp_path / "whole" / "checkpoint.h5")

    out = tmp_path / "looped"
    command = [sys.executable, "-m", "npgpt", *args(shards, out, "--resume", "auto", "--save-every", "2",
                                                    "--keep-last", "2", "--keep-every", "10")]
    rng, kills, mid_run = random.Random(29), 0, 0
    for attempt in range(40):                   # bounded: a loop that never ends fails the test
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=CHILD_ENV)
        before = steps_logged(out)
        if kills < 8:                           # the first starts are killed, the last one may finish
            deadline = time.monotonic() + 60
            # a random moment once training has started: after 0 to 6 more steps were logged, plus 0-50 ms
            wanted = before + rng.randrange(0, 7)
            while proc.poll() is None and steps_logged(out) <= wanted and time.monotonic() < deadline:
                time.sleep(0.002)
            time.sleep(rng.uniform(0, 0.05))
            proc.kill()
        _, err = proc.communicate(timeout=120)
        if proc.returncode == 0:
            break
        assert proc.returncode == -9, err.decode()
        kills += 1
        mid_run += steps_logged(out) > before
    else:
        pytest.fail("the restart loop did not end")
    assert kills == 8 and mid_run >= 6, (kills, mid_run)     # the kills came while steps were being taken

    got = read_checkpoint(out / "checkpoint.h5")
    assert got["state"].global_step == STEPS - 1
    for name, p in whole["params"].items():
        assert np.array_equal(got["params"][name], p), name
    for key in ("exp_avg", "exp_avg_sq"):
        for name, p in whole["optimizer"][key].items():
            assert np.array_equal(got["optimizer"][key][name], p), (key, name)
    assert got["state"] == whole["state"] and got["rng"] == whole["rng"]
    assert json.loads((out / "DONE").read_text())["steps"] == STEPS
    # numbered by steps done: every 10th for good, and the newest 2 saves (every 2 steps)
    assert sorted(p.name for p in out.glob("checkpoint_*.h5")) == [f"checkpoint_{n:08d}.h5" for n in (10, 20, 28, 30)]
    assert os.path.samefile(out / "checkpoint.h5", out / "checkpoint_00000030.h5")
    saves = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines() if '"save"' in line]
    assert saves[-1]["disk_bytes"] == sum(p.stat().st_size for p in out.glob("checkpoint_*.h5"))

    # the loop's next start: nothing to train, nothing written
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    again = subprocess.run(command, capture_output=True, env=CHILD_ENV, timeout=120)
    assert again.returncode == 0 and "nothing to train" in again.stderr.decode()
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


def test_a_resume_that_would_train_nothing_is_refused_and_writes_nothing(shards, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(args(shards, out, "--max-steps", "6")) == 0
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    capsys.readouterr()
    for steps in ("6", "4"):
        assert main(["train", "--resume", str(out / "checkpoint.h5"), "--max-steps", steps]) == 2
        assert capsys.readouterr().err.strip() == (
            f"npgpt train: error: --max-steps {steps}: {out / 'checkpoint.h5'} has done 6 steps already, so this "
            "resume would train nothing (give a --max-steps above 6)")
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    assert main(["train", "--resume", "auto"]) == 2
    assert capsys.readouterr().err.strip() == ("npgpt train: error: --resume auto continues the run in --out DIR: "
                                               "give --out")
