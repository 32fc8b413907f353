"""Weights read one tensor at a time: LazyParam, the Reader interface of the weight-file readers,
torch state_dicts, and building a model whose parameters are filled from lazy tensors.

The readers of the file formats (safetensors.py, tfbundle.py, TorchReader below) know shapes
and dtypes up front and read data only when asked, so a loader holds at most one tensor besides
the model. Pickles are never run: torch.load(weights_only=True).

Nothing a file declares is trusted before it is checked against the bytes the file holds: each
reader checks every tensor's offsets and size against its file when it opens it, and
check_stored() the whole model's size against the files' before a byte of the model is allocated.
"""
from __future__ import annotations

import math
import re
import zipfile
from pathlib import Path

import numpy as np

from ..config import GPTConfig
from ..files import check_regular
from ..params import check_params, param_shapes


class LazyParam:
    """A parameter not read yet: its shape and dtype, and fill(out) to read it into an array.
    np.asarray(p) reads it into a new array, so a dict of these can go to model.load_params."""

    def __init__(self, shape, dtype, fill):
        self.shape, self.dtype, self.fill = tuple(shape), np.dtype(dtype), fill

    def __array__(self, dtype=None, copy=None):
        out = np.empty(self.shape, dtype or self.dtype)
        self.fill(out)
        return out


def build_loaded_model(cfg: GPTConfig, params: dict, backend="numpy", dtype="float32", device=None, seed=123,
                       **torch_options):
    """A model whose parameters are read from params (LazyParam or arrays), one tensor at a time.

    The NumPy backend's tensors are views into one flat buffer (param_views()): each is read
    straight into its view. Other backends get the lazy dict through load_params, one tensor in
    memory at a time besides the model."""
    from ..backend import build_model, check_build_args
    check_build_args(cfg, backend, dtype, device, torch_options)
    if backend != "numpy":
        zero = np.zeros((), np.dtype(dtype))             # the torch backend needs initial values
        placeholders = {name: np.broadcast_to(zero, np.shape(p)) for name, p in params.items()}
        model = build_model(cfg, backend=backend, dtype=dtype, device=device, seed=seed, params=placeholders,
                            **torch_options)
        model.load_params(params)                    # LazyParams are read as load_params asks for them
        return model
    from ..numpy_backend import NumpyGPT
    check_params(params, param_shapes(cfg))          # before allocating the model
    model = NumpyGPT(cfg, None, dtype=dtype, seed=seed, **torch_options)     # grad_accum at most
    for name, view in model.param_views().items():
        p = params[name]
        if isinstance(p, LazyParam):
            p.fill(view)
        else:
            view[...] = p
    return model


def check_stored(params: dict, file_bytes: int, where) -> None:
    """Refuse weights that declare more data than their files hold. Every parameter is a float of 2
    bytes or more in the file (float16, bfloat16, float32, float64) and no two share bytes (a
    tied head is one tensor), so params need at least 2 bytes an element of file_bytes. A file
    whose tensors alias one another (a stride-0 view, two names on one storage, overlapping
    offsets) or declare sizes it does not hold is refused here, before the model, which costs at
    most 4 times file_bytes in float64, is allocated."""
    elements = sum(math.prod(np.shape(p)) for p in params.values())
    if 2 * elements > file_bytes:
        raise ValueError(f"{where}: its tensors declare {elements:,} weights, at least {2 * elements:,} bytes, "
                         f"but its files hold {file_bytes:,} bytes; the file is damaged or crafted")


def read_exact(f, offset: int, out: np.ndarray) -> None:
    """Read out.nbytes bytes of the unbuffered file f at offset straight into the contiguous array out."""
    view = memoryview(out.reshape(-1).view(np.uint8))
    f.seek(offset)
    done = 0
    while done < len(view):
        n = f.readinto(view[done:done + (1 << 28)])
        if not n:
            raise ValueError(f"{f.name}: file ends {len(view) - done} bytes early at offset {offset + done}")
        done += n


class Reader:
    """Tensors of one source by name: shapes known up front, data read on demand."""
    where = ""                         # the file or folder, for error messages

    def __init__(self):
        self.info = {}                 # name -> (dtype, shape)
        self.file_bytes = 0            # the size of the files the tensors are read from

    def read(self, name) -> np.ndarray:
        raise NotImplementedError

    def read_into(self, name, out) -> None:
        np.copyto(out, self.read(name), casting="same_kind")

    def close(self) -> None:
        pass


