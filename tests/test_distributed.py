"""Data-parallel training under torchrun: 2 CPU processes (gloo) against one process on the same
global batches, with the command line and with the Python API.

Why one process with batch size W*B is exactly the reference for W ranks of batch size B: rank r
reads batches r, r + W, r + 2W, ... of the global order of B-window batches (DataLoader.shard), so
step k trains on global batches kW .. kW + W - 1, that is windows kWB .. (k+1)WB - 1 of the epoch's
order, rank 0's B first. That order is a permutation of the windows drawn from (seed, epoch) alone,
so a single process with batch W*B trains its step k on the same windows in the same order (and
both drop the same tail: floor(floor(n/B)/W) = floor(n/(WB))). Its loss is the mean over W*B*T
tokens; DDP's averaged gradient and the ranks' averaged loss are the mean of W equal-sized means,
the same number up to rounding. Evaluation lines up the same way: the train and val losses recorded
after every step (--eval-freq 1) average the ranks' shares of the first --eval-iter global batches,
weighted by windows. The validation text below holds 2 windows, one batch of B, so rank 1 takes
part in its evaluation with an empty batch. Dropout is off (--drop-rate 0) where runs are compared
with one process: the ranks draw their own masks. With dropout on, a run resumed under torchrun is
compared with the same run straight through.

Run as a script under torchrun, this file is also the worker of the Python API test.
"""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import npgpt
from npgpt.cli import main
from parity.helpers import assert_close

REPO = Path(__file__).resolve().parent.parent
WORLD, B, T = 2, 2, 16               # ranks, windows per rank and step, tokens per window
CHARS = 1500                         # of The Verdict: 21 train windows (5 steps an epoch), 2 val windows
STEPS = 5
LOSS_TOL = {"float64": dict(atol=1e-10, rtol=0.0), "float32": dict(atol=0.0, rtol=1e-5)}
TIMEOUT_S = 180


