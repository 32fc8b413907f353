"""npgpt's checkpoint: one HDF5 file that either backend writes and either backend resumes.

Layout:
  /                attrs: format, version, config (JSON), dtype, backend, checksum
  /params/NAME     one dataset per parameter (GPT-2 names, (out, in) layout), attr crc32
  /optimizer       attrs: step, lr, betas, eps, weight_decay, decay ("all", "matrices" or "none")
  /optimizer/exp_avg/NAME, /optimizer/exp_avg_sq/NAME
  /train_state     attrs: epoch, global_step, tokens_seen, rng (JSON; backend-specific),
                          schedule (JSON: run_state.Schedule, once a training loop has run),
                          run (JSON: the command line's settings, if any)
                   datasets: train_losses, val_losses, track_tokens_seen, track_steps, lrs,
                             hellaswag ((k, 4): step, n, acc, acc_norm of each scored evaluation;
                             absent from files written before it: none), guard_losses,
                             guard_norms, skipped_steps (the spike guard's windows and the steps
                             it skipped; absent from older files: empty)
  /optimizer       attrs also: grad_scaler (JSON: torch.amp.GradScaler's state_dict, fp16 runs only)
A file is written to a temporary name beside the target (.NAME.*.tmp), flushed, fsynced and
renamed over it, so a crash leaves either the old checkpoint or the new one, never half of one.
Loading reads each tensor straight into the NumPy model's (and optimizer's) flat buffers; the
torch backend receives one tensor at a time and copies it to its device.

Nothing read is trusted: each tensor's crc32 covers its data, and the root's checksum (version 2)
covers everything else (every attribute, every dataset's name, shape and dtype, the train_state
lists), so a damaged file is refused, never loaded with other values. What a checksum cannot
cover, data from outside the file, is refused before anything is read: links (soft, external),
datasets stored in other files (external storage, virtual datasets), and chunked or filtered
datasets, none of which npgpt writes; each dataset must hold the bytes it declares, all of them
within the file's size. Every failure to read a file is a ValueError (CheckpointError) that
names it; a missing file a FileNotFoundError.

Files of versions 1 and 2 load: their optimizer's decay_all=True reads as decay "all", False (which
exempted the embeddings too) as "matrices"; they saved the schedule's peak only (peak_lr), which is
not read, so a run resumed from one takes its schedule from the command line (or the loop's
keywords) anew.
"""
from __future__ import annotations

import json
import math
import zlib
from contextlib import contextmanager
from pathlib import Path

import h5py
import numpy as np

from ..config import GPTConfig
from ..files import atomic_write, check_regular, parse_json
from ..params import DECAY_GROUPS, check_params, param_shapes
from ..run_state import Schedule, TrainState
from .checkpoint_checks import CheckpointError, check_layout, foreign_file
from .lazy import LazyParam

FORMAT = "npgpt-checkpoint"
VERSION = 3                 # 2 added the root checksum, 3 the schedule and the optimizer's decay groups by name
_TENSOR_GROUPS = ("params/", "optimizer/exp_avg/", "optimizer/exp_avg_sq/")     # data under their own crc32
_STATE_LISTS = ("train_losses", "val_losses", "track_tokens_seen", "track_steps", "lrs")
_GUARD_LISTS = ("guard_losses", "guard_norms", "skipped_steps")      # optional: absent from older files
_HELLASWAG = ("step", "n", "acc", "acc_norm")       # the columns of train_state/hellaswag


def _crc32(array: np.ndarray) -> int:
    return zlib.crc32(np.ascontiguousarray(array).data)


def _write_tensors(group, tensors: dict):
    for name, array in tensors.items():
        ds = group.create_dataset(name, data=array)
        ds.attrs["crc32"] = _crc32(array)


def _fixed(text: str) -> np.bytes_:
    """Text as a fixed-length string attribute. h5py stores str as variable-length strings, which
    live in HDF5's global heap: it has no checksum, and reading a damaged one can hang."""
    return np.bytes_(text.encode("utf-8"))


def _text(value) -> str:
    """A string attribute as str: fixed-length (bytes, version 2) or variable-length (version 1)."""
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _plain(value):
    """An attribute or a small dataset as JSON-able data that keeps its type: (dtype, shape, values)."""
    a = np.asarray(value)
    return [a.dtype.str, list(a.shape), a.tobytes().hex() if a.dtype.kind in "SV" else a.tolist()]


