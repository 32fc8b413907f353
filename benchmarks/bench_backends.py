"""The backends side by side on this machine, like with like, in one run.

    python benchmarks/bench_backends.py [--shapes book llmc long long-dropout] [--rounds 2] [--repeats 3]
                                        [--variants numpy numpy-reference torch ...] [--llmc DIR]

Shapes (profile_numpy.SHAPES): book, the book's 124M model at B=2, T=256 with dropout 0.1; llmc,
llm.c's (GPT-2 small, vocabulary padded to 50,304, no dropout, B=4, T=64: 256 tokens a step, where
passes over the parameters and per-call costs weigh most); long, GPT-2 small at B=2, T=1024
without dropout, and long-dropout, the same with dropout 0.1 (where attention's T x T work weighs
most). numpy-reference and the book's model run at the book's shape only; generation and the
eval forward are measured there only.

Variants, each measured in a process of its own:
  numpy       npgpt's NumPy backend, float32
  numpy-reference  the same model on the reference kernels (numpy_backend/reference.py: whole arrays,
              no thread pool, BLAS with its own threads): what the fast kernels buy
  torch       npgpt's torch backend on the CPU, float32, fused AdamW
  torch-bf16  the same under torch.autocast("cpu", torch.bfloat16) (AVX512-BF16 or AMX where present;
              skipped, with the reason in results.md, on a CPU where torch has no fast bf16)
  torch-cuda  bf16 autocast, TF32 and fused AdamW on the GPU, where there is one
  book        the book's GPTModel (llms-from-scratch, `pip install llms-from-scratch --no-deps`)
              with its default torch.optim.AdamW, as its users run it: glibc's default allocator
  book+alloc  the same with npgpt.memory.keep_freed_memory(), the allocator setting that both
              npgpt backends make (without it a step pays ~250,000 page faults)
  llmc        llm.c's C trainer (train_gpt2.c, built from --llmc DIR with its Makefile's flags;
              benchmarks/llmc_rival.py) on the same model and batch, OMP_NUM_THREADS = npgpt's
              pool size, at the llmc shape only; skipped in one line without --llmc DIR
Both npgpt backends keep freed memory, by their own process-wide choice (npgpt/memory.py).

Method: rounds alternate the variants (numpy, torch, ..., numpy, torch, ...), each variant of each
round in a fresh process; in it a warm-up (WARMUP_STEPS train steps, one call of the rest), then
--repeats timed runs of each measurement; min and median over all rounds are reported.
Measured: the train step (forward + backward + AdamW) and the peak RSS after it, and at the
book's shape the eval forward, greedy generation (batch 1, 4-token prompt, 100 new tokens) with the KV
cache and, in round 1, without, page faults per step, and peak RSS. Each process also measures its
library's float32 matmul peak (2048^3 products) and the read bandwidth of a float32 matrix-vector
product over 256 MiB, the two limits: a step's GFLOP/s against the first, generation's weight
bytes per token / seconds per token against the second (the best of any process: one limit of the
machine for every variant). The NumPy process of round 1 adds a profile of its step per layer type
(benchmarks/profile_numpy.py) at each shape.
"other load" is the CPU time used by other processes on the machine while a variant ran, in cores.

OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE work around old OpenBLAS builds and slow down current
NumPy; when set, both are removed together from the children's environment (--keep-openblas-env
keeps them), and the OpenBLAS kernel that ran is reported (threadpoolctl).
FLOPs per trained token: 6 * N_matmul + 12 * L * T * C (PaLM's appendix B), N_matmul the weights of
every matrix product, the head's included (wte again when tied): npgpt.training.perf.flops_per_token.
Writes results.md (what docs/performance.md shows), results.json and results.png.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_report import cpu_flags, cpu_name, merge, plot, report  # noqa: E402
from profile_numpy import SHAPES, shape  # noqa: E402

VARIANTS = ["numpy", "numpy-reference", "torch", "torch-bf16", "torch-cuda", "book", "book+alloc", "llmc"]
EVERY_SHAPE = ("numpy", "torch", "torch-bf16", "torch-cuda")    # the rest: BOOK_SHAPES (llmc: its own)
BOOK_SHAPES = ("book", "small", "tiny")     # where the book's model, the reference form and generation run
DEFAULT_SHAPES = ["book", "llmc", "long", "long-dropout"]
OPENBLAS_ENV = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
GEN_TOKENS = 100
PROMPT = [[6109, 3626, 6100, 345]]          # "Every effort moves you"
WARMUP_STEPS = 2    # the heap reaches its steady size over the first steps, even when freed memory
                    # is kept: torch's first three steps fault ~150,000, ~50,000, then 0 pages here


# ---- in the child process: one variant, one config -----------------------------------------

def timed(fn, repeats, warmup=1):
    """Seconds of each of `repeats` calls after `warmup` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return times