def torchrun(args, cwd, timeout=TIMEOUT_S):
    """Run `torchrun --standalone --nproc_per_node=WORLD ARGS` (a free loopback port, chosen by
    torchrun); kill the whole process group if it outlives the timeout."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}", *args]
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"torchrun ran past {timeout} s\n{out[-3000:]}\n{err[-3000:]}")
    assert proc.returncode == 0, f"torchrun exited {proc.returncode}\n{out[-3000:]}\n{err[-3000:]}"
    return out, err


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread(one_thread):
    """The in-process references run on one thread, as each rank does (OMP_NUM_THREADS=1)."""


@pytest.fixture(scope="module")
def small_text(verdict_text, tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "small.txt"
    path.write_text(verdict_text[:CHARS], encoding="utf-8")
    return path


def train_args(dtype, data, batch_size, out, drop_rate=0.0, epochs=2):
    return ["train", "--backend", "torch", "--device", "cpu", "--preset", "tiny", "--drop-rate", str(drop_rate),
            "--dtype", dtype, "--data", str(data), "--epochs", str(epochs), "--max-length", str(T),
            "--batch-size", str(batch_size), "--eval-freq", "1", "--eval-iter", "2", "--warmup", "2",
            "--cosine", "--clip", "1.0", "--no-progress", "--out", str(out)]


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_torchrun_cli_matches_one_process(dtype, small_text, tmp_path, capsys):
    out, err = torchrun(["-m", "npgpt", *train_args(dtype, small_text, B, tmp_path / "ddp")], cwd=tmp_path)
    assert main(train_args(dtype, small_text, WORLD * B, tmp_path / "ref")) == 0
    ref_out = capsys.readouterr().out

    # rank 0 alone printed and wrote: the same lines as one process, one set of files
    assert out.count("Ep ") == ref_out.count("Ep ") == 2 * STEPS
    assert err.count("npgpt: torch backend") == 1 and err.count("npgpt: done") == 1, err
    files = ["DONE", "checkpoint.h5", "history.json", "log.jsonl", "loss.png"]
    assert sorted(p.name for p in (tmp_path / "ddp").iterdir()) == files
    kinds = [[json.loads(line)["kind"] for line in (tmp_path / run / "log.jsonl").read_text().splitlines()]
             for run in ("ddp", "ref")]
    assert kinds[0] == kinds[1] and kinds[0].count("step") == 2 * STEPS     # one rank's lines
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ddp", "ref"]

    ddp = json.loads((tmp_path / "ddp" / "history.json").read_text())
    ref = json.loads((tmp_path / "ref" / "history.json").read_text())
    assert ddp["steps"] == ref["steps"] == list(range(2 * STEPS)) and ddp["lrs"] == ref["lrs"]
    assert ddp["tokens_seen"] == ref["tokens_seen"]
    assert_close(f"{dtype} train losses", ddp["train_losses"], ref["train_losses"], **LOSS_TOL[dtype])
    assert_close(f"{dtype} val losses", ddp["val_losses"], ref["val_losses"], **LOSS_TOL[dtype])

    model, opt, state = npgpt.load_checkpoint(tmp_path / "ddp" / "checkpoint.h5")
    ref_model, ref_opt, _ = npgpt.load_checkpoint(tmp_path / "ref" / "checkpoint.h5")
    assert state.global_step == 2 * STEPS - 1 and opt.step_count == ref_opt.step_count == 2 * STEPS
    ref_params = ref_model.params()
    for name, p in model.params().items():
        assert_close(f"{dtype} {name} after training", p, ref_params[name],
                     atol=1e-10 if dtype == "float64" else 1e-5 * np.abs(ref_params[name]).max())

    # the run remembers its 2 processes: a single process may not resume it; torchrun resumes it exactly
    resume = ["train", "--backend", "torch", "--device", "cpu", "--epochs", "3", "--no-progress", "--resume"]
    assert main([*resume, str(tmp_path / "ddp" / "checkpoint.h5")]) == 2
    assert "trained by 2 processes (torchrun ranks), this run has 1" in capsys.readouterr().err
    torchrun(["-m", "npgpt", *resume, str(tmp_path / "ddp" / "checkpoint.h5")], cwd=tmp_path)
    assert main([*resume, str(tmp_path / "ref" / "checkpoint.h5")]) == 0
    ddp = json.loads((tmp_path / "ddp" / "history.json").read_text())
    ref = json.loads((tmp_path / "ref" / "history.json").read_text())
    assert ddp["steps"] == ref["steps"] == list(range(3 * STEPS))
    assert_close(f"{dtype} resumed train losses", ddp["train_losses"], ref["train_losses"], **LOSS_TOL[dtype])
    assert_close(f"{dtype} resumed val losses", ddp["val_losses"], ref["val_losses"], **LOSS_TOL[dtype])


def test_torchrun_on_shards_takes_one_process_windows_split_between_the_ranks(tmp_path, verdict_text):
    """From token shards, rank r of W takes the r-th B of the step's W*B distinct windows, so two
    ranks of batch B train on exactly the batches of one process with batch 2B (float64)."""
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "v.txt").write_text(verdict_text, encoding="utf-8")
    assert main(["prepare", str(tmp_path / "corpus"), "--out", str(tmp_path / "shards"), "--val-fraction", "0.1",
                 "--no-progress"]) == 0

    def args(batch, out):
        return ["train", "--backend", "torch", "--device", "cpu", "--preset", "tiny", "--drop-rate", "0",
                "--dtype", "float64", "--data", str(tmp_path / "shards"), "--max-length", str(T), "--batch-size",
                str(batch), "--max-steps", "6", "--eval-every", "2", "--eval-iter", "2", "--no-progress",
                "--out", str(out)]
    torchrun(["-m", "npgpt", *args(B, tmp_path / "ddp")], cwd=tmp_path)
    assert main(args(WORLD * B, tmp_path / "ref")) == 0
    ddp = json.loads((tmp_path / "ddp" / "history.json").read_text())
    ref = json.loads((tmp_path / "ref" / "history.json").read_text())
    assert ddp["steps"] == ref["steps"] == [0, 2, 4, 5] and ddp["tokens_seen"] == ref["tokens_seen"]
    assert_close("train losses", ddp["train_losses"], ref["train_losses"], **LOSS_TOL["float64"])
    assert_close("val losses", ddp["val_losses"], ref["val_losses"], **LOSS_TOL["float64"])
    batches = [npgpt.data.TokenDir(tmp_path / "shards").train_batches(B, T, 123, rank, WORLD) for rank in range(WORLD)]
    for step in range(6):                      # no window twice within a step
        starts = [tuple(zip(*b.starts(step))) for b in batches]
        assert not set(starts[0]) & set(starts[1])


def test_torchrun_resume_with_dropout_is_exact(small_text, tmp_path):
    """2 ranks with dropout 0.1: 2 epochs straight, and 1 epoch then 1 resumed, give identical
    losses and parameters. The checkpoint holds rank 0's dropout generator, which is every rank's:
    each rank adds its rank to the seeds it draws (TorchGPT._compute), so none reseeds on resume."""
    straight, split = tmp_path / "straight", tmp_path / "split"
    for out, epochs in ((straight, 2), (split, 1)):
        args = train_args("float32", small_text, B, out, drop_rate=0.1, epochs=epochs)
        warmup = args.index("--warmup")
        del args[warmup:warmup + 2], args[args.index("--cosine")]     # a constant lr, whatever --epochs
        torchrun(["-m", "npgpt", *args], cwd=tmp_path)
    torchrun(["-m", "npgpt", "train", "--backend", "torch", "--device", "cpu", "--epochs", "2", "--no-progress",
              "--resume", str(split / "checkpoint.h5")], cwd=tmp_path)
    runs = [json.loads((d / "history.json").read_text()) for d in (straight, split)]
    assert runs[0]["steps"] == runs[1]["steps"] == list(range(2 * STEPS))
    for key in ("train_losses", "val_losses"):
        np.testing.assert_array_equal(runs[1][key], runs[0][key], err_msg=key)
    params = [npgpt.load_checkpoint(d / "checkpoint.h5")[0].params() for d in (straight, split)]
    for name, p in params[0].items():
        np.testing.assert_array_equal(params[1][name], p, err_msg=name)


def test_ranks_draw_their_own_masks_from_one_generator_state():
    """Without processes: rank 1's dropout differs from rank 0's, yet both leave the model's
    generator in the same state (what makes rank 0's checkpoint resume every rank)."""
    from types import SimpleNamespace
    cfg = npgpt.GPTConfig.preset("tiny", drop_rate=0.1)
    x, y = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, B, T))
    models = [npgpt.build_model(cfg, backend="torch", device="cpu") for _ in range(WORLD)]
    for rank, model in enumerate(models):
        model.ranks = SimpleNamespace(rank=rank, mean=lambda loss, n: loss)
    losses = [model.loss(x, y) for model in models]
    assert losses[0] != losses[1]
    assert models[0].rng_state() == models[1].rng_state()


