"""Where a NumPy training step spends its time: forward and backward per layer type, and AdamW.

    python benchmarks/profile_numpy.py [--config book-124m] [--repeats 3]

Every function of npgpt.numpy_backend.layers (which model.py calls through the module) and the
optimizer's step are wrapped in a timer for the measured steps; "other" is the rest of the step
(residual additions, reshapes, Python). The timers cost a few microseconds a call, well under 1%
of a step. bench_backends.py prints this table for the NumPy backend in each run.
"""
from __future__ import annotations

import argparse
import collections
import functools
import json
import sys
import time
from pathlib import Path

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


def linear_gflops(cfg, B, T, ms) -> dict:
    """Achieved GFLOP/s of the linear layers (the head included): 2 FLOPs a weight and token
    forward, 4 backward."""
    C, L, V = cfg.emb_dim, cfg.n_layers, cfg.vocab_size
    weights = L * 12 * C * C + V * C
    return {phase: (2 if phase == "forward" else 4) * weights * B * T / (ms[f"linear {phase}"] / 1000) / 1e9
            for phase in ("forward", "backward") if f"linear {phase}" in ms}


def table(ms: dict, cfg=None, B=None, T=None) -> str:
    """A markdown table: one row per layer type (forward, backward, both, share of the step)."""
    total = ms["total"]
    layers = []
    for key in ms:
        layer = key.rsplit(" ", 1)[0]
        if key not in ("other", "total") and layer not in layers:
            layers.append(layer)
    both = {layer: ms.get(f"{layer} forward", 0) + ms.get(f"{layer} backward", 0) + ms.get(f"{layer} update", 0)
            for layer in layers}
    lines = ["| layer | forward ms | backward ms | total ms | share |", "| --- | ---: | ---: | ---: | ---: |"]
    fmt = lambda v: "-" if v is None else f"{v:.1f}"
    for layer in sorted(layers, key=lambda n: -both[n]):
        fwd = ms.get(f"{layer} forward", ms.get(f"{layer} update"))
        lines.append(f"| {layer} | {fmt(fwd)} | {fmt(ms.get(f'{layer} backward'))} | {both[layer]:.1f} | "
                     f"{100 * both[layer] / total:.0f}% |")
    lines.append(f"| other (residuals, Python) | | | {ms['other']:.1f} | {100 * ms['other'] / total:.0f}% |")
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
    parser.add_argument("--config", default="book-124m")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="print the numbers as JSON")
    args = parser.parse_args()
    cfg = npgpt.GPTConfig.preset(args.config)
    B, T = 2, min(256, cfg.context_length)
    model = npgpt.build_model(cfg, backend="numpy", seed=123)
    opt = npgpt.AdamW(model, lr=5e-4, weight_decay=0.1)
    x, y = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, B, T))
    ms = profile_step(model, opt, x, y, args.repeats)
    print(json.dumps(ms) if args.json else table(ms, cfg, B, T))


if __name__ == "__main__":
    main()
