"""Checkpoints: what is saved comes back exactly, in either backend; a resumed run is the run that
was never interrupted (the book's exercise 5.4, through the command line); a crash or a damaged
file never passes for a checkpoint."""
from __future__ import annotations

import json
import os
import stat
import tracemalloc

import h5py
import numpy as np
import pytest

import npgpt
from npgpt.files import atomic_write
from npgpt.cli import main
from npgpt.run_state import TrainState

CFG = npgpt.GPTConfig.preset("tiny", vocab_size=500, context_length=16, drop_rate=0.1)


pytestmark = pytest.mark.usefixtures("one_thread")   # see conftest.py


def batches(n, seed=0, vocab=CFG.vocab_size):
    rng = np.random.default_rng(seed)
    return [(x[:, :-1], x[:, 1:]) for x in (rng.integers(0, vocab, (2, 17)) for _ in range(n))]


def trained(backend, dtype="float64", steps=3, cfg=CFG):
    model = npgpt.build_model(cfg, backend=backend, dtype=dtype, seed=7)
    opt = npgpt.AdamW(model, lr=1e-3, weight_decay=0.1)
    losses = [model.train_step(x, y, opt) for x, y in batches(steps)]
    return model, opt, losses


def assert_same_state(a, b):
    """Optimizer state() of either backend: same step, hyperparameters and moments."""
    for key in ("step", "lr", "eps", "weight_decay", "decay"):
        assert a[key] == pytest.approx(b[key]), key
    assert tuple(a["betas"]) == pytest.approx(tuple(b["betas"]))
    for key in ("exp_avg", "exp_avg_sq"):
        for name in a[key]:
            assert np.array_equal(a[key][name], b[key][name]), (key, name)


def test_save_load_restores_everything_and_training_continues_identically(tmp_path):
    model, opt, _ = trained("numpy")
    state = TrainState(epoch=1, global_step=2, tokens_seen=96, train_losses=[9.1, 8.2], val_losses=[9.3, 8.7],
                       track_tokens_seen=[32, 96], track_steps=[0, 2], lrs=[1e-3] * 3)
    npgpt.save_checkpoint(tmp_path / "c.h5", model, opt, state=state)
    loaded, loaded_opt, loaded_state = npgpt.load_checkpoint(tmp_path / "c.h5")
    assert loaded.cfg == CFG and loaded.dtype == np.float64 and loaded_state == state
    for name, p in model.params().items():
        assert np.array_equal(loaded.params()[name], p), name
    assert_same_state(loaded_opt.state(), opt.state())
    assert loaded.rng_state() == model.rng_state()
    more = batches(3, seed=1)                       # dropout is on: the RNG has to carry over too
    assert [loaded.train_step(x, y, loaded_opt) for x, y in more] == [model.train_step(x, y, opt) for x, y in more]


@pytest.mark.parametrize("source, target", [("numpy", "torch"), ("torch", "numpy")])
def test_either_backend_resumes_what_the_other_wrote(tmp_path, source, target):
    pytest.importorskip("torch")
    cfg = npgpt.GPTConfig.preset("tiny", vocab_size=500, context_length=16)       # no dropout: RNGs differ
    model, opt, _ = trained(source, cfg=cfg)
    npgpt.save_checkpoint(tmp_path / "c.h5", model, opt, epoch=1, global_step=2, tokens_seen=96)
    other, other_opt, state = npgpt.load_checkpoint(tmp_path / "c.h5", backend=target)
    assert other.backend == target and (state.epoch, state.global_step, state.tokens_seen) == (1, 2, 96)
    for name, p in model.params().items():
        assert np.array_equal(other.params()[name], p), name
    assert_same_state(other_opt.state(), opt.state())
    more = batches(3, seed=1)
    ref = np.array([model.train_step(x, y, opt) for x, y in more])
    got = np.array([other.train_step(x, y, other_opt) for x, y in more])
    assert np.abs(got - ref).max() <= 1e-9 * np.abs(ref).max(), (got, ref)   # float64 parity tolerance