def _digest(f: h5py.File) -> int:
    """crc32 of everything in the file that the tensors' own crc32s do not cover: every attribute
    (the tensors' crc32s among them), the name, shape and dtype of every dataset, and the data of
    the datasets outside the tensor groups. Computed on the file as written and as read."""
    items = [["/", sorted((k, _plain(v)) for k, v in f.attrs.items() if k != "checksum")]]

    def visit(name, obj):
        item = [name, sorted((k, _plain(v)) for k, v in obj.attrs.items())]
        if isinstance(obj, h5py.Dataset):
            item += [list(obj.shape), obj.dtype.str]
            if not name.startswith(_TENSOR_GROUPS):
                item.append(_plain(obj[()]))
        items.append(item)
    f.visititems(visit)
    return zlib.crc32(json.dumps(sorted(items)).encode())


def _lazy_tensors(group, where: str) -> dict:
    """{name: LazyParam}: each dataset is read when asked, straight into the caller's array
    (Dataset.read_direct) when its dtype matches, and its crc32 checked."""
    def filler(ds, name):
        def fill(out):
            if not ds.id.valid:
                raise RuntimeError(f"{where}/{name}: read the tensors inside open_checkpoint's with block")
            path = ds.file.filename
            direct = out.dtype == ds.dtype and out.flags.c_contiguous
            data = out if direct else np.empty(ds.shape, ds.dtype)
            try:
                if data.size:
                    ds.read_direct(data)
                expected = int(ds.attrs["crc32"])
            except Exception as e:      # h5py on a damaged file: OSError, KeyError, RuntimeError, ...
                raise CheckpointError(f"{path}: {where}/{name} cannot be read, the checkpoint is damaged "
                                      f"({type(e).__name__}: {e})") from None
            if _crc32(data) != expected:
                raise CheckpointError(f"{path}: {where}/{name}: checksum mismatch, the checkpoint is corrupted")
            if not direct:
                np.copyto(out, data, casting="same_kind")
        return fill

    return {name: LazyParam(ds.shape, ds.dtype, filler(ds, name)) for name, ds in group.items()}


def save_checkpoint(path, model, optimizer=None, epoch=None, global_step=None, tokens_seen=None,
                    state: TrainState | None = None, run: dict | None = None) -> Path:
    """Save parameters, optimizer state (if given) and training state to one .h5 file, atomically.

    run: JSON-serialisable settings of the run (the command line keeps its data and schedule
    options here, so that --resume continues with the same batches)."""
    state = TrainState(**vars(state)) if state is not None else TrainState()
    for name, value in (("epoch", epoch), ("global_step", global_step), ("tokens_seen", tokens_seen)):
        if value is not None:
            setattr(state, name, int(value))
    # the NumPy backend lends views of its flat buffers (param_views, state_views): the file is written
    # without a second copy of the weights and moments. The torch backend's come as NumPy copies.
    params = model.param_views() if hasattr(model, "param_views") else model.params()
    bad = [n for n, p in params.items() if not np.isfinite(p).all()]
    if bad:
        raise FloatingPointError(f"refusing to save non-finite parameters ({', '.join(bad[:5])}); "
                                 f"the previous checkpoint at {path} is kept")

    def write(tmp):
        # HDF5 1.10's formats checksum the file's own structures (superblock, object headers, B-trees),
        # so the library refuses damaged ones instead of misreading them
        with h5py.File(tmp, "w", libver=("v110", "latest")) as f:
            f.attrs.update(format=_fixed(FORMAT), version=VERSION, config=_fixed(model.cfg.to_json()),
                           dtype=_fixed(str(model.dtype)), backend=_fixed(model.backend))
            _write_tensors(f.create_group("params"), params)
            if optimizer is not None:
                opt_state = optimizer.state_views() if hasattr(optimizer, "state_views") else optimizer.state()
                g = f.create_group("optimizer")
                g.attrs.update(step=opt_state["step"], lr=opt_state["lr"], betas=np.asarray(opt_state["betas"]),
                               eps=opt_state["eps"], weight_decay=opt_state["weight_decay"],
                               decay=_fixed(opt_state["decay"]))
                if opt_state.get("grad_scaler"):
                    g.attrs["grad_scaler"] = _fixed(json.dumps(opt_state["grad_scaler"]))
                _write_tensors(g.create_group("exp_avg"), opt_state["exp_avg"])
                _write_tensors(g.create_group("exp_avg_sq"), opt_state["exp_avg_sq"])
            t = f.create_group("train_state")
            t.attrs.update(epoch=state.epoch, global_step=state.global_step, tokens_seen=state.tokens_seen,
                           rng=_fixed(json.dumps({"backend": model.backend, "state": model.rng_state()})),
                           run=_fixed(json.dumps(run or {})))
            if state.schedule is not None:
                t.attrs["schedule"] = _fixed(json.dumps(state.schedule.to_dict()))
            for name in _STATE_LISTS + _GUARD_LISTS:
                t.create_dataset(name, data=np.asarray(getattr(state, name), dtype=np.float64))
            t.create_dataset("hellaswag", data=np.asarray([[r[k] for k in _HELLASWAG] for r in state.hellaswag],
                                                          dtype=np.float64).reshape(-1, len(_HELLASWAG)))
            f.attrs["checksum"] = _digest(f)
            f.flush()

    return atomic_write(path, write)


