"""fp16 autocast with a GradScaler on the torch backend, on the CPU (torch.amp.GradScaler("cpu")):
the norm a step reports is the true (unscaled) one, a step whose float16 gradients overflow is
skipped with the parameters, the moments and the step count untouched and the scale halved, the
scaler's state goes through a checkpoint and back (a file without it loads, starting a new
scaler), and bf16 is refused in one line, suggesting fp16, on a CUDA device without bf16
(torch.cuda's capability queries monkeypatched to a V100's)."""
import contextlib

import numpy as np
import pytest
import torch

import npgpt
from npgpt.torch_backend import device as device_module
from npgpt.torch_backend.model import TorchGPT
from npgpt.weights.checkpoint import load_checkpoint, read_checkpoint, save_checkpoint

CFG = npgpt.GPTConfig(vocab_size=64, context_length=8, emb_dim=16, n_heads=2, n_layers=1, drop_rate=0.0)


def batch(seed=0):
    ids = np.random.default_rng(seed).integers(0, CFG.vocab_size, (4, CFG.context_length + 1))
    return ids[:, :-1], ids[:, 1:]


def test_the_reported_norm_is_the_unscaled_one():
    fp16 = npgpt.build_model(CFG, backend="torch", device="cpu", autocast="fp16")
    fp32 = npgpt.build_model(CFG, backend="torch", device="cpu")
    assert fp16.scaler.get_scale() == 2.0 ** 16
    for model in (fp16, fp32):
        model.train_step(*batch(), npgpt.AdamW(model, lr=1e-3))
    assert fp16.last_applied
    assert abs(fp16.last_grad_norm - fp32.last_grad_norm) <= 2e-2 * fp32.last_grad_norm   # not 65536 times it
    _, grads16 = fp16.loss_and_grads(*batch(1))
    _, grads32 = fp32.loss_and_grads(*batch(1))
    np.testing.assert_allclose(grads16["wte"], grads32["wte"], rtol=0.1, atol=1e-3)


def test_an_overflowing_step_is_skipped_and_the_scale_halved():
    model = npgpt.build_model(CFG, backend="torch", device="cpu", autocast="fp16")
    opt = npgpt.AdamW(model, lr=1e-3)
    model.train_step(*batch(), opt)
    before, moments = model.params(), opt.state()
    model.scaler.update(2.0 ** 40)                  # loss x 2^40: the float16 gradients overflow
    model.train_step(*batch(1), opt)
    assert not model.last_applied and not np.isfinite(model.last_grad_norm)
    assert model.scaler.get_scale() == 2.0 ** 39
    assert opt.state()["step"] == 1
    for name, p in model.params().items():
        np.testing.assert_array_equal(p, before[name], err_msg=name)
        np.testing.assert_array_equal(opt.state()["exp_avg"][name], moments["exp_avg"][name], err_msg=name)


def test_the_scaler_is_saved_and_restored(tmp_path):
    model = npgpt.build_model(CFG, backend="torch", device="cpu", autocast="fp16")
    opt = npgpt.AdamW(model, lr=1e-3)
    model.scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=2)
    for s in range(3):                                    # two clean steps: the scale doubles once
        model.train_step(*batch(s), opt)
    saved = model.scaler.state_dict()
    assert saved["scale"] == 2048.0 and saved["_growth_tracker"] == 1
    save_checkpoint(tmp_path / "c.h5", model, opt)
    assert read_checkpoint(tmp_path / "c.h5")["optimizer"]["grad_scaler"] == saved
    back, back_opt, _ = load_checkpoint(tmp_path / "c.h5", backend="torch", device="cpu", autocast="fp16")
    assert back.scaler.state_dict() == saved
    for m, o in ((model, opt), (back, back_opt)):         # and the next step is the same on both
        m.train_step(*batch(7), o)
    for name, p in model.params().items():
        np.testing.assert_array_equal(back.params()[name], p, err_msg=name)
    plain = npgpt.build_model(CFG, backend="torch", device="cpu")
    save_checkpoint(tmp_path / "old.h5", plain, npgpt.AdamW(plain))          # no grad_scaler in it
    assert read_checkpoint(tmp_path / "old.h5")["optimizer"]["grad_scaler"] is None
    fresh, _, _ = load_checkpoint(tmp_path / "old.h5", backend="torch", device="cpu", autocast="fp16")
    assert fresh.scaler.get_scale() == 2.0 ** 16


def test_bf16_is_refused_on_a_cuda_device_without_it(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100-SXM2-16GB")
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    params = npgpt.init_params(CFG, 0, "float32")
    with pytest.raises(ValueError, match=r"^autocast='bf16': Tesla V100-SXM2-16GB \(compute capability 7.0\) "
                                         r"has no bf16; use autocast 'fp16'"):
        TorchGPT(CFG, params, device="cuda", autocast="bf16")
    assert device_module.cuda_bf16_missing(torch.device("cpu")) is None
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert device_module.cuda_bf16_missing(torch.device("cuda")) is None