def test_a_failed_write_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    model, opt, _ = trained("numpy", dtype="float32", steps=1)
    path = npgpt.save_checkpoint(tmp_path / "c.h5", model, opt, epoch=1)
    before = path.read_bytes()
    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask            # not mkstemp's 0600

    def crash(group, tensors):                                             # dies halfway through
        group.create_dataset("half", data=np.zeros(3))
        raise OSError("disk full")
    monkeypatch.setattr(npgpt.weights.checkpoint, "_write_tensors", crash)
    with pytest.raises(OSError, match="disk full"):
        npgpt.save_checkpoint(path, model, opt, epoch=2)
    monkeypatch.undo()
    model.load_params({**model.params(), "wpe": np.full(model.p["wpe"].shape, np.nan, np.float32)})
    with pytest.raises(FloatingPointError, match="non-finite"):
        npgpt.save_checkpoint(path, model, opt, epoch=3)
    assert path.read_bytes() == before and sorted(os.listdir(tmp_path)) == ["c.h5"]
    assert npgpt.load_checkpoint(path)[2].epoch == 1

    def junk_then_fail(tmp):
        with open(tmp, "wb") as f:
            f.write(b"junk")
        raise RuntimeError("interrupted")
    with pytest.raises(RuntimeError, match="interrupted"):
        atomic_write(path, junk_then_fail)
    assert path.read_bytes() == before and sorted(os.listdir(tmp_path)) == ["c.h5"]


