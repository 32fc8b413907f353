"""The hand-written AdamW, gradient clipping and learning-rate schedule against PyTorch's own
(torch.optim.AdamW, torch.nn.utils.clip_grad_norm_), on identical float64 arrays for 10 steps."""
import math

import numpy as np
import pytest

import npgpt
from npgpt.params import decays
from npgpt.training.schedule import warmup_cosine_lr

torch = pytest.importorskip("torch")

CFG = npgpt.GPTConfig(vocab_size=31, context_length=8, emb_dim=8, n_heads=2, n_layers=2, qkv_bias=True)


def exempt_from_decay(name):
    """The usual GPT-2 rule, stated here on its own: biases, LayerNorm and the embeddings."""
    return name.endswith(".bias") or ".ln_" in name or name.startswith("ln_f.") or name in ("wte", "wpe")


def torch_reference(params, grads_seq, lr, weight_decay, decay_all, clip, lrs=None):
    """torch.optim.AdamW (the book's call) on the same arrays, with the same decay groups."""
    tensors = {n: torch.tensor(p, requires_grad=True) for n, p in params.items()}
    if decay_all:
        groups = [{"params": list(tensors.values())}]
    else:
        groups = [{"params": [t for n, t in tensors.items() if not exempt_from_decay(n)]},
                  {"params": [t for n, t in tensors.items() if exempt_from_decay(n)], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay, foreach=False)
    norms = []
    for step, grads in enumerate(grads_seq):
        for n, t in tensors.items():
            t.grad = torch.tensor(grads[n])
        if lrs is not None:
            for g in opt.param_groups:
                g["lr"] = lrs[step]
        if clip is not None:
            norms.append(float(torch.nn.utils.clip_grad_norm_(list(tensors.values()), clip)))
        opt.step()
    moments = {key: {n: opt.state[t][key].numpy() for n, t in tensors.items()} for key in ("exp_avg", "exp_avg_sq")}
    return {n: t.detach().numpy() for n, t in tensors.items()}, norms, moments


@pytest.mark.parametrize("decay_all, clip, schedule", [
    (True, None, False), (False, None, False), (True, 0.05, False), (False, 0.05, True)])
def test_adamw_matches_torch(decay_all, clip, schedule):
    rng = np.random.default_rng(0)
    params = npgpt.init_params(CFG, seed=3, dtype="float64")
    grads_seq = [{n: rng.standard_normal(p.shape) * 0.1 for n, p in params.items()} for _ in range(10)]
    lrs = [warmup_cosine_lr(s, 1e-2, 10, warmup_steps=3) for s in range(10)] if schedule else None
    model = npgpt.build_model(CFG, dtype="float64", params=params)
    opt = npgpt.AdamW(model, lr=1e-2, weight_decay=0.1, decay_all=decay_all)
    norms = []
    for step, grads in enumerate(grads_seq):
        for n, g in model.g.items():
            g[...] = grads[n]
        if schedule:
            opt.lr = lrs[step]
        if clip is not None:
            norms.append(model.clip_grad_norm(clip))
        opt.step()
    ref, ref_norms, ref_moments = torch_reference(params, grads_seq, 1e-2, 0.1, decay_all, clip, lrs)
    np.testing.assert_allclose(norms, ref_norms, rtol=1e-12)
    state = opt.state()
    assert state["step"] == 10
    for n, p in model.params().items():
        np.testing.assert_allclose(p, ref[n], rtol=1e-10, atol=1e-15, err_msg=n)
        for key in ("exp_avg", "exp_avg_sq"):
            np.testing.assert_allclose(state[key][n], ref_moments[key][n], rtol=1e-10, atol=1e-18, err_msg=f"{key} {n}")


def test_no_decay_groups():
    """decay_all=False exempts biases, LayerNorm and embeddings, and nothing else."""
    names = npgpt.param_shapes(npgpt.GPTConfig.preset("tiny", qkv_bias=True, tie_weights=False))
    assert {n for n in names if not decays(n)} == {n for n in names if exempt_from_decay(n)}
    assert {"wte", "wpe", "ln_f.weight", "h.0.ln_1.bias", "h.1.attn.c_attn.bias"} <= set(names)


def test_clip_leaves_small_gradients_alone():
    model = npgpt.build_model(CFG, dtype="float64")
    model.flat_grads[:] = 1e-4
    before = model.flat_grads.copy()
    norm = model.clip_grad_norm(1.0)
    assert norm == pytest.approx(1e-4 * math.sqrt(model.flat_grads.size))
    np.testing.assert_array_equal(model.flat_grads, before)


def test_warmup_cosine_schedule():
    """Appendix D: linear warmup from initial_lr, cosine from peak_lr down to min_lr."""
    peak, total, warm = 1e-3, 100, 10
    lr = [warmup_cosine_lr(s, peak, total, warm, initial_lr=1e-5, min_lr=1e-6) for s in range(total + 1)]
    assert lr[0] == pytest.approx(1e-5)
    assert lr[5] == pytest.approx(1e-5 + 5 * (peak - 1e-5) / warm)
    assert lr[warm] == pytest.approx(peak)
    assert lr[55] == pytest.approx(1e-6 + (peak - 1e-6) * 0.5)           # half way through the cosine
    assert lr[total] == pytest.approx(1e-6)
    assert all(a >= b for a, b in zip(lr[warm:], lr[warm + 1:]))
    assert warmup_cosine_lr(50, peak, total, warm, cosine=False) == peak
