"""The checks `npgpt train` makes before it builds a model: the run's numbers (check_run), the device
and bf16 (check_device, check_autocast), the output folder (check_out); and what they need: the
data's fingerprint, the run's tokenizer. Each failure is a ValueError naming the option."""
from __future__ import annotations

import hashlib
import json
import math
import os
import sys
from pathlib import Path

MAX_SEED = 2**63 - 1                                   # what every RNG involved (NumPy's, torch's) accepts


def check_run(a, cfg, changes: dict) -> None:
    """The run's numbers, given or resumed (a: the settings being resolved), against each other and
    the model's shape cfg; changes: what options given with --resume change."""
    def check(key, ok, expected):
        value = getattr(a, key)
        if value is not None and (isinstance(value, bool) or not ok(value)):
            raise ValueError(f"--{key.replace('_', '-')} must be {expected}, got {value!r}")
    for key in ("epochs", "max_steps", "batch_size", "max_length", "stride", "eval_freq", "eval_every",
                "eval_iter", "grad_accum", "lr_decay_steps", "hellaswag_batch", "sample_every"):
        check(key, lambda v: isinstance(v, int) and v >= 1, "a positive integer")
    for key in ("save_every", "warmup", "keep_last", "keep_every", "sample_tokens"):
        check(key, lambda v: isinstance(v, int) and v >= 0, "an integer >= 0")
    check("seed", lambda v: isinstance(v, int) and 0 <= v <= MAX_SEED, f"an integer in [0, {MAX_SEED}]")
    for key in ("clip", "eps"):
        check(key, lambda v: isinstance(v, (int, float)) and 0 < v < math.inf, "a positive number")
    for key in ("lr", "weight_decay", "min_lr"):
        check(key, lambda v: isinstance(v, (int, float)) and 0 <= v < math.inf, "a number >= 0")
    for key in ("beta1", "beta2"):
        check(key, lambda v: isinstance(v, (int, float)) and 0 <= v < 1, "a number in [0, 1)")
    if a.min_lr is not None and a.min_lr > a.lr:
        resumed = a.resume and "min_lr" not in changes
        raise ValueError(f"--min-lr {a.min_lr} must be at most --lr {a.lr}: the schedule decays from --lr down to "
                         f"it{' (the resumed run saved this --min-lr: give another)' if resumed else ''}")
    if a.lr_decay_steps is not None and a.lr_decay_steps <= a.warmup:
        raise ValueError(f"--lr-decay-steps {a.lr_decay_steps} must be more than --warmup {a.warmup}: the decay "
                         "runs from the end of warmup to step --lr-decay-steps")
    if a.max_length > cfg.context_length:
        raise ValueError(f"--max-length {a.max_length} exceeds the model's context length {cfg.context_length}")
    check("start_context", lambda v: v.strip() != "", "some text (the samples continue it)")
    if a.log_every is not None and (a.log_every < 1 or a.progress):
        raise ValueError(f"--log-every {a.log_every}: " + ("expected a positive number of steps" if a.log_every < 1
                         else "the lines replace the progress bar: give --no-progress"))
    if a.hellaswag_limit is not None and (a.hellaswag is None or a.hellaswag_limit < 1):
        raise ValueError(f"--hellaswag-limit {a.hellaswag_limit}: expected a positive number of examples of a "
                         "--hellaswag FILE")
    if a.hellaswag is not None and not os.path.isfile(a.hellaswag):
        raise ValueError(f"--hellaswag {a.hellaswag}: no such file")
    torch_only = [flag for flag, on in (("--autocast", a.autocast), ("--compile", a.compile is True)) if on]
    if torch_only and a.backend != "torch":
        raise ValueError(f"{torch_only[0]}{' ' + a.autocast if a.autocast else ''} needs --backend torch")
    if a.autocast == "fp16" and a.dtype == "float64":
        raise ValueError("--autocast fp16 needs --dtype float32 (mixed precision keeps float32 parameters)")
    if a.kernels != "fast" and a.backend != "numpy":
        raise ValueError(f"--kernels {a.kernels} needs --backend numpy (the torch backend's gradients are autograd's)")


