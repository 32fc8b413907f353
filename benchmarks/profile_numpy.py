"""Where a NumPy training step spends its time: forward and backward per layer type, and AdamW.

    python benchmarks/profile_numpy.py [--shape book|llmc|long|long-dropout] [--repeats 3]

The shapes (SHAPES, which bench_backends.py measures too): the book's (its 124M model, B=2,
T=256, dropout 0.1), llm.c's (GPT-2 small, vocabulary padded to 50,304, no dropout, B=4, T=64)
and a long context (GPT-2 small, B=2, T=1024, without and with dropout 0.1).

Every function of npgpt.numpy_backend.layers (which model.py calls through the module) and the
optimizer's step are wrapped in a timer for the measured steps; "other" is the rest of the step
(residual additions, reshapes, Python). The timers cost a few microseconds a call, well under 1%
of a step. bench_backends.py prints this table for the NumPy backend in each run.

Each row also gets its floor: the time the layer would take if it ran at this machine's limits,
measured in the same process (machine_limits): its FLOPs at the pool's float32 matmul peak, or
its bytes at the pool's copy bandwidth, whichever is longer. The bytes are the least traffic the
math needs (floors): every input read from memory once, every output written once, the caches
the backward reads included; passes that a block repeats inside the L2 cache are free there.
"x floor" is the measured time over the floor: where it is large, the layer is far from what the
machine allows. Drawing random numbers (dropout) and tanh (GELU) cost arithmetic that neither
limit counts, so their floors are optimistic.
"""
from __future__ import annotations

import argparse
import collections
import functools
import json
import sys
import time
from pathlib import Path

SHAPES = {   # name -> the model (a preset and fields it replaces) and the batch, B sequences of T tokens
    "book": dict(preset="book-124m", B=2, T=256),
    "llmc": dict(preset="gpt2-small", vocab_size=50304, drop_rate=0.0, B=4, T=64),
    "long": dict(preset="gpt2-small", drop_rate=0.0, B=2, T=1024),
    "long-dropout": dict(preset="gpt2-small", drop_rate=0.1, B=2, T=1024),
    "small": dict(preset="book-124m", emb_dim=256, n_heads=4, n_layers=4, B=2, T=256),    # quick looks
    "tiny": dict(preset="tiny", B=2, T=64),
}


def shape(name):
    """(GPTConfig, B, T) of one of SHAPES."""
    import npgpt
    spec = dict(SHAPES[name])
    B, T = spec.pop("B"), spec.pop("T")
    return npgpt.GPTConfig.preset(spec.pop("preset"), **spec), B, T


GROUPS = {   # layers.py function -> (layer type, "forward" or "backward")
    "embedding_forward": ("embedding", "forward"), "embedding_backward": ("embedding", "backward"),
    "dropout_mask": ("dropout", "forward"), "dropout_forward": ("dropout", "forward"),
    "dropout_backward": ("dropout", "backward"),
    "linear_forward": ("linear", "forward"), "linear_backward": ("linear", "backward"),
    "layernorm_forward": ("layernorm", "forward"), "layernorm_backward": ("layernorm", "backward"),
    "gelu_forward": ("gelu", "forward"), "gelu_backward": ("gelu", "backward"),
    "attention_forward": ("attention", "forward"), "attention_backward": ("attention", "backward"),
    "cross_entropy_forward": ("cross-entropy", "forward"), "cross_entropy_backward": ("cross-entropy", "backward"),
}


