"""The token-shard data path on this machine: npgpt prepare's throughput against tiktoken's own,
the shard loader's batch rate against a training step's, and the loader's memory on a 2 GB file.

    python benchmarks/bench_data.py [--mb 100] [--dir DIR] [--keep]

1. prepare: a corpus of --mb MB generated from The Verdict's words (shuffled with a seeded RNG into
   documents of 20 to 20,000 words in paragraphs), as eight .jsonl files and one large .txt
   (a single document of a tenth of the corpus), goes through prepare(workers=2); against it,
   tiktoken's encode_ordinary_batch(documents, num_threads=2) on the same documents already in
   memory: tokenising alone, no reading, decoding, writing or hashing. The baseline runs before
   and after prepare, to show how much the shared machine's load moves the numbers.
2. loader: TrainBatches.batch(step) per second over the prepared shards (page cache warm), for
   B in (2, 8) and T in (256, 1024), against the steps per second of npgpt's torch backend
   training a small GPT-2 (4 layers, 256 wide) at B=2, T=256, the fastest step in the table.
3. memory: peak RSS of a process that opens a nanoGPT folder and reads 500 batches of B=8,
   T=1024 from it, with a 2 GB train.bin (a sparse file) and with a 4 MB one.

Each measurement runs in its own process; the table goes to stdout as markdown.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

LOADER_SHAPES = [(2, 256), (8, 256), (2, 1024), (8, 1024)]
RSS_BATCHES, RSS_B, RSS_T = 500, 8, 1024


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def make_corpus(folder: Path, mb: int, seed: int = 0) -> None:
    """The Verdict's words in random documents: eight .jsonl files, plus one .txt of a tenth."""
    from npgpt.data import load_corpus
    words = np.array(load_corpus().split())
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)

    def document(n_words):
        cuts = np.cumsum(rng.integers(20, 120, n_words // 20 + 1))
        paragraphs = np.split(rng.choice(words, n_words), cuts[cuts < n_words])
        return "\n\n".join(" ".join(p) for p in paragraphs if len(p))
    budget = mb * 1_000_000
    with open(folder / "book.txt", "w", encoding="utf-8") as f:
        while f.tell() < budget // 10:
            f.write(document(20_000) + "\n\n")
    files = [open(folder / f"part_{i}.jsonl", "w", encoding="utf-8") for i in range(8)]
    written = (folder / "book.txt").stat().st_size
    while written < budget:
        line = json.dumps({"text": document(int(np.exp(rng.uniform(np.log(20), np.log(20_000)))))}) + "\n"
        files[rng.integers(8)].write(line)
        written += len(line)
    for f in files:
        f.close()


def load_documents(folder: Path) -> list[str]:
    docs = []
    for path in sorted(folder.iterdir()):
        if path.suffix == ".txt":
            docs.append(path.read_text(encoding="utf-8"))
        else:
            docs += [json.loads(line)["text"] for line in path.open(encoding="utf-8")]
    return docs


def measure_tiktoken(folder: Path) -> dict:
    from npgpt.tokenizer import get_tokenizer
    docs, enc = load_documents(folder), get_tokenizer()
    n_bytes = sum(len(d.encode()) for d in docs)
    start = time.perf_counter()
    tokens = enc.encode_ordinary_batch(docs, num_threads=2)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "mb": n_bytes / 1e6, "tokens": sum(map(len, tokens)) + len(docs)}


def measure_prepare(folder: Path, out: Path) -> dict:
    from npgpt.data.prepare import prepare
    start = time.perf_counter()
    manifest = prepare(folder, out, workers=2, progress=False, overwrite=True)
    seconds = time.perf_counter() - start
    n_bytes = sum(p.stat().st_size for p in folder.iterdir())
    return {"seconds": seconds, "mb": n_bytes / 1e6, "tokens": manifest["tokens"]["total"],
            "shards": len(manifest["shards"]), "peak_rss_mb": peak_rss_mb()}


def measure_loader(out: Path) -> dict:
    from npgpt.data.shards import TokenDir
    d, rates = TokenDir(out), {}
    for B, T in LOADER_SHAPES:
        batches = d.train_batches(B, T, seed=1)
        batches.batch(0)
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < 1.0:
            batches.batch(n)
            n += 1
        rates[f"{B}x{T}"] = n / (time.perf_counter() - start)
    return rates


def measure_step() -> dict:
    """Steps per second of npgpt's torch backend on a small GPT-2; None where it cannot run here."""
    try:
        import torch
        import npgpt
        torch.set_num_threads(2)
        cfg = npgpt.GPTConfig.preset("book-124m", emb_dim=256, n_heads=4, n_layers=4)
        model = npgpt.build_model(cfg, backend="torch", seed=123)
        opt = npgpt.AdamW(model, lr=5e-4, weight_decay=0.1)
        x, y = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 2, 256))
        model.train_step(x, y, opt)
        times = []
        for _ in range(5):
            start = time.perf_counter()
            model.train_step(x, y, opt)
            times.append(time.perf_counter() - start)
        return {"steps_per_s": 1 / float(np.median(times))}
    except Exception as e:          # another part of npgpt may be mid-change; the rest still runs
        return {"steps_per_s": None, "error": f"{type(e).__name__}: {e}"}


