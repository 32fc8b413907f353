"""Training parity: the same loss curve on The Verdict, and a run that moves from the NumPy
backend to the torch backend halfway (parameters and optimizer state) without noticing."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

import npgpt

from .helpers import assert_close, build_pair

CFG = npgpt.GPTConfig.preset("tiny", emb_init_std=0.02)   # GPT-2's vocabulary and init, 2 layers, no dropout


@pytest.fixture(scope="module")
def batches(verdict_text):
    train_loader, _ = npgpt.make_loaders(verdict_text, npgpt.get_tokenizer(), batch_size=2,
                                         max_length=32, stride=32)
    batches = list(itertools.islice(train_loader, 20))
    assert len(batches) == 20
    return batches


@pytest.mark.parametrize("dtype, rel", [("float64", 1e-9), ("float32", 1e-4)])
def test_training_curve(batches, dtype, rel):
    models = build_pair(CFG, dtype, seed=123)
    curves = []
    for model in models:
        opt = npgpt.AdamW(model, lr=1e-3, weight_decay=0.1)
        curves.append([model.train_step(x, y, opt) for x, y in batches])
    np_losses, torch_losses = map(np.array, curves)
    assert np_losses[-5:].mean() < np_losses[0] - 0.3, f"the model should learn: {np_losses}"
    assert_close("losses", np_losses, torch_losses, rtol=rel)


def test_resume_numpy_run_in_torch(batches):
    batches = batches[:10]
    np_model = npgpt.build_model(CFG, "numpy", dtype="float64", seed=123)
    np_opt = npgpt.AdamW(np_model, lr=1e-3, weight_decay=0.1)
    reference = [np_model.train_step(x, y, np_opt, clip_norm=1.0) for x, y in batches]

    first = npgpt.build_model(CFG, "numpy", dtype="float64", seed=123)
    first_opt = npgpt.AdamW(first, lr=1e-3, weight_decay=0.1)
    losses = [first.train_step(x, y, first_opt, clip_norm=1.0) for x, y in batches[:5]]
    # a fresh torch model from different weights, with a different optimizer setting: all replaced
    second = npgpt.build_model(CFG, "torch", dtype="float64", seed=999)
    second_opt = npgpt.AdamW(second, lr=0.1, weight_decay=0.0)
    second.load_params(first.params())
    second_opt.load_state(first_opt.state())
    losses += [second.train_step(x, y, second_opt, clip_norm=1.0) for x, y in batches[5:]]
    assert_close("losses", np.array(losses), np.array(reference), rtol=1e-9)
    assert second_opt.state()["step"] == 10
