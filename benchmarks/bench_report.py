"""bench_backends.py's report: its rows merged over rounds, then results.md (the ratios, the
targets of issue 32, the absolute numbers, NumPy's per-layer profile) and results.png.

Called by bench_backends.py's main(); run that, not this.
"""
from __future__ import annotations

import platform
import statistics

from profile_numpy import shape, table


def variant_order(merged):
    """The variants in the order they ran (bench_backends.VARIANTS' order)."""
    return list(dict.fromkeys(variant for _, variant in merged))


def merge(rows):
    """One record per (config, variant): the samples of every round together."""
    merged = {}
    for r in rows:
        key = (r["config"], r["variant"])
        m = merged.setdefault(key, {**r, "train_s": [], "forward_s": [], "gen_s_per_token": [], "other_load": []})
        m["train_s"] += r["train_s"]
        m["forward_s"] += r.get("forward_s", [])
        m["gen_s_per_token"] += r.get("gen_s_per_token", [])
        m["other_load"].append(r.get("other_load_cores", float("nan")))
        for k in ("profile_ms", "gen_no_cache_s_per_token"):
            if k in r:
                m[k] = r[k]
        for k in ("matmul_peak_gflops", "bf16_matmul_peak_gflops", "read_gb_s", "peak_rss_mb", "train_peak_rss_mb"):
            if k in r:
                m[k] = max(m.get(k, 0), r[k])
    return merged


def stats(samples):
    return (min(samples), statistics.median(samples)) if samples else (None, None)


def report(merged, configs, meta, command):
    """results.md: command and conditions, ratios, absolute numbers, the NumPy profile."""
    fmt = lambda v, f="{:.3f}": "-" if v is None else f.format(v)
    lines = [f"`{command}`", "",
             f"Measured {meta['date']}: {meta['cpu']} ({meta.get('cpu_flags', '?')}), {meta['cpus']} cores, "
             f"{meta['memory_gb']:.0f} GiB; "
             f"Python {meta['python']}, NumPy {meta['numpy']}, torch {meta['torch']}. "
             f"{meta['method']}", "", f"Conditions: {meta['conditions']}", ""]
    for name in configs:
        by = {v: merged[(c, v)] for (c, v) in merged if c == name}
        if not by:
            continue
        step = {v: stats(m["train_s"]) for v, m in by.items()}
        gen = {v: stats(m["gen_s_per_token"]) for v, m in by.items() if m["gen_s_per_token"]}
        first = by[next(iter(by))]
        lines.append(f"**{name}** ({first['params'] / 1e6:.0f}M parameters, B={first['B']}, T={first['T']}, "
                     f"dropout {first.get('drop_rate', 0.1):g}, float32 unless named)")
        lines.append("")
        ratios = ["| ratio | min | median |", "| --- | ---: | ---: |"]
        if "numpy" in step and "llmc" in step:
            ratios.append(f"| train step: llmc / numpy (how many times faster than llm.c's C) | "
                          f"{step['llmc'][0] / step['numpy'][0]:.2f} | {step['llmc'][1] / step['numpy'][1]:.2f} |")
        for other in ("torch", "torch-bf16", "book", "book+alloc", "torch-cuda"):
            if "numpy" in step and other in step:
                ratios.append(f"| train step: numpy / {other} | {step['numpy'][0] / step[other][0]:.2f} | "
                              f"{step['numpy'][1] / step[other][1]:.2f} |")
        if "numpy" in step and "numpy-reference" in step:
            ratios.append(f"| train step: numpy-reference / numpy (what the fast kernels buy) | "
                          f"{step['numpy-reference'][0] / step['numpy'][0]:.2f} | "
                          f"{step['numpy-reference'][1] / step['numpy'][1]:.2f} |")
        if "numpy" in gen and "torch" in gen:
            ratios.append(f"| KV-cache generation tokens/s: numpy / torch | {gen['torch'][0] / gen['numpy'][0]:.2f} | "
                          f"{gen['torch'][1] / gen['numpy'][1]:.2f} |")
        for v in ("numpy", "numpy-reference", "torch", "torch-bf16", "book", "book+alloc"):
            if v in step:
                m = by[v]
                peak = m["bf16_matmul_peak_gflops"] if v == "torch-bf16" else m["matmul_peak_gflops"]
                share = m["flops_per_token"] * m["B"] * m["T"] / step[v][0] / 1e9 / peak
                ratios.append(f"| {v} step: share of its {'bf16' if v == 'torch-bf16' else 'float32'} matmul "
                              f"peak ({peak:.0f} GFLOP/s) | {100 * share:.0f}% | "
                              f"{100 * share * step[v][0] / step[v][1]:.0f}% |")
        # the machine's read bandwidth: the best matrix-vector product over 256 MiB in any process
        read = max((m["read_gb_s"] for m in by.values() if "read_gb_s" in m), default=None)
        for v, (best, med) in gen.items():
            m = by[v]
            if read and "read_gb_s" in m:
                ratios.append(f"| {v} generation: weight bytes per token / s per token, share of the "
                              f"{read:.1f} GB/s read bandwidth | {100 * m['gen_weight_bytes'] / best / 1e9 / read:.0f}% | "
                              f"{100 * m['gen_weight_bytes'] / med / 1e9 / read:.0f}% |")
        lines += ratios + [""] + targets(name, by, step)
        lines.append("| variant | train step s (min / median) | tokens/s | GFLOP/s | share of NumPy's matmul peak "
                     "| peak RSS MB, training | page faults / step | forward s "
                     "| gen tok/s, KV cache (best / median) | gen GB/s of weights | gen tok/s, no cache | "
                     "peak RSS MB | other load (cores) |")
        lines.append("| --- |" + " ---: |" * 12)
        numpy_peak = by["numpy"]["matmul_peak_gflops"] if "numpy" in by else None
        for v in variant_order(merged):
            if v not in by:
                continue
            m, (best, med) = by[v], step[v]
            g = gen.get(v)
            gflops = m["flops_per_token"] * m["B"] * m["T"] / best / 1e9
            lines.append(
                f"| {v} | {best:.3f} / {med:.3f} | {m['B'] * m['T'] / best:.0f} | {gflops:.0f} | "
                f"{fmt(100 * gflops / numpy_peak if numpy_peak else None, '{:.0f}%')} | "
                f"{m['train_peak_rss_mb']:.0f} | {fmt(m.get('page_faults_per_step'), '{:,.0f}')} | "
                f"{fmt(stats(m['forward_s'])[0])} | "
                + (f"{1 / g[0]:.1f} / {1 / g[1]:.1f} | {m['gen_weight_bytes'] / g[0] / 1e9:.1f} | " if g else "- | - | ")
                + f"{fmt(1 / m['gen_no_cache_s_per_token'] if m.get('gen_no_cache_s_per_token') else None, '{:.1f}')} | "
                f"{m['peak_rss_mb']:.0f} | {statistics.mean(m['other_load']):.2f} |")
        lines.append("")
        if "numpy" in by and "profile_ms" in by["numpy"]:
            cfg, B, T = shape(name)
            lines += [f"NumPy step by layer type ({name}, ms per step, mean of 2 steps, round 1):", "",
                      table(by["numpy"]["profile_ms"], cfg, B, T, by["numpy"].get("profile_limits")), ""]
    info = {v: m["info"] for (c, v), m in merged.items()}
    lines.append("Libraries and threads: " + "; ".join(f"{v}: {describe(i)}" for v, i in info.items()))
    return "\n".join(lines) + "\n"