def matmul_peak(lib, repeats, device="cpu", dtype="float32"):
    """Best GFLOP/s of a 2048^3 product in the variant's own library (OpenBLAS, MKL, cuBLAS), the
    best of at least 10: a product takes ~0.1 s on 2 cores, and the few of a step's repeats gave
    peaks 20% apart from one process to the next."""
    n = 2048
    if lib == "numpy":
        import numpy as np
        a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
        fn = lambda: a @ a
    else:
        import torch
        a = torch.randn(n, n, device=device, dtype=getattr(torch, {"bf16": "bfloat16"}.get(dtype, dtype)))
        sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        fn = lambda: (a @ a, sync())
    return 2 * n ** 3 / min(timed(fn, max(repeats, 10))) / 1e9


def read_bandwidth(lib, repeats):
    """Best GB/s of a float32 matrix-vector product over a 256 MiB matrix: each weight read once,
    as in generation."""
    rows, cols = 16384, 4096
    if lib == "numpy":
        import numpy as np
        w = np.random.default_rng(0).standard_normal((rows, cols), dtype=np.float32)
        x = np.ones(cols, np.float32)
        fn = lambda: w @ x
    else:
        import torch
        w, x = torch.randn(rows, cols), torch.ones(cols)
        fn = lambda: torch.mv(w, x)
    return w.nbytes if lib == "numpy" else w.numel() * 4, min(timed(fn, repeats + 2))


def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def book_model(cfg, x, y, repeats):
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

    for _ in range(WARMUP_STEPS):
        step()
    f0 = faults()
    train = timed(step, repeats, warmup=0)
    page_faults = (faults() - f0) / repeats
    model.eval()
    with torch.no_grad():
        forward = timed(lambda: model(x), repeats)
    return train, page_faults, forward


