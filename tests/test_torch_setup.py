"""What the torch backend sets up around the model, checked on the CPU: refused option pairs, the
GPU peak table behind MFU, a model that leaves torch's global RNG and TF32 setting alone, the
device of each torchrun rank, empty evaluation batches, a training step that never asks the
device for a value, the float32 loss of bf16 logits, and float32 logits for greedy decoding."""
import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

import npgpt
from npgpt.base import loss_value
from npgpt.torch_backend import device as device_mod
from npgpt.torch_backend.distributed import rank_device

pytestmark = [pytest.mark.usefixtures("one_thread"),   # bf16 on tiny models: no matter if slow here
              pytest.mark.filterwarnings("ignore:autocast='bf16' on the CPU")]

CFG = npgpt.GPTConfig(vocab_size=100, context_length=16, emb_dim=32, n_heads=2, n_layers=2,
                      drop_rate=0.1, qkv_bias=True)


def batch(seed=0, B=2, T=16):
    return np.random.default_rng(seed).integers(0, CFG.vocab_size, (2, B, T))


@pytest.mark.parametrize("missing", [None, "no fast bf16 here"])
def test_bf16_autocast_on_a_cpu_without_bf16_warns(monkeypatch, missing):
    """build_model warns where torch reports no fast CPU bf16 (the CLI refuses: tests/test_cli_errors.py)."""
    import warnings
    from npgpt.torch_backend import device
    monkeypatch.setattr(device, "cpu_bf16_missing", lambda: missing)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        npgpt.build_model(CFG, "torch", autocast="bf16", device="cpu")
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert messages == ([] if missing is None else ["autocast='bf16' on the CPU: no fast bf16 here"])


def test_cpu_bf16_missing_agrees_with_torch():
    import torch
    from npgpt.torch_backend.device import cpu_bf16_missing
    reason = cpu_bf16_missing()
    assert (reason is None) == bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    if reason:
        assert torch.backends.cpu.get_cpu_capability() in reason and "float32" in reason


def test_float64_with_bf16_autocast_is_refused():
    with pytest.raises(ValueError, match=r"autocast='bf16' with dtype='float64'.*dtype='float32'"):
        npgpt.build_model(CFG, "torch", dtype="float64", autocast="bf16", device="cpu")


# ---- the peak FLOP/s behind MFU ----

@pytest.mark.parametrize("name, precision, tflops", [
    ("NVIDIA H100 80GB HBM3", "bf16", 989.5), ("NVIDIA H100 PCIe", "bf16", 756.5),
    ("NVIDIA H100 NVL", "bf16", 835.5), ("NVIDIA H200", "bf16", 989.5), ("NVIDIA H200", "tf32", 494.5),
    ("NVIDIA A100-SXM4-40GB", "bf16", 312), ("NVIDIA A100 80GB PCIe", "tf32", 156),
    ("NVIDIA L4", "bf16", 121), ("NVIDIA L40S", "bf16", 362.05), ("NVIDIA A10", "bf16", 125),
    ("NVIDIA A10G", "bf16", 70), ("NVIDIA GeForce RTX 4090", "bf16", 165.2),
    ("NVIDIA H100 80GB HBM3", "fp64", 67), ("nvidia h100 pcie ", "fp32", 51),
])
def test_peak_flops_from_the_exact_table(name, precision, tflops):
    assert npgpt.peak_flops(name, precision) == pytest.approx(tflops * 1e12)


def test_peak_flops_is_none_for_what_it_does_not_know():
    for name in ("NVIDIA L40", "NVIDIA H100", "H100", "NVIDIA GeForce RTX 3090", "Tesla T4", ""):
        assert npgpt.peak_flops(name, "bf16") is None, name
    assert npgpt.peak_flops("NVIDIA L4", "fp64") is None           # not on the data sheet
    with pytest.raises(ValueError, match="precision must be one of"):
        npgpt.peak_flops("NVIDIA H200", "float16")


