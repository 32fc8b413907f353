"""Parity on CUDA: float64 (exact, as on the CPU), float32 with and without TF32, bf16 autocast
against float64, the compiled production step against eager, and the GPU step that does not
wait for the GPU. `pytest -m cuda parity/` runs the CUDA cases; they skip without a GPU.

Every check is also shown to fail when the code is wrong: the tests named *_catches_* run the same
check on a deliberately broken model (an attention backward 5% too large, matmuls left in float32,
an optimizer that never steps, dropout that never drops), on the CPU in the ordinary suite (bf16
autocast runs there too; eager stands in for compiled) and on the GPU under -m cuda.

Tolerances (|a - b| <= atol + rtol*|ref|, ref = NumPy float64 from the same parameters):
  float64                 as on the CPU: logits/loss atol 1e-10, gradients rtol 1e-8 (+ atol 1e-12)
  float32, TF32 off       the CPU float32 tolerances: logits atol 1e-4, loss rtol 1e-5,
                          gradients rtol 1e-3 + atol 1e-5 * max|g|
  float32, TF32 on        TF32 rounds matmul inputs to 10 mantissa bits: logits atol 2e-2 * max|logits|,
                          loss rtol 5e-3, gradients rtol 3e-2 + atol 3e-2 * max|g|; and its error
                          must be 10x TF32-off's (it really ran in TF32)
  bf16 autocast           derived from bf16's own error on the same inputs: for logits, loss and each
                          gradient, ||a - ref|| <= 3 ||ref(bf16(params)) - ref||, where ref(bf16(params))
                          is the float64 reference run on the parameters rounded to bf16, the rounding
                          autocast applies to every weight. The CPU's bf16 measures 1.0-1.5 times that;
                          an attention backward 5% too large measures 4-16 times it.
  compiled vs eager       dropout 0: 8 steps, |compiled - eager| <= 5 * max |eager bf16 - eager fp32|
                          (bf16's own error on the same curve), and the curve must fall by 20 times
                          that; dropout 0.1: the mean of 30 losses agree within 4 standard errors,
                          and both sit above the loss without dropout by 5 of them.
Set NPGPT_PARITY_REPORT=FILE to get the measured ratios and differences appended as JSON lines.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import os
import zlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import npgpt
from npgpt.base import loss_value

from .helpers import assert_close, perturb, random_batch

HAVE_CUDA = torch.cuda.is_available()
on_cuda = [pytest.mark.cuda, pytest.mark.skipif(not HAVE_CUDA, reason="needs a CUDA device")]
DEVICES = [pytest.param("cpu"), pytest.param("cuda", marks=on_cuda)]

CFG = npgpt.GPTConfig(vocab_size=100, context_length=32, emb_dim=64, n_heads=4, n_layers=2,
                      drop_rate=0.1, qkv_bias=True)
CFG0 = dataclasses.replace(CFG, drop_rate=0.0)
BF16_FACTOR = 3.0            # bf16 results vs its own error on the same inputs (see the docstring)
CURVE_FACTOR = 5.0           # compiled vs eager curves vs bf16's own error on that curve


def report(test, **values):
    path = os.environ.get("NPGPT_PARITY_REPORT")
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"test": test, **values}) + "\n")


@pytest.fixture
def matmul_precision():
    """Give back the process's float32 matmul setting, whatever a test does to it."""
    new_api = hasattr(torch.backends, "fp32_precision")
    key = "fp32_precision" if new_api else "allow_tf32"
    saved = getattr(torch.backends.cuda.matmul, key)
    yield
    setattr(torch.backends.cuda.matmul, key, saved)


def reference_and_model(dtype, device="cuda", cfg=CFG, **torch_options):
    params = perturb(npgpt.init_params(cfg, 6, dtype), 6)
    reference = npgpt.build_model(cfg, "numpy", dtype="float64",
                                  params={n: p.astype(np.float64) for n, p in params.items()})
    model = npgpt.build_model(cfg, "torch", dtype=dtype, params=params, device=device, **torch_options)
    return reference.eval(), model.eval()