def library_info(variant):
    """BLAS and threads as this process runs them."""
    info = {}
    try:
        import threadpoolctl
        info["threadpools"] = [{k: p.get(k) for k in ("internal_api", "version", "architecture", "num_threads",
                                                        "threading_layer")}
                               for p in threadpoolctl.threadpool_info()]
    except ImportError:
        info["threadpools"] = "threadpoolctl not installed"
    if variant == "llmc":
        return info
    if not variant.startswith("numpy"):
        import torch
        info["torch_threads"] = torch.get_num_threads()
        info["torch_cpu_capability"] = torch.backends.cpu.get_cpu_capability()
        info["mkldnn_bf16"] = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    if variant.startswith("numpy"):
        from npgpt.numpy_backend import threads
        info["npgpt_threads"] = threads.num_threads()
    from npgpt.memory import allocator_settings
    info["allocator"] = allocator_settings()
    return info


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_one(variant, name, repeats, first_round, llmc_dir=None):
    """Measure one variant at one shape (called in a fresh process)."""
    import numpy as np
    import npgpt
    from npgpt.training.perf import flops_per_token, matmul_weights
    if variant == "book+alloc":
        from npgpt.memory import keep_freed_memory
        keep_freed_memory()
    cfg, B, T = shape(name)
    # ids below GPT-2's 50,257: llm.c's padded rows are never targets
    x, y = np.random.default_rng(0).integers(0, min(cfg.vocab_size, 50257), (2, B, T))
    row = {"variant": variant, "config": name, "params": npgpt.num_params(cfg), "B": B, "T": T,
           "drop_rate": cfg.drop_rate}
    cuda = variant == "torch-cuda"
    if variant.startswith("book"):
        row["train_s"], row["page_faults_per_step"], row["forward_s"] = book_model(cfg, x, y, repeats)
        row["train_peak_rss_mb"] = peak_rss_mb()
        lib = "torch"
    elif variant == "llmc":
        from llmc_rival import time_llmc
        from npgpt.numpy_backend import threads
        model = npgpt.build_model(cfg, backend="numpy", seed=123)
        rival = time_llmc(llmc_dir, model, x, WARMUP_STEPS, repeats, threads.num_threads())
        row["train_s"], row["train_peak_rss_mb"] = rival["train_s"], rival["peak_rss_mb"]
        row["info"] = {"llmc_threads": threads.num_threads()}
        lib = "numpy"            # the share of a peak: against NumPy's, as every row at this shape
    else:
        numpy = variant.startswith("numpy")
        options = {"kernels": "reference"} if variant == "numpy-reference" else {} if numpy else \
            {"device": "cuda" if cuda else "cpu", "autocast": "bf16" if variant != "torch" else None}
        model = npgpt.build_model(cfg, backend="numpy" if numpy else "torch", seed=123, **options)
        opt = npgpt.AdamW(model, lr=5e-4, weight_decay=0.1)
        for _ in range(WARMUP_STEPS):
            model.train_step(x, y, opt)
        f0 = faults()
        row["train_s"] = timed(lambda: model.train_step(x, y, opt), repeats, warmup=0)
        row["page_faults_per_step"] = (faults() - f0) / repeats
        row["train_peak_rss_mb"] = peak_rss_mb()
        lib = "numpy" if numpy else "torch"
        if variant == "numpy" and first_round:
            from profile_numpy import machine_limits, profile_step
            row["profile_ms"] = profile_step(model, opt, x, y, repeats=2)
            row["profile_limits"] = machine_limits(repeats)
        if name in BOOK_SHAPES:
            model.eval()
            row["forward_s"] = timed(lambda: model.logits(x), repeats)
            prompt = np.array(PROMPT)
            generate = lambda n, cache: npgpt.generate(model, prompt, max_new_tokens=n, temperature=0.0,
                                                       use_cache=cache)
            generate(10, True)
            row["gen_s_per_token"] = [t / GEN_TOKENS for t in timed(lambda: generate(GEN_TOKENS, True), repeats, 0)]
            if first_round:
                row["gen_no_cache_s_per_token"] = timed(lambda: generate(GEN_TOKENS, False), 1, 0)[0] / GEN_TOKENS
            row["gen_weight_bytes"] = 4 * matmul_weights(cfg)    # float32, the head included
    row["matmul_peak_gflops"] = matmul_peak(lib, repeats, "cuda" if cuda else "cpu")
    if variant in ("torch-bf16", "torch-cuda"):
        row["bf16_matmul_peak_gflops"] = matmul_peak(lib, repeats, "cuda" if cuda else "cpu", "bf16")
    if not cuda and variant != "llmc":
        nbytes, seconds = read_bandwidth(lib, repeats)
        row["read_gb_s"] = nbytes / seconds / 1e9
    row["flops_per_token"] = flops_per_token(cfg, T)    # 6 per matmul weight (a tied head too) + attention
    row["peak_rss_mb"] = peak_rss_mb()
    row.setdefault("info", {}).update(library_info(variant))
    return row


# ---- in the parent: rounds of child processes, then the report -----------------------------

def cpu_ticks():
    """(busy, total) jiffies of the whole machine, from /proc/stat (None elsewhere)."""
    try:
        with open("/proc/stat") as f:
            v = [int(t) for t in f.readline().split()[1:9]]
    except OSError:
        return None
    return sum(v) - v[3] - v[4], sum(v)


def child_env(keep_openblas_env):
    env = dict(os.environ)
    removed = {k: env[k] for k in OPENBLAS_ENV if k in env}
    if not keep_openblas_env:
        for k in OPENBLAS_ENV:
            env.pop(k, None)
    return env, removed


