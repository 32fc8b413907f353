"""The textbook (numpy_backend/reference.py) against PyTorch autograd, layer by layer, and the whole
reference model against the fast one.

Every reference layer runs on the book's (B, T, C) shapes in float64 and is compared with torch
doing the same math with autograd: the forward's output and the backward's every gradient. Then
a model built with kernels="reference" must match the default fast model: logits, loss, every
gradient and five AdamW steps with clipping, within 1e-10. Last, a reference backward broken by
10% must fail its torch comparison here and `npgpt gradcheck --kernels reference`.
"""
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import npgpt
from npgpt import gradcheck as G
from npgpt.numpy_backend import reference as R, reference_optim
from parity.helpers import assert_close, single_thread

B, T, C, NH = 2, 5, 6, 3
TOL = dict(atol=1e-12, rtol=1e-10)      # float64: both sides round the same math differently


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with single_thread():
        yield


def t(a, grad=True):
    return torch.tensor(a, dtype=torch.float64, requires_grad=grad)


def rand(*shape, seed=0, scale=1.0):
    return np.random.default_rng([seed, *shape]).standard_normal(shape) * scale


def torch_grads(out, dout, *inputs):
    """The gradients of sum(out * dout) with respect to inputs: the backward of out given dout."""
    return torch.autograd.grad(out, inputs, torch.tensor(dout))


# ---- each layer: (reference forward/backward, torch forward) on the same inputs -----------------

def case_linear(bias=True):
    x, w, b, dy = rand(B, T, 4), rand(C, 4, seed=1), rand(C, seed=2), rand(B, T, C, seed=3)
    y, cache = R.linear_forward(x, w, b if bias else None)
    dx, dw, db = R.linear_backward(dy, cache)
    tx, tw, tb = t(x), t(w), t(b)
    ty = F.linear(tx, tw, tb if bias else None)
    ref = torch_grads(ty, dy, tx, tw, tb) if bias else torch_grads(ty, dy, tx, tw)
    return [("y", y, ty), ("dx", dx, ref[0]), ("dw", dw, ref[1])] + ([("db", db, ref[2])] if bias else [])


def case_layernorm(bias=True):
    x, w, b, dy = rand(B, T, C, scale=3) + 1, rand(C, seed=1), rand(C, seed=2), rand(B, T, C, seed=3)
    y, cache = R.layernorm_forward(x, w, b if bias else None)
    dx, dw, db = R.layernorm_backward(dy, cache)
    tx, tw, tb = t(x), t(w), t(b)
    if not bias:
        ty = F.layer_norm(tx, (C,), tw, None, eps=R.LN_EPS)
        assert db is None
        return list(zip(("y", "dx", "dw"), (y, dx, dw), (ty, *torch_grads(ty, dy, tx, tw))))
    ty = F.layer_norm(tx, (C,), tw, tb, eps=R.LN_EPS)
    return list(zip(("y", "dx", "dw", "db"), (y, dx, dw, db), (ty, *torch_grads(ty, dy, tx, tw, tb))))


def case_gelu():
    x, dy = rand(B, T, C, scale=2), rand(B, T, C, seed=1)
    y, cache = R.gelu_forward(x)
    tx = t(x)
    ty = F.gelu(tx, approximate="tanh")
    return [("y", y, ty), ("dx", R.gelu_backward(dy, cache), torch_grads(ty, dy, tx)[0])]


def case_softmax():
    z, dp = rand(B, T, C, scale=3), rand(B, T, C, seed=1)
    z[..., -2:] = -np.inf                                    # masked entries
    p, cache = R.softmax_forward(z)
    tz = t(z)
    tp = torch.softmax(tz, dim=-1)
    return [("p", p, tp), ("dz", R.softmax_backward(dp, cache), torch_grads(tp, dp, tz)[0])]


