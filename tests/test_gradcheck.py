"""`npgpt gradcheck` (npgpt/gradcheck.py): the correct backward passes, and deliberate bugs in
layers.py's backward functions fail exactly the parameters upstream of the broken layer.

A bug in a layer's backward corrupts the gradient of every parameter used before the last place
that layer runs in the forward (the gradient flows back through it) and of no parameter after.
"""
import argparse
import functools
import importlib.util
import math
import subprocess
import sys

import numpy as np
import pytest

from npgpt import gradcheck as G
from npgpt.config import GPTConfig
from npgpt.numpy_backend import layers as L
from npgpt.numpy_backend import reference as R
from npgpt.params import param_shapes

NAMES = list(param_shapes(GPTConfig.preset("tiny")))    # the tiny model's parameters, in forward order
HAS_TORCH = importlib.util.find_spec("torch") is not None
SMALL_VOCAB = 256


def upstream_of(name):
    """The parameters before `name` in forward order."""
    return NAMES[:NAMES.index(name)]


# ---- the bugs: each a replacement for one backward in layers.py --------------------------------

def gelu_off_by_1_percent(real):
    return lambda dout, cache: real(dout, cache) * 1.01


def layernorm_without_mean_term(real):
    """dx = (dxhat - xhat * mean(dxhat * xhat)) * rstd: the - mean(dxhat) term forgotten."""
    def backward(dout, cache, dw, db):
        xhat, rstd, w, _ = cache
        return real(dout, cache, dw, db) + rstd * np.mean(dout * w, axis=-1, keepdims=True)
    return backward


def attention_without_softmax_term(real):
    """datt_pre = att * datt, the - sum_j(att_j * datt_j) of the softmax's Jacobian forgotten."""
    def backward(dy, cache):
        q, k, v, lse, att_mask = cache              # the fast form keeps each row's log-sum-exp
        B, NH, T, hs = q.shape
        att = np.exp(q @ k.swapaxes(-1, -2) / math.sqrt(hs) + R.causal_bias(T, q.dtype) - lse[..., None])
        dy = dy.reshape(B, T, NH, hs).transpose(0, 2, 1, 3)                 # (B, NH, T, hs)
        att_d = att if att_mask is None else att * att_mask
        dqkv = np.empty((B, T, 3, NH, hs), dtype=dy.dtype)
        heads = dqkv.transpose(2, 0, 3, 1, 4)                               # 3 x (B, NH, T, hs)
        heads[2] = att_d.swapaxes(-1, -2) @ dy
        datt = dy @ v.swapaxes(-1, -2)                                      # (B, NH, T, T)
        if att_mask is not None:
            datt *= att_mask
        datt *= att / math.sqrt(hs)
        heads[0] = datt @ k
        heads[1] = datt.swapaxes(-1, -2) @ q
        return dqkv.reshape(B, T, 3 * NH * hs)
    return backward


def dropout_mask_ignored(real):
    return lambda dout, cache: dout


BUGS = {   # bug -> (the backward it replaces, the parameters whose gradients it corrupts)
    "gelu": ("gelu_backward", gelu_off_by_1_percent, upstream_of("h.1.mlp.c_proj.weight")),
    "layernorm": ("layernorm_backward", layernorm_without_mean_term, upstream_of("ln_f.weight")),
    "attention": ("attention_backward", attention_without_softmax_term,
                  upstream_of("h.1.attn.c_proj.weight")),
    "dropout": ("dropout_backward", dropout_mask_ignored, upstream_of("ln_f.weight")),
}


def install(monkeypatch, bug):
    name, make, affected = BUGS[bug]
    monkeypatch.setattr(L, name, make(getattr(L, name)))
    return affected


# ---- the tests ---------------------------------------------------------------------------------

def test_correct_backward_passes():
    lines = []
    assert G.gradcheck(print_fn=lines.append) == []
    rows = [line.split() for line in lines if line.split()[0] in NAMES]
    assert [row[0] for row in rows] == NAMES
    assert all(row[-1] == "OK" for row in rows)
    # a clear margin: every error at least 10 times below the tolerance
    assert max(float(row[1]) for row in rows) < G.FD_RTOL / 10
    if HAS_TORCH:
        assert max(float(row[2]) for row in rows) < G.TORCH_RTOL / 10
    else:
        assert all(row[2] == "-" for row in rows)
    assert lines[-1] == f"gradcheck passed: all {len(NAMES)} parameters OK"


