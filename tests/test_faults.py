"""Faults while training: a NaN loss, a full disk, Ctrl-C / SIGTERM, SIGKILL in the middle of a
checkpoint write or anywhere in a run, and damaged checkpoint bytes. A run loses at most the steps
since its last checkpoint, the checkpoint on disk is always whole, and a run killed and resumed
ends exactly where the run that was never interrupted ends. Also: nothing is unpickled, and a file
never decides where npgpt writes."""
from __future__ import annotations

import ast
import errno
import faulthandler
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import npgpt
from npgpt.weights.checkpoint import read_checkpoint
from npgpt.cli import main
from npgpt.cli.stop import StopOnSignal

PACKAGE = Path(npgpt.__file__).resolve().parent
FIXTURES = Path(__file__).resolve().parent / "fixtures"
STEPS_PER_EPOCH = 14                       # 2,000 characters of The Verdict in windows of 2 x 16 tokens
CHILD_ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1",
             "MKL_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
             "PYTHONPATH": os.pathsep.join([str(PACKAGE.parent), os.environ.get("PYTHONPATH", "")])}


@pytest.fixture(scope="module")
def text(verdict_start):
    return verdict_start(2000)


def train_args(data, out, *extra):
    """The tiny model with dropout (so the RNG state matters) in float64 (so equal means equal),
    evaluated after every step: each step prints a line and adds to the history."""
    return ["train", "--preset", "tiny", "--drop-rate", "0.1", "--dtype", "float64", "--data", str(data),
            "--max-length", "16", "--batch-size", "2", "--eval-freq", "1", "--eval-iter", "1", "--no-progress",
            "--out", str(out), *extra]