def test_mfu_peak_follows_the_precision_the_matmuls_run_in():
    """The model asks for the peak of the precision it computes in (the GPU's name is set by hand
    here; on a GPU it comes from torch.cuda.get_device_name)."""
    cases = [("float32", {"autocast": "bf16"}, False, "bf16", 756.5), ("float32", {}, True, "tf32", 378.0),
             ("float32", {}, False, "fp32", 51.0), ("float64", {}, False, "fp64", 51.0)]
    for dtype, options, tf32, precision, tflops in cases:
        model = npgpt.build_model(CFG, "torch", dtype=dtype, device="cpu", **options)
        assert model.peak_flops is None                              # on the CPU
        model.device_name, model.tf32 = "NVIDIA H100 PCIe", tf32
        assert model.precision == precision and model.peak_flops == pytest.approx(tflops * 1e12)


# ---- a model leaves the process as it found it ----

def test_building_and_training_leave_the_global_rng_alone():
    torch.manual_seed(0)
    state = torch.get_rng_state()
    model = npgpt.build_model(CFG, "torch", device="cpu", seed=5)
    opt = npgpt.AdamW(model)
    for seed in range(2):
        model.train_step(*batch(seed), opt)
    assert torch.equal(torch.get_rng_state(), state)


def test_dropout_comes_from_the_seed_not_from_torchs_global_rng():
    def losses(seed, disturb):
        model = npgpt.build_model(CFG, "torch", device="cpu", seed=5, params=npgpt.init_params(CFG, 1))
        model.generator.manual_seed(seed)
        out = []
        for _ in range(3):
            torch.manual_seed(disturb)                     # whatever the rest of the process does
            out.append(model.loss(*batch()))
        return out
    assert losses(5, 0) == losses(5, 1)
    assert losses(5, 0) != losses(6, 0)
    model = npgpt.build_model(CFG, "torch", device="cpu", params=npgpt.init_params(CFG, 1))
    assert model.loss(*batch()) != model.eval().loss(*batch()), "dropout is applied in training mode"


def test_tf32_matmuls_set_and_restore_with_the_current_api():
    """What a float32 model on CUDA wraps its calls in. torch.backends.fp32_precision = "ieee" then
    reading the legacy cudnn.allow_tf32 raised RuntimeError; the new API is all that is touched."""
    matmul = torch.backends.cuda.matmul
    saved = torch.backends.fp32_precision, matmul.fp32_precision
    try:
        torch.backends.fp32_precision = "ieee"
        before = matmul.fp32_precision
        with device_mod.tf32_matmuls(True):
            assert matmul.fp32_precision == "tf32"
            assert torch.backends.fp32_precision == "ieee"
        assert matmul.fp32_precision == before and torch.backends.fp32_precision == "ieee"
        with device_mod.tf32_matmuls(False):
            assert matmul.fp32_precision == before
    finally:
        torch.backends.fp32_precision, matmul.fp32_precision = saved


# ---- torchrun: one GPU per local rank ----

def test_each_rank_takes_the_gpu_of_its_local_rank():
    assert rank_device("cuda", 3) == torch.device("cuda", 3)
    assert rank_device("cuda:1", 1) == torch.device("cuda", 1)
    assert rank_device("cpu", 3) == torch.device("cpu")
    with pytest.raises(ValueError, match=r"--device cuda:0: .*LOCAL_RANK \(cuda:1 for this one\)"):
        rank_device("cuda:0", 1)


def test_an_empty_evaluation_batch_runs_no_forward(monkeypatch):
    model = npgpt.build_model(CFG, "torch", device="cpu").eval()
    monkeypatch.setattr(model.module, "forward", lambda *a, **k: pytest.fail("forward ran on batch size 0"))
    empty = np.zeros((0, 16), np.int64)
    assert np.isnan(model.loss(empty, empty))


# ---- a training step that never asks the device for a value ----

