"""AdamW parity: ten steps from the same parameters and the same gradient sequence, with and
without clipping, under a warmup + cosine schedule, with each decay grouping; and the
optimizer state format that moves between the backends."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import npgpt

from .helpers import assert_close, build_pair, perturb

CFG = npgpt.GPTConfig(vocab_size=60, context_length=16, emb_dim=16, n_heads=2, n_layers=2,
                      drop_rate=0.0, qkv_bias=True)


def warmup_cosine(step, peak=1e-2, warmup=3, total=10, floor=1e-3):
    if step < warmup:
        return peak * (step + 1) / warmup
    return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))


def set_grads(np_model, torch_model, grads):
    for name, g in grads.items():
        np_model.g[name][...] = g
    for name, p in torch_model.module.named_parameters():
        p.grad = torch.from_numpy(grads[name].copy())


@pytest.mark.parametrize("decay", ["all", "matrices"])
@pytest.mark.parametrize("clip", [None, 1.0])
def test_ten_adamw_steps(clip, decay):
    params = perturb(npgpt.init_params(CFG, 3, "float64"), 3)
    np_model, torch_model = build_pair(CFG, "float64", params=params)
    opts = [npgpt.AdamW(m, lr=0.0, weight_decay=0.1, decay=decay) for m in (np_model, torch_model)]
    rng = np.random.default_rng(11)
    clipped = []
    for step in range(10):
        # gradient norms spread around the clip threshold, so some steps are clipped and some not
        scale = math.exp(rng.uniform(-1.0, 1.0)) / math.sqrt(sum(p.size for p in params.values()))
        set_grads(np_model, torch_model, {n: rng.standard_normal(p.shape) * scale for n, p in params.items()})
        if clip is not None:
            norms = [m.clip_grad_norm(clip) for m in (np_model, torch_model)]
            assert_close(f"grad norm, step {step}", norms[0], norms[1], rtol=1e-12)
            clipped.append(norms[1] > clip)
        for opt in opts:
            opt.lr = warmup_cosine(step)
            opt.step()
    if clip is not None:
        assert 0 < sum(clipped) < len(clipped), f"clipping should act on some steps only: {clipped}"
    new_params = torch_model.params()
    assert all(np.abs(new_params[n] - params[n]).max() > 1e-3 for n in params), "every parameter moves"
    for name, ref in new_params.items():
        assert_close(name, np_model.params()[name], ref, rtol=1e-10)
    np_state, torch_state = (opt.state() for opt in opts)
    for key in ("step", "lr", "betas", "eps", "weight_decay", "decay"):
        assert np_state[key] == torch_state[key], key
    for key in ("exp_avg", "exp_avg_sq"):
        assert list(np_state[key]) == list(torch_state[key]) == list(params)
        for name, ref in torch_state[key].items():
            assert_close(f"{key}[{name}]", np_state[key][name], ref, rtol=1e-10)


def test_groups_follow_decay():
    """"matrices" is nanoGPT's grouping (p.dim() >= 2 decays); the groups keep their roles when the
    weight decay is set; "all" and "none" are one group each."""
    _, torch_model = build_pair(CFG, "float64")
    params = dict(torch_model.module.named_parameters())
    names = {id(p): n for n, p in params.items()}
    opt = npgpt.AdamW(torch_model, weight_decay=0.1, decay="matrices")
    decayed = {names[id(p)] for g in opt.opt.param_groups if g["weight_decay"] == 0.1 for p in g["params"]}
    assert decayed == {n for n, p in params.items() if p.dim() >= 2} and {"wte", "wpe"} <= decayed
    opt.weight_decay = 0.2
    assert opt.weight_decay == 0.2 and sorted(g["weight_decay"] for g in opt.opt.param_groups) == [0.0, 0.2]
    opt.lr = 3e-4
    assert [g["lr"] for g in opt.opt.param_groups] == [3e-4, 3e-4]
    for decay, wd in (("all", 0.1), ("none", 0.0)):
        one = npgpt.AdamW(torch_model, weight_decay=0.1, decay=decay)
        assert [(len(g["params"]), g["weight_decay"]) for g in one.opt.param_groups] == [(len(names), wd)]
        one.weight_decay = 0.3
        assert one.opt.param_groups[0]["weight_decay"] == (0.3 if decay == "all" else 0.0)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_the_step_runs_torchs_fused_kernel(dtype):
    """What ran, seen by torch's profiler: one fused AdamW kernel over every tensor (the CPU has one
    since torch 2.4), not a loop of per-tensor updates."""
    _, torch_model = build_pair(CFG, dtype)
    opt = npgpt.AdamW(torch_model)
    for p in torch_model.module.parameters():
        p.grad = torch.ones_like(p)
    with torch.profiler.profile() as prof:
        opt.step()
    ops = [e.name for e in prof.events()]
    assert ops.count("aten::_fused_adamw_") == 1, sorted(set(ops))


def test_state_before_first_step_and_load_state():
    np_model, torch_model = build_pair(CFG, "float64")
    np_opt = npgpt.AdamW(np_model, lr=1e-3, weight_decay=0.05, decay="matrices")
    torch_opt = npgpt.AdamW(torch_model, lr=1e-3, weight_decay=0.05, decay="matrices")
    fresh = torch_opt.state()                      # torch has no state yet: zeros, not an error
    assert fresh["step"] == 0
    for key in ("exp_avg", "exp_avg_sq"):
        for name, shape in np_model.shapes.items():
            assert fresh[key][name].shape == shape and fresh[key][name].dtype == np.float64
            assert not fresh[key][name].any()
    # a NumPy state with made-up moments and hyperparameters: torch takes it, and gives it back
    rng = np.random.default_rng(5)
    state = np_opt.state()
    state.update(step=7, lr=2e-3, betas=(0.8, 0.99), eps=1e-7, weight_decay=0.3, decay="all",
                 exp_avg={n: rng.standard_normal(s) for n, s in np_model.shapes.items()},
                 exp_avg_sq={n: rng.random(s) for n, s in np_model.shapes.items()})
    torch_opt.load_state(state)
    back = torch_opt.state()
    for key in ("step", "lr", "betas", "eps", "weight_decay", "decay"):
        assert back[key] == state[key], key
    for key in ("exp_avg", "exp_avg_sq"):
        for name in np_model.shapes:
            np.testing.assert_array_equal(back[key][name], state[key][name], err_msg=f"{key}[{name}]")
    # torch's own per-parameter state is complete, on the parameter's device and dtype
    assert len(torch_opt.opt.param_groups) == 1
    for p in torch_model.module.parameters():
        s = torch_opt.opt.state[p]
        assert float(s["step"]) == 7.0
        assert s["exp_avg"].dtype == s["exp_avg_sq"].dtype == p.dtype
        assert s["exp_avg"].device == p.device
    # a wrong name or shape is refused, as the NumPy optimizer does
    broken = dict(state, exp_avg={n: a for n, a in state["exp_avg"].items() if n != "wte"})
    with pytest.raises(ValueError, match="missing"):
        torch_opt.load_state(broken)