def run_child(variant, name, repeats, first_round, env, llmc_dir=None):
    """One child process; its row plus the other processes' load while it ran (in cores)."""
    ticks0, usage0, t0 = cpu_ticks(), resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    cmd = [sys.executable, __file__, "--one", variant, name, "--repeats", str(repeats)] + \
        (["--first"] if first_round else []) + (["--llmc", str(llmc_dir)] if llmc_dir else [])
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"{variant} {name} failed:\n{out.stderr}")
    row = json.loads(out.stdout.strip().splitlines()[-1])
    wall = time.perf_counter() - t0
    ticks1, usage1 = cpu_ticks(), resource.getrusage(resource.RUSAGE_CHILDREN)
    if ticks0 and ticks1:
        hz = os.sysconf("SC_CLK_TCK")
        mine = (usage1.ru_utime + usage1.ru_stime) - (usage0.ru_utime + usage0.ru_stime)
        row["other_load_cores"] = max(0.0, ((ticks1[0] - ticks0[0]) / hz - mine) / wall)
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=DEFAULT_SHAPES, choices=list(SHAPES))
    parser.add_argument("--llmc", type=Path, metavar="DIR", help="a built llm.c checkout: its C trainer as a "
                        "rival at the llmc shape (nothing is downloaded; skipped without)")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS,
                        help="default: all that this machine has")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--keep-openblas-env", action="store_true")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--one", nargs=2, help=argparse.SUPPRESS)       # internal: variant shape
    parser.add_argument("--first", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(*args.one, args.repeats, args.first, args.llmc)))
        return
    if args.rounds < 1 or args.repeats < 1:
        parser.error("--rounds and --repeats must be at least 1")
    variants = list(args.variants or VARIANTS)
    if "llmc" in variants:
        from llmc_rival import missing
        why = missing(args.llmc) or ("" if "llmc" in args.shapes else "the llmc shape is not measured")
        if why:
            print(f"bench: llm.c's row skipped: {why}", file=sys.stderr)
            variants.remove("llmc")
    has_torch = importlib.util.find_spec("torch") is not None
    if not has_torch:
        variants = [v for v in variants if v.startswith("numpy")]
    if "torch-cuda" in variants and not __import__("torch").cuda.is_available():
        variants.remove("torch-cuda")
    if any(v.startswith("book") for v in variants) and importlib.util.find_spec("llms_from_scratch") is None:
        print("bench: llms-from-scratch not installed, skipping the book's model "
              "(pip install llms-from-scratch --no-deps)", file=sys.stderr)
        variants = [v for v in variants if not v.startswith("book")]
    skipped = ""
    if "torch-bf16" in variants:
        from npgpt.torch_backend.device import cpu_bf16_missing
        reason = cpu_bf16_missing()
        if reason:
            skipped = f"; torch-bf16 skipped: {reason}"
            print(f"bench: torch-bf16 skipped: {reason}", file=sys.stderr)
            variants.remove("torch-bf16")
    env, removed = child_env(args.keep_openblas_env)
    started = time.perf_counter()
    rows = []
    for r in range(args.rounds):
        for name in args.shapes:
            for variant in variants:
                if variant == "llmc" and name != "llmc" or \
                        variant not in EVERY_SHAPE + ("llmc",) and name not in BOOK_SHAPES:
                    continue
                rows.append(run_child(variant, name, args.repeats, r == 0, env, args.llmc))
                Path(args.out).mkdir(parents=True, exist_ok=True)     # the rows so far, should a later one fail
                (Path(args.out) / "rows.json").write_text(json.dumps(rows, indent=1))
                best = min(rows[-1]["train_s"])
                print(f"bench: round {r + 1} {name} {variant}: step {best:.3f} s, other load "
                      f"{rows[-1].get('other_load_cores', float('nan')):.2f} cores", file=sys.stderr)
    import numpy
    torch_version = __import__("torch").__version__ if has_torch else None
    try:
        memory_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30
    except (ValueError, OSError):
        memory_gb = float("nan")
    openblas = ("OpenBLAS environment: " + (", ".join(f"{k}={v}" for k, v in removed.items()) +
                (" kept" if args.keep_openblas_env else " removed for the children") if removed else "none set"))
    meta = {"date": time.strftime("%Y-%m-%d"), "cpu": cpu_name(), "cpu_flags": cpu_flags(), "cpus": os.cpu_count(), "memory_gb": memory_gb,
            "machine": platform.platform(), "python": platform.python_version(), "numpy": numpy.__version__,
            "torch": torch_version,
            "method": f"Each variant in its own process, {args.rounds} rounds alternating the variants, "
                      f"{args.repeats} timed repeats after a warm-up ({WARMUP_STEPS} train steps) in each: "
                      f"min and median of {args.rounds * args.repeats} samples.",
            "conditions": openblas + "; MALLOC_* environment: " +
                          (", ".join(f"{k}={v}" for k, v in os.environ.items() if k.startswith("MALLOC_")) or "none") +
                          f"; the run took {(time.perf_counter() - started) / 60:.1f} min{skipped}."}
    command = "python benchmarks/bench_backends.py" + "".join(
        f" {flag} {' '.join(map(str, value)) if isinstance(value, list) else value}"
        for flag, value, default in (("--shapes", args.shapes, DEFAULT_SHAPES), ("--llmc", args.llmc, None),
                                     ("--variants", args.variants, None), ("--rounds", args.rounds, 2),
                                     ("--repeats", args.repeats, 3))
        if value != default)
    merged = merge(rows)
    text = report(merged, args.shapes, meta, command)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps({"meta": meta, "command": command, "rows": rows}, indent=1))
    (out_dir / "results.md").write_text(text)
    plot(merged, args.shapes, out_dir / "results.png", meta)
    print(text)


if __name__ == "__main__":
    main()