@contextmanager
def open_checkpoint(path):
    """The checkpoint's contents, validated, with every tensor still in the file (a LazyParam,
    which fills an array when asked): read them inside the with block."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    file_bytes = check_regular(path, "an npgpt .h5 checkpoint")        # is_hdf5 would block on a FIFO
    if not h5py.is_hdf5(path):
        foreign = foreign_file(path)
        raise CheckpointError(f"{path}: {foreign}" if foreign else f"{path}: not an HDF5 file (empty, truncated or "
                              "another format); expected an npgpt .h5 checkpoint")
    try:
        f = h5py.File(path, "r")
    except Exception as e:                  # h5py's errors on a damaged file are of many types
        raise CheckpointError(f"{path}: damaged checkpoint ({type(e).__name__}: {e})") from None
    with f:
        try:
            check_layout(f, path, file_bytes)
            out = _contents(f, path)
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"{path}: damaged or incomplete checkpoint ({type(e).__name__}: {e})") from None
        yield out


def _contents(f: h5py.File, path: Path) -> dict:
    """open_checkpoint's dict, each check raising a CheckpointError that says what is wrong."""
    form = _text(f.attrs.get("format", ""))
    if form != FORMAT:
        raise CheckpointError(f"{path}: not an npgpt checkpoint (format attribute {form!r}, expected {FORMAT!r})")
    version = int(f.attrs["version"])
    if version > VERSION:
        raise CheckpointError(f"{path}: checkpoint format version {version} is newer than this npgpt reads "
                              f"({VERSION}); upgrade npgpt")
    if version < 1:
        raise CheckpointError(f"{path}: checkpoint format version {version}; expected 1 to {VERSION}")
    if version >= 2 and int(f.attrs["checksum"]) != _digest(f):
        raise CheckpointError(f"{path}: checksum mismatch in its attributes or layout, the checkpoint is "
                              "corrupted")
    try:
        recorded = parse_json(_text(f.attrs["config"]), path, "a config attribute: a GPTConfig as JSON")
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    try:
        cfg = GPTConfig.from_dict(recorded)
    except (ValueError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{path}: its config is not valid ({e})") from None
    dtype = _text(f.attrs["dtype"])
    if dtype not in ("float32", "float64"):
        raise CheckpointError(f"{path}: dtype {dtype!r}; expected 'float32' or 'float64'")
    out = {"config": cfg, "dtype": dtype, "params": _lazy_tensors(f["params"], "params"), "optimizer": None}
    groups = {"params": out["params"]}
    if "optimizer" in f:
        g = f["optimizer"]
        out["optimizer"] = {key: g.attrs[key].tolist() for key in ("step", "lr", "betas", "eps", "weight_decay")}
        decay = _text(g.attrs["decay"]) if "decay" in g.attrs else "all" if bool(g.attrs["decay_all"]) else "matrices"
        if decay not in DECAY_GROUPS:
            raise CheckpointError(f"{path}: optimizer decay {decay!r}; expected one of {DECAY_GROUPS}")
        out["optimizer"]["decay"] = decay
        step = out["optimizer"]["step"]
        if isinstance(step, bool) or not isinstance(step, (int, float)) or not math.isfinite(step) \
                or step < 0 or step != int(step):
            raise CheckpointError(f"{path}: optimizer step {step!r}; expected a whole number >= 0")
        out["optimizer"]["step"] = int(step)
        scaler = parse_json(_text(g.attrs["grad_scaler"]), path, "a GradScaler state as JSON") if "grad_scaler" in g.attrs else None
        numbers = isinstance(scaler, dict) and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                   and np.isfinite(v) for v in scaler.values())
        if scaler is not None and not (numbers and scaler.get("scale", 0) > 0):
            raise CheckpointError(f"{path}: optimizer's grad_scaler attribute is not a GradScaler state "
                                  f"(expected an object of finite numbers with a positive scale, got {scaler!r:.80})")
        out["optimizer"]["grad_scaler"] = scaler
        for key in ("exp_avg", "exp_avg_sq"):
            groups[f"optimizer/{key}"] = out["optimizer"][key] = _lazy_tensors(g[key], f"optimizer/{key}")
    shapes = param_shapes(cfg)
    for where, tensors in groups.items():
        try:
            check_params(tensors, shapes)
        except ValueError as e:
            raise CheckpointError(f"{path}: the tensors in {where}/ do not fit its config ({e})") from None
        for name, p in tensors.items():
            if p.dtype != np.dtype(dtype):
                raise CheckpointError(f"{path}: {where}/{name} holds {p.dtype}; the checkpoint's dtype is {dtype}, "
                                      "and npgpt writes every tensor in it")
    t = f["train_state"]
    try:
        schedule = Schedule.from_dict(parse_json(_text(t.attrs["schedule"]), path, "a schedule attribute as JSON")) if "schedule" in t.attrs else None
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: its train_state's schedule is not valid ({e})") from None
    state = TrainState(epoch=int(t.attrs["epoch"]), global_step=int(t.attrs["global_step"]),
                       tokens_seen=int(t.attrs["tokens_seen"]), schedule=schedule)
    for name in _STATE_LISTS:
        values = t[name][()].tolist()
        setattr(state, name, [int(v) for v in values] if name.startswith("track") else values)
    for name in _GUARD_LISTS:
        if name in t:
            values = t[name][()].reshape(-1).tolist()
            setattr(state, name, [int(v) for v in values] if name == "skipped_steps" else values)
    if "hellaswag" in t:
        state.hellaswag = [{"step": int(step), "n": int(n), "acc": acc, "acc_norm": acc_norm}
                           for step, n, acc, acc_norm in t["hellaswag"][()].reshape(-1, len(_HELLASWAG)).tolist()]
    out["state"], out["rng"] = state, parse_json(_text(t.attrs["rng"]), path, "an rng attribute as JSON")
    out["run"] = parse_json(_text(t.attrs["run"]), path, "a run attribute as JSON") if "run" in t.attrs else {}
    for key in ("rng", "run"):
        if not isinstance(out[key], dict):
            raise CheckpointError(f"{path}: train_state's {key} attribute holds a JSON {type(out[key]).__name__}; "
                                  "expected an object")
    return out


