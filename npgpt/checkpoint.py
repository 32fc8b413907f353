"""npgpt's checkpoint: one HDF5 file that either backend writes and either backend resumes.

Layout:
  /                attrs: format, version, config (JSON), dtype, backend
  /params/NAME     one dataset per parameter (GPT-2 names, (out, in) layout), attr crc32
  /optimizer       attrs: step, lr, betas, eps, weight_decay, decay_all
  /optimizer/exp_avg/NAME, /optimizer/exp_avg_sq/NAME
  /train_state     attrs: epoch, global_step, tokens_seen, rng (JSON; backend-specific)
                   datasets: train_losses, val_losses, track_tokens_seen, track_steps, lrs
A file is written to a temporary name beside the target, flushed, fsynced and renamed over it,
so a crash leaves either the old checkpoint or the new one, never half of one.
"""
from __future__ import annotations

import json
import os
import tempfile
import zlib
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


def _read_tensors(group, where: str) -> dict:
    out = {}
    for name, ds in group.items():
        array = ds[()]
        if "crc32" in ds.attrs and _crc32(array) != int(ds.attrs["crc32"]):
            raise ValueError(f"{where}/{name}: checksum mismatch, the checkpoint is corrupted")
        out[name] = array
    return out


def atomic_write(path: str | Path, write) -> Path:
    """Call write(tmp_path), then fsync and rename tmp_path over path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
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
                    state: TrainState | None = None) -> Path:
    """Save parameters, optimizer state (if given) and training state to one .h5 file, atomically."""
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
            t.attrs.update(epoch=state.epoch, global_step=state.global_step, tokens_seen=state.tokens_seen,
                           rng=json.dumps({"backend": model.backend, "state": model.rng_state()}))
            for name in _STATE_LISTS:
                t.create_dataset(name, data=np.asarray(getattr(state, name), dtype=np.float64))
            f.flush()

    return atomic_write(path, write)


def read_checkpoint(path) -> dict:
    """The checkpoint's contents as plain Python and NumPy objects, validated."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if not h5py.is_hdf5(path):
        raise ValueError(f"{path}: not an HDF5 file (empty, truncated or another format)")
    try:
        with h5py.File(path, "r") as f:
            if f.attrs.get("format") != FORMAT:
                raise ValueError(f"{path}: not an npgpt checkpoint (format attribute "
                                 f"{f.attrs.get('format')!r}, expected {FORMAT!r})")
            version = int(f.attrs["version"])
            if version > VERSION:
                raise ValueError(f"{path}: checkpoint format version {version} is newer than this npgpt "
                                 f"reads ({VERSION}); upgrade npgpt")
            out = {"config": GPTConfig.from_dict(json.loads(f.attrs["config"])),
                   "dtype": str(f.attrs["dtype"]), "params": _read_tensors(f["params"], "params"),
                   "optimizer": None}
            if "optimizer" in f:
                g = f["optimizer"]
                out["optimizer"] = {key: g.attrs[key].tolist() for key in
                                    ("step", "lr", "betas", "eps", "weight_decay", "decay_all")}
                for key in ("exp_avg", "exp_avg_sq"):
                    out["optimizer"][key] = _read_tensors(g[key], f"optimizer/{key}")
            t = f["train_state"]
            state = TrainState(epoch=int(t.attrs["epoch"]), global_step=int(t.attrs["global_step"]),
                               tokens_seen=int(t.attrs["tokens_seen"]))
            for name in _STATE_LISTS:
                values = t[name][()].tolist()
                setattr(state, name, [int(v) for v in values] if name.startswith("track") else values)
            out["state"], out["rng"] = state, json.loads(t.attrs["rng"])
    except (KeyError, OSError) as e:
        raise ValueError(f"{path}: damaged or incomplete checkpoint ({e})") from None
    return out


def load_checkpoint(path, backend="numpy", dtype=None, device=None):
    """-> (model, optimizer or None, TrainState). Either backend loads what either wrote; the
    dropout RNG state carries over when the backend is the same."""
    from .backend import AdamW, build_model
    ckpt = read_checkpoint(path)
    model = build_model(ckpt["config"], backend=backend, dtype=dtype or ckpt["dtype"], device=device,
                        params=ckpt["params"])
    if ckpt["rng"].get("backend") == model.backend:
        model.set_rng_state(ckpt["rng"]["state"])
    optimizer = None
    if ckpt["optimizer"] is not None:
        o = ckpt["optimizer"]
        optimizer = AdamW(model, lr=o["lr"], weight_decay=o["weight_decay"], betas=tuple(o["betas"]),
                          eps=o["eps"], decay_all=bool(o["decay_all"]))
        optimizer.load_state(o)
    return model, optimizer, ckpt["state"]