def results(model, inputs, targets) -> dict:
    """logits, loss and every gradient by name, as float64 NumPy arrays."""
    loss, grads = model.loss_and_grads(inputs, targets)
    out = {"logits": model.logits(inputs), "loss": np.array(loss), **grads}
    return {k: np.asarray(v, dtype=np.float64) for k, v in out.items()}


def compare(reference, model, logits, loss, grads):
    """logits: (atol, atol as a fraction of max|logits|); loss: assert_close keywords;
    grads: (rtol, atol, atol as a fraction of max|g|), for every gradient by name."""
    inputs, targets = random_batch(CFG, 4, 32, seed=2)
    ref_logits = reference.logits(inputs)
    got_logits = model.logits(inputs)
    assert_close("logits", got_logits, ref_logits, atol=logits[0] + logits[1] * np.abs(ref_logits).max())
    assert_close("loss", model.loss(inputs, targets), reference.loss(inputs, targets), **loss)
    _, ref_grads = reference.loss_and_grads(inputs, targets)
    _, model_grads = model.loss_and_grads(inputs, targets)
    rtol, atol, atol_scale = grads
    for name, ref in ref_grads.items():
        assert_close(name, model_grads[name], ref, rtol=rtol, atol=atol + atol_scale * np.abs(ref).max())
    return np.abs(got_logits - ref_logits).max()


# ---- float64 and float32 ----

@pytest.mark.cuda
@pytest.mark.skipif(not HAVE_CUDA, reason="needs a CUDA device")
def test_float64():
    reference, model = reference_and_model("float64")
    assert model.device.type == "cuda" and model.module.wte.is_cuda and model.precision == "fp64"
    compare(reference, model, (1e-10, 0.0), {"atol": 1e-10}, (1e-8, 1e-12, 0.0))


@pytest.mark.cuda
@pytest.mark.skipif(not HAVE_CUDA, reason="needs a CUDA device")
def test_float32_with_and_without_tf32(matmul_precision):
    cpu_rng, cuda_rng = torch.get_rng_state(), torch.cuda.get_rng_state()
    setting = torch.backends.cuda.matmul.fp32_precision if hasattr(torch.backends, "fp32_precision") else None
    reference, model = reference_and_model("float32")
    assert model.tf32 and model.precision == "tf32"
    assert npgpt.AdamW(model).opt.param_groups[0]["fused"], "fused AdamW on CUDA"
    tf32_error = compare(reference, model, (0.0, 2e-2), {"rtol": 5e-3}, (3e-2, 0.0, 3e-2))
    model.tf32 = False
    ieee_error = compare(reference, model, (1e-4, 0.0), {"rtol": 1e-5}, (1e-3, 0.0, 1e-5))
    report("float32", tf32_logits_error=float(tf32_error), ieee_logits_error=float(ieee_error))
    assert tf32_error > 10 * ieee_error, f"TF32 was not used: logits error {tf32_error:.2e} vs {ieee_error:.2e}"
    # building and running the model left the process's RNG and matmul setting as they were
    assert torch.equal(torch.get_rng_state(), cpu_rng) and torch.equal(torch.cuda.get_rng_state(), cuda_rng)
    if setting is not None:
        assert torch.backends.cuda.matmul.fp32_precision == setting


# ---- bf16 autocast: against float64, with bf16's own error as the yardstick ----

def to_bf16(a: np.ndarray) -> np.ndarray:
    return torch.from_numpy(a).to(torch.bfloat16).to(torch.float64).numpy()


def bf16_ratios(device) -> dict:
    """||bf16 model - float64|| / ||float64 on bf16-rounded parameters - float64||, by tensor."""
    reference, model = reference_and_model("float32", device, cfg=CFG0, autocast="bf16")
    inputs, targets = random_batch(CFG0, 4, 32, seed=2)
    ref = results(reference, inputs, targets)
    rounded = results(npgpt.build_model(CFG0, "numpy", dtype="float64",
                                        params={n: to_bf16(p) for n, p in reference.params().items()}),
                      inputs, targets)
    got = results(model, inputs, targets)
    return {k: float(np.linalg.norm(got[k] - ref[k]) / np.linalg.norm(rounded[k] - ref[k])) for k in ref}


