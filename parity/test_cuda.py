"""Parity on CUDA: float64 (exact, as on the CPU), float32 with and without TF32 matmuls, bf16
autocast, torch.compile. Skipped where torch.cuda.is_available() is False.

Tolerances on CUDA (|a-b| <= atol + rtol*|ref|, ref = NumPy float64 from the same parameters):
  float64                 as on the CPU: logits/loss atol 1e-10, gradients rtol 1e-8 (+ atol 1e-12)
  float32, TF32 off       the CPU float32 tolerances: logits atol 1e-4, loss rtol 1e-5,
                          gradients rtol 1e-3 + atol 1e-5 * max|g|
  float32, TF32 on        TF32 rounds matmul inputs to 10 mantissa bits (relative 2^-11 ~ 5e-4
                          per operand, ~3e-3 after a few layers): logits atol 2e-2 * max|logits|,
                          loss rtol 5e-3, gradients rtol 3e-2 + atol 3e-2 * max|g|
  bf16 autocast           7 mantissa bits (2^-8 ~ 4e-3 per rounding), logits stored in bf16:
                          logits atol 1e-1 * max|logits|, loss rtol 2e-2, gradients rtol 1e-1 +
                          atol 1e-1 * max|g|
"""
from __future__ import annotations

import zlib

import numpy as np
import pytest
import torch

import npgpt

from .helpers import assert_close, perturb, random_batch

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

DEVICE = "cuda"
CFG = npgpt.GPTConfig(vocab_size=100, context_length=32, emb_dim=64, n_heads=4, n_layers=2,
                      drop_rate=0.1, qkv_bias=True)


@pytest.fixture
def tf32():
    """Restore the global TF32 switches that a float32 CUDA model turns on."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def reference_and_cuda(dtype, **torch_options):
    params = perturb(npgpt.init_params(CFG, 6, dtype), 6)
    reference = npgpt.build_model(CFG, "numpy", dtype="float64",
                                  params={n: p.astype(np.float64) for n, p in params.items()})
    model = npgpt.build_model(CFG, "torch", dtype=dtype, params=params, device=DEVICE, **torch_options)
    return reference.eval(), model.eval()


def compare(reference, model, logits, loss, grads):
    """logits: (atol, atol as a fraction of max|logits|); loss: assert_close keywords;
    grads: (rtol, atol, atol as a fraction of max|g|), for every gradient by name."""
    inputs, targets = random_batch(CFG, 4, 32, seed=2)
    ref_logits = reference.logits(inputs)
    assert_close("logits", model.logits(inputs), ref_logits, atol=logits[0] + logits[1] * np.abs(ref_logits).max())
    assert_close("loss", model.loss(inputs, targets), reference.loss(inputs, targets), **loss)
    _, ref_grads = reference.loss_and_grads(inputs, targets)
    _, model_grads = model.loss_and_grads(inputs, targets)
    rtol, atol, atol_scale = grads
    for name, ref in ref_grads.items():
        assert_close(name, model_grads[name], ref, rtol=rtol, atol=atol + atol_scale * np.abs(ref).max())


def test_float64():
    reference, model = reference_and_cuda("float64")
    assert model.device.type == "cuda" and model.module.wte.is_cuda
    compare(reference, model, (1e-10, 0.0), {"atol": 1e-10}, (1e-8, 1e-12, 0.0))


def test_float32_without_tf32(tf32):
    reference, model = reference_and_cuda("float32")
    assert torch.backends.cuda.matmul.allow_tf32, "float32 on CUDA turns TF32 on"
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    compare(reference, model, (1e-4, 0.0), {"rtol": 1e-5}, (1e-3, 0.0, 1e-5))


def test_float32_tf32(tf32):
    reference, model = reference_and_cuda("float32")
    assert npgpt.AdamW(model).opt.param_groups[0]["fused"], "fused AdamW on CUDA"
    compare(reference, model, (0.0, 2e-2), {"rtol": 5e-3}, (3e-2, 0.0, 3e-2))


def test_bf16_autocast(tf32):
    reference, model = reference_and_cuda("float32", autocast="bf16")
    compare(reference, model, (0.0, 1e-1), {"rtol": 2e-2}, (1e-1, 0.0, 1e-1))


def test_adamw_and_greedy_generation_float64():
    reference, model = reference_and_cuda("float64")
    reference.train(), model.train()
    opts = [npgpt.AdamW(m, lr=1e-3, weight_decay=0.1, decay_all=False) for m in (reference, model)]
    for step in range(5):
        inputs, targets = random_batch(CFG, 2, 32, seed=10 + step)
        reference.dropout_masks = model.dropout_masks = \
            lambda name, shape: np.random.default_rng([step, zlib.crc32(name.encode())]).random(shape) >= CFG.drop_rate
        losses = [m.train_step(inputs, targets, opt, clip_norm=1.0) for m, opt in zip((reference, model), opts)]
        assert_close(f"loss, step {step}", losses[1], losses[0], rtol=1e-9)
    # the key bias's gradient is zero in exact arithmetic (softmax ignores a constant added to a
    # row of scores), so it is rounding noise that AdamW scales up to ~lr * noise / eps: its
    # entries near zero are judged against the tensor's scale, atol = 1e-10 * max|p|
    for name, ref in reference.params().items():
        assert_close(name, model.params()[name], ref, rtol=1e-10, atol=1e-10 * np.abs(ref).max())
    prompt = random_batch(CFG, 2, 5, seed=3)[0]
    expected = npgpt.generate(reference, prompt, max_new_tokens=40, temperature=0.0)   # slides past 32
    for cache in (True, False):
        np.testing.assert_array_equal(
            npgpt.generate(model, prompt, max_new_tokens=40, temperature=0.0, use_cache=cache), expected)
    sampled = [npgpt.generate(model, prompt, max_new_tokens=20, temperature=1.0, top_p=0.9, seed=5)
               for _ in range(2)]
    np.testing.assert_array_equal(sampled[0], sampled[1])


def test_compiled_train_steps(tf32):
    _, eager = reference_and_cuda("float32")
    _, compiled = reference_and_cuda("float32", compile=True)
    curves = []
    for model in (eager, compiled):
        model.module.train()
        model.dropout_masks = lambda name, shape: np.random.default_rng(zlib.crc32(name.encode())).random(shape) >= 0.1
        opt = npgpt.AdamW(model, lr=1e-3)
        curves.append([model.train_step(*random_batch(CFG, 2, 32, seed=s), opt) for s in range(5)])
    # both TF32; the compiled graph fuses and reorders float32 arithmetic
    assert_close("losses", np.array(curves[1]), np.array(curves[0]), rtol=1e-3)