def targets(name, by, step) -> list[str]:
    """Issue 32's targets at this shape, each with its measured value (min of the step times)."""
    if "numpy" not in step:
        return []
    m, best = by["numpy"], step["numpy"][0]
    share = m["flops_per_token"] * m["B"] * m["T"] / best / 1e9 / m["matmul_peak_gflops"]
    found = [f"NumPy at {100 * share:.0f}% of its matmul peak (target 70%)"]
    if "torch" in step:
        found.append(f"numpy / torch {best / step['torch'][0]:.2f} (target 0.85)")
        if name.startswith("long"):
            found.append(f"peak RSS numpy / torch {m['train_peak_rss_mb'] / by['torch']['train_peak_rss_mb']:.2f} "
                         f"(target 1.00)")
    if "llmc" in step:
        found.append(f"{step['llmc'][0] / best:.1f}x faster than llm.c (target 4x)")
    return ["Targets: " + "; ".join(found) + ".", ""]


def describe(info):
    parts = []
    pools = info.get("threadpools")
    if isinstance(pools, list):
        parts += [f"{p['internal_api']} {p.get('version') or ''} {p.get('architecture') or ''} "
                  f"{p['num_threads']} threads".replace("  ", " ") for p in pools]
    if "torch_threads" in info:
        parts.append(f"torch {info['torch_threads']} threads, {info['torch_cpu_capability']}, "
                     f"oneDNN bf16 {'yes' if info['mkldnn_bf16'] else 'no'}")
    if "llmc_threads" in info:
        parts.append(f"llm.c OpenMP {info['llmc_threads']} threads")
    if "npgpt_threads" in info:
        parts.append(f"npgpt elementwise {info['npgpt_threads']} threads")
    alloc = info.get("allocator")
    if alloc is not None:
        parts.append("keeps freed memory" if alloc.get("keep_freed_memory") else "glibc default allocator")
    return ", ".join(parts)


def cpu_name():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags():
    """The vector extensions that decide the matmul peaks: which of AVX2, FMA, AVX-512, its bf16, AMX."""
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return "flags unknown"
    wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16")
    return ", ".join(f"{f} {'yes' if f in flags else 'no'}" for f in wanted)


def plot(merged, configs, path, meta):
    """Train step time (min) and KV-cache generation speed per config, one bar per variant."""
    try:
        import matplotlib
    except ImportError:
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    variants = variant_order(merged)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    width = 0.8 / len(variants)
    for i, v in enumerate(variants):
        xs = [j + i * width for j in range(len(configs))]
        step = [min(merged[(c, v)]["train_s"]) if (c, v) in merged else 0 for c in configs]
        gen = [1 / min(merged[(c, v)]["gen_s_per_token"]) if (c, v) in merged and merged[(c, v)]["gen_s_per_token"]
               else 0 for c in configs]
        axes[0].bar(xs, step, width, label=v)
        axes[1].bar(xs, gen, width, label=v)
    axes[0].set_yscale("log")            # the shapes differ tenfold
    for ax, title in zip(axes, ("train step (s, min; lower is better)", "greedy generation, KV cache (tokens/s)")):
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(configs))], configs)
        ax.set_title(title, fontsize=9)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"npgpt backends, {meta['date']}, {meta['cpu']}, {meta['cpus']} cores", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