def test_a_damaged_checkpoint_is_refused_with_the_reason(tmp_path):
    model, opt, _ = trained("numpy", dtype="float32", steps=1)
    path = npgpt.save_checkpoint(tmp_path / "c.h5", model, opt)
    with h5py.File(path, "r") as f:
        offset = f["optimizer/exp_avg/h.1.mlp.c_fc.weight"].id.get_offset()
    raw = bytearray(path.read_bytes())
    raw[offset + 40] ^= 0xFF
    (tmp_path / "flipped.h5").write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="optimizer/exp_avg/h.1.mlp.c_fc.weight: checksum mismatch"):
        npgpt.load_checkpoint(tmp_path / "flipped.h5")
    (tmp_path / "cut.h5").write_bytes(path.read_bytes()[:len(raw) // 2])
    with pytest.raises(ValueError, match="cut.h5"):
        npgpt.load_checkpoint(tmp_path / "cut.h5")
    (tmp_path / "empty.h5").write_bytes(b"")
    with pytest.raises(ValueError, match="not an HDF5 file"):
        npgpt.load_checkpoint(tmp_path / "empty.h5")


def test_loading_reads_into_the_model_and_optimizer_buffers(tmp_path):
    """No second copy: the parameters, gradients and AdamW's three buffers are all that is allocated."""
    cfg = npgpt.GPTConfig.preset("tiny", n_layers=4)
    model, opt, _ = trained("numpy", dtype="float32", steps=1, cfg=cfg)
    npgpt.save_checkpoint(tmp_path / "c.h5", model, opt)
    weights = npgpt.num_params(cfg) * 4
    del model, opt
    tracemalloc.start()
    try:
        npgpt.load_checkpoint(tmp_path / "c.h5")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # params + grads + exp_avg + exp_avg_sq + AdamW scratch, and one tensor in flight (wte: half the weights)
    assert peak < 5 * weights + 0.6 * weights, f"peak {peak / weights:.2f} x the weights' size"


# ---- exercise 5.4 through the command line ----

@pytest.fixture(scope="module")
def short_text(tmp_path_factory, verdict_text):
    """The first 1,000 characters of The Verdict: 7 steps an epoch with the options below."""
    path = tmp_path_factory.mktemp("data") / "verdict-start.txt"
    path.write_text(verdict_text[:1000], encoding="utf-8")
    return path


def train_args(data, out, epochs, *extra):
    return ["train", "--preset", "tiny", "--drop-rate", "0.1", "--data", str(data), "--max-length", "16",
            "--batch-size", "2", "--eval-freq", "4", "--eval-iter", "2", "--epochs", str(epochs),
            "--out", str(out), "--no-progress", *extra]


def history(out, upto_step=None):
    """history.json's lists, cut after upto_step (the last step of a shorter run)."""
    h = json.loads((out / "history.json").read_text())
    n = len(h["lrs"]) if upto_step is None else upto_step + 1
    evals = sum(s <= n - 1 for s in h["steps"])
    return {"lrs": h["lrs"][:n], **{k: h[k][:evals] for k in ("train_losses", "val_losses", "tokens_seen", "steps")}}


def assert_same_history(got, ref, atol):
    assert {k: got[k] for k in ("lrs", "tokens_seen", "steps")} == {k: ref[k] for k in ("lrs", "tokens_seen", "steps")}
    for key in ("train_losses", "val_losses"):
        diff = np.abs(np.subtract(got[key], ref[key]))
        assert diff.max() <= atol, f"{key}: max |diff| {diff.max():.3g} > {atol}"


@pytest.mark.parametrize("dtype, atol", [("float64", 0.0), ("float32", 1e-6)])
def test_cli_five_epochs_then_five_more_equal_ten(tmp_path, short_text, monkeypatch, dtype, atol):
    """The tiny preset has no dropout (drop_rate 0), which would leave the RNG state untested, hence
    --drop-rate 0.1. Snapshots of the checkpoints the ten-epoch run writes (every 5 steps, and at
    the end) give the epoch-5 (step 34) and mid-epoch resumes."""
    snapshots, save = tmp_path / "snapshots", npgpt.save_checkpoint
    snapshots.mkdir()

    def keep(path, *args, **kwargs):
        out = save(path, *args, **kwargs)
        snapshot = snapshots / f"{kwargs['state'].global_step}.h5"
        snapshot.unlink(missing_ok=True)
        os.link(out, snapshot)                 # a hard link: the next save replaces the file, not rewrites it
        return out
    monkeypatch.setattr("npgpt.training.keep.save_checkpoint", keep)          # the run saves through its Keeper
    assert main(train_args(short_text, tmp_path / "ten", 10, "--dtype", dtype, "--save-every", "5")) == 0
    ten = history(tmp_path / "ten")
    steps_per_epoch = len(ten["lrs"]) // 10
    assert steps_per_epoch >= 5 and len(ten["train_losses"]) >= 15

    if dtype == "float32":                     # a separate five-epoch run, resumed for five more
        assert main(train_args(short_text, tmp_path / "split", 5, "--dtype", dtype)) == 0
        assert json.loads((tmp_path / "split" / "history.json").read_text())["epoch"] == 5
        assert main(["train", "--resume", str(tmp_path / "split" / "checkpoint.h5"), "--epochs", "10",
                     "--no-progress"]) == 0
        assert_same_history(history(tmp_path / "split"), ten, atol)
        return
    # float64: the ten-epoch run's own checkpoint after epoch 5, resumed for five more
    assert main(["train", "--resume", str(snapshots / f"{5 * steps_per_epoch - 1}.h5"), "--out",
                 str(tmp_path / "split"), "--no-progress"]) == 0
    assert_same_history(history(tmp_path / "split"), ten, atol)

    # a save inside an epoch (not its first or last steps), resumed to the end of the next epoch
    mid = next(s for s in range(9, 10 * steps_per_epoch, 10) if 2 <= s % steps_per_epoch <= steps_per_epoch - 3)
    epochs = str(mid // steps_per_epoch + 2)
    assert main(["train", "--resume", str(snapshots / f"{mid}.h5"), "--out", str(tmp_path / "mid"),
                 "--epochs", epochs, "--no-progress"]) == 0
    last = int(epochs) * steps_per_epoch - 1
    assert_same_history(history(tmp_path / "mid"), history(tmp_path / "ten", last), 0.0)
    # the dropout RNG is what makes it exact: resumed with a fresh RNG, the losses differ
    monkeypatch.setattr(npgpt.numpy_backend.NumpyGPT, "set_rng_state", lambda self, state: None)
    assert main(["train", "--resume", str(snapshots / f"{mid}.h5"), "--out", str(tmp_path / "fresh"),
                 "--epochs", epochs, "--no-progress"]) == 0
    assert history(tmp_path / "fresh")["train_losses"] != history(tmp_path / "ten", last)["train_losses"]


def test_cli_resume_refuses_other_batches(tmp_path, short_text, capsys):
    assert main(train_args(short_text, tmp_path / "run", 1)) == 0
    ckpt = str(tmp_path / "run" / "checkpoint.h5")
    assert main(["train", "--resume", ckpt, "--batch-size", "4", "--epochs", "2"]) == 2
    assert "trained with 1 process(es) x --batch-size 2 x --grad-accum 1" in capsys.readouterr().err


def test_cli_torch_backend_resumes_exactly(tmp_path, short_text):
    """Dropout on: torch's global RNG state goes through the checkpoint too."""
    pytest.importorskip("torch")
    args = ["--backend", "torch", "--dtype", "float64", "--drop-rate", "0.1"]
    assert main(train_args(short_text, tmp_path / "four", 4, *args)) == 0
    assert main(train_args(short_text, tmp_path / "split", 2, *args)) == 0
    assert main(["train", "--backend", "torch", "--resume", str(tmp_path / "split" / "checkpoint.h5"),
                 "--epochs", "4", "--no-progress"]) == 0
    assert_same_history(history(tmp_path / "split"), history(tmp_path / "four"), 0.0)