def profile_step(model, opt, x, y, repeats=3) -> dict:
    """ms per step by (layer type, forward/backward), plus AdamW, other and total: the means over
    `repeats` steps after one warm-up step."""
    from npgpt.numpy_backend import layers as L
    totals = collections.defaultdict(float)
    originals = {name: getattr(L, name) for name in GROUPS}

    def timed(key, fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                totals[key] += time.perf_counter() - t
        return wrapper

    model.train()
    model.train_step(x, y, opt)                       # warm-up: first-touch page faults, pools
    step = opt.step
    try:
        for name, fn in originals.items():
            setattr(L, name, timed(GROUPS[name], fn))
        opt.step = timed(("AdamW", "update"), step)
        t = time.perf_counter()
        for _ in range(repeats):
            model.train_step(x, y, opt)
        total = (time.perf_counter() - t) / repeats
    finally:
        for name, fn in originals.items():
            setattr(L, name, fn)
        del opt.step                                  # the instance attribute; the method shows again
    ms = {f"{layer} {phase}": 1000 * s / repeats for (layer, phase), s in totals.items()}
    ms["other"] = 1000 * total - sum(ms.values())
    ms["total"] = 1000 * total
    return ms


def machine_limits(repeats=3) -> dict:
    """This process's limits, as the fast kernels meet them: copy_gb_s, bytes read plus bytes
    written per second by np.copyto over 256 MiB of float32 in row blocks on npgpt's pool, and
    matmul_gflops, a 2048^3 float32 product through threads.matmul (one BLAS thread a block)."""
    import numpy as np
    from npgpt.numpy_backend.threads import for_row_blocks, matmul, one_blas_thread
    src = np.ones(((1 << 26) // 1024, 1024), np.float32)                     # 256 MiB
    dst = np.empty_like(src)
    a = np.random.default_rng(0).random((2048, 2048), dtype=np.float32)
    best_copy = best_mm = float("inf")
    with one_blas_thread():
        for i in range(max(repeats + 1, 10)):         # 10 products at least: single ones vary by 20%
            if i <= repeats:
                t = time.perf_counter()
                for_row_blocks(lambda r: np.copyto(dst[r], src[r]), src)
                best_copy = min(best_copy, time.perf_counter() - t)
            t = time.perf_counter()
            matmul(a, a)
            best_mm = min(best_mm, time.perf_counter() - t)
    return {"copy_gb_s": 2 * src.nbytes / best_copy / 1e9, "matmul_gflops": 2 * 2048 ** 3 / best_mm / 1e9}


def floors(cfg, B, T, itemsize=4) -> dict:
    """{"layer phase": (bytes, FLOPs)}: the least memory traffic and the arithmetic of one
    training step's layers (N = B*T rows, float32), as the table's rows name them."""
    N, C, L, V, NH = B * T, cfg.emb_dim, cfg.n_layers, cfg.vocab_size, cfg.n_heads
    f = itemsize
    weights = L * 12 * C * C + V * C                   # the linear layers', the head's included
    linear_in = L * 7 * N * C + N * C                  # inputs of c_attn, c_proj, c_fc, mlp c_proj, head
    linear_out = L * 9 * N * C + N * V
    att = B * NH * T * T                               # attention weights, one layer
    dropped = (N * C + L * (2 * N * C + att)) if cfg.drop_rate else 0
    masks = att // 2 if cfg.drop_rate else 0
    params = sum(n for n in _param_sizes(cfg))
    return {
        "linear forward": (f * (weights + linear_in + linear_out), 2 * N * weights),
        "linear backward": (f * (2 * weights + 2 * linear_in + linear_out), 4 * N * weights),
        "AdamW update": (7 * f * params, 0),           # reads p, g, m, v; writes p, m, v
        # causal: half of the T x T products; the weights stay in the cache (the backward recomputes
        # them, work not counted here); a dropout mask's lower half is read once each way
        "attention forward": (f * L * (4 * N * C + masks), L * 2 * B * T * T * C),
        "attention backward": (f * L * (7 * N * C + masks), L * 4 * B * T * T * C),
        "gelu forward": (f * L * 2 * 4 * N * C, 0),
        "gelu backward": (f * L * 3 * 4 * N * C, 0),
        "dropout forward": (f * 3 * dropped, 0),       # x in; out and the mask out
        "dropout backward": (f * 3 * dropped, 0),      # dout and the mask in, dx out
        "layernorm forward": (f * (2 * L + 1) * 2 * N * C, 0),
        "layernorm backward": (f * (2 * L + 1) * 3 * N * C, 0),
        "cross-entropy forward": (f * 2 * N * V, 0),   # logits in, probabilities out (the cache)
        "cross-entropy backward": (f * 2 * N * V, 0),
        "embedding forward": (f * 2 * N * C, 0),
        "embedding backward": (f * 2 * N * C, 0),      # dout in; a row of dwte and of dwpe out per token
    }


def _param_sizes(cfg):
    import numpy as np
    from npgpt.params import param_shapes
    return [int(np.prod(shape)) for shape in param_shapes(cfg).values()]


def floor_ms(cfg, B, T, limits) -> dict:
    """{"layer phase": ms} at the machine's limits: the longer of bytes / copy bandwidth and
    FLOPs / matmul peak."""
    return {key: 1000 * max(nbytes / (limits["copy_gb_s"] * 1e9), flops / (limits["matmul_gflops"] * 1e9))
            for key, (nbytes, flops) in floors(cfg, B, T).items()}


def linear_gflops(cfg, B, T, ms) -> dict:
    """Achieved GFLOP/s of the linear layers (the head included): 2 FLOPs a weight and token
    forward, 4 backward."""
    C, L, V = cfg.emb_dim, cfg.n_layers, cfg.vocab_size
    weights = L * 12 * C * C + V * C
    return {phase: (2 if phase == "forward" else 4) * weights * B * T / (ms[f"linear {phase}"] / 1000) / 1e9
            for phase in ("forward", "backward") if f"linear {phase}" in ms}


def table(ms: dict, cfg=None, B=None, T=None, limits=None) -> str:
    """A markdown table: one row per layer type (forward, backward, both, share of the step), and
    with the machine's limits each row's floor and how far above it the layer runs."""
    total = ms["total"]
    low = floor_ms(cfg, B, T, limits) if limits else None
    layers = []
    for key in ms:
        layer = key.rsplit(" ", 1)[0]
        if key not in ("other", "total") and layer not in layers:
            layers.append(layer)
    both = {layer: ms.get(f"{layer} forward", 0) + ms.get(f"{layer} backward", 0) + ms.get(f"{layer} update", 0)
            for layer in layers}
    head = "| layer | forward ms | backward ms | total ms | share |"
    rule = "| --- | ---: | ---: | ---: | ---: |"
    if low:
        head, rule = head + " floor ms | x floor |", rule + " ---: | ---: |"
    lines = [head, rule]
    fmt = lambda v: "-" if v is None else f"{v:.1f}"
    for layer in sorted(layers, key=lambda n: -both[n]):
        fwd = ms.get(f"{layer} forward", ms.get(f"{layer} update"))
        row = (f"| {layer} | {fmt(fwd)} | {fmt(ms.get(f'{layer} backward'))} | {both[layer]:.1f} | "
               f"{100 * both[layer] / total:.0f}% |")
        if low:
            floor = sum(v for k, v in low.items() if k.rsplit(" ", 1)[0] == layer)
            row += f" {floor:.1f} | {both[layer] / floor:.1f} |" if floor else " - | - |"
        lines.append(row)
    blank = " | |" if low else ""
    lines.append(f"| other (residuals, Python) | | | {ms['other']:.1f} | {100 * ms['other'] / total:.0f}% |{blank}")
    if low:
        floor = sum(low.values())
        lines.append(f"| step | | | {total:.1f} | 100% | {floor:.1f} | {total / floor:.1f} |")
        lines.append(f"\nlimits measured in the same process: copy {limits['copy_gb_s']:.1f} GB/s (read + write, "
                     f"npgpt's pool), float32 matmul {limits['matmul_gflops']:.0f} GFLOP/s (threads.matmul, 2048^3)")
    else:
        lines.append(f"| step | | | {total:.1f} | 100% |")
    if cfg is not None:
        rates = linear_gflops(cfg, B, T, ms)
        lines.append("\nlinear layers: " + ", ".join(f"{phase} {r:.0f} GFLOP/s" for phase, r in rates.items()))
    return "\n".join(lines)


def main():
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import numpy as np
    import npgpt
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="book", choices=list(SHAPES))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="print the numbers as JSON")
    args = parser.parse_args()
    cfg, B, T = shape(args.shape)
    model = npgpt.build_model(cfg, backend="numpy", seed=123)
    opt = npgpt.AdamW(model, lr=5e-4, weight_decay=0.1)
    x, y = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, B, T))
    ms = profile_step(model, opt, x, y, args.repeats)
    limits = machine_limits()
    print(json.dumps({"ms": ms, "limits": limits}) if args.json else table(ms, cfg, B, T, limits))


if __name__ == "__main__":
    main()
