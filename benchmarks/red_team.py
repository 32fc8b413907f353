"""A red team against npgpt's command line: hostile but realistic input and faults, on the tiny preset.

Every case runs in a sandbox that holds a trained run (checkpoint, history, plot), an exported
weight folder, a text and a folder of token shards. A case of bad input passes when npgpt exits
with 2 and one line on stderr without a traceback, and every file that was in the sandbox before is
byte for byte the same after. A truncated checkpoint passes when it is refused the same way, one
with a flipped bit when it is refused naming the file or loads with every tensor unchanged. A run
killed with SIGKILL while it saves passes when its checkpoint then loads. Prints one table row per
kind of case and the totals: tried, handled as promised, files lost or changed.

    python benchmarks/red_team.py [--flips 60] [--kills 6]
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import platform
import random
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import npgpt
from npgpt.cli import main

REPO = Path(__file__).resolve().parent.parent


def snapshot(folders, *files) -> dict:
    """sha256 of every file the user had before a case ran."""
    paths = [*files, *(p for d in folders for p in sorted(Path(d).rglob("*")) if p.is_file())]
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in paths}


def run_cli(argv) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(argv)
        except SystemExit as e:                   # argparse's own refusals exit 2 too
            code = e.code
    return code, err.getvalue()


def sandbox(root: Path) -> dict:
    """The files a user has: a finished run, exported weights, a text, shards."""
    text = npgpt.load_corpus()[:1500]
    f = {"text": root / "story.txt", "run": root / "run", "hf": root / "hf", "shards": root / "shards"}
    f["text"].write_text(text, encoding="utf-8")
    base = ["--preset", "tiny", "--max-length", "16", "--epochs", "1", "--no-progress"]
    assert main(["train", *base, "--data", str(f["text"]), "--out", str(f["run"])]) == 0
    f["ckpt"] = f["run"] / "checkpoint.h5"
    assert main(["convert", str(f["ckpt"]), str(f["hf"])]) == 0
    (root / "corpus").mkdir()
    (root / "corpus" / "a.txt").write_text(text, encoding="utf-8")
    assert main(["prepare", str(root / "corpus"), "--out", str(f["shards"]), "--val-fraction", "0.2",
                 "--no-progress"]) == 0
    return f


def crafted(root: Path, f: dict) -> dict:
    """Weight files and inputs a hostile user could hand over."""
    bad = root / "bad"
    bad.mkdir()
    st = (f["hf"] / "model.safetensors").read_bytes()
    n = struct.unpack("<Q", st[:8])[0]
    header = json.loads(st[8:8 + n])

    def safetensors(name, change):
        h = json.loads(json.dumps(header))
        change(h)
        raw = json.dumps(h).encode()
        path = bad / name
        path.write_bytes(struct.pack("<Q", len(raw)) + raw + st[8 + n:])
        return path
    first = next(k for k in header if k != "__metadata__")
    second = [k for k in header if k not in ("__metadata__", first)][0]
    out = {
        "negative offsets": safetensors("neg.safetensors", lambda h: h[first].update(data_offsets=[-64, -64 + (
            h[first]["data_offsets"][1] - h[first]["data_offsets"][0])])),
        "overlapping offsets": safetensors("overlap.safetensors", lambda h: h[second].update(
            data_offsets=h[first]["data_offsets"]) if h[second]["data_offsets"][1] - h[second]["data_offsets"][0]
            == h[first]["data_offsets"][1] - h[first]["data_offsets"][0] else h[second].update(
            data_offsets=[0, h[second]["data_offsets"][1] - h[second]["data_offsets"][0]])),
        "entry not a dict": safetensors("entry.safetensors", lambda h: h.update({first: [1, 2]})),
        "metadata not a dict": safetensors("meta.safetensors", lambda h: h.update(__metadata__=[1])),
        "offsets past the data": safetensors("past.safetensors", lambda h: h[first].update(
            data_offsets=[len(st), len(st) + h[first]["data_offsets"][1] - h[first]["data_offsets"][0]])),
    }
    for name, content in (("config-list", "[1, 2]"), ("config-not-json", "{")):
        d = bad / name
        shutil.copytree(f["hf"], d)
        (d / "config.json").write_text(content)
        out[f"config.json {name[7:]}"] = d
    d = bad / "index"
    shutil.copytree(f["hf"], d)
    (d / "model.safetensors").rename(d / "model-00001-of-00001.safetensors")
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}}))
    out["index without weight_map"] = d
    (bad / "empty.pth").write_bytes(b"")
    out["0-byte .pth"] = bad / "empty.pth"
    d = bad / "bin"
    d.mkdir()
    shutil.copy(f["hf"] / "config.json", d)
    (d / "pytorch_model.bin").write_bytes(b"")
    out["0-byte pytorch_model.bin"] = d
    marker = root / "pickle-ran"

    class RunsCode:
        def __reduce__(self):
            return os.mkdir, (str(marker),)
    import pickle
    (bad / "evil.pth").write_bytes(pickle.dumps({"tok_emb.weight": RunsCode()}))
    out["code-running pickle (.pth)"] = bad / "evil.pth"
    out["_marker"] = marker
    return out


def cases(f: dict, c: dict, root: Path) -> list[tuple[str, list[str]]]:
    text, run, ckpt, shards = str(f["text"]), str(f["run"]), str(f["ckpt"]), str(f["shards"])
    new = ["--preset", "tiny", "--max-length", "16", "--no-progress", "--data", text, "--out", str(root / "new")]
    gen = ["generate", "--checkpoint", ckpt, "--prompt", "Hello"]
    loop = root / "loop"
    with contextlib.suppress(FileExistsError):
        os.symlink(loop, loop)
    train = [("train", ["train", *new, *extra]) for extra in (
        ["--batch-size", "0"], ["--max-length", "0"], ["--stride", "-3"], ["--epochs", "0"], ["--eval-freq", "0"],
        ["--eval-iter", "0"], ["--save-every", "-1"], ["--clip", "0"], ["--lr", "nan"], ["--lr", "inf"],
        ["--weight-decay", "-1"], ["--seed", "-1"], ["--seed", str(10**30)], ["--drop-rate", "1.5"],
        ["--preset", "gpt5"], ["--preset", ""], ["--out", ""], ["--start-context", ""], ["--grad-accum", "0"],
        ["--compile"], ["--autocast", "bf16"], ["--device", "cuda"], ["--backend", "torch", "--device", "banana"],
        ["--max-steps", "5"], ["--max-length", "65"], ["--batch-size", "500"])]
    train += [("train", ["train", "--preset", "tiny", "--no-progress", "--out", str(root / "new"), *extra]) for extra in (
        ["--data", str(root / "missing.txt")], ["--data", str(loop)], ["--data", shards],
        ["--data", shards, "--max-steps", "5", "--epochs", "2"], ["--data", shards, "--max-steps", "5",
                                                                   "--max-length", "900"])]
    overwrite = [("lose a run", ["train", *new[:-1], run]), ("lose a run", ["train", *new[:-2], "--out", run,
                                                                           "--seed", "7"]),
                 ("lose a run", ["convert", ckpt, ckpt]), ("lose a run", ["convert", ckpt, ckpt, "--overwrite"]),
                 ("lose a run", ["convert", ckpt, str(f["hf"])]),
                 ("lose a run", ["prepare", str(root / "corpus"), "--out", shards, "--no-progress"]),
                 ("lose a run", ["train", "--resume", ckpt, "--epochs", "2", "--data", str(root / "corpus" / "a.txt"),
                                 "--batch-size", "3"])]
    generate = [("generate", [*gen, *extra]) for extra in (
        ["--temperature", "-1"], ["--temperature", "nan"], ["--temperature", "inf"], ["--top-k", "0"],
        ["--top-k", "50258"], ["--top-p", "0"], ["--top-p", "1.5"], ["--max-new-tokens", "-1"])]
    from safetensors.numpy import load_file, save_file     # an outside writer for weights with a NaN
    nan = root / "nan-weights"
    shutil.copytree(f["hf"], nan)
    tensors = load_file(nan / "model.safetensors")
    tensors["transformer.ln_f.weight"][0] = np.nan
    save_file(tensors, nan / "model.safetensors", metadata={"format": "pt"})
    generate += [("generate", ["generate", "--pretrained", str(nan), "--prompt", "Hi", "--temperature", t])
                 for t in ("0", "1")]
    generate += [("generate", ["generate", "--checkpoint", ckpt, "--prompt", ""]),
                 ("generate", ["eval", "--checkpoint", ckpt, "--batch-size", "0"]),
                 ("generate", ["eval", "--checkpoint", ckpt, "--data", str(root / "missing.txt")])]
    weights = [("weight file", ["generate", "--pretrained", str(p), "--prompt", "Hi"])
               for name, p in c.items() if not name.startswith("_")]
    weights += [("weight file", ["convert", str(p), str(root / "out.h5")]) for name, p in c.items()
                if not name.startswith("_")]
    return train + overwrite + generate + weights


def truncated_checkpoints(ckpt: Path, root: Path) -> list[tuple[str, list[str]]]:
    data, out = ckpt.read_bytes(), []
    for i, cut in enumerate(np.linspace(0, len(data) - 1, 12).astype(int)):
        p = root / f"cut{i}.h5"
        p.write_bytes(data[:cut])
        out.append(("truncated checkpoint", ["train", "--resume", str(p), "--epochs", "2", "--out",
                                             str(root / "cut-run"), "--no-progress"]))
    return out


def flipped_bits(ckpt: Path, root: Path, flips: int, seed: int = 0) -> tuple[int, int]:
    """Checkpoints with one flipped bit: each must be refused with an error naming the file, or load
    with every tensor equal to the original's (a bit in HDF5's free space changes nothing)."""
    data, rng = ckpt.read_bytes(), random.Random(seed)
    model, opt, _ = npgpt.load_checkpoint(ckpt)
    ref = {**model.params(), **{f"m.{k}": v for k, v in opt.state()["exp_avg"].items()}}
    ok = 0
    for _ in range(flips):
        b = bytearray(data)
        b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        p = root / "flipped.h5"
        p.write_bytes(bytes(b))
        try:
            m, o, _ = npgpt.load_checkpoint(p)
        except (OSError, ValueError) as e:
            ok += str(p) in str(e)
            continue
        got = {**m.params(), **{f"m.{k}": v for k, v in o.state()["exp_avg"].items()}}
        ok += all(np.array_equal(got[k], v) for k, v in ref.items())
    return flips, ok


def kills(f: dict, root: Path, n: int) -> tuple[int, int]:
    """SIGKILL a `--save-every 1` run at random moments; the checkpoint must load after each."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    ok, rng = 0, random.Random(1)
    out = root / "killed"
    args = [sys.executable, "-m", "npgpt", "train", "--preset", "tiny", "--max-length", "16", "--epochs", "1000",
            "--save-every", "1", "--no-progress", "--data", str(f["text"]), "--out", str(out)]
    for i in range(n):
        proc = subprocess.Popen([*args, *(["--resume", str(out / "checkpoint.h5")] if i else [])],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        time.sleep(4 + rng.random() * 3)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        try:
            npgpt.load_checkpoint(out / "checkpoint.h5")
            ok += 1
        except (OSError, ValueError):
            pass
    return n, ok


def main_(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flips", type=int, default=60, help="checkpoints with one flipped bit")
    parser.add_argument("--kills", type=int, default=6, help="SIGKILLs during a --save-every 1 run")
    parser.add_argument("--verbose", action="store_true", help="print every case and npgpt's line")
    args = parser.parse_args(argv)
    rows, lost_total = {}, 0
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        f = sandbox(root)
        c = crafted(root, f)
        all_cases = cases(f, c, root) + truncated_checkpoints(f["ckpt"], root)
        users = [f["run"], f["hf"], f["shards"], f["text"].parent / "corpus"]
        for kind, argv_ in all_cases:
            before = snapshot(users, f["text"])
            code, err = run_cli(argv_)
            lines = err.strip().splitlines()
            after = snapshot(users, f["text"])
            changed = [p for p, h in before.items() if after.get(p) != h]
            lost_total += len(changed)
            good = code == 2 and len(lines) == 1 and "Traceback" not in err and not changed
            tried, passed = rows.get(kind, (0, 0))
            rows[kind] = (tried + 1, passed + good)
            if args.verbose:
                print(f"  {kind}: {' '.join(argv_)}\n    -> {code} {lines[-1:]}")
            if not good:
                print(f"  not as promised: {' '.join(argv_)} -> exit {code}, {lines[-1:] or 'no message'}"
                      f"{', changed ' + ', '.join(p.name for p in changed) if changed else ''}")
        ran_pickle = c["_marker"].exists()
        rows["one flipped bit in a checkpoint"] = flipped_bits(f["ckpt"], root, args.flips)
        rows["SIGKILL during --save-every 1"] = kills(f, root, args.kills)
    print(f"\nnpgpt red team, {time.strftime('%Y-%m-%d')}: Python {platform.python_version()}, "
          f"NumPy {np.__version__}, {os.cpu_count()} cores; command: python benchmarks/red_team.py "
          f"--flips {args.flips} --kills {args.kills}\n")
    print("| kind of case | tried | handled as promised |\n| --- | --- | --- |")
    for kind, (tried, passed) in rows.items():
        print(f"| {kind} | {tried} | {passed} |")
    tried = sum(t for t, _ in rows.values())
    passed = sum(p for _, p in rows.values())
    print(f"| **all** | **{tried}** | **{passed}** |\n\nfiles lost or changed: {lost_total}; "
          f"code in a pickle ran: {'yes' if ran_pickle else 'no'}")


if __name__ == "__main__":
    main_()
