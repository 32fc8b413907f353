"""Dropout parity. With identical injected keep-masks both backends compute the same function
(logits, loss, every gradient); without injection each backend's own dropout drops at rate p and
scales what it keeps by 1 / (1 - p), checked on the masks and activations it actually produces."""
from __future__ import annotations

import dataclasses
import math
import zlib

import numpy as np
import pytest
import torch

import npgpt
from npgpt.torch_backend.gpt import CausalSelfAttention, Dropout

from .helpers import assert_close, build_pair, perturb, random_batch


class FixedMasks:
    """fn(name, shape) -> bool keep-mask, a function of the name alone; records what was asked."""

    def __init__(self, p, seed):
        self.p, self.seed, self.calls = p, seed, []

    def __call__(self, name, shape):
        self.calls.append((name, shape))
        return np.random.default_rng([self.seed, zlib.crc32(name.encode())]).random(shape) >= self.p


def expected_calls(cfg, B, T):
    C, NH = cfg.emb_dim, cfg.n_heads
    calls = [("emb", (B, T, C))]
    for i in range(cfg.n_layers):
        calls += [(f"h.{i}.attn", (B, NH, T, T)), (f"h.{i}.resid_1", (B, T, C)), (f"h.{i}.resid_2", (B, T, C))]
    return calls


@pytest.mark.parametrize("p", [0.1, 0.5])
@pytest.mark.parametrize("qkv_bias, tie", [(False, False), (True, True)])
def test_injected_masks_give_identical_results(p, qkv_bias, tie):
    cfg = npgpt.GPTConfig(vocab_size=80, context_length=16, emb_dim=24, n_heads=3, n_layers=2,
                          drop_rate=p, qkv_bias=qkv_bias, tie_weights=tie)
    params = perturb(npgpt.init_params(cfg, 4, "float64"), 4)
    models = build_pair(cfg, "float64", params=params)
    inputs, targets = random_batch(cfg, 3, 12, seed=5)
    no_dropout = models[1].eval().logits(inputs)
    results = []
    for model in models:
        model.train()
        model.dropout_masks = FixedMasks(p, seed=9)
        logits = model.logits(inputs)
        loss, grads = model.loss_and_grads(inputs, targets)
        assert model.dropout_masks.calls == 2 * expected_calls(cfg, 3, 12), model.backend
        assert model.loss(inputs, targets) == loss        # the same masks again: the same loss
        results.append((logits, loss, grads))
    (np_logits, np_loss, np_grads), (torch_logits, torch_loss, torch_grads) = results
    assert np.abs(torch_logits - no_dropout).max() > 1e-2, "the masks must change the output"
    assert_close("logits", np_logits, torch_logits, atol=1e-10)
    assert_close("loss", np_loss, torch_loss, atol=1e-10)
    for name, ref in torch_grads.items():
        assert_close(name, np_grads[name], ref, atol=1e-12, rtol=1e-8)


def test_masks_are_not_used_in_eval_or_at_rate_zero():
    cfg = npgpt.GPTConfig(vocab_size=50, context_length=8, emb_dim=8, n_heads=2, n_layers=1, drop_rate=0.0)
    for model in build_pair(cfg, "float64"):
        model.dropout_masks = FixedMasks(0.5, seed=1)
        model.logits(random_batch(cfg, 1, 8, seed=0)[0])
        assert model.dropout_masks.calls == [], model.backend


def test_wrong_mask_shape_is_refused():
    cfg = npgpt.GPTConfig(vocab_size=50, context_length=8, emb_dim=8, n_heads=2, n_layers=1, drop_rate=0.2)
    messages = []
    for model in build_pair(cfg, "float64"):
        model.dropout_masks = lambda name, shape: np.ones((1, 2, 3), dtype=bool)
        with pytest.raises(ValueError) as e:
            model.logits(random_batch(cfg, 1, 8, seed=0)[0])
        messages.append(str(e.value))
    assert messages[0] == messages[1] == "dropout mask emb: expected shape (1, 8, 8), got (1, 2, 3)"


def assert_rate(name, dropped, total, p):
    """dropped ~ Binomial(total, p): within 5 standard deviations (two-sided p ~ 6e-7; seeds fixed)."""
    sigma = math.sqrt(total * p * (1 - p))
    assert abs(dropped - total * p) <= 5 * sigma, \
        f"{name}: dropped {dropped} of {total} ({dropped / total:.4f}), expected p = {p} +- {5 * sigma / total:.4f}"