def measure_rss(folder: Path) -> dict:
    from npgpt.data.shards import TokenDir
    before = peak_rss_mb()
    batches = TokenDir(folder).train_batches(RSS_B, RSS_T, seed=0)
    for step in range(RSS_BATCHES):
        batches.batch(step)
    return {"rss_before_mb": before, "peak_rss_mb": peak_rss_mb(),
            "train_bytes": (folder / "train.bin").stat().st_size}


def sparse_folder(folder: Path, n_bytes: int) -> Path:
    folder.mkdir(parents=True)
    with open(folder / "train.bin", "wb") as f:
        f.truncate(n_bytes)
    np.random.default_rng(0).integers(0, 50257, 100_000, dtype=np.uint16).tofile(folder / "val.bin")
    return folder


def in_subprocess(*args) -> dict:
    result = subprocess.run([sys.executable, __file__, "--measure", *map(str, args)], capture_output=True,
                            text=True, check=False)
    if result.returncode:
        raise RuntimeError(f"bench_data.py --measure {' '.join(map(str, args))} failed:\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def conditions() -> str:
    import tiktoken
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return (f"{len(os.sched_getaffinity(0))} cores ({cpu}), load average {load} at the start; Python "
            f"{platform.python_version()}, NumPy {np.__version__}, tiktoken {tiktoken.__version__}, "
            f"{platform.system()}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=100, help="size of the generated corpus (MB)")
    parser.add_argument("--dir", help="work folder (default: a new temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    parser.add_argument("--measure", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        kind, *paths = args.measure
        fn = {"tiktoken": measure_tiktoken, "prepare": measure_prepare, "loader": measure_loader,
              "step": measure_step, "rss": measure_rss}[kind]
        print(json.dumps(fn(*map(Path, paths))))
        return

    work = Path(args.dir or tempfile.mkdtemp(prefix="npgpt-bench-data-"))
    try:
        setting = conditions()
        make_corpus(work / "corpus", args.mb)
        base1 = in_subprocess("tiktoken", work / "corpus")
        prep = in_subprocess("prepare", work / "corpus", work / "shards")
        base2 = in_subprocess("tiktoken", work / "corpus")
        loader = in_subprocess("loader", work / "shards")
        step = in_subprocess("step")
        big = in_subprocess("rss", sparse_folder(work / "big", 2 << 30))
        small = in_subprocess("rss", sparse_folder(work / "small", 4 << 20))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    rate = lambda r: r["mb"] / r["seconds"]
    print(f"Conditions: {setting}.\n")
    print(f"Corpus: {prep['mb']:.1f} MB of text, {prep['tokens'] / 1e6:.1f}M tokens, {prep['shards']} shards.\n")
    print("| measurement | result | reference | ratio |")
    print("|---|---|---|---|")
    for name, base in (("before", base1), ("after", base2)):
        print(f"| prepare(workers=2), whole run | {rate(prep):.2f} MB/s | tiktoken encode_ordinary_batch"
              f"(num_threads=2), run {name}: {rate(base):.2f} MB/s | {rate(prep) / rate(base):.2f} |")
    print(f"| prepare peak RSS | {prep['peak_rss_mb']:.0f} MB | corpus {prep['mb']:.0f} MB | |")
    steps = step["steps_per_s"]
    for shape, batches_per_s in loader.items():
        reference = f"torch train step (4x256 GPT-2, B=2, T=256): {steps:.1f} steps/s" if steps else \
            f"torch train step: not measured ({step.get('error', '')[:60]})"
        ratio = f"{batches_per_s / steps:.0f}x" if steps else ""
        B, T = map(int, shape.split("x"))
        print(f"| loader batch(step), B={B}, T={T} | {batches_per_s:,.0f} batches/s "
              f"({batches_per_s * B * T / 1e6:.1f}M tokens/s) | {reference} | {ratio} |")
    for label, r in (("2 GB", big), ("4 MB", small)):
        print(f"| peak RSS, {RSS_BATCHES} batches B={RSS_B} T={RSS_T}, {label} train.bin | "
              f"{r['peak_rss_mb']:.0f} MB ({r['peak_rss_mb'] - r['rss_before_mb']:+.0f} MB while reading) | "
              f"file {r['train_bytes'] / 2**20:,.0f} MiB | |")


if __name__ == "__main__":
    main()
