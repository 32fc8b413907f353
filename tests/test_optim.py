"""The hand-written AdamW (each decay grouping), gradient clipping and learning-rate schedule against
PyTorch's own (torch.optim.AdamW, torch.nn.utils.clip_grad_norm_) on identical float64 arrays for 10
steps, and against nanoGPT's get_lr."""
import math

import numpy as np
import pytest

import npgpt
from npgpt.params import decays
from npgpt.training.schedule import warmup_cosine_lr

torch = pytest.importorskip("torch")

CFG = npgpt.GPTConfig(vocab_size=31, context_length=8, emb_dim=8, n_heads=2, n_layers=2, qkv_bias=True)


def torch_groups(tensors: dict, decay: str) -> list:
    """The param groups as the book and nanoGPT write them: torch.optim.AdamW(model.parameters())
    for "all"; nanoGPT's configure_optimizers for "matrices" (p.dim() >= 2 decays, the rest not)."""
    if decay == "all":
        return [{"params": list(tensors.values())}]
    if decay == "none":
        return [{"params": list(tensors.values()), "weight_decay": 0.0}]
    return [{"params": [t for t in tensors.values() if t.dim() >= 2]},
            {"params": [t for t in tensors.values() if t.dim() < 2], "weight_decay": 0.0}]


def torch_reference(params, grads_seq, lr, weight_decay, decay, clip, lrs=None, betas=(0.9, 0.999)):
    """torch.optim.AdamW on the same arrays, with its own decay groups."""
    tensors = {n: torch.tensor(p, requires_grad=True) for n, p in params.items()}
    opt = torch.optim.AdamW(torch_groups(tensors, decay), lr=lr, weight_decay=weight_decay, betas=betas,
                            foreach=False)
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


@pytest.mark.parametrize("decay, clip, schedule, betas", [
    ("all", None, False, (0.9, 0.999)), ("matrices", None, False, (0.9, 0.999)), ("none", None, False, (0.9, 0.999)),
    ("all", 0.05, False, (0.9, 0.999)), ("matrices", 0.05, True, (0.9, 0.95))])
def test_adamw_matches_torch(decay, clip, schedule, betas):
    rng = np.random.default_rng(0)
    params = npgpt.init_params(CFG, seed=3, dtype="float64")
    grads_seq = [{n: rng.standard_normal(p.shape) * 0.1 for n, p in params.items()} for _ in range(10)]
    lrs = [warmup_cosine_lr(s, 1e-2, 10, warmup_steps=3) for s in range(10)] if schedule else None
    model = npgpt.build_model(CFG, dtype="float64", params=params)
    opt = npgpt.AdamW(model, lr=1e-2, weight_decay=0.1, betas=betas, decay=decay)
    norms = []
    for step, grads in enumerate(grads_seq):
        for n, g in model.g.items():
            g[...] = grads[n]
        if schedule:
            opt.lr = lrs[step]
        if clip is not None:
            norms.append(model.clip_grad_norm(clip))
        opt.step()
    ref, ref_norms, ref_moments = torch_reference(params, grads_seq, 1e-2, 0.1, decay, clip, lrs, betas)
    np.testing.assert_allclose(norms, ref_norms, rtol=1e-12)
    state = opt.state()
    assert state["step"] == 10
    for n, p in model.params().items():
        np.testing.assert_allclose(p, ref[n], rtol=1e-10, atol=1e-15, err_msg=n)
        for key in ("exp_avg", "exp_avg_sq"):
            np.testing.assert_allclose(state[key][n], ref_moments[key][n], rtol=1e-10, atol=1e-18, err_msg=f"{key} {n}")


def test_decay_groups():
    """"matrices" decays every tensor of 2 or more dimensions (the embeddings and an untied head
    included) and exempts the rest; "all" and "none" are what they say; anything else is refused."""
    shapes = npgpt.param_shapes(npgpt.GPTConfig.preset("tiny", qkv_bias=True, tie_weights=False))
    assert {"wte", "wpe", "lm_head.weight", "ln_f.weight", "h.0.ln_1.bias", "h.1.attn.c_attn.bias"} <= set(shapes)
    assert {n for n in shapes if decays(n, "matrices")} == {n for n, s in shapes.items() if len(s) >= 2}
    assert all(decays(n, "all") for n in shapes) and not any(decays(n, "none") for n in shapes)
    with pytest.raises(ValueError, match=r"decay must be one of \('all', 'matrices', 'none'\), got True"):
        npgpt.AdamW(npgpt.build_model(CFG), decay=True)


def test_clip_leaves_small_gradients_alone():
    model = npgpt.build_model(CFG, dtype="float64")
    model.flat_grads[:] = 1e-4
    before = model.flat_grads.copy()
    norm = model.clip_grad_norm(1.0)
    assert norm == pytest.approx(1e-4 * math.sqrt(model.flat_grads.size))
    np.testing.assert_array_equal(model.flat_grads, before)


def nanogpt_lr(it, learning_rate, warmup_iters, lr_decay_iters, min_lr):
    """nanoGPT's train.py get_lr, as written there."""
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if it > lr_decay_iters:
        return min_lr
    decay_ratio = (it - warmup_iters) / (lr_decay_iters - warmup_iters)
    coeff = 0.5 * (1.0 + math.cos(math.pi * decay_ratio))
    return min_lr + coeff * (learning_rate - min_lr)


def test_warmup_cosine_schedule_is_nanogpts():
    """The default warmup starts near zero and never passes the peak (appendix D's line from 3e-5
    went down for a peak of 1e-5); the floor defaults to peak / 10 and holds past the decay's end."""
    peak, warm, decay = 6e-4, 10, 100
    for step in range(130):
        assert warmup_cosine_lr(step, peak, decay, warm) == pytest.approx(nanogpt_lr(step, peak, warm, decay, peak / 10),
                                                                          rel=1e-14), step
    low = [warmup_cosine_lr(s, 1e-5, 20, 4) for s in range(5)]
    assert low == pytest.approx([2e-6, 4e-6, 6e-6, 8e-6, 1e-5]) and max(low) <= 1e-5
    assert warmup_cosine_lr(3, 1e-5, 20, 4, initial_lr=3e-5) > 1e-5        # appendix D's, on request


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
