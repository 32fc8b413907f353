"""Side-by-side speed of the NumPy and torch backends on this machine, in one run.

    python benchmarks/bench_backends.py [--configs tiny small book-124m] [--repeats 5] [--out benchmarks/results]

Backends: numpy, torch (npgpt's, on the CPU, fused AdamW), and as an outside reference "book":
the book's GPTModel with its default torch.optim.AdamW (the llms-from-scratch package, installed
with `pip install llms-from-scratch --no-deps`; skipped when absent). For each backend and config: train step (forward + backward + AdamW) at B=2, T=256 (the context
length when shorter), tokens/s, achieved GFLOP/s and its share of the same library's measured
float32 matmul peak, forward latency, greedy generation tokens/s (batch 1, 4-token prompt, 100 new
tokens) with and without the KV cache, and peak RSS. Each backend runs in its own process (clean
RSS); times are medians of --repeats runs after one warm-up. Writes results.md, results.json and results.png.

FLOPs per trained token: 6 * N_matmul + 12 * L * T * C, where N_matmul counts the weights used in
matrix products (all but the embeddings, the head included) and the second term is attention's
q @ k^T and att @ v, forward and backward (the formula of the PaLM paper's appendix B).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ORDER = ["numpy", "torch", "torch-cuda", "book"]
CONFIGS = {"tiny": dict(preset="tiny"),
           "small": dict(preset="book-124m", emb_dim=256, n_heads=4, n_layers=4),
           "book-124m": dict(preset="book-124m")}


def median_time(fn, repeats):
    fn()                                    # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def matmul_peak(backend, repeats):
    """Float32 GFLOP/s of a 2048^3 product in the backend's own library (OpenBLAS or MKL)."""
    n = 2048
    if backend == "numpy":
        import numpy as np
        a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
        fn = lambda: a @ a
    else:
        import torch
        device = "cuda" if backend == "torch-cuda" else "cpu"
        a = torch.randn(n, n, device=device)
        sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        fn = lambda: (a @ a, sync())
    return 2 * n ** 3 / median_time(fn, repeats) / 1e9


def book_step(cfg, x, y, repeats):
    """The book's model and training step (chapter 5's calc_loss_batch + default AdamW)."""
    import torch
    from llms_from_scratch.ch04 import GPTModel
    book_cfg = {"vocab_size": cfg.vocab_size, "context_length": cfg.context_length, "emb_dim": cfg.emb_dim,
                "n_heads": cfg.n_heads, "n_layers": cfg.n_layers, "drop_rate": cfg.drop_rate, "qkv_bias": cfg.qkv_bias}
    torch.manual_seed(123)
    model = GPTModel(book_cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=0.1)
    x, y = torch.from_numpy(x), torch.from_numpy(y)

    def step():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
        loss.backward()
        opt.step()

    train = median_time(step, repeats)
    model.eval()
    with torch.no_grad():
        forward = median_time(lambda: model(x), repeats)
    return train, forward