def check_bf16(ratios: dict) -> None:
    bad = {k: round(r, 2) for k, r in ratios.items() if not r <= BF16_FACTOR}
    assert not bad, (f"bf16 error above {BF16_FACTOR}x bf16's own error on the same inputs: {bad} "
                     f"(all ratios: { {k: round(r, 2) for k, r in ratios.items()} })")


class _Scale(torch.autograd.Function):
    """Identity forward, backward times 1.05: an attention backward 5% too large everywhere."""

    @staticmethod
    def forward(ctx, y):
        return y.view_as(y)

    @staticmethod
    def backward(ctx, dy):
        return 1.05 * dy


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_autocast_against_float64(device):
    ratios = bf16_ratios(device)
    report(f"bf16 {device}", max_ratio=max(ratios.values()), ratios=ratios)
    check_bf16(ratios)


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_check_catches_an_attention_backward_5pct_too_large(device, monkeypatch):
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **k: _Scale.apply(sdpa(*a, **k)))
    ratios = bf16_ratios(device)
    report(f"bf16 {device}, attention backward x1.05", max_ratio=max(ratios.values()))
    with pytest.raises(AssertionError, match="attn.c_attn.weight"):
        check_bf16(ratios)


class MatmulDtypes(TorchDispatchMode):
    """Records the operand dtypes of every matrix product and attention kernel that runs,
    forward and backward."""
    OPERANDS = {"mm": slice(0, 2), "bmm": slice(0, 2), "addmm": slice(1, 3), "baddbmm": slice(1, 3)}

    def __init__(self):
        super().__init__()
        self.seen = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        operands = self.OPERANDS.get(name, slice(0, 3) if "attention" in name else None)
        if operands is not None:
            tensors = [a for a in tree_leaves(args) if isinstance(a, torch.Tensor)]
            self.seen[(name, tuple(str(t.dtype) for t in tensors[operands]))] += 1
        return func(*args, **(kwargs or {}))


def check_matmuls_in_bf16(model) -> None:
    """A forward and backward runs every matmul in bf16: 3 (4 L + 1) products (4 linear layers a
    block and the head, each once forward and twice backward) and 2 L attention kernels."""
    inputs, targets = random_batch(CFG0, 4, 32, seed=2)
    with MatmulDtypes() as log:
        model.loss_and_grads(inputs, targets)
    not_bf16 = {op: n for op, n in log.seen.items() if set(op[1]) != {"torch.bfloat16"}}
    assert not not_bf16, f"matmuls not in bf16: {not_bf16}"
    products = sum(n for (name, _), n in log.seen.items() if "attention" not in name)
    attention = sum(n for (name, _), n in log.seen.items() if "attention" in name)
    L = CFG0.n_layers
    assert products >= 3 * (4 * L + 1) and attention >= 2 * L, f"too few matmuls seen: {dict(log.seen)}"


@pytest.mark.parametrize("device", DEVICES)
def test_matmuls_run_in_bf16(device):
    _, model = reference_and_model("float32", device, cfg=CFG0, autocast="bf16")
    check_matmuls_in_bf16(model)


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_matmul_check_catches_float32_matmuls(device):
    _, model = reference_and_model("float32", device, cfg=CFG0)     # autocast left out
    with pytest.raises(AssertionError, match="matmuls not in bf16"):
        check_matmuls_in_bf16(model)


# ---- the step that does not wait for the GPU, generation, evaluation padding ----

def check_never_waits(**options):
    _, model = reference_and_model("float32", cfg=CFG, **options)
    model.train()
    opt = npgpt.AdamW(model, lr=1e-3)
    inputs, targets = random_batch(CFG, 8, 32, seed=3)      # the dropout test's shape: one compile for both
    expected = model.train_step(inputs, targets, opt, clip_norm=1.0)     # warm-up (compiles, allocates)
    torch.cuda.set_sync_debug_mode("error")            # any synchronising call raises
    try:
        losses = [model.train_step(inputs, targets, opt, clip_norm=1.0, sync=False) for _ in range(3)]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(isinstance(loss, torch.Tensor) and loss.is_cuda for loss in losses)
    model.synchronize()
    values = [loss_value(loss) for loss in losses]
    assert values[-1] < expected, f"no progress: {expected} then {values}"


