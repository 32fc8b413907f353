"""gpt2.py, the reference model, read as a reader reads it, and both NumPy models without biases.

GPT-2 with nanoGPT's bias=False has no bias in any LayerNorm or linear layer: its params simply
lack every `*.bias`. Both NumPy models must run on such params and give autograd's gradients; the
torch forward here is written for the test (F.layer_norm, F.linear, F.gelu, F.cross_entropy),
independent of both NumPy models and of npgpt's torch backend.
"""
import dataclasses
import inspect
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import npgpt
from npgpt.numpy_backend import gpt2
from npgpt.numpy_backend import model as model_module
from npgpt.params import param_shapes
from parity.helpers import assert_close

CFG = npgpt.GPTConfig(vocab_size=29, context_length=8, emb_dim=12, n_heads=3, n_layers=2, drop_rate=0.0,
                      qkv_bias=False, tie_weights=True)


def without_biases(shapes):
    return {name: s for name, s in shapes.items() if not name.endswith(".bias")}


def torch_gpt2(p, cfg, idx, targets):
    """GPT-2's loss in torch, every bias optional (p.get): -> (logits, loss)."""
    B, T = idx.shape
    C, NH = cfg.emb_dim, cfg.n_heads
    x = p["wte"][idx] + p["wpe"][:T]
    future = torch.ones(T, T, dtype=torch.bool).triu(1)
    for i in range(cfg.n_layers):
        h = f"h.{i}."
        a = F.layer_norm(x, (C,), p[h + "ln_1.weight"], p.get(h + "ln_1.bias"), eps=1e-5)
        q, k, v = F.linear(a, p[h + "attn.c_attn.weight"], p.get(h + "attn.c_attn.bias")).split(C, dim=-1)
        q, k, v = (z.reshape(B, T, NH, C // NH).transpose(1, 2) for z in (q, k, v))
        att = torch.softmax((q @ k.transpose(-1, -2) / math.sqrt(C // NH)).masked_fill(future, -math.inf), -1)
        a = (att @ v).transpose(1, 2).reshape(B, T, C)
        x = x + F.linear(a, p[h + "attn.c_proj.weight"], p.get(h + "attn.c_proj.bias"))
        m = F.layer_norm(x, (C,), p[h + "ln_2.weight"], p.get(h + "ln_2.bias"), eps=1e-5)
        m = F.gelu(F.linear(m, p[h + "mlp.c_fc.weight"], p.get(h + "mlp.c_fc.bias")), approximate="tanh")
        x = x + F.linear(m, p[h + "mlp.c_proj.weight"], p.get(h + "mlp.c_proj.bias"))
    x = F.layer_norm(x, (C,), p["ln_f.weight"], p.get("ln_f.bias"), eps=1e-5)
    logits = x @ (p["wte"] if cfg.tie_weights else p["lm_head.weight"]).T
    return logits, F.cross_entropy(logits.reshape(B * T, -1), targets.reshape(-1))


@pytest.mark.parametrize("kernels", ["reference", "fast"])
@pytest.mark.parametrize("tied", [True, False])
def test_models_without_biases_against_torch_autograd(monkeypatch, kernels, tied):
    cfg = dataclasses.replace(CFG, tie_weights=tied)
    shapes = without_biases(param_shapes(cfg))
    assert not any(name.endswith(".bias") for name in shapes) and len(shapes) < len(param_shapes(cfg))
    monkeypatch.setattr(model_module, "param_shapes", lambda cfg: shapes)   # GPTConfig(bias=False)'s
    rng = np.random.default_rng(0)
    params = {name: rng.standard_normal(s) * (0.3 if len(s) == 1 else 0.1) + (len(s) == 1)
              for name, s in shapes.items()}
    x, y = rng.integers(0, cfg.vocab_size, (2, 2, 7))
    model = model_module.NumpyGPT(cfg, params, dtype="float64", kernels=kernels)
    loss, grads = model.loss_and_grads(x, y)
    assert list(grads) == list(shapes)
    tp = {name: torch.tensor(a, requires_grad=True) for name, a in params.items()}
    tlogits, tloss = torch_gpt2(tp, cfg, torch.tensor(x), torch.tensor(y))
    tloss.backward()
    assert_close("logits", model.logits(x), tlogits.detach().numpy(), atol=1e-12, rtol=1e-10)
    assert loss == pytest.approx(tloss.item(), abs=1e-12)
    for name in shapes:
        assert_close(name, grads[name], tp[name].grad.numpy(), atol=1e-13, rtol=1e-9)
    # and it trains: generation and an AdamW step run on the same params
    opt = npgpt.AdamW(model, lr=1e-2)
    model.train_step(x, y, opt)
    assert npgpt.generate(model, x[:, :3], max_new_tokens=2).shape == (2, 5)


def test_the_reference_model_reads_top_to_bottom_in_reference_words(monkeypatch):
    """One file, at most ~150 lines, calling reference.py's layers only (as R.<name>), every
    backward of them, the residual's included; the model class runs exactly it."""
    source = inspect.getsource(gpt2)
    assert len(source.splitlines()) <= 160
    from npgpt.numpy_backend import reference as R
    backwards = {n for n in dir(R) if n.endswith("_backward")} - {"softmax_backward"}   # inside attention
    for name in backwards:
        assert f"R.{name}(" in source, name
    assert "wte" in source and "dwte_lookup + dhead" in source
    model = npgpt.build_model(CFG, dtype="float64", kernels="reference")
    assert model.kernels == "reference"
    calls, real = [], gpt2.gpt2_backward
    monkeypatch.setattr(gpt2, "gpt2_backward", lambda cache: calls.append(1) or real(cache))
    model.loss_and_grads(np.zeros((1, 4), int), np.ones((1, 4), int))
    assert calls == [1]