class HostReads(TorchFunctionMode):
    """Records each tensor method that hands a value to the host (on a GPU: waits for it)."""
    READS = {"item", "tolist", "numpy", "cpu", "__float__", "__int__", "__bool__", "__index__"}

    def __init__(self):
        super().__init__()
        self.reads = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", None) in self.READS:
            self.reads.append(func.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("clip", [None, 1.0])
def test_train_step_without_sync_reads_nothing_back(clip):
    cfg = dataclasses.replace(CFG, drop_rate=0.0)     # with dropout: one int() of a CPU generator's draw
    model = npgpt.build_model(cfg, "torch", device="cpu")
    twin = npgpt.build_model(cfg, "torch", device="cpu")
    opt, twin_opt = npgpt.AdamW(model), npgpt.AdamW(twin)
    assert opt.fused
    for seed in range(2):
        with HostReads() as log:
            loss = model.train_step(*batch(seed), opt, clip_norm=clip, sync=False)
        assert log.reads == [] and isinstance(loss, torch.Tensor) and loss.dim() == 0
        assert loss_value(loss) == twin.train_step(*batch(seed), twin_opt, clip_norm=clip)
    for name, p in twin.params().items():
        np.testing.assert_array_equal(model.params()[name], p, err_msg=name)
    with HostReads() as log:
        model.train_step(*batch(), opt, clip_norm=clip)
    assert log.reads, "the synchronous step reads the loss (the check above can see reads)"


def test_nonfinite_loss_without_sync_skips_the_update_and_raises_when_read():
    model = npgpt.build_model(CFG, "torch", device="cpu")
    opt = npgpt.AdamW(model)
    model.train_step(*batch(), opt)
    params = model.params()
    params["h.0.ln_1.weight"][:] = np.nan
    model.load_params(params)
    moments = opt.state()
    loss = model.train_step(*batch(1), opt, clip_norm=1.0, sync=False)
    with pytest.raises(FloatingPointError, match="nan; the optimizer step was skipped"):
        loss_value(loss)
    for name, p in model.params().items():
        np.testing.assert_array_equal(p, params[name], err_msg=name)
        np.testing.assert_array_equal(opt.state()["exp_avg"][name], moments["exp_avg"][name], err_msg=name)


def test_synchronize_is_there_and_does_nothing_on_the_cpu():
    for backend in ("numpy", "torch"):
        assert npgpt.build_model(CFG, backend).synchronize() is None


# ---- bf16: the loss in float32 without a float32 copy, generation logits in float32 ----

def test_bf16_cross_entropy_matches_the_float32_one(monkeypatch):
    monkeypatch.setattr(device_mod, "ROWS", 7)                      # several chunks and a ragged last one
    rng = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(40, 300, generator=rng)).to(torch.bfloat16)
    targets = torch.randint(300, (40,), generator=rng)
    mine = logits.clone().requires_grad_()
    ref = logits.clone().requires_grad_()
    loss = device_mod.cross_entropy(mine, targets)
    ref_loss = F.cross_entropy(ref.float(), targets)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=0)
    (2 * loss).backward()
    (2 * ref_loss).backward()
    assert mine.grad.dtype == torch.bfloat16
    torch.testing.assert_close(mine.grad, ref.grad, rtol=2**-7, atol=0)   # one bf16 rounding apart at most


def test_bf16_greedy_logits_come_from_a_float32_head():
    model = npgpt.build_model(CFG, "torch", device="cpu", autocast="bf16").eval()
    ids = batch()[0]
    logits = model.next_logits(ids, None)
    assert logits.dtype == torch.float32 and logits.shape == (2, CFG.vocab_size)
    assert not torch.equal(logits, logits.to(torch.bfloat16).float()), "the head ran in bf16"
    cache = model.new_kv_cache(2, CFG.context_length)
    torch.testing.assert_close(model.next_logits(ids, cache), logits, rtol=0, atol=5e-2)


@pytest.mark.parametrize("missing", ["no fast bf16 here"])
def test_the_cli_refuses_bf16_on_a_cpu_without_it(monkeypatch, tmp_path, capsys, missing):
    """One line naming the lack and the float32 alternative, exit 2, before a model is built."""
    from npgpt.cli import train
    from npgpt.torch_backend import device
    monkeypatch.setattr(device, "cpu_bf16_missing", lambda: missing)
    monkeypatch.setattr(train, "check_out", lambda *a: (_ for _ in ()).throw(SystemExit("checks passed")))
    argv = ["train", "--backend", "torch", "--device", "cpu", "--autocast", "bf16", "--out", str(tmp_path / "o")]
    if missing:
        assert npgpt.cli.main(argv) == 2
        assert capsys.readouterr().err.strip() == \
            "npgpt train: error: --autocast bf16: no fast bf16 here: train in float32 (leave --autocast out)"
    else:
        with pytest.raises(SystemExit, match="checks passed"):   # past the check, to the next one
            npgpt.cli.main(argv)
