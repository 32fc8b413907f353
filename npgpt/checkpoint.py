"""npgpt's checkpoint: one HDF5 file that either backend writes and either backend resumes.

Layout:
  /                attrs: format, version, config (JSON), dtype, backend
  /params/NAME     one dataset per parameter (GPT-2 names, (out, in) layout), attr crc32
  /optimizer       attrs: step, lr, betas, eps, weight_decay, decay_all
  /optimizer/exp_avg/NAME, /optimizer/exp_avg_sq/NAME
  /train_state     attrs: epoch, global_step, tokens_seen, rng (JSON; backend-specific),
                          run (JSON: the command line's data and schedule settings, if any)
                   datasets: train_losses, val_losses, track_tokens_seen, track_steps, lrs
A file is written to a temporary name beside the target, flushed, fsynced and renamed over it,
so a crash leaves either the old checkpoint or the new one, never half of one. Loading reads each
tensor straight into the model's (and the optimizer's) own arrays: no second copy of the weights.
"""
from __future__ import annotations

import json
import os
import tempfile
import zlib
from contextlib import contextmanager
from pathlib import Path

import h5py
import numpy as np

from .config import GPTConfig
from .train import TrainState

FORMAT = "npgpt-checkpoint"
VERSION = 1
_STATE_LISTS = ("train_losses", "val_losses", "track_tokens_seen", "track_steps", "lrs")


def _crc32(array: np.ndarray) -> int:
    return zlib.crc32(np.ascontiguousarray(array).data)


def _write_tensors(group, tensors: dict):
    for name, array in tensors.items():
        ds = group.create_dataset(name, data=array)
        ds.attrs["crc32"] = _crc32(array)


def _lazy_tensors(group, where: str) -> dict:
    """{name: LazyParam}: each dataset is read when asked, straight into the caller's array
    (Dataset.read_direct) when its dtype matches, and its crc32 checked."""
    from .pretrained import LazyParam

    def filler(ds, name):
        def fill(out):
            direct = out.dtype == ds.dtype and out.flags.c_contiguous
            data = out if direct else np.empty(ds.shape, ds.dtype)
            if data.size:
                ds.read_direct(data)
            if "crc32" in ds.attrs and _crc32(data) != int(ds.attrs["crc32"]):
                raise ValueError(f"{where}/{name}: checksum mismatch, the checkpoint is corrupted")
            if not direct:
                np.copyto(out, data, casting="same_kind")
        return fill

    return {name: LazyParam(ds.shape, ds.dtype, filler(ds, name)) for name, ds in group.items()}