def run_one(backend, name, repeats):
    """Measure one backend on one config (called in a fresh process)."""
    import numpy as np
    import npgpt
    spec = dict(CONFIGS[name])
    cfg = npgpt.GPTConfig.preset(spec.pop("preset"), **spec)
    B, T = 2, min(256, cfg.context_length)
    if backend == "book":
        rng = np.random.default_rng(0)
        x, y = rng.integers(0, cfg.vocab_size, (2, B, T))
        step, forward = book_step(cfg, x, y, repeats)
        return summarise("book", name, cfg, B, T, step, forward, None, matmul_peak("torch", repeats))
    if backend == "numpy":
        model = npgpt.build_model(cfg, backend="numpy", seed=123)
    else:      # torch on the CPU, or "torch-cuda": bf16 autocast, TF32 and fused AdamW on the GPU
        cuda = backend == "torch-cuda"
        model = npgpt.build_model(cfg, backend="torch", seed=123, device="cuda" if cuda else "cpu",
                                  autocast="bf16" if cuda else None)
    opt = npgpt.AdamW(model, lr=5e-4, weight_decay=0.1)
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, cfg.vocab_size, (2, B, T))
    step = median_time(lambda: model.train_step(x, y, opt), repeats)
    model.eval()
    forward = median_time(lambda: model.logits(x), repeats)
    prompt = np.array([[6109, 3626, 6100, 345]])
    gen = {}
    for use_cache in (True, False):
        t = median_time(lambda: npgpt.generate(model, prompt, max_new_tokens=100, temperature=0.0,
                                               use_cache=use_cache), max(1, repeats // 2))
        gen[use_cache] = 100 / t
    return summarise(backend, name, cfg, B, T, step, forward, gen, matmul_peak(backend, repeats))


def summarise(backend, name, cfg, B, T, step, forward, gen, peak):
    import numpy as np
    import npgpt
    shapes = npgpt.param_shapes(cfg)
    n_matmul = sum(int(np.prod(s)) for n, s in shapes.items() if n.endswith("weight") and ".ln_" not in n
                   and not n.startswith("ln_f")) + (cfg.vocab_size * cfg.emb_dim if cfg.tie_weights else 0)
    flops_per_token = 6 * n_matmul + 12 * cfg.n_layers * T * cfg.emb_dim
    achieved = flops_per_token * B * T / step / 1e9
    return {"backend": backend, "config": name, "params": npgpt.num_params(cfg), "B": B, "T": T,
            "train_step_s": step, "tokens_per_s": B * T / step, "gflops": achieved,
            "matmul_peak_gflops": peak, "share_of_peak": achieved / peak, "forward_s": forward,
            "gen_tok_s_cache": gen[True] if gen else None, "gen_tok_s_no_cache": gen[False] if gen else None,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--backends", nargs="+", help="numpy torch torch-cuda book (default: all that "
                        "this machine has)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--one", nargs=2, help=argparse.SUPPRESS)       # internal: backend config
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(*args.one, args.repeats)))
        return
    import numpy
    rows = []
    backends = list(args.backends or ORDER)
    if "torch-cuda" in backends and not (importlib.util.find_spec("torch") and __import__("torch").cuda.is_available()):
        backends.remove("torch-cuda")
    if "book" in backends and importlib.util.find_spec("llms_from_scratch") is None:
        print("bench: llms-from-scratch not installed, skipping the book's model "
              "(pip install llms-from-scratch --no-deps)", file=sys.stderr)
        backends.remove("book")
    for name in args.configs:
        for backend in backends:
            out = subprocess.run([sys.executable, __file__, "--one", backend, name, "--repeats", str(args.repeats)],
                                 capture_output=True, text=True, check=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(rows[-1], file=sys.stderr)
    try:
        import torch
        torch_version = torch.__version__
    except ImportError:
        torch_version = None
    meta = {"date": time.strftime("%Y-%m-%d"), "machine": platform.platform(), "processor": platform.processor(),
            "cpus": __import__("os").cpu_count(), "python": platform.python_version(),
            "numpy": numpy.__version__, "torch": torch_version}
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    head = ("| config | backend | train step s | tokens/s | GFLOP/s | % of matmul peak | forward s "
            "| gen tok/s (cache) | gen tok/s (no cache) | peak RSS MB |\n|" + " --- |" * 10)
    lines = [f"{meta}", "", head]
    fmt = lambda v: "-" if v is None else f"{v:.1f}"
    for r in rows:
        lines.append(f"| {r['config']} | {r['backend']} | {r['train_step_s']:.3f} | {r['tokens_per_s']:.0f} | "
                     f"{r['gflops']:.0f} | {100 * r['share_of_peak']:.0f}% of {r['matmul_peak_gflops']:.0f} | "
                     f"{r['forward_s']:.3f} | {fmt(r['gen_tok_s_cache'])} | {fmt(r['gen_tok_s_no_cache'])} | "
                     f"{r['peak_rss_mb']:.0f} |")
    by = {(r["config"], r["backend"]): r for r in rows}
    for name in args.configs:
        n, t, b = (by.get((name, k)) for k in ("numpy", "torch", "book"))
        ratios = []
        if n and b:
            ratios.append(f"numpy / book step {n['train_step_s'] / b['train_step_s']:.2f}")
        if n and t:
            ratios.append(f"numpy / torch step {n['train_step_s'] / t['train_step_s']:.2f}")
            ratios.append(f"numpy cache / torch cache {n['gen_tok_s_cache'] / t['gen_tok_s_cache']:.2f}")
        if n:
            ratios.append(f"numpy cache / no cache {n['gen_tok_s_cache'] / n['gen_tok_s_no_cache']:.2f}")
        lines.append(f"\n{name}: " + ", ".join(ratios))
    (out_dir / "results.md").write_text("\n".join(lines) + "\n")
    plot(rows, args.configs, out_dir / "results.png", meta)
    print("\n".join(lines))


def plot(rows, configs, path, meta):
    """Train step time and KV-cache generation speed per config, one bar per backend."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    backends = sorted({r["backend"] for r in rows}, key=ORDER.index)
    by = {(r["config"], r["backend"]): r for r in rows}
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    width = 0.8 / len(backends)
    for i, backend in enumerate(backends):
        xs = [j + i * width for j in range(len(configs))]
        step = [by[(c, backend)]["train_step_s"] if (c, backend) in by else 0 for c in configs]
        gen = [(by.get((c, backend)) or {}).get("gen_tok_s_cache") or 0 for c in configs]
        axes[0].bar(xs, step, width, label=backend)
        axes[1].bar(xs, gen, width, label=backend)
    for ax, title in zip(axes, ("train step (s, lower is better)", "greedy generation with KV cache (tokens/s)")):
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(configs))], configs)
        ax.set_title(title, fontsize=9)
    axes[0].set_yscale("log")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"npgpt backends, {meta['date']}, {meta['cpus']} CPUs", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