P = 0.3
STAT_CFG = npgpt.GPTConfig(vocab_size=64, context_length=32, emb_dim=32, n_heads=2, n_layers=2, drop_rate=P)


def test_numpy_dropout_rate_and_scale():
    np_model, _ = build_pair(STAT_CFG, "float64")
    masks, make_mask = {}, np_model._mask

    def spy(name, shape, p, as_shape=None):         # the masks the model draws from its own RNG
        masks[name] = make_mask(name, shape, p, as_shape)
        return masks[name]

    np_model._mask = spy
    inputs, targets = random_batch(STAT_CFG, 8, 32, seed=1)
    np_model.loss(inputs, targets)
    assert sorted(masks) == sorted(name for name, _ in expected_calls(STAT_CFG, 8, 32))
    for name, mask in masks.items():
        kept = mask[mask != 0]
        assert np.all(kept == 1.0 / (1.0 - P)), f"{name}: kept values must be scaled by 1/(1-p)"
        assert_rate(name, mask.size - kept.size, mask.size, P)
    first = dict(masks)
    np_model.loss(inputs, targets)
    assert not np.array_equal(first["emb"], masks["emb"]), "a new mask every forward pass"


def test_torch_dropout_rate_and_scale():
    _, torch_model = build_pair(STAT_CFG, "float64")   # float64: attention dropout in the manual path
    seen = {}
    for module in torch_model.module.modules():
        if isinstance(module, Dropout):
            module.register_forward_hook(lambda m, args, out: seen.__setitem__(m.name, (args[0], out)))
    inputs, targets = random_batch(STAT_CFG, 8, 32, seed=1)
    torch_model.loss(inputs, targets)
    assert sorted(seen) == sorted(name for name, _ in expected_calls(STAT_CFG, 8, 32))
    for name, (x, y) in seen.items():
        live = x != 0                                  # attention weights above the diagonal are 0
        kept = live & (y != 0)
        assert_close(f"{name} kept / input", (y[kept] / x[kept]).numpy(), 1.0 / (1.0 - P), rtol=1e-14)
        assert_rate(name, int(live.sum() - kept.sum()), int(live.sum()), P)
    first = seen["emb"][1].clone()
    torch_model.loss(inputs, targets)
    assert not torch.equal(first, seen["emb"][1]), "a new mask every forward pass"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_torch_attention_dropout(dtype):
    """Make the attention output show the dropped attention matrix: q = k = 0 gives uniform causal
    weights 1/(i+1), and v = x = one-hot rows with identity projections give y[i, j] = att[i, j].
    float32 goes through scaled_dot_product_attention's own dropout, float64 through the manual path."""
    T, B = 32, 64
    cfg = npgpt.GPTConfig(vocab_size=10, context_length=T, emb_dim=T, n_heads=1, n_layers=1, drop_rate=P)
    attn = CausalSelfAttention(cfg, layer=0).to(dtype).train()
    with torch.no_grad():
        eye = torch.eye(T, dtype=dtype)
        attn.c_attn.weight.copy_(torch.cat([0 * eye, 0 * eye, eye]))
        attn.c_proj.weight.copy_(eye)
        attn.c_proj.bias.zero_()
        att = attn(eye.expand(B, T, T).contiguous())                    # (B, T, T)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    weights = (1.0 / torch.arange(1, T + 1, dtype=torch.float64))[:, None].expand(T, T)
    assert not att[:, ~causal].any(), "no weight above the diagonal"
    below = att[:, causal].double()
    kept = below != 0
    expected = (weights[causal] / (1.0 - P)).expand_as(below)
    assert_close("kept attention weights", below[kept].numpy(), expected[kept].numpy(),
                 rtol=1e-6 if dtype == torch.float32 else 1e-14)
    assert_rate("attention weights", int((~kept).sum()), kept.numel(), P)


def test_eval_turns_dropout_off():
    params = perturb(npgpt.init_params(STAT_CFG, 2, "float64"), 2)
    inputs = random_batch(STAT_CFG, 2, 16, seed=3)[0]
    no_dropout = dataclasses.replace(STAT_CFG, drop_rate=0.0)
    reference = build_pair(no_dropout, "float64", params=params)[0].logits(inputs)
    for model in build_pair(STAT_CFG, "float64", params=params):
        a, b = model.logits(inputs), model.logits(inputs)
        assert np.abs(a - b).max() > 1e-3, f"{model.backend}: training mode must drop"
        assert_close(f"{model.backend} eval logits", model.eval().logits(inputs), reference, atol=1e-12)