def read_checkpoint(path) -> dict:
    """The checkpoint's contents as plain Python and NumPy objects, validated."""
    with open_checkpoint(path) as ckpt:
        ckpt["params"] = {name: np.asarray(p) for name, p in ckpt["params"].items()}
        if ckpt["optimizer"] is not None:
            for key in ("exp_avg", "exp_avg_sq"):
                ckpt["optimizer"][key] = {n: np.asarray(p) for n, p in ckpt["optimizer"][key].items()}
    return ckpt


def load_checkpoint(path, backend="numpy", dtype=None, device=None, **torch_options):
    """-> (model, optimizer or None, TrainState). Either backend loads what either wrote; the
    dropout RNG state carries over when the backend is the same. torch_options as build_model's."""
    from ..backend import AdamW
    from .lazy import build_loaded_model
    with open_checkpoint(path) as ckpt:
        model = build_loaded_model(ckpt["config"], ckpt["params"], backend=backend,
                                   dtype=dtype or ckpt["dtype"], device=device, **torch_options)
        rng, optimizer = ckpt["rng"], None
        try:
            if rng.get("backend") == model.backend and rng.get("state") is not None:
                model.set_rng_state(rng["state"])
        except (TypeError, ValueError, KeyError, RuntimeError, OverflowError) as e:
            raise CheckpointError(f"{path}: its {model.backend} RNG state cannot be restored "
                                  f"({type(e).__name__}: {e})") from None
        if ckpt["optimizer"] is not None:
            o = ckpt["optimizer"]
            try:
                optimizer = AdamW(model, lr=o["lr"], weight_decay=o["weight_decay"], betas=tuple(o["betas"]),
                                  eps=o["eps"], decay=o["decay"])
            except (TypeError, ValueError) as e:
                raise CheckpointError(f"{path}: its optimizer settings are not valid ({e})") from None
            optimizer.load_state(o)
    return model, optimizer, ckpt["state"]
