"""Training speed of the torch backend on one NVIDIA GPU: GPT-2 small at T=1024, bf16 autocast,
fused AdamW, with and without torch.compile.

    python benchmarks/bench_cuda.py [--preset gpt2-small] [--batch-size 16] [--seq-len 1024]
                                    [--steps 20] [--compile on off] [--out benchmarks/results]

Each row runs in a process of its own (fresh memory statistics, nothing compiled before) and
reports: tokens/s and the step time over --steps steps after 3 warm-up steps (the first of which
compiles), measured from one torch.cuda.synchronize() to another with train_step(sync=False) in
between, so the clock sees every kernel and the host never waits inside the loop; MFU = model
FLOPs per token (6 N + 12 L T C, npgpt.training.perf) x tokens/s / the GPU's dense bf16 peak
(npgpt.peak_flops, None for a GPU not in its table); peak GPU memory (torch.cuda.max_memory_allocated,
weights, AdamW state and activations); and the warm-up time (mostly compilation). Writes
cuda.json and cuda.md into --out and prints the table. Exit status 2 without a CUDA device.
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path


def run_one(args, compile: bool) -> dict:
    """One row, in this process."""
    import numpy as np
    import torch

    import npgpt
    from npgpt.base import loss_value
    overrides = {} if args.drop_rate is None else {"drop_rate": args.drop_rate}
    cfg = npgpt.GPTConfig.preset(args.preset, **overrides)
    B, T = args.batch_size, args.seq_len
    model = npgpt.build_model(cfg, backend="torch", device="cuda", autocast="bf16", compile=compile)
    opt = npgpt.AdamW(model, lr=6e-4, weight_decay=0.1, decay="matrices")
    rng = np.random.default_rng(0)
    batches = [tuple(rng.integers(0, cfg.vocab_size, (2, B, T))) for _ in range(4)]
    started = time.perf_counter()
    for i in range(3):                                               # compiles on the first
        loss_value(model.train_step(*batches[i % 4], opt, clip_norm=1.0, sync=False))
    warmup_s = time.perf_counter() - started
    model.synchronize()
    started = time.perf_counter()
    losses = [model.train_step(*batches[i % 4], opt, clip_norm=1.0, sync=False) for i in range(args.steps)]
    model.synchronize()
    seconds = time.perf_counter() - started
    last_loss = loss_value(losses[-1])
    tokens_per_s = args.steps * B * T / seconds
    peak = model.peak_flops
    return {"config": args.preset, "compile": compile, "B": B, "T": T, "precision": model.precision,
            "fused_adamw": opt.fused, "drop_rate": cfg.drop_rate, "steps": args.steps,
            "step_ms": 1000 * seconds / args.steps, "tokens_per_s": tokens_per_s,
            "model_tflops": model.flops_per_token(T) * tokens_per_s / 1e12,
            "peak_tflops": None if peak is None else peak / 1e12,
            "mfu": None if peak is None else model.flops_per_token(T) * tokens_per_s / peak,
            "peak_memory_gb": torch.cuda.max_memory_allocated() / 1e9, "warmup_s": warmup_s,
            "last_loss": last_loss, "gpu": torch.cuda.get_device_name()}


def table(rows) -> str:
    mfu = lambda r: "-" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
    lines = ["| config | compile | B x T | tokens/s | step ms | model TFLOP/s | MFU | peak GPU memory GB | warm-up s |",
             "|" + " --- |" * 9]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['config']} | {'on' if r['compile'] else 'off'} | failed: {r['error']} |")
            continue
        lines.append(f"| {r['config']} | {'on' if r['compile'] else 'off'} | {r['B']} x {r['T']} | "
                     f"{r['tokens_per_s']:,.0f} | {r['step_ms']:.1f} | {r['model_tflops']:.0f} | "
                     f"{mfu(r)} | {r['peak_memory_gb']:.1f} | {r['warmup_s']:.0f} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="gpt2-small")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--drop-rate", type=float, help="default: the preset's")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--compile", nargs="+", choices=("on", "off"), default=["off", "on"])
    parser.add_argument("--timeout", type=float, default=240, help="seconds for each row")
    parser.add_argument("--budget", type=float, default=600, help="seconds for all rows: a row gets what is "
                        "left, so that the results are written whatever happens")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--one", choices=("on", "off"), help=argparse.SUPPRESS)   # internal: one row
    args = parser.parse_args()
    import torch
    if not torch.cuda.is_available():
        print("bench_cuda: no CUDA device; nothing measured", file=sys.stderr)
        return 2
    if args.one:
        print(json.dumps(run_one(args, args.one == "on")))
        return 0
    rows, deadline = [], time.monotonic() + args.budget
    for mode in args.compile:
        cmd = [sys.executable, __file__, "--one", mode] + [a for a in sys.argv[1:] if a != "--compile"
                                                            and a not in ("on", "off")]
        row = {"config": args.preset, "compile": mode == "on"}
        timeout = min(args.timeout, deadline - time.monotonic() - 5)
        try:
            if timeout < 10:
                raise subprocess.TimeoutExpired(cmd, 0)
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
            if out.returncode == 0:
                row = json.loads(out.stdout.strip().splitlines()[-1])
            else:
                row["error"] = (out.stderr.strip().splitlines() or ["exit %d" % out.returncode])[-1][:200]
        except subprocess.TimeoutExpired:
            row["error"] = f"out of time ({max(timeout, 0):.0f} s)"
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)
    meta = {"date": time.strftime("%Y-%m-%d %H:%M"), "gpu": torch.cuda.get_device_name(),
            "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version()}
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "cuda.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    text = f"{meta['gpu']}, torch {meta['torch']} (CUDA {meta['cuda']}), {meta['date']}\n\n{table(rows)}\n"
    (out_dir / "cuda.md").write_text(text)
    print(text)
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