@pytest.mark.parametrize("bug", list(BUGS))
def test_bug_fails_exactly_the_parameters_upstream(monkeypatch, bug):
    """Finite differences alone (torch skipped) must find each bug. A 256-token vocabulary makes
    each loss 30 times cheaper than tiny's 50,257 and runs the same backward code."""
    affected = install(monkeypatch, bug)
    lines = []
    assert G.gradcheck(print_fn=lines.append, compare_torch=False, vocab_size=SMALL_VOCAB) == affected
    assert lines[-1].startswith(f"gradcheck FAILED for {len(affected)} of {len(NAMES)} parameters: ")


def test_run_exits_1_naming_the_failing_parameters(monkeypatch, capsys):
    affected = install(monkeypatch, "attention")
    monkeypatch.setattr(G, "gradcheck", functools.partial(G.gradcheck, vocab_size=SMALL_VOCAB))
    parser = argparse.ArgumentParser()
    G.add_arguments(parser)
    assert G.run(parser.parse_args([])) == 1
    out = capsys.readouterr().out
    verdict = out.strip().splitlines()[-1]
    assert verdict.endswith(": " + ", ".join(affected))
    for line in out.splitlines():
        if line.split()[0] in NAMES:
            assert line.endswith("FAIL") == (line.split()[0] in affected), line
    if HAS_TORCH:   # torch, comparing every entry, flags the same tensors
        for line in out.splitlines():
            if line.split()[0] in affected:
                assert float(line.split()[2]) > G.TORCH_RTOL, line


def test_add_arguments():
    parser = argparse.ArgumentParser()
    G.add_arguments(parser)
    args = parser.parse_args([])
    assert (args.preset, args.seed) == ("tiny", 123)
    args = parser.parse_args(["--preset", "gpt2-small", "--seed", "7"])
    assert (args.preset, args.seed) == ("gpt2-small", 7)
    with pytest.raises(SystemExit):
        parser.parse_args(["--preset", "huge"])


def test_fixed_masks_are_fixed_per_name():
    masks = G.fixed_dropout_masks(seed=1, p=0.5)
    a = masks("h.0.attn", (2, 2, 8, 8))
    assert a.dtype == bool and a.shape == (2, 2, 8, 8)
    assert masks("h.0.attn", (2, 2, 8, 8)) is a
    assert np.array_equal(G.fixed_dropout_masks(seed=1, p=0.5)("h.0.attn", (2, 2, 8, 8)), a)
    assert not np.array_equal(masks("h.1.attn", (2, 2, 8, 8)), a)


def test_sampled_entries_cover_every_block_and_the_largest():
    """A c_attn-like gradient whose v block dwarfs q and k (near-uniform attention): the largest
    entries of q and of k are checked too, not only v's."""
    rng = np.random.default_rng(0)
    C = 32
    g = rng.standard_normal((3 * C, C)) * np.repeat([1e-6, 1e-6, 1.0], C)[:, None]   # q, k, v rows
    picked = set(G.sampled_entries(g, rng))
    block_max = [i * C * C + int(np.argmax(np.abs(g[i * C:(i + 1) * C]))) for i in range(3)]
    assert set(block_max) <= picked
    assert int(np.argmax(np.abs(g))) in picked


def test_without_torch_the_torch_column_is_a_dash(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "torch" else real_find_spec(name, *a))
    lines = []
    assert G.gradcheck(print_fn=lines.append, vocab_size=SMALL_VOCAB) == []
    assert "  torch autograd: not installed" in lines
    assert all(line.split()[2] == "-" for line in lines if line.split()[0] in NAMES)


def test_importing_gradcheck_does_not_import_torch():
    code = "import sys, npgpt.gradcheck; assert 'torch' not in sys.modules, 'torch was imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