def _check_stored_members(path) -> None:
    """torch.save writes its zip archive uncompressed, and torch.load(mmap=True) maps each tensor's
    member as it lies in the file, so a compressed member (a legal zip: re-zipping tools make
    them) would be read as other numbers. Such a file is refused rather than decompressed: a
    DEFLATE member can expand a thousandfold, beyond what the file's size lets a reader bound."""
    if not zipfile.is_zipfile(path):
        return                                  # torch's legacy format, or not torch's at all
    try:
        with zipfile.ZipFile(path) as z:
            packed = [i.filename for i in z.infolist() if i.compress_type != zipfile.ZIP_STORED]
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
        raise ValueError(f"{path}: not a PyTorch state_dict npgpt can read (a damaged zip archive: {e})") from None
    if packed:
        raise ValueError(f"{path}: its zip archive holds {len(packed)} compressed members ({packed[0]}, ...); "
                         "torch.save stores them uncompressed and npgpt reads only those: re-save it with "
                         "torch.save, or re-zip it without compression (zip -0)")


class TorchReader(Reader):
    """A state_dict from torch.load(..., weights_only=True): plain tensors, no pickled code."""

    def __init__(self, state: dict, where: str):
        super().__init__()
        import torch
        self.where, self.state = where, state
        self.file_bytes = Path(where).stat().st_size
        for name, t in state.items():
            kind = str(t.dtype).replace("torch.", "")
            try:
                dtype = np.dtype("float32" if kind == "bfloat16" else kind)
            except TypeError:
                dtype = None
            if dtype is None or t.layout != torch.strided:
                raise ValueError(f"{where}: {name} is a {kind} tensor of layout {t.layout}; npgpt reads dense "
                                 "tensors of NumPy's dtypes (and bfloat16)")
            self.info[name] = (dtype, tuple(t.shape))

    def read(self, name):
        import torch
        t = self.state[name].detach()
        return (t.float() if t.dtype == torch.bfloat16 else t).numpy()


def torch_state_dict(path) -> dict:
    """A .pth / .bin state_dict through torch.load(weights_only=True): tensors and plain
    containers only; a file that needs any other class to unpickle is refused, never run."""
    return state_dict_of(torch_file(path), path)


def torch_file(path):
    """What a PyTorch file holds, through torch.load(weights_only=True) (memory-mapped where it can be)."""
    import pickle
    import warnings
    import torch
    if check_regular(path, "a PyTorch state_dict") == 0:
        raise ValueError(f"{path}: the file is empty (0 bytes); expected a PyTorch state_dict")
    _check_stored_members(path)
    try:
        # torch's warnings and errors advise unpickling the file anyway: npgpt says its own line instead
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            try:
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:           # torch's legacy (pre-zip) format cannot be memory-mapped
                state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL (\S+)", str(e))
        raise ValueError(f"{path}: holds objects other than tensors{f' (such as {found.group(1)})' if found else ''}, "
                         "which torch.load(weights_only=True) refuses to build; npgpt never unpickles untrusted "
                         "data, so it does not read this file") from None
    except Exception as e:             # torch on a damaged or foreign file: RuntimeError, EOFError, KeyError, ...
        reason = (str(e).strip().splitlines() or [""])[0].split(". ")[0]
        reason = "" if "weights_only" in reason else reason            # torch's advice to unpickle anyway
        raise ValueError(f"{path}: not a PyTorch state_dict npgpt can read (damaged, truncated or another "
                         f"format; {type(e).__name__}{f': {reason}' if reason else ''})") from None
    return state


def state_dict_of(state, path) -> dict:
    """The state_dict in what torch_file read: itself, the book's model_state_dict, or nanoGPT's ckpt.pt
    "model"; the names without the wrappers' prefixes."""
    import torch
    if isinstance(state, dict) and "model_state_dict" in state:
        state = state["model_state_dict"]                         # the book's model + optimizer file
    elif isinstance(state, dict) and "model" in state and "model_args" in state:
        state = state["model"]                                    # nanoGPT's ckpt.pt (train.py's checkpoint)
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise ValueError(f"{path}: expected a state_dict (names -> tensors), got {type(state).__name__}"
                         + (f" with other entries ({', '.join(sorted(map(str, state))[:6])})"
                            if isinstance(state, dict) else ""))
    strip = re.compile(r"^(module\.|_orig_mod\.)+")                # DDP / torch.compile wrappers
    return {strip.sub("", k): v for k, v in state.items()}
