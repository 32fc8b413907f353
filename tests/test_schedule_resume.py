"""The optimizer and schedule of `npgpt train`, and a schedule that resumes exactly: a cosine run with
warmup and clipping, resumed, equals the uninterrupted one step for step (float64, dropout on, both
backends) for the same and for a larger --max-steps; a larger --max-steps without --lr-decay-steps
continues at the saved floor; a schedule option given with --resume applies from the next step
and says so in one line; clipping acts from the first step; every refusal is one line, exit
code 2, before any model is built."""
import json
import os
import shutil
import struct
from array import array

import h5py
import numpy as np
import pytest

import npgpt
from npgpt.cli import main
from npgpt.run_state import Schedule
from npgpt.training.schedule import scheduled_lr
from npgpt.weights.checkpoint import _digest, read_checkpoint

T, B = 16, 2
# the GPT-2 recipe's shape, small: peak 1e-3, 3 warmup steps, cosine to 1e-4, clipping at 0.05 (below
# every step's gradient norm here, so every step is clipped), beta2 0.95, decay on matrices only
RECIPE = ["--lr", "1e-3", "--warmup", "3", "--cosine", "--min-lr", "1e-4", "--clip", "0.05", "--beta2", "0.95",
          "--decay", "matrices"]

pytestmark = pytest.mark.usefixtures("one_thread")   # see conftest.py


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """An llm.c-format folder: 600 val and 3,000 train tokens."""
    folder = tmp_path_factory.mktemp("shards")
    rng = np.random.default_rng(5)
    for name, n in (("t_val_000000.bin", 600), ("t_train_000001.bin", 3000)):
        tokens = rng.integers(0, 1000, n).tolist()
        (folder / name).write_bytes(struct.pack("<256i", 20240520, 1, n, *[0] * 253) + array("H", tokens).tobytes())
    return folder


def train(shards, out, *extra):
    return main(["train", "--preset", "tiny", "--drop-rate", "0.1", "--dtype", "float64", "--data", str(shards),
                 "--max-length", str(T), "--batch-size", str(B), "--eval-every", "3", "--eval-iter", "1",
                 "--no-progress", "--out", str(out), *extra])


def resume(ckpt, *extra):
    return main(["train", "--resume", str(ckpt), "--no-progress", *extra])


def history(out):
    h = json.loads((out / "history.json").read_text())
    return {k: h[k] for k in ("lrs", "steps", "train_losses", "val_losses")}


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_a_resumed_cosine_run_equals_the_uninterrupted_one(shards, tmp_path, monkeypatch, backend):
    """Whole: 12 steps, a checkpoint at step 6 (kept as a snapshot; an evaluation there, as the
    reported training loss averages the steps since the last one). Same --max-steps: that
    checkpoint resumed. Larger --max-steps: a 7-step run resumed to 12. --lr-decay-steps 12 in both,
    so they share the whole run's schedule."""
    snapshots, save = tmp_path / "snapshots", npgpt.save_checkpoint
    snapshots.mkdir()

    def keep(path, *args, **kwargs):
        out = save(path, *args, **kwargs)
        snapshot = snapshots / f"{kwargs['state'].global_step}.h5"
        snapshot.unlink(missing_ok=True)
        os.link(out, snapshot)
        return out
    monkeypatch.setattr("npgpt.training.keep.save_checkpoint", keep)          # the run saves through its Keeper
    args = [*RECIPE, "--lr-decay-steps", "12", "--backend", backend]
    assert train(shards, tmp_path / "whole", *args, "--max-steps", "12", "--save-every", "7") == 0
    whole = history(tmp_path / "whole")
    expected = Schedule(1e-3, warmup_steps=3, cosine=True, decay_steps=12, min_lr=1e-4)
    assert whole["lrs"] == [scheduled_lr(expected, s) for s in range(12)]
    assert whole["lrs"][:4] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3]) and whole["steps"] == [0, 3, 6, 9, 11]

    assert resume(snapshots / "6.h5", "--backend", backend, "--out", str(tmp_path / "same")) == 0
    assert history(tmp_path / "same") == whole

    assert train(shards, tmp_path / "split", *args, "--max-steps", "7") == 0
    assert resume(tmp_path / "split" / "checkpoint.h5", "--backend", backend, "--max-steps", "12") == 0
    assert history(tmp_path / "split") == whole


@pytest.fixture(scope="module")
def cosine_run(shards, tmp_path_factory):
    """A finished 5-step recipe run: its schedule's cosine ends at step 5, the run's length."""
    out = tmp_path_factory.mktemp("cosine")
    assert train(shards, out, *RECIPE, "--max-steps", "5") == 0
    return out / "checkpoint.h5"