def _file_mode(path: Path) -> int:
    if path.exists():
        return path.stat().st_mode & 0o777
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write(path: str | Path, write) -> Path:
    """Call write(tmp_path), then fsync and rename tmp_path over path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        os.chmod(tmp, _file_mode(path))     # mkstemp makes 0600; give the file the usual mode
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path


def save_checkpoint(path, model, optimizer=None, epoch=None, global_step=None, tokens_seen=None,
                    state: TrainState | None = None, run: dict | None = None) -> Path:
    """Save parameters, optimizer state (if given) and training state to one .h5 file, atomically.

    run: JSON-serialisable settings of the run (the command line keeps its data and schedule
    options here, so that --resume continues with the same batches)."""
    state = TrainState(**vars(state)) if state is not None else TrainState()
    for name, value in (("epoch", epoch), ("global_step", global_step), ("tokens_seen", tokens_seen)):
        if value is not None:
            setattr(state, name, int(value))
    params = model.params()
    bad = [n for n, p in params.items() if not np.isfinite(p).all()]
    if bad:
        raise FloatingPointError(f"refusing to save non-finite parameters ({', '.join(bad[:5])}); "
                                 f"the previous checkpoint at {path} is kept")

    def write(tmp):
        with h5py.File(tmp, "w") as f:
            f.attrs.update(format=FORMAT, version=VERSION, config=model.cfg.to_json(),
                           dtype=str(model.dtype), backend=model.backend)
            _write_tensors(f.create_group("params"), params)
            if optimizer is not None:
                opt_state = optimizer.state()
                g = f.create_group("optimizer")
                g.attrs.update(step=opt_state["step"], lr=opt_state["lr"], betas=np.asarray(opt_state["betas"]),
                               eps=opt_state["eps"], weight_decay=opt_state["weight_decay"],
                               decay_all=opt_state["decay_all"])
                _write_tensors(g.create_group("exp_avg"), opt_state["exp_avg"])
                _write_tensors(g.create_group("exp_avg_sq"), opt_state["exp_avg_sq"])
            t = f.create_group("train_state")
            rng = model.rng_state() if hasattr(model, "rng_state") else None
            t.attrs.update(epoch=state.epoch, global_step=state.global_step, tokens_seen=state.tokens_seen,
                           rng=json.dumps({"backend": model.backend, "state": rng}),
                           run=json.dumps(run or {}))
            for name in _STATE_LISTS:
                t.create_dataset(name, data=np.asarray(getattr(state, name), dtype=np.float64))
            f.flush()

    return atomic_write(path, write)


@contextmanager
def open_checkpoint(path):
    """The checkpoint's contents, validated, with every tensor still in the file (a LazyParam,
    which fills an array when asked): read them inside the with block."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if not h5py.is_hdf5(path):
        raise ValueError(f"{path}: not an HDF5 file (empty, truncated or another format)")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise ValueError(f"{path}: damaged checkpoint ({e})") from None
    with f:
        try:
            if f.attrs.get("format") != FORMAT:
                raise ValueError(f"{path}: not an npgpt checkpoint (format attribute "
                                 f"{f.attrs.get('format')!r}, expected {FORMAT!r})")
            version = int(f.attrs["version"])
            if version > VERSION:
                raise ValueError(f"{path}: checkpoint format version {version} is newer than this npgpt "
                                 f"reads ({VERSION}); upgrade npgpt")
            out = {"config": GPTConfig.from_dict(json.loads(f.attrs["config"])),
                   "dtype": str(f.attrs["dtype"]), "params": _lazy_tensors(f["params"], "params"),
                   "optimizer": None}
            if "optimizer" in f:
                g = f["optimizer"]
                out["optimizer"] = {key: g.attrs[key].tolist() for key in
                                    ("step", "lr", "betas", "eps", "weight_decay", "decay_all")}
                for key in ("exp_avg", "exp_avg_sq"):
                    out["optimizer"][key] = _lazy_tensors(g[key], f"optimizer/{key}")
            t = f["train_state"]
            state = TrainState(epoch=int(t.attrs["epoch"]), global_step=int(t.attrs["global_step"]),
                               tokens_seen=int(t.attrs["tokens_seen"]))
            for name in _STATE_LISTS:
                values = t[name][()].tolist()
                setattr(state, name, [int(v) for v in values] if name.startswith("track") else values)
            out["state"], out["rng"] = state, json.loads(t.attrs["rng"])
            out["run"] = json.loads(t.attrs["run"]) if "run" in t.attrs else {}
        except (KeyError, OSError) as e:
            raise ValueError(f"{path}: damaged or incomplete checkpoint ({e})") from None
        yield out


def read_checkpoint(path) -> dict:
    """The checkpoint's contents as plain Python and NumPy objects, validated."""
    with open_checkpoint(path) as ckpt:
        ckpt["params"] = {name: np.asarray(p) for name, p in ckpt["params"].items()}
        if ckpt["optimizer"] is not None:
            for key in ("exp_avg", "exp_avg_sq"):
                ckpt["optimizer"][key] = {n: np.asarray(p) for n, p in ckpt["optimizer"][key].items()}
    return ckpt


def load_checkpoint(path, backend="numpy", dtype=None, device=None):
    """-> (model, optimizer or None, TrainState). Either backend loads what either wrote; the
    dropout RNG state carries over when the backend is the same."""
    from .backend import AdamW
    from .pretrained import build_loaded_model
    with open_checkpoint(path) as ckpt:
        model = build_loaded_model(ckpt["config"], ckpt["params"], backend=backend,
                                   dtype=dtype or ckpt["dtype"], device=device)
        rng = ckpt["rng"]
        if rng.get("backend") == model.backend and rng.get("state") is not None \
                and hasattr(model, "set_rng_state"):
            model.set_rng_state(rng["state"])
        optimizer = None
        if ckpt["optimizer"] is not None:
            o = ckpt["optimizer"]
            optimizer = AdamW(model, lr=o["lr"], weight_decay=o["weight_decay"], betas=tuple(o["betas"]),
                              eps=o["eps"], decay_all=bool(o["decay_all"]))
            optimizer.load_state(o)
    return model, optimizer, ckpt["state"]
