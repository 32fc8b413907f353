"""The torch backend's surface matches the NumPy backend's: attributes, return types and
dtypes, the training flag, and its option checks."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import npgpt

from .helpers import assert_close, build_pair, random_batch

CFG = npgpt.GPTConfig(vocab_size=50, context_length=8, emb_dim=8, n_heads=2, n_layers=1, drop_rate=0.1)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_same_surface(dtype):
    inputs, targets = random_batch(CFG, 2, 8, seed=0)
    for model in build_pair(CFG, dtype):
        assert model.cfg == CFG and model.dtype == np.dtype(dtype) and model.shapes == npgpt.param_shapes(CFG)
        assert model.training and model.dropout_masks is None
        assert model.eval() is model and not model.training
        assert model.train() is model and model.training
        model.training = False                      # what generate() does to restore the flag
        assert not model.training
        logits = model.logits(inputs)
        assert logits.shape == (2, 8, CFG.vocab_size) and logits.dtype == np.dtype(dtype)
        assert isinstance(model.loss(inputs, targets), float)
        loss, grads = model.loss_and_grads(inputs, targets)
        assert isinstance(loss, float) and list(grads) == list(model.shapes)
        assert all(g.dtype == np.dtype(dtype) and g.shape == model.shapes[n] for n, g in grads.items())
        assert isinstance(model.clip_grad_norm(1e9), float)
        assert all(p.dtype == np.dtype(dtype) for p in model.params().values())
    torch_model = build_pair(CFG, dtype)[1]
    assert torch_model.backend == "torch" and torch_model.device == torch.device("cpu")
    assert all(p.dtype == getattr(torch, dtype) for p in torch_model.module.parameters())
    torch_model.eval()
    assert not torch_model.module.training and not torch_model.module.h[0].attn.attn_dropout.training


def test_torch_options_are_checked():
    params = npgpt.init_params(CFG)
    with pytest.raises(ValueError, match="autocast='bf16' runs on CUDA or the CPU, got device 'meta'"):
        npgpt.build_model(CFG, "torch", params=params, device="meta", autocast="bf16")
    with pytest.raises(ValueError, match="autocast must be None, 'bf16' or 'fp16'"):
        npgpt.build_model(CFG, "torch", params=params, device="cpu", autocast="fp8")
    with pytest.raises(TypeError):
        npgpt.build_model(CFG, "torch", params=params, device="cpu", bogus=True)
    model = npgpt.build_model(CFG, "torch", params=params, device="cpu")
    with pytest.raises(ValueError, match="longer than context_length 8"):
        model.logits(np.zeros((1, 9), dtype=np.int64))


@pytest.mark.filterwarnings("ignore:autocast='bf16' on the CPU")   # slow where the CPU lacks bf16; tiny here
def test_bf16_autocast_on_the_cpu():
    """autocast="bf16" on the CPU: matrix products in bfloat16 (8 significant bits, ~4e-3 a
    rounding), parameters and their gradients float32; the loss stays within 2e-2 of float32's."""
    cfg = npgpt.GPTConfig.preset("tiny", vocab_size=100, context_length=16)
    params = npgpt.init_params(cfg, 3)
    inputs, targets = random_batch(cfg, 2, 16, seed=4)
    full, bf16 = (npgpt.build_model(cfg, "torch", params=params, device="cpu", autocast=a).eval()
                  for a in (None, "bf16"))
    assert_close("bf16 loss", bf16.loss(inputs, targets), full.loss(inputs, targets), rtol=2e-2)
    assert bf16.logits(inputs).dtype == np.float32
    loss, grads = bf16.train().loss_and_grads(inputs, targets)
    assert np.isfinite(loss) and all(g.dtype == np.float32 for g in grads.values())


def test_train_step_equals_torch_by_hand():
    """train_step (loss, backward, clip, AdamW) against the same step written with plain torch on a
    copy of the module: autograd, clip_grad_norm_ and torch.optim.AdamW's single-tensor loop."""
    import copy
    params = npgpt.init_params(CFG, 1, "float64")
    model = npgpt.build_model(CFG, "torch", dtype="float64", params=params).eval()
    module = copy.deepcopy(model.module)
    inputs, targets = random_batch(CFG, 2, 8, seed=1)
    loss = model.train_step(inputs, targets, npgpt.AdamW(model, lr=1e-2, weight_decay=0.1), clip_norm=0.01)
    ref_opt = torch.optim.AdamW(module.parameters(), lr=1e-2, weight_decay=0.1, foreach=False)
    ref_loss = module(torch.from_numpy(inputs), torch.from_numpy(targets))
    ref_loss.backward()
    assert torch.nn.utils.clip_grad_norm_(module.parameters(), 0.01) > 0.01          # the clip acts
    ref_opt.step()
    assert_close("loss", loss, ref_loss.item(), rtol=1e-14)
    ref = dict(module.named_parameters())
    for name, p in model.params().items():
        assert_close(name, p, ref[name].detach().numpy(), atol=1e-15, rtol=1e-12)


def test_gradient_accumulation_gives_the_whole_batch_gradients():
    """grad_accum=k runs the batch as k micro-batches whose scaled gradients sum to the batch's."""
    cfg = npgpt.GPTConfig.preset("tiny", vocab_size=100, context_length=16)
    params = npgpt.init_params(cfg, 1, "float64")
    whole = npgpt.build_model(cfg, "torch", dtype="float64", params=params)
    accum = npgpt.build_model(cfg, "torch", dtype="float64", params=params, grad_accum=2)
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 100, (2, 4, 16))
    loss, grads = whole.loss_and_grads(x, y)
    loss2, grads2 = accum.loss_and_grads(x, y)
    assert_close("loss", loss2, loss, rtol=1e-12)
    for name in grads:
        assert_close(name, grads2[name], grads[name], atol=1e-15, rtol=1e-12)
    with pytest.raises(ValueError, match="grad_accum=2"):
        accum.loss_and_grads(x[:3], y[:3])


@pytest.mark.parametrize("tie", [False, True])
def test_flops_per_token_equals_torchs_flop_counter(tie):
    """The FLOPs of one forward + backward, counted by torch.utils.flop_counter over the matmuls that
    actually ran (float64 takes the written-out attention, whose products it sees)."""
    import dataclasses

    from torch.utils.flop_counter import FlopCounterMode
    cfg = dataclasses.replace(CFG, context_length=32, tie_weights=tie, drop_rate=0.0)
    model = npgpt.build_model(cfg, "torch", dtype="float64")
    inputs, targets = (torch.from_numpy(a) for a in random_batch(cfg, 2, 32, seed=3))
    with FlopCounterMode(display=False) as counter:
        model.module(inputs, targets).backward()
    assert model.flops_per_token(32) * inputs.numel() == counter.get_total_flops()