def case_attention(dropout=True):
    qkv, dy = rand(B, T, 3 * C), rand(B, T, C, seed=1)
    mask = R.dropout_mask(np.random.default_rng(4), (B, NH, T, T), 0.3, np.float64) if dropout else None
    y, cache = R.attention_forward(qkv, NH, mask)
    tqkv = t(qkv)
    q, k, v = (z.reshape(B, T, NH, C // NH).transpose(1, 2) for z in tqkv.split(C, dim=-1))
    scores = q @ k.transpose(-1, -2) / math.sqrt(C // NH)
    scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), -math.inf)
    att = torch.softmax(scores, dim=-1)
    if dropout:
        att = att * torch.tensor(mask)
    ty = (att @ v).transpose(1, 2).reshape(B, T, C)
    return [("y", y, ty), ("dqkv", R.attention_backward(dy, cache), torch_grads(ty, dy, tqkv)[0])]


def case_cross_entropy():
    logits = rand(B, T, 11, scale=4)
    targets = np.random.default_rng(5).integers(0, 11, (B, T))
    loss, cache = R.cross_entropy_forward(logits, targets)
    tl = t(logits)
    tloss = F.cross_entropy(tl.reshape(-1, 11), torch.tensor(targets).reshape(-1))
    return [("loss", loss, tloss), ("dlogits", R.cross_entropy_backward(cache), torch_grads(tloss, 1.0, tl)[0])]


def case_embedding():
    V, Tmax = 4, 8
    idx = np.random.default_rng(6).integers(0, V, (B, T))   # 10 positions over 4 ids: repeats
    wte, wpe, dx = rand(V, C), rand(Tmax, C, seed=1), rand(B, T, C, seed=2)
    x, cache = R.embedding_forward(idx, wte, wpe)
    dwte, dwpe = R.embedding_backward(dx, cache)
    twte, twpe = t(wte), t(wpe)
    tx = F.embedding(torch.tensor(idx), twte) + twpe[:T]
    return list(zip(("x", "dwte", "dwpe"), (x, dwte, dwpe), (tx, *torch_grads(tx, dx, twte, twpe))))


def case_dropout():
    x, dout = rand(B, T, C), rand(B, T, C, seed=1)
    mask = R.dropout_mask(np.random.default_rng(2), x.shape, 0.5, np.float64)
    out, cache = R.dropout_forward(x, mask)
    tx = t(x)
    tout = tx * torch.tensor(mask)
    return [("out", out, tout), ("dx", R.dropout_backward(dout, cache), torch_grads(tout, dout, tx)[0])]


def case_residual():
    x, fx, dout = rand(B, T, C), rand(B, T, C, seed=1), rand(B, T, C, seed=2)
    out, cache = R.residual_forward(x, fx)
    dx, dfx = R.residual_backward(dout, cache)
    tx, tfx = t(x), t(fx)
    tout = tx + tfx
    return list(zip(("out", "dx", "dfx"), (out, dx, dfx), (tout, *torch_grads(tout, dout, tx, tfx))))


CASES = {"linear": case_linear, "linear without bias": lambda: case_linear(bias=False),
         "layernorm": case_layernorm, "layernorm without bias": lambda: case_layernorm(bias=False),
         "gelu": case_gelu, "softmax": case_softmax,
         "attention": case_attention, "attention without dropout": lambda: case_attention(dropout=False),
         "cross_entropy": case_cross_entropy, "embedding": case_embedding, "dropout": case_dropout,
         "residual": case_residual}


def compare(case):
    for name, ours, theirs in CASES[case]():
        assert_close(f"{case}: {name}", ours, theirs.detach().numpy(), **TOL)


@pytest.mark.parametrize("case", list(CASES))
def test_layer_against_torch_autograd(case):
    compare(case)


def test_dropout_mask_keeps_1_minus_p_scaled():
    mask = R.dropout_mask(np.random.default_rng(0), (200, 500), 0.3, np.float32)
    assert mask.dtype == np.float32 and set(np.unique(mask)) == {0.0, np.float32(1 / 0.7)}
    assert abs((mask > 0).mean() - 0.7) < 0.005               # 100,000 draws: 5 standard deviations


def test_reference_functions_leave_their_arguments_alone():
    """The textbook computes new arrays: the caller's logits and gradients are unchanged."""
    logits, targets = rand(B, T, 7), np.zeros((B, T), dtype=np.int64)
    kept = logits.copy()
    _, cache = R.cross_entropy_forward(logits, targets)
    R.cross_entropy_backward(cache)
    np.testing.assert_array_equal(logits, kept)
    grads = {"a": rand(3, 4), "b": rand(5)}
    kept = {k: g.copy() for k, g in grads.items()}
    clipped, _ = reference_optim.clip_grad_norm(grads, 0.1)
    for k in grads:
        np.testing.assert_array_equal(grads[k], kept[k])


# ---- the optimizer ---------------------------------------------------------------------------

def test_adamw_against_torch():
    p0, grads = rand(4, 3), [rand(4, 3, seed=s) for s in range(1, 6)]
    tp = t(p0)
    opt = torch.optim.AdamW([tp], lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    p, m, v = p0, np.zeros_like(p0), np.zeros_like(p0)
    for step, g in enumerate(grads, start=1):
        p, m, v = reference_optim.adamw_update(p, g, m, v, step, 1e-2, (0.9, 0.95), 1e-8, 0.1)
        tp.grad = torch.tensor(g)
        opt.step()
        assert_close(f"p after step {step}", p, tp.detach().numpy(), atol=1e-15, rtol=1e-12)
    state = opt.state[tp]
    assert_close("m", m, state["exp_avg"].numpy(), atol=1e-15, rtol=1e-12)
    assert_close("v", v, state["exp_avg_sq"].numpy(), atol=1e-15, rtol=1e-12)


@pytest.mark.parametrize("max_norm", [0.5, 100.0])           # clipped, and left alone
def test_clip_grad_norm_against_torch(max_norm):
    grads = {"a": rand(3, 4), "b": rand(5, seed=1)}
    clipped, norm = reference_optim.clip_grad_norm(grads, max_norm)
    tensors = [t(g, grad=False) for g in grads.values()]
    params = [torch.zeros_like(x, requires_grad=True) for x in tensors]
    for p, g in zip(params, tensors):
        p.grad = g.clone()
    tnorm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    assert norm == pytest.approx(float(tnorm), rel=1e-14)
    for (name, ours), p in zip(clipped.items(), params):
        assert_close(name, ours, p.grad.numpy(), atol=1e-16, rtol=1e-14)


# ---- the reference model against the fast one ------------------------------------------------

@pytest.mark.parametrize("tied, qkv_bias", [(False, False), (True, True)])
def test_reference_model_equals_fast_model(tied, qkv_bias):
    """float64, dropout on (the same RNG draws in both), clipping on: logits, loss, every gradient,
    then 5 AdamW steps, all within 1e-10."""
    cfg = npgpt.GPTConfig(vocab_size=53, context_length=12, emb_dim=12, n_heads=3, n_layers=2,
                          drop_rate=0.2, qkv_bias=qkv_bias, tie_weights=tied)
    params = npgpt.init_params(cfg, 3, "float64")
    for p in params.values():                                # off GPT-2's init (biases 0, scales 1)
        p += np.random.default_rng(p.size).standard_normal(p.shape) * 0.05
    x, y = np.random.default_rng(9).integers(0, 53, (2, 3, 12))
    models = {k: npgpt.build_model(cfg, dtype="float64", params=params, seed=4, kernels=k)
              for k in ("fast", "reference")}
    assert models["reference"].kernels == "reference" and models["fast"].kernels == "fast"
    fast, ref = models["fast"], models["reference"]
    fast.eval(), ref.eval()
    assert_close("logits", ref.logits(x), fast.logits(x), atol=1e-10)
    fast.train(), ref.train()
    (loss_f, grads_f), (loss_r, grads_r) = fast.loss_and_grads(x, y), ref.loss_and_grads(x, y)
    assert loss_r == pytest.approx(loss_f, abs=1e-10)
    for name in grads_f:
        assert_close(name, grads_r[name], grads_f[name], atol=1e-10)
    opts = {k: npgpt.AdamW(m, lr=1e-2, weight_decay=0.1, decay="matrices") for k, m in models.items()}
    for step in range(5):
        losses = {k: m.train_step(x, y, opts[k], clip_norm=0.5) for k, m in models.items()}
        assert losses["reference"] == pytest.approx(losses["fast"], abs=1e-10), step
    for name, p in fast.params().items():
        assert_close(name, ref.params()[name], p, atol=1e-10)
    assert_close("exp_avg_sq", opts["reference"].exp_avg_sq, opts["fast"].exp_avg_sq, atol=1e-10)


def test_kernels_are_refused_where_they_do_not_apply():
    cfg = npgpt.GPTConfig.preset("tiny", vocab_size=16)
    with pytest.raises(ValueError, match="unknown kernels 'slow'"):
        npgpt.build_model(cfg, kernels="slow")
    with pytest.raises(ValueError, match="needs backend='numpy'"):
        npgpt.build_model(cfg, backend="torch", kernels="reference")


# ---- a reference backward broken by 10% is caught --------------------------------------------

BACKWARDS = {   # backward -> the CASES that run it
    "linear_backward": ["linear"], "layernorm_backward": ["layernorm", "layernorm without bias"],
    "gelu_backward": ["gelu"],
    "softmax_backward": ["softmax", "attention"], "attention_backward": ["attention"],
    "cross_entropy_backward": ["cross_entropy"], "embedding_backward": ["embedding"],
    "dropout_backward": ["dropout", "attention"], "residual_backward": ["residual"]}


def off_by_10_percent(real):
    def broken(*args):
        out = real(*args)
        if isinstance(out, tuple):
            return tuple(None if g is None else g * 1.1 for g in out)
        return out * 1.1
    return broken


def test_every_reference_backward_is_tested():
    assert set(BACKWARDS) == {name for name in dir(R) if name.endswith("_backward")}


@pytest.mark.parametrize("backward", list(BACKWARDS))
def test_a_broken_backward_fails_against_torch(monkeypatch, backward):
    monkeypatch.setattr(R, backward, off_by_10_percent(getattr(R, backward)))
    for case in BACKWARDS[backward]:
        with pytest.raises(AssertionError):
            compare(case)


@pytest.mark.parametrize("backward", list(BACKWARDS))
def test_a_broken_backward_fails_gradcheck(monkeypatch, backward):
    """Every backward the reference model (gpt2.py) runs, softmax's inside attention_backward:
    gradcheck on the reference kernels fails."""
    monkeypatch.setattr(R, backward, off_by_10_percent(getattr(R, backward)))
    lines = []
    assert G.gradcheck(print_fn=lines.append, compare_torch=False, vocab_size=256, kernels="reference")
    assert lines[-1].startswith("gradcheck FAILED")


# ---- the command line ------------------------------------------------------------------------

def test_train_and_gradcheck_on_the_reference_kernels(tmp_path, verdict_start, capsys):
    """A reader's loop: gradcheck the reference kernels, then train the tiny preset on them."""
    from npgpt.cli import main
    assert main(["gradcheck", "--kernels", "reference"]) == 0
    assert "gradcheck: reference kernels" in capsys.readouterr().out
    args = ["train", "--preset", "tiny", "--data", str(verdict_start(3000)), "--epochs", "1",
            "--eval-freq", "100", "--no-progress", "--out"]
    assert main(args + [str(tmp_path / "ref"), "--kernels", "reference"]) == 0
    assert main(args + [str(tmp_path / "fast")]) == 0
    ref = json.loads((tmp_path / "ref" / "history.json").read_text())
    fast = json.loads((tmp_path / "fast" / "history.json").read_text())
    np.testing.assert_allclose(ref["train_losses"], fast["train_losses"], rtol=1e-4)   # float32
    assert main(args + [str(tmp_path / "torch"), "--kernels", "reference", "--backend", "torch"]) == 2
    assert "--kernels reference needs --backend numpy" in capsys.readouterr().err