@pytest.mark.cuda
@pytest.mark.skipif(not HAVE_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("options", [{}, {"autocast": "bf16"}])
def test_train_step_never_waits_for_the_gpu(options):
    check_never_waits(**options)


@pytest.mark.cuda
@pytest.mark.skipif(not HAVE_CUDA, reason="needs a CUDA device")
def test_nonfinite_loss_skips_the_update_on_the_gpu():
    _, model = reference_and_model("float32", autocast="bf16")
    opt = npgpt.AdamW(model.train(), lr=1e-3)
    inputs, targets = random_batch(CFG, 4, 32, seed=4)
    model.train_step(inputs, targets, opt)
    before = model.params()
    with torch.no_grad():
        model.module.h[0].ln_1.weight.fill_(float("nan"))
    loss = model.train_step(inputs, targets, opt, sync=False)
    with pytest.raises(FloatingPointError, match="skipped"):
        loss_value(loss)
    after = model.params()
    for name, p in before.items():
        if name != "h.0.ln_1.weight":
            np.testing.assert_array_equal(after[name], p, err_msg=f"{name} was updated by a NaN loss")


@pytest.mark.cuda
@pytest.mark.skipif(not HAVE_CUDA, reason="needs a CUDA device")
def test_float64_adamw_and_greedy_generation():
    reference, model = reference_and_model("float64")
    reference.train(), model.train()
    opts = [npgpt.AdamW(m, lr=1e-3, weight_decay=0.1, decay="matrices") for m in (reference, model)]
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
    expected = npgpt.generate(reference.eval(), prompt, max_new_tokens=40, temperature=0.0)   # slides past 32
    for cache in (True, False):
        np.testing.assert_array_equal(
            npgpt.generate(model.eval(), prompt, max_new_tokens=40, temperature=0.0, use_cache=cache), expected)
    sampled = [npgpt.generate(model, prompt, max_new_tokens=20, temperature=1.0, top_p=0.9, seed=5)
               for _ in range(2)]
    np.testing.assert_array_equal(sampled[0], sampled[1])


@pytest.mark.cuda
@pytest.mark.skipif(not HAVE_CUDA, reason="needs a CUDA device")
def test_bf16_generation_logits_are_float32_and_empty_batches_are_nan():
    _, model = reference_and_model("float32", autocast="bf16")
    ids = random_batch(CFG, 2, 5, seed=3)[0]
    logits = model.next_logits(ids, None)
    assert logits.dtype == torch.float32 and logits.shape == (2, CFG.vocab_size)
    assert not torch.equal(logits, logits.to(torch.bfloat16).float()), "the head ran in bf16"
    assert np.isnan(model.loss(np.zeros((0, 32), np.int64), np.zeros((0, 32), np.int64)))


@pytest.mark.cuda
@pytest.mark.skipif(not HAVE_CUDA, reason="needs a CUDA device")
def test_this_gpu_is_in_the_peak_table():
    name = torch.cuda.get_device_name()
    if any(family in name for family in ("H100", "H200", "A100")):
        assert npgpt.peak_flops(name, "bf16") is not None, f"{name!r} is missing from npgpt's PEAK_TFLOPS"
    report("gpu", name=name, bf16_peak=npgpt.peak_flops(name, "bf16"))


# ---- the compiled production step (SDPA, dropout from the RNG, bf16, fused AdamW) vs eager ----
# (last in the file: compiling takes the most time)

def curve(device, compile, autocast="bf16", frozen=False, steps=8):
    """Losses of train_step over two alternating batches, lr 3e-3, from the same parameters."""
    _, model = reference_and_model("float32", device, cfg=CFG0, compile=compile, autocast=autocast)
    model.tf32 = False                                  # the float32 curve is the precise one
    model.train()
    opt = npgpt.AdamW(model, lr=3e-3, weight_decay=0.0)
    if frozen:
        opt.step = lambda *args, **kwargs: None
    batches = [random_batch(CFG0, 4, 32, seed=s) for s in (10, 11)]
    return np.array([model.train_step(*batches[s % 2], opt) for s in range(steps)])


def check_curves(compiled, eager, eager_fp32) -> float:
    own = np.abs(eager - eager_fp32).max()            # bf16's own error on this curve
    tol = CURVE_FACTOR * own + 1e-4
    assert eager[0] - eager[-1] > 20 * tol, f"the eager curve barely moves: {eager}"
    assert_close("compiled losses", compiled, eager, atol=tol)
    return own


def compile_on(device) -> bool:
    return device == "cuda"          # on the CPU eager stands in: the check itself is what is shown


@pytest.fixture(scope="module")
def curves(request):
    cache = {}

    def get(device, frozen=False):
        key = (device, frozen)
        if key not in cache:
            cache[key] = curve(device, compile_on(device), frozen=frozen)
        if (device, "eager") not in cache:
            cache[(device, "eager")] = curve(device, False), curve(device, False, autocast=None)
        return cache[key], *cache[(device, "eager")]
    return get


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_steps_match_eager_without_dropout(device, curves):
    compiled, eager, eager_fp32 = curves(device)
    own = check_curves(compiled, eager, eager_fp32)
    report(f"compiled vs eager {device}", max_diff=float(np.abs(compiled - eager).max()), bf16_own=float(own),
           eager=eager.tolist(), compiled=compiled.tolist())


@pytest.mark.parametrize("device", DEVICES)
def test_curve_check_catches_an_optimizer_that_never_steps(device, curves):
    frozen, eager, eager_fp32 = curves(device, frozen=True)
    with pytest.raises(AssertionError, match="compiled losses"):
        check_curves(frozen, eager, eager_fp32)


def dropout_losses(device, params, compile, drop=True, draws=30):
    """Losses of forward_backward on one batch, dropout 0.1 from the RNG (no optimizer steps)."""
    cfg = CFG if drop else CFG0
    model = npgpt.build_model(cfg, "torch", params=params, device=device, compile=compile, autocast="bf16")
    inputs, targets = random_batch(CFG, 8, 32, seed=3)
    return np.array([model.train().forward_backward(inputs, targets) for _ in range(draws)])


def check_dropout_stats(compiled, eager, no_dropout) -> None:
    se = lambda x: x.std(ddof=1) / np.sqrt(len(x))
    assert np.ptp(compiled) > 0 and np.ptp(eager) > 0, "the same masks every step"
    for name, losses in (("compiled", compiled), ("eager", eager)):
        assert losses.mean() - no_dropout > 5 * se(losses), \
            f"{name}: mean loss {losses.mean():.4f} is no higher than without dropout ({no_dropout:.4f})"
    bound = 4 * np.hypot(se(compiled), se(eager))
    assert abs(compiled.mean() - eager.mean()) <= bound, \
        f"mean loss compiled {compiled.mean():.4f} vs eager {eager.mean():.4f}, more than {bound:.4f} apart"


@pytest.fixture(scope="module")
def memorised():
    """Parameters trained to fit one batch (loss ~1e-3), where dropout shows plainly in the loss."""
    cache = {}

    def get(device):
        if device not in cache:
            _, model = reference_and_model("float32", device, cfg=CFG0)
            opt = npgpt.AdamW(model.train(), lr=1e-2, weight_decay=0.0)
            inputs, targets = random_batch(CFG, 8, 32, seed=3)
            for _ in range(40):
                model.train_step(inputs, targets, opt)
            cache[device] = model.params(), model.eval().loss(inputs, targets)
        return cache[device]
    return get


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_dropout_matches_eager_in_distribution(device, memorised):
    params, no_dropout = memorised(device)
    compiled = dropout_losses(device, params, compile_on(device))
    eager = dropout_losses(device, params, False)
    report(f"dropout {device}", compiled_mean=compiled.mean(), eager_mean=eager.mean(), no_dropout=no_dropout,
           compiled_std=compiled.std(), eager_std=eager.std())
    check_dropout_stats(compiled, eager, no_dropout)


def test_dropout_check_catches_dropout_that_never_drops(memorised):
    params, no_dropout = memorised("cpu")
    with pytest.raises(AssertionError):
        check_dropout_stats(dropout_losses("cpu", params, False, drop=False), dropout_losses("cpu", params, False),
                            no_dropout)


@pytest.mark.cuda
@pytest.mark.skipif(not HAVE_CUDA, reason="needs a CUDA device")
def test_compiled_train_step_never_waits_for_the_gpu():
    check_never_waits(autocast="bf16", compile=True)