def test_a_longer_resume_continues_at_the_floor_and_given_options_apply(cosine_run, tmp_path, capsys):
    """Resumed to 8 steps, steps 5-7 run at --min-lr (a 7-step run once jumped back up 5x); then
    --lr and --lr-decay-steps given with --resume make a new schedule from the next step on, said
    in one line, and saved."""
    ckpt = tmp_path / "checkpoint.h5"
    shutil.copyfile(cosine_run, ckpt)
    saved = Schedule(1e-3, warmup_steps=3, cosine=True, decay_steps=5, min_lr=1e-4)
    assert npgpt.load_checkpoint(ckpt)[2].schedule == saved
    capsys.readouterr()
    assert resume(ckpt, "--max-steps", "8") == 0
    assert "resuming" not in capsys.readouterr().err
    lrs = history(tmp_path)["lrs"]
    assert lrs[:5] == [scheduled_lr(saved, s) for s in range(5)] and lrs[5:] == [1e-4] * 3

    assert resume(ckpt, "--max-steps", "11", "--lr", "2e-3", "--lr-decay-steps", "11") == 0
    said = [line for line in capsys.readouterr().err.splitlines() if "resuming" in line]
    assert said == [f"npgpt: resuming {ckpt} after step 7: from step 8 on, --lr 0.002 (saved: 0.001), "
                    "--lr-decay-steps 11 (saved: 5); the rest as saved"]
    new = Schedule(2e-3, warmup_steps=3, cosine=True, decay_steps=11, min_lr=1e-4)
    assert history(tmp_path)["lrs"][8:] == [scheduled_lr(new, s) for s in range(8, 11)]
    model, opt, state = npgpt.load_checkpoint(ckpt)
    assert state.schedule == new and opt.state()["decay"] == "matrices" and opt.betas == (0.9, 0.95)


def test_the_books_constant_lr_takes_a_new_lr_on_resume(shards, tmp_path, capsys):
    assert train(shards, tmp_path, "--max-steps", "3") == 0
    capsys.readouterr()
    assert resume(tmp_path / "checkpoint.h5", "--max-steps", "5", "--lr", "1e-4") == 0
    assert "--lr 0.0001 (saved: 0.0005)" in capsys.readouterr().err
    assert history(tmp_path)["lrs"] == [5e-4] * 3 + [1e-4] * 2


def test_clipping_acts_from_the_first_step(shards, tmp_path, monkeypatch, verdict_text):
    """--clip on every step, warmup included; no clipping without it (the book's run); through
    Python, clip_after_warmup=True is appendix D's (none during warmup)."""
    from npgpt.numpy_backend import NumpyGPT
    clips, train_step = [], NumpyGPT.train_step

    def spy(self, inputs, targets, optimizer, clip_norm=None, sync=True):
        clips.append(clip_norm)
        return train_step(self, inputs, targets, optimizer, clip_norm, sync)
    monkeypatch.setattr(NumpyGPT, "train_step", spy)
    assert train(shards, tmp_path / "clip", "--max-steps", "5", "--warmup", "3", "--clip", "1.0") == 0
    assert clips == [1.0] * 5
    clips.clear()
    assert train(shards, tmp_path / "book", "--max-steps", "2") == 0
    assert clips == [None] * 2
    tok = npgpt.get_tokenizer()
    loaders = npgpt.make_loaders(verdict_text[:600], tok, batch_size=2, max_length=16, stride=16)
    for after_warmup, expected in ((True, [None] * 3 + [0.5]), (False, [0.5] * 4)):
        clips.clear()
        model = npgpt.build_model(npgpt.GPTConfig.preset("tiny"))
        npgpt.train_model_simple(model, *loaders, npgpt.AdamW(model), 1, 100, 1, "Every", tok, warmup_steps=3,
                                 clip_norm=0.5, clip_after_warmup=after_warmup, progress=False,
                                 print_fn=lambda *_: None)
        assert clips[:4] == expected