def _default_sigint():
    """A shell starts background jobs with SIGINT ignored, and npgpt keeps an ignored signal ignored."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Child:
    """`python -m npgpt ARGV` in a subprocess, its stdout read line by line; killed after `timeout` s
    whatever happens, so a test fails instead of hanging."""

    def __init__(self, argv, timeout=240):
        self.proc = subprocess.Popen([sys.executable, "-m", "npgpt", *argv], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, env=CHILD_ENV, preexec_fn=_default_sigint)
        self.timer = threading.Timer(timeout, self.proc.kill)
        self.timer.start()

    def wait_for_step(self, step: int):
        """Read stdout up to the line of a step >= step; that step, or None if the run ended first."""
        for line in self.proc.stdout:
            m = re.match(r"Ep \d+ \(Step (\d+)\)", line)
            if m and int(m.group(1)) >= step:
                return int(m.group(1))
        return None

    def finish(self):
        out, err = self.proc.communicate()
        self.timer.cancel()
        return self.proc.returncode, out, err


# ---- numerical faults and write errors, through the command line ----

def test_cli_nan_loss_exits_2_naming_the_step_and_keeps_the_checkpoint(tmp_path, text, monkeypatch, capsys):
    """A NaN before step 5 (a poisoned weight, as a diverging run gets): the run stops with the step
    in one line, and the checkpoint of step 3 (--save-every 2) and its history stay byte for byte."""
    from npgpt.numpy_backend import NumpyGPT as model_class
    train_step, kept = model_class.train_step, {}

    def poisoned(self, inputs, targets, optimizer, clip_norm=None, sync=True):
        if optimizer.step_count == 5:
            kept.update({name: (tmp_path / "run" / name).read_bytes() for name in ("checkpoint.h5", "history.json")})
            self.p["ln_f.weight"][0] = np.nan
        return train_step(self, inputs, targets, optimizer, clip_norm, sync)
    monkeypatch.setattr(model_class, "train_step", poisoned)
    assert main(train_args(text, tmp_path / "run", "--save-every", "2")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("npgpt train: error: training diverged at step 5 (epoch 1): loss is nan"), err
    assert err[-1].endswith(f"the last checkpoint, {tmp_path / 'run' / 'checkpoint.h5'} (step 3), is kept as it was")
    assert {name: (tmp_path / "run" / name).read_bytes() for name in kept} == kept
    assert npgpt.load_checkpoint(tmp_path / "run" / "checkpoint.h5")[2].global_step == 3
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["checkpoint.h5", "history.json", "log.jsonl"]


def test_cli_full_disk_exits_2_and_keeps_the_checkpoint(tmp_path, text, monkeypatch, capsys):
    """The second save runs out of space halfway (HDF5 dataset creation fails with ENOSPC)."""
    save, create_dataset, saves = npgpt.save_checkpoint, h5py.Group.create_dataset, []

    def counting_save(*args, **kwargs):
        saves.append(args[0])
        return save(*args, **kwargs)

    def create(self, name, *args, **kwargs):
        if len(saves) >= 2 and name == "h.1.mlp.c_fc.weight":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return create_dataset(self, name, *args, **kwargs)
    monkeypatch.setattr("npgpt.training.keep.save_checkpoint", counting_save)          # the run saves through its Keeper
    monkeypatch.setattr(h5py.Group, "create_dataset", create)
    out = tmp_path / "run"
    assert main(train_args(text, out, "--save-every", "3")) == 2
    monkeypatch.undo()
    err = capsys.readouterr().err.strip().splitlines()
    assert "No space left on device" in err[-1] and err[-1].startswith("npgpt train: error: training stopped: ")
    assert err[-1].endswith(f"the last checkpoint, {out / 'checkpoint.h5'} (step 2), is kept as it was")
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.h5", "history.json", "log.jsonl"]   # no temp file
    assert npgpt.load_checkpoint(out / "checkpoint.h5")[2].global_step == 2
    assert json.loads((out / "history.json").read_text())["global_step"] == 5     # rewritten at each evaluation


# ---- signals ----

@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_saves_the_step_reached_and_resume_continues(tmp_path, text, signum):
    out, name = tmp_path / "run", signal.Signals(signum).name
    child = Child(train_args(text, out, "--epochs", "1000"))          # minutes of work: it must be stopped
    assert child.wait_for_step(10) is not None
    child.proc.send_signal(signum)
    code, _, err = child.finish()
    assert code == 128 + signum, err
    ckpt = out / "checkpoint.h5"
    m = re.fullmatch(rf"npgpt: {name} at step (\d+) \(epoch \d+\); saved {re.escape(str(ckpt))}; "
                     rf"continue with: npgpt train --resume {re.escape(str(ckpt))}", err.strip().splitlines()[-1])
    assert m, err
    step = int(m.group(1))
    _, opt, state = npgpt.load_checkpoint(ckpt)                       # whole, and at the step reached
    assert step >= 10 and state.global_step == step and opt.step_count == step + 1
    assert state.track_steps == list(range(step + 1)) and len(state.lrs) == step + 1
    assert json.loads((out / "history.json").read_text())["global_step"] == step

    epochs = step // STEPS_PER_EPOCH + 2
    handler = signal.getsignal(signal.SIGINT)
    assert main(["train", "--resume", str(ckpt), "--epochs", str(epochs), "--no-progress"]) == 0
    assert signal.getsignal(signal.SIGINT) is handler                 # the previous handler is back
    _, opt, state = npgpt.load_checkpoint(ckpt)
    total = epochs * STEPS_PER_EPOCH
    assert state.epoch == epochs and opt.step_count == total
    assert state.track_steps == list(range(total))                    # every step once: none lost, none twice


def test_the_first_signal_sets_a_flag_the_second_interrupts():
    before = signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGINT, signal.default_int_handler)          # a background job inherits SIG_IGN
    with StopOnSignal() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.signum == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            sum(range(10))                                            # the handler runs between bytecodes
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    signal.signal(signal.SIGINT, signal.SIG_IGN)                     # nohup: an ignored signal stays ignored
    try:
        with StopOnSignal():
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before)


WRITER = """
import itertools, sys
import numpy as np, npgpt
from npgpt.params import param_shapes
cfg = npgpt.GPTConfig(vocab_size=50257, context_length=64, emb_dim=256, n_heads=4, n_layers=1)
model = npgpt.build_model(cfg, params={n: np.full(s, 0.25, np.float32) for n, s in param_shapes(cfg).items()})
npgpt.save_checkpoint(sys.argv[1], model, epoch=0)
print("saved", flush=True)
for epoch in itertools.count(1):
    npgpt.save_checkpoint(sys.argv[1], model, epoch=epoch)
