"""Peak memory of loading GPT-2 XL weights (1558M parameters, 6.2 GB in float32) with load_pretrained.

Writes a synthetic Hugging Face folder (config.json + model.safetensors, GPT-2 XL's names and
shapes, one tensor at a time), then loads it in a fresh process with
load_pretrained(backend="numpy") and reports that process's peak resident memory (ru_maxrss) over
the weights' size, and the time (the file is read once before, so that it sits in the page cache).
For comparison it also loads the same file the usual way, with the safetensors package (safe_open +
get_tensor, which memory-maps the file), into the same model.

    python benchmarks/load_memory.py [--dir /tmp/npgpt-load-memory] [--preset gpt2-xl] [--keep]
"""
from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

import npgpt
from npgpt.weights.lazy import LazyParam
from npgpt.weights.names import hf_source
from npgpt.weights.export import hf_config
from npgpt.weights.safetensors import write_safetensors


def synthetic(name: str, shape) -> LazyParam:
    """A tensor of GPT-2's scale, its values a function of its name (so a load can be checked)."""
    seed = sum(name.encode())

    def fill(out):
        out[...] = np.random.default_rng(seed).standard_normal(out.shape, dtype=np.float32) * np.float32(0.02)
    return LazyParam(shape, np.float32, fill)


def write_folder(folder: Path, cfg) -> None:
    tensors = {}
    for name, shape in npgpt.param_shapes(cfg).items():
        (source,), kind = hf_source(name)
        tensors[source] = synthetic(source, shape[::-1] if kind == "T" else shape)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(hf_config(cfg, "float32"), indent=2))
    write_safetensors(folder / "model.safetensors", tensors, {"format": "pt"})


def load(folder: str, reader: str) -> None:
    """Runs in the child process: load, record the peak, then check a few tensors."""
    started = time.perf_counter()
    if reader == "npgpt":
        model = npgpt.load_pretrained(folder, backend="numpy")
    else:
        from safetensors import safe_open
        from npgpt.weights.lazy import build_loaded_model
        from npgpt.weights.pretrained import _hf_config
        cfg = _hf_config(Path(folder) / "config.json", None, None)
        zero = np.zeros((), np.float32)
        model = build_loaded_model(cfg, {n: np.broadcast_to(zero, s) for n, s in npgpt.param_shapes(cfg).items()})
        with safe_open(Path(folder) / "model.safetensors", "np") as f:
            for name, view in model.p.items():
                (source,), kind = hf_source(name)
                t = f.get_tensor(source)
                view[...] = t.T if kind == "T" else t
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024          # Linux: KiB
    for name in ("wte", "h.47.mlp.c_fc.weight", "ln_f.bias"):
        if name in model.p:
            (source,), kind = hf_source(name)
            want = np.asarray(synthetic(source, model.p[name].shape[::-1] if kind == "T" else model.p[name].shape))
            assert np.array_equal(model.p[name], want.T if kind == "T" else want), name
    print(json.dumps({"peak_rss": peak, "seconds": seconds, "weights": model.flat_params.nbytes}))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default="/tmp/npgpt-load-memory", help="where the synthetic folder goes")
    parser.add_argument("--preset", default="gpt2-xl")
    parser.add_argument("--keep", action="store_true", help="keep the folder for another run")
    parser.add_argument("--child", nargs=2, metavar=("FOLDER", "READER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        load(*args.child)
        return 0
    cfg = npgpt.GPTConfig.preset(args.preset)
    folder = Path(args.dir) / args.preset
    if not (folder / "model.safetensors").is_file():
        started = time.perf_counter()
        write_folder(folder, cfg)
        print(f"wrote {folder / 'model.safetensors'}: {(folder / 'model.safetensors').stat().st_size / 1e9:.2f} GB "
              f"in {time.perf_counter() - started:.0f} s")
    with open(folder / "model.safetensors", "rb", buffering=0) as f:      # into the page cache: time reading,
        while f.read(1 << 26):                                             # not the disk, for both readers
            pass
    try:
        for reader in ("npgpt", "safetensors-package"):
            out = subprocess.run([sys.executable, __file__, "--child", str(folder), reader],
                                 check=True, capture_output=True, text=True).stdout
            r = json.loads(out.strip().splitlines()[-1])
            print(f"{args.preset} ({npgpt.num_params(cfg) / 1e6:.0f}M parameters, {r['weights'] / 1e9:.2f} GB), "
                  f"{reader:>19}: peak RSS {r['peak_rss'] / 1e9:.2f} GB = {r['peak_rss'] / r['weights']:.2f} x "
                  f"the weights, {r['seconds']:.1f} s")
    finally:
        if not args.keep:
            shutil.rmtree(folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
