"""The test helpers, for the parity suite and tests/ alike: assert_close (names the tensor and prints
the max difference on failure), building both backends from one set of parameters, random batches,
and single_thread() for tiny models."""
from __future__ import annotations

import contextlib
import importlib.util

import numpy as np

import npgpt


def assert_close(name, a, b, atol=0.0, rtol=0.0):
    """|a - b| <= atol + rtol * |b| elementwise (b is the reference), else an AssertionError that
    reports the max absolute difference, where it is, and the tolerance there."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if b.ndim == 0:                   # one reference value for every entry
        b = np.broadcast_to(b, a.shape)
    assert a.shape == b.shape, f"{name}: shapes differ, {a.shape} vs {b.shape}"
    diff = np.abs(a - b)
    bound = atol + rtol * np.abs(b)
    bad = ~(diff <= bound)            # catches NaN too
    if bad.any():
        worst = np.unravel_index(np.argmax(np.where(bad, diff - bound, -np.inf)), diff.shape) if diff.ndim else ()
        raise AssertionError(
            f"{name}: {int(bad.sum())} of {diff.size} entries differ; max |a-b| = {diff.max():.3e} "
            f"(max |b| = {np.abs(b).max():.3e}); worst at {worst}: a={a[worst]!r}, b={b[worst]!r}, "
            f"|a-b|={diff[worst]:.3e} > atol + rtol*|b| = {atol:g} + {rtol:g}*|b| = {bound[worst]:.3e}")


def build_pair(cfg, dtype="float64", seed=123, params=None, device="cpu", **torch_options):
    """(NumPy model, torch model) built from the same parameter arrays."""
    if params is None:
        params = npgpt.init_params(cfg, seed, dtype)
    np_model = npgpt.build_model(cfg, "numpy", seed=seed, dtype=dtype, params=params)
    torch_model = npgpt.build_model(cfg, "torch", seed=seed, dtype=dtype, params=params, device=device,
                                    **torch_options)
    return np_model, torch_model


def random_batch(cfg, B, T, seed):
    """Random (inputs, targets) token ids, np.int64 (B, T)."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, cfg.vocab_size, (2, B, T), dtype=np.int64)


def perturb(params, seed, scale=0.1):
    """Parameters moved away from their initial values (LayerNorm scales not all 1, biases not 0),
    so that every gradient is exercised, not only the ones of a freshly initialised model."""
    rng = np.random.default_rng(seed)
    return {n: (p + scale * rng.standard_normal(p.shape)).astype(p.dtype) for n, p in params.items()}


@contextlib.contextmanager
def single_thread():
    """One thread each for torch and BLAS while tiny models run. On this 2-core machine, busy with
    other work, a second thread only adds waits: (32, 50257) @ (50257, 32) took 1.2 s with two
    OpenBLAS threads and 2 ms with one; a tiny torch forward 150 ms instead of 1 ms."""
    torch = importlib.import_module("torch") if importlib.util.find_spec("torch") else None
    threads = torch.get_num_threads() if torch else None
    if torch:
        torch.set_num_threads(1)
    limits = None
    if importlib.util.find_spec("threadpoolctl"):
        from threadpoolctl import threadpool_limits
        limits = threadpool_limits(1, "blas")
    try:
        yield
    finally:
        if limits is not None:
            limits.restore_original_limits()
        if torch:
            torch.set_num_threads(threads)