"""


def test_sigkill_while_a_checkpoint_is_written_leaves_the_previous_one(tmp_path):
    """A writer saves a 106 MB checkpoint over and over; SIGKILL lands while a temporary file is
    being filled. The target still loads and passes every checksum; the leftover is .NAME.*.tmp."""
    path = tmp_path / "big.h5"
    for attempt in range(5):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True,
                                env=CHILD_ENV)
        try:
            assert proc.stdout.readline() == "saved\n"
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                if any(p.stat().st_size > 1 << 20 for p in tmp_path.glob(".big.h5.*.tmp")):
                    proc.kill()
                    break
                time.sleep(0.001)
        finally:
            proc.kill()
            proc.wait(timeout=60)
        leftovers = [p.name for p in tmp_path.iterdir() if p.name != "big.h5"]
        if leftovers:                          # else the write finished between the look and the kill: again
            break
    assert leftovers and all(re.fullmatch(r"\.big\.h5\.\w+\.tmp", n) for n in leftovers), leftovers
    ckpt = read_checkpoint(path)                                      # reads every tensor, checks every crc32
    assert all(np.all(p == 0.25) for p in ckpt["params"].values()) and ckpt["state"].epoch >= 0
    small = npgpt.build_model(npgpt.GPTConfig.preset("tiny", vocab_size=100), seed=3)
    npgpt.save_checkpoint(path, small, epoch=7)                       # the next save works
    assert npgpt.load_checkpoint(path)[2].epoch == 7


def test_a_run_killed_at_random_steps_and_resumed_equals_the_uninterrupted_run(tmp_path, text):
    """SIGKILL twice at seeded random steps (maybe mid-checkpoint, maybe before any), then --resume
    until the run finishes: its history, weights, optimizer and RNG state equal those of a run
    never interrupted, exactly (float64, dropout on)."""
    epochs, save_every = 3, 4
    total = epochs * STEPS_PER_EPOCH
    ref_code, _, err = Child(train_args(text, tmp_path / "ref", "--epochs", str(epochs),
                                        "--save-every", str(save_every))).finish()
    assert ref_code == 0, err

    out = tmp_path / "faulty"
    fresh = train_args(text, out, "--epochs", str(epochs), "--save-every", str(save_every))
    resume = ["train", "--resume", str(out / "checkpoint.h5"), "--no-progress"]
    kills = sorted(random.Random(6).sample(range(2, total - 3), 2))
    for kill_at in kills:
        child = Child(resume if (out / "checkpoint.h5").exists() else fresh)
        assert child.wait_for_step(kill_at) is not None
        child.proc.send_signal(signal.SIGKILL)
        assert child.finish()[0] == -signal.SIGKILL
    code, _, err = Child(resume if (out / "checkpoint.h5").exists() else fresh).finish()
    assert code == 0, err

    got, ref = (json.loads((d / "history.json").read_text()) for d in (out, tmp_path / "ref"))
    for key in ("train_losses", "val_losses", "tokens_seen", "steps", "lrs", "epoch", "global_step"):
        assert got[key] == ref[key], key
    assert len(got["steps"]) == total
    a, b = read_checkpoint(out / "checkpoint.h5"), read_checkpoint(tmp_path / "ref" / "checkpoint.h5")
    assert a["state"] == b["state"] and a["rng"] == b["rng"]
    for name, p in b["params"].items():
        assert np.array_equal(a["params"][name], p), name
    for key in ("exp_avg", "exp_avg_sq"):
        for name, p in b["optimizer"][key].items():
            assert np.array_equal(a["optimizer"][key][name], p), (key, name)


# ---- damaged bytes ----

@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory):
    cfg = npgpt.GPTConfig(vocab_size=50, context_length=8, emb_dim=8, n_heads=2, n_layers=1, drop_rate=0.1)
    model = npgpt.build_model(cfg, seed=1)
    opt = npgpt.AdamW(model)
    x = np.array([[1, 2, 3, 4]])
    model.train_step(x, x, opt)
    state = npgpt.run_state.TrainState(epoch=1, global_step=0, tokens_seen=4, train_losses=[3.9], val_losses=[3.95],
                                   track_tokens_seen=[4], track_steps=[0], lrs=[5e-4])
    path = npgpt.save_checkpoint(tmp_path_factory.mktemp("fuzz") / "c.h5", model, opt, state=state,
                                 run={"data": "x.txt"})
    return path.read_bytes(), read_checkpoint(path)


def same_checkpoint(a, b) -> bool:
    opt = a["optimizer"], b["optimizer"]
    return (a["config"] == b["config"] and a["dtype"] == b["dtype"] and a["state"] == b["state"]
            and a["rng"] == b["rng"] and a["run"] == b["run"]
            and all(np.array_equal(a["params"][n], p) for n, p in b["params"].items())
            and all(opt[0][k] == opt[1][k] for k in ("step", "lr", "betas", "eps", "weight_decay", "decay"))
            and all(np.array_equal(opt[0][k][n], p) for k in ("exp_avg", "exp_avg_sq") for n, p in opt[1][k].items()))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_damaged_checkpoint_bytes_are_refused_or_read_unchanged(small_checkpoint, tmp_path, data):
    """Random truncation and bit flips of a valid .h5 (about 50 kB). Allowed: the original contents
    exactly, or a ValueError naming the file. Not allowed: any other exception, a hang (faulthandler
    ends the test run with a traceback after 60 s), or contents that differ from what was saved."""
    raw, original = small_checkpoint
    damaged = bytearray(raw)
    if data.draw(st.booleans(), label="truncate"):
        damaged = damaged[:data.draw(st.integers(0, len(raw) - 1), label="length")]
    for pos, bit in data.draw(st.lists(st.tuples(st.integers(0, len(raw) - 1), st.integers(0, 7)),
                                       min_size=1, max_size=4), label="flips"):
        if pos < len(damaged):
            damaged[pos] ^= 1 << bit
    path = tmp_path / "damaged.h5"
    path.write_bytes(bytes(damaged))
    faulthandler.dump_traceback_later(60, exit=True, file=sys.__stderr__)
    try:
        loaded = read_checkpoint(path)
    except ValueError as e:
        assert str(path) in str(e)
        return
    finally:
        faulthandler.cancel_dump_traceback_later()
    assert same_checkpoint(loaded, original)


@pytest.mark.parametrize("edit", ["config", "epoch", "lr", "crc32", "no crc32", "train_losses", "dataset dtype"])
def test_edited_metadata_is_refused(small_checkpoint, tmp_path, edit):
    """What the tensors' crc32s do not cover, the root checksum does. Edits made with h5py (which
    keeps HDF5's own checksums right, unlike a bit flip) that would load silently otherwise."""
    raw, _ = small_checkpoint
    path = tmp_path / "edited.h5"
    path.write_bytes(raw)
    with h5py.File(path, "r+") as f:
        if edit == "config":                         # 4 heads of 2 instead of 2 of 4: same shapes, other model
            f.attrs["config"] = np.bytes_(f.attrs["config"].replace(b'"n_heads": 2', b'"n_heads": 4'))
        elif edit == "epoch":
            f["train_state"].attrs["epoch"] = 5
        elif edit == "lr":
            f["optimizer"].attrs["lr"] = 1.0
        elif edit in ("crc32", "no crc32"):          # with the data changed to match the new crc32
            ds = f["params/wpe"]
            ds[0, 0] += 1.0
            if edit == "crc32":
                ds.attrs["crc32"] = npgpt.weights.checkpoint._crc32(ds[()])
            else:
                del ds.attrs["crc32"]
        elif edit == "train_losses":
            f["train_state/train_losses"][0] = 1.0
        else:
            data = f["params/ln_f.bias"][()]
            del f["params/ln_f.bias"]
            f["params"].create_dataset("ln_f.bias", data=data.astype(np.float64)).attrs["crc32"] = 0
    with pytest.raises(ValueError, match=r"edited\.h5: checksum mismatch in its attributes or layout"):
        read_checkpoint(path)