def data_fingerprint(path: str | None) -> str:
    """sha256 of what decides the batches: the text's bytes (the bundled Verdict's when None), or for a
    folder of shards its manifest (which lists every shard's sha256) or else each shard's name and size."""
    from ..data.corpus import VERDICT_FILE
    from ..data.shards import TokenDir
    if path is None or not os.path.isdir(path):
        if path is not None and not os.path.isfile(path):
            raise FileNotFoundError(f"corpus file not found: {path}")
        return hashlib.sha256(Path(path or VERDICT_FILE).read_bytes()).hexdigest()
    tokens = TokenDir(path)
    manifest = Path(path) / f"{tokens.name}_manifest.json"
    if manifest.is_file():
        return hashlib.sha256(manifest.read_bytes()).hexdigest()
    sizes = [(p.name, p.stat().st_size) for split in ("val", "train") for p in tokens.files[split]]
    return hashlib.sha256(json.dumps(sizes).encode()).hexdigest()


def run_tokenizer(init_from: str | None):
    """The run's tokenizer: the one beside the --init-from weights (or those a resumed run started
    from), else GPT-2's."""
    from ..tokenizer import get_tokenizer
    if init_from and os.path.exists(init_from):
        from ..weights.pretrained import load_tokenizer
        return load_tokenizer(init_from)
    return get_tokenizer()


def check_device(backend: str, device: str | None) -> None:
    """--device names a device this machine has, before a model is built."""
    if device is None:
        return
    if backend == "numpy":
        if device != "cpu":
            raise ValueError(f"--device {device}: the numpy backend runs on the CPU; use --backend torch")
        return
    import torch
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"--device {device}: not a torch device (expected cpu, cuda or cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: this machine has no CUDA device (torch {torch.__version__})")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {device}: npgpt trains on cpu or cuda")


def check_autocast(s) -> None:
    """--autocast bf16 only where torch has fast bf16 matrix products: a CPU with them
    (device.cpu_bf16_missing), a CUDA GPU from Ampere on (device.cuda_bf16_missing; on an older one
    fp16 is suggested, and a run without --autocast is told fp16 would be faster); the message says
    where the bf16 came from (a --config file, a resumed run) and how to turn it off."""
    if s.backend != "torch" or s.autocast == "fp16":
        return
    import torch
    from ..torch_backend.device import cpu_bf16_missing, cuda_bf16_missing
    device = torch.device(s.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if s.autocast is None:
        reason = cuda_bf16_missing(device)
        if reason:
            print(f"npgpt: note: {reason.split('; ')[0]}: this run trains in float32; --autocast fp16 (with a "
                  "GradScaler) would be faster", file=sys.stderr)
        return
    reason = cpu_bf16_missing() if device.type == "cpu" else cuda_bf16_missing(device)
    if reason:
        if "autocast" in s.from_config:
            off = f"set autocast = \"none\" in {s.config}, or give --autocast none"
        elif s.resume and "autocast" not in s.changes:
            off = f"{s.resume} was trained with it: give --autocast none"
        else:
            off = "leave --autocast out"
        if device.type == "cuda":          # such a GPU has fp16: nanoGPT's choice there
            raise ValueError(f"{s.origin('autocast')}: {reason.split('; ')[0]}: give --autocast fp16 (with a "
                             f"GradScaler), or train in float32 ({off})")
        raise ValueError(f"{s.origin('autocast')}: {reason}: train in float32 ({off})")


def check_out(s, ckpt_path: Path) -> None:
    """A new run never replaces a checkpoint without --overwrite, and --out must be writable: both are
    known before the first step, so both fail before it."""
    out = Path(s.out)
    resuming_here = s.resume and ckpt_path.exists() and os.path.samefile(Path(s.resume).parent, out)
    if ckpt_path.exists() and not resuming_here and not s.overwrite:
        how = f"--resume {ckpt_path} to continue it" if not s.resume else "another --out"
        raise ValueError(f"{ckpt_path} already exists; use {how}, or --overwrite to replace it")
    existing = next(p for p in (out, *out.absolute().parents) if p.exists())   # out itself is made later
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(f"--out {out}: cannot write in {existing}, so no checkpoint could be saved")