@pytest.mark.parametrize("n_windows, drop_last", [(21, True), (23, True), (5, False), (2, False), (7, False)])
def test_rank_loaders_split_the_batches_of_one_process(n_windows, drop_last):
    """Without processes: every rank gets the same number of batches, and step k's batches, rank
    0's first, are batch k of one process with batch size W*B (empty batches pad the last round)."""
    from npgpt.data import DataLoader
    from npgpt.torch_backend.distributed import RankLoader
    tokens = np.arange(n_windows * T + 1)
    make = lambda batch_size: DataLoader(tokens, batch_size, T, T, shuffle=drop_last, drop_last=drop_last)
    shards = [list(RankLoader(make(B), r, WORLD)) for r in range(WORLD)]
    whole = list(make(WORLD * B))
    assert [len(s) for s in shards] == [len(whole)] * WORLD
    for k, (x, y) in enumerate(whole):
        np.testing.assert_array_equal(np.concatenate([s[k][0] for s in shards]), x)
        np.testing.assert_array_equal(np.concatenate([s[k][1] for s in shards]), y)
    with pytest.raises(ValueError, match="make no step for 2 processes"):
        RankLoader(DataLoader(tokens[:2 * T + 1], 2, T, T, shuffle=True, drop_last=True), 0, WORLD)


# ---- the Python API: per-step losses of train_step and the gradients of loss_and_grads ----

def api_run(dtype, data, batch_size, ranks=None):
    """Train the tiny model one epoch -> (loss and gradients of the first batch, the losses of
    train_step, the validation loss after training)."""
    text = Path(data).read_text(encoding="utf-8")
    train_loader, val_loader = npgpt.make_loaders(text, npgpt.get_tokenizer(), batch_size=batch_size,
                                                  max_length=T, stride=T)
    model = npgpt.build_model(npgpt.GPTConfig.preset("tiny"), backend="torch", dtype=dtype, device="cpu")
    opt = npgpt.AdamW(model)
    if ranks is not None:
        ranks.wrap(model)
        train_loader, val_loader = ranks.shard(train_loader), ranks.shard(val_loader)
    loss, grads = model.loss_and_grads(*next(iter(train_loader)))
    losses = [model.train_step(x, y, opt, clip_norm=1.0) for x, y in train_loader]
    return loss, grads, losses, npgpt.calc_loss_loader(model.eval(), val_loader)


def worker(data, out_dir):
    """Each rank trains with the API and saves what it saw: its losses and first gradients."""
    from npgpt.torch_backend.distributed import Ranks
    ranks = Ranks("cpu")
    saved = {}
    for dtype in LOSS_TOL:
        loss, grads, losses, val_loss = api_run(dtype, data, B, ranks)
        saved.update({f"{dtype}/loss": loss, f"{dtype}/losses": losses, f"{dtype}/val_loss": val_loss},
                     **{f"{dtype}/grad/{name}": g for name, g in grads.items()})
    np.savez(Path(out_dir) / f"rank{ranks.rank}.npz", **saved)
    ranks.finish()


def test_torchrun_api_steps_match_one_process(small_text, tmp_path):
    torchrun([__file__, str(small_text), str(tmp_path)], cwd=tmp_path)
    ranks = [np.load(tmp_path / f"rank{r}.npz") for r in range(WORLD)]
    for dtype, tol in LOSS_TOL.items():
        loss, grads, losses, val_loss = api_run(dtype, small_text, WORLD * B)
        assert len(losses) == STEPS
        for r, saved in enumerate(ranks):
            assert_close(f"{dtype} rank {r} first loss", saved[f"{dtype}/loss"], loss, **tol)
            assert_close(f"{dtype} rank {r} train_step losses", saved[f"{dtype}/losses"], losses, **tol)
            assert_close(f"{dtype} rank {r} val loss", saved[f"{dtype}/val_loss"], val_loss, **tol)
            for name, g in grads.items():
                ours = saved[f"{dtype}/grad/{name}"]
                np.testing.assert_array_equal(ours, ranks[0][f"{dtype}/grad/{name}"])  # DDP: same on every rank
                if dtype == "float64":
                    assert_close(f"rank {r} d{name}", ours, g, atol=1e-14, rtol=1e-8)
                else:
                    assert_close(f"rank {r} d{name}", ours, g, atol=1e-5 * np.abs(g).max(), rtol=1e-3)


if __name__ == "__main__":
    worker(*sys.argv[1:])
