"""The chapter-5 loop: loss evaluation, the book's printed lines, learning on The Verdict, and the
files `npgpt train` writes."""
import collections
import json
import math
import re

import numpy as np
import pytest

import npgpt
from npgpt.cli import main
from npgpt.run_state import TrainState

TINY = npgpt.GPTConfig.preset("tiny")


def test_calc_loss_loader_caps_batches_and_averages(verdict_text):
    tok = npgpt.get_tokenizer()
    train, _ = npgpt.make_loaders(verdict_text, tok, batch_size=4, max_length=32, stride=32)
    model = npgpt.build_model(TINY).eval()
    batches = list(train)
    expected = np.mean([model.loss(x, y) for x, y in batches[:3]])
    assert npgpt.calc_loss_loader(model, train, num_batches=3) == pytest.approx(expected, rel=1e-12)
    everything = np.mean([model.loss(x, y) for x, y in batches])
    assert npgpt.calc_loss_loader(model, train, num_batches=10_000) == pytest.approx(everything, rel=1e-12)
    # an untrained GPT-2-initialised model is close to uniform over the vocabulary
    assert abs(everything - math.log(TINY.vocab_size)) < 0.1


def test_tiny_model_learns_the_verdict(verdict_text, capsys):
    """Threshold: the unigram entropy of the training tokens (about 6.0 nats) is the best loss a
    model can reach without looking at the context; the trained model must get below it."""
    tok = npgpt.get_tokenizer()
    train, val = npgpt.make_loaders(verdict_text, tok, batch_size=8, max_length=32, stride=32, seed=1)
    counts = np.array(list(collections.Counter(tok.encode(verdict_text[:int(0.9 * len(verdict_text))])).values()))
    unigram_entropy = float(-(counts / counts.sum() * np.log(counts / counts.sum())).sum())
    cfg = npgpt.GPTConfig.preset("tiny", emb_dim=64, n_heads=4)
    model = npgpt.build_model(cfg, seed=1)
    opt = npgpt.AdamW(model, lr=3e-3, weight_decay=0.1)
    epochs = 14                                                    # 17 batches an epoch: 238 steps
    train_losses, val_losses, tokens_seen = npgpt.train_model_simple(
        model, train, val, opt, num_epochs=epochs, eval_freq=40, eval_iter=5,
        start_context="Every effort moves you", tokenizer=tok, progress=False)
    out = capsys.readouterr().out
    lines = re.findall(r"^Ep (\d+) \(Step (\d{6})\): Train loss (\d+\.\d{3}), Val loss (\d+\.\d{3})$", out, re.M)
    assert [int(step) for _, step, _, _ in lines] == list(range(0, epochs * len(train), 40))
    assert out.count("Every effort moves you") == epochs           # one sample per epoch
    assert tokens_seen == [(s + 1) * 8 * 32 for s in range(0, epochs * len(train), 40)]
    assert train_losses[0] > 9.5
    final_train = npgpt.calc_loss_loader(model.eval(), train)
    assert final_train < unigram_entropy - 0.5, (final_train, unigram_entropy)
    assert npgpt.calc_loss_loader(model, val) < math.log(cfg.vocab_size) - 3


def test_cli_train_writes_checkpoint_history_and_plot(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", "--preset", "tiny", "--epochs", "2", "--max-length", "64", "--batch-size", "4",
                 "--eval-freq", "4", "--out", str(out), "--no-progress", "--warmup", "3", "--cosine", "--clip", "1.0"])
    assert code == 0
    history = json.loads((out / "history.json").read_text())
    steps = history["global_step"] + 1
    assert steps == 2 * 18 and len(history["lrs"]) == steps      # 18 batches of 4 x 64 tokens an epoch
    assert history["lrs"][:4] == pytest.approx([1.25e-4, 2.5e-4, 3.75e-4, 5e-4])     # 5e-4 (s + 1) / 4, the peak
    assert len(history["train_losses"]) == len(history["val_losses"]) == len(range(0, steps, 4))
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    model, opt, state = npgpt.load_checkpoint(out / "checkpoint.h5")
    assert state.epoch == 2 and state.global_step == steps - 1 and opt.step_count == steps
    assert re.search(r"^Ep 2 \(Step 000032\): Train loss \d+\.\d{3}, Val loss \d+\.\d{3}$", capsys.readouterr().out, re.M)


def test_cli_reports_bad_input_in_one_line(tmp_path, capsys):
    assert main(["train", "--data", str(tmp_path / "missing.txt"), "--preset", "tiny", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("npgpt train: error:") and "missing.txt" in err[-1]


class QueuedLoss:
    """A loss as a GPU leaves it after train_step(sync=False): reading it waits for the device."""
    reads = 0

    def __init__(self, value):
        self.value = value

    def __float__(self):
        QueuedLoss.reads += 1
        return self.value


def test_the_loop_reads_a_queued_device_only_every_few_steps(verdict_text, monkeypatch):
    """A backend that queues its work (a GPU) is waited for every FLUSH_EVERY steps and before each
    evaluation, not after every step; a NaN found at a flush still names its own step."""
    from npgpt.numpy_backend import NumpyGPT
    from npgpt.training.stepper import FLUSH_EVERY
    waits = []
    train_step = NumpyGPT.train_step
    monkeypatch.setattr(NumpyGPT, "synchronous", False, raising=False)
    monkeypatch.setattr(NumpyGPT, "synchronize", lambda self: waits.append(QueuedLoss.reads), raising=False)
    poison = {}

    def queued(self, inputs, targets, optimizer, clip_norm=None, sync=True):
        value = train_step(self, inputs, targets, optimizer, clip_norm)
        return QueuedLoss(float("nan") if optimizer.step_count == poison.get("at") else value)
    monkeypatch.setattr(NumpyGPT, "train_step", queued)
    tok = npgpt.get_tokenizer()
    train, val = npgpt.make_loaders(verdict_text, tok, batch_size=2, max_length=16, stride=16)
    model = npgpt.build_model(TINY)
    calls = []
    state = TrainState()
    npgpt.train_model_simple(model, train, val, npgpt.AdamW(model), 1, 25, 1, "Every", tok, state=state,
                             on_step=lambda s: calls.append(s.global_step), progress=False, print_fn=lambda *_: None)
    steps, due, pending = len(train), [], 0
    for step in range(steps):                      # flushed: FLUSH_EVERY steps queued, an evaluation, the end
        pending += 1
        if pending == FLUSH_EVERY or step % 25 == 0 or step == steps - 1:
            due.append(step)
            pending = 0
    assert steps > 3 * FLUSH_EVERY and len(due) < steps / 5
    assert calls == due and len(waits) == len(due) and QueuedLoss.reads == steps
    assert len(state.train_losses) == len(range(0, steps, 25))
    poison["at"] = 3                               # the third step of a new run: found at the flush after it
    with pytest.raises(npgpt.TrainingDiverged, match=r"^step 2 \(epoch 1\): loss is nan"):
        fresh = npgpt.build_model(TINY)
        npgpt.train_model_simple(fresh, train, val, npgpt.AdamW(fresh), 1, 25, 1, "Every", tok, progress=False,
                                 print_fn=lambda *_: None)