def test_version_1_files_still_load(small_checkpoint, tmp_path):
    """Version 1 (before the root checksum): variable-length string attributes, no checksum."""
    raw, original = small_checkpoint
    path = tmp_path / "v1.h5"
    path.write_bytes(raw)
    with h5py.File(path, "r+") as f:
        for attrs in (f.attrs, f["train_state"].attrs):
            for key, value in list(attrs.items()):
                if isinstance(value, bytes):
                    attrs[key] = value.decode()                     # h5py writes str as variable-length
        f.attrs["version"] = 1
        del f.attrs["checksum"]
        assert f.attrs["config"] == original["config"].to_json()
    assert same_checkpoint(read_checkpoint(path), original)


# ---- nothing unpickled, nothing written where a file says ----

def test_no_code_in_the_package_unpickles():
    """torch.load only with weights_only=True; no pickle/marshal/dill/joblib loading; np.load
    never with allow_pickle=True."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
                continue
            owner = node.func.value.id if isinstance(node.func.value, ast.Name) else None
            kwargs = {k.arg: k.value for k in node.keywords}
            where = f"{path.relative_to(PACKAGE)}:{node.lineno}"
            if owner == "torch" and node.func.attr == "load":
                flag = kwargs.get("weights_only")
                if not (isinstance(flag, ast.Constant) and flag.value is True):
                    found.append(f"{where}: torch.load without weights_only=True")
            elif owner in ("pickle", "cPickle", "_pickle", "marshal", "dill", "joblib", "shelve") \
                    and node.func.attr in ("load", "loads", "open", "Unpickler"):
                found.append(f"{where}: {owner}.{node.func.attr}")
            elif owner in ("np", "numpy") and node.func.attr == "load" and "allow_pickle" in kwargs:
                found.append(f"{where}: np.load(allow_pickle=...)")
    assert not found, found
    assert any("torch.load" in p.read_text() for p in PACKAGE.rglob("*.py"))    # the scan looks at real code


def test_a_checkpoint_cannot_choose_where_a_resumed_run_writes(tmp_path, text):
    """The run settings a checkpoint carries are read by name (RUN_DEFAULTS): an "out" or "resume"
    among them is ignored, and everything is written beside the checkpoint."""
    elsewhere = tmp_path / "elsewhere"
    model = npgpt.build_model(npgpt.GPTConfig.preset("tiny"), seed=1, dtype="float64")
    run = {"data": str(text), "epochs": 1, "batch_size": 2, "max_length": 16, "stride": 16, "eval_freq": 50,
           "out": str(elsewhere), "resume": str(elsewhere / "x.h5"), "debug": True}
    (tmp_path / "run").mkdir()
    ckpt = npgpt.save_checkpoint(tmp_path / "run" / "checkpoint.h5", model, npgpt.AdamW(model), run=run)
    assert main(["train", "--resume", str(ckpt), "--no-progress"]) == 0
    assert not elsewhere.exists()
    assert sorted(p.name for p in ckpt.parent.iterdir()) == ["DONE", "checkpoint.h5", "history.json", "log.jsonl",
                                                            "loss.png"]


def test_convert_writes_only_inside_its_output_folder(tmp_path):
    """File names inside weight folders are not followed out of them: an OpenAI folder whose
    `checkpoint` file names ../../elsewhere/model.ckpt is read from its own model.ckpt, and
    `npgpt convert` writes the weights and the tokenizer files under OUT, with fixed names."""
    src = tmp_path / "in" / "gpt2"
    shutil.copytree(FIXTURES / "openai-tiny", src)
    (src / "checkpoint").write_text('model_checkpoint_path: "../../elsewhere/model.ckpt"\n')
    assert main(["convert", str(src), str(tmp_path / "out")]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "out"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["config.json", "merges.txt", "model.safetensors",
                                                                   "vocab.json"]
    assert sorted(p.name for p in src.iterdir()) == sorted(p.name for p in (FIXTURES / "openai-tiny").iterdir())