@pytest.mark.parametrize("extra, message", [
    (["--min-lr", "1e-5"], "--min-lr 1e-05 needs a decaying --schedule (cosine, linear, wsd) (it is the "
                           "schedule's floor); --schedule is constant"),
    (["--lr-decay-steps", "9"], "--lr-decay-steps 9 needs a decaying --schedule (cosine, linear, wsd) (it is the "
                                "schedule's length); --schedule is constant"),
    (["--schedule", "cosine", "--decay-fraction", "0.5"], "--decay-fraction 0.5 needs --schedule wsd (it is the "
                                                          "schedule's wsd decay's share); --schedule is cosine"),
    (["--schedule", "wsd", "--decay-fraction", "0"], "--decay-fraction must be a number in (0, 1], got 0.0"),
    (["--schedule", "wsd", "--final-lr-frac", "1.5"], "--final-lr-frac must be a number in [0, 1], got 1.5"),
    (["--schedule", "wsd", "--final-lr-frac", "0.1", "--min-lr", "0"], "--final-lr-frac 0.1 and --min-lr 0.0 both "
                                                                       "set the floor: give one of them"),
    (["--cosine", "--schedule", "wsd"], "--cosine is --schedule cosine, and --schedule wsd was given: give one of "
                                        "them"),
    (["--skip-loss-z", "-1"], "--skip-loss-z must be a number > 0 (0: off), got -1.0"),
    (["--keep-last", "-1"], "--keep-last must be an integer >= 0, got -1"),
    (["--sample-tokens", "-1"], "--sample-tokens must be an integer >= 0, got -1"),
    (["--sample-every", "0"], "--sample-every must be a positive integer, got 0"),
    (["--hellaswag-batch", "0"], "--hellaswag-batch must be a positive integer, got 0"),
    (["--cosine", "--min-lr", "1e-2"], "--min-lr 0.01 must be at most --lr 0.0005"),
    (["--cosine", "--min-lr", "nan"], "--min-lr must be a number >= 0, got nan"),
    (["--cosine", "--warmup", "5", "--lr-decay-steps", "5"], "--lr-decay-steps 5 must be more than --warmup 5"),
    (["--cosine", "--lr-decay-steps", "0"], "--lr-decay-steps must be a positive integer, got 0"),
    (["--beta1", "1"], "--beta1 must be a number in [0, 1), got 1.0"),
    (["--beta2", "-0.5"], "--beta2 must be a number in [0, 1), got -0.5"),
    (["--eps", "0"], "--eps must be a positive number, got 0.0"),
])
def test_bad_optimizer_and_schedule_options_are_refused(shards, tmp_path, capsys, monkeypatch, extra, message):
    monkeypatch.setattr(npgpt, "build_model", lambda *a, **k: pytest.fail("a model was built"))
    assert train(shards, tmp_path / "out", "--max-steps", "10", *extra) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("extra, message", [
    (["--decay", "all"], "--decay all: {ckpt} was trained with --decay matrices, and a resumed run keeps its "
                         "optimizer's parameter groups (leave --decay out)"),
    (["--lr", "1e-5"], "--min-lr 0.0001 must be at most --lr 1e-05: the schedule decays from --lr down to it (the "
                       "resumed run saved this --min-lr: give another)"),
])
def test_a_resume_refuses_what_it_cannot_apply(cosine_run, capsys, monkeypatch, extra, message):
    monkeypatch.setattr(npgpt, "load_checkpoint", lambda *a, **k: pytest.fail("a model was built"))
    before = cosine_run.read_bytes()
    assert resume(cosine_run, "--max-steps", "8", *extra) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"npgpt train: error: {message.format(ckpt=cosine_run)}"]
    assert cosine_run.read_bytes() == before


def test_the_schedule_and_decay_groups_round_trip_and_older_files_load(cosine_run, tmp_path):
    ckpt = read_checkpoint(cosine_run)
    assert ckpt["state"].schedule == Schedule(1e-3, 3, None, True, 5, 1e-4)
    assert ckpt["optimizer"]["decay"] == "matrices" and ckpt["optimizer"]["betas"] == [0.9, 0.95]
    old = tmp_path / "v2.h5"                     # version 2 wrote decay_all and the peak alone
    shutil.copyfile(cosine_run, old)
    with h5py.File(old, "r+") as f:
        del f["optimizer"].attrs["decay"], f["train_state"].attrs["schedule"]
        f["optimizer"].attrs["decay_all"] = False
        f["train_state"].attrs["peak_lr"] = 1e-3
        f.attrs["version"] = 2
        f.attrs["checksum"] = _digest(f)
    ckpt = read_checkpoint(old)
    assert ckpt["optimizer"]["decay"] == "matrices" and ckpt["state"].schedule is None
    bad = tmp_path / "bad.h5"
    shutil.copyfile(cosine_run, bad)
    with h5py.File(bad, "r+") as f:
        f["train_state"].attrs["schedule"] = np.bytes_(json.dumps({"peak_lr": 1e-3, "cosine": True}).encode())
        f.attrs["checksum"] = _digest(f)
    with pytest.raises(ValueError, match=r"bad\.h5: its train_state's schedule is not valid \(Schedule.decay_steps"):
        read_checkpoint(bad)
