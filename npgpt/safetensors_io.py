"""The safetensors format, read and written by hand: an 8-byte little-endian header length, a JSON
header {name: {dtype, shape, data_offsets}} (plus an optional "__metadata__" of strings), then
the raw little-endian data.

The format is simple enough to read with plain file reads, which lets every tensor land in its
final array (the safetensors package would map the whole file, and the mapped pages count in the
process's memory too). Hugging Face splits large models into shards listed by an index file;
ShardedSafetensorsReader reads those as one.
"""
from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import numpy as np

from .checkpoint import atomic_write
from .lazy_tensors import Reader, read_exact

# bfloat16 has no NumPy dtype: its 2-byte words are read as uint16 and widened to float32
ST_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2", "I64": "<i8", "I32": "<i4",
             "U8": "u1", "BOOL": "?"}


class SafetensorsReader(Reader):
    """One .safetensors file; metadata is its "__metadata__" dict."""

    def __init__(self, path):
        super().__init__()
        self.where, size = str(path), Path(path).stat().st_size
        with open(path, "rb") as f:
            n = struct.unpack("<Q", f.read(8))[0] if size >= 8 else -1
            if not 0 < n <= min(size - 8, 1 << 27):
                raise ValueError(f"{path}: not a safetensors file (header length {n}, file size {size})")
            try:
                header = json.loads(f.read(n))
            except ValueError as e:
                raise ValueError(f"{path}: not a safetensors file (its header is not JSON: {e})") from None
        self.metadata = header.pop("__metadata__", None) or {}
        self.offsets = {}                  # name -> (file offset, stored dtype, is bfloat16)
        for name, t in header.items():
            kind, shape, (start, end) = t.get("dtype"), tuple(t.get("shape", ())), t.get("data_offsets", (0, -1))
            if kind not in ST_DTYPES:
                raise ValueError(f"{path}: {name} has dtype {kind}; expected one of {sorted(ST_DTYPES)}")
            dtype = np.dtype(ST_DTYPES[kind])
            if end - start != math.prod(shape) * dtype.itemsize or 8 + n + end > size:
                raise ValueError(f"{path}: {name} of shape {shape} does not fit its data offsets {start}..{end}")
            self.info[name] = (np.dtype(np.float32) if kind == "BF16" else dtype, shape)
            self.offsets[name] = (8 + n + start, dtype, kind == "BF16")
        self.f = open(path, "rb", buffering=0)

    def read(self, name):
        offset, dtype, bf16 = self.offsets[name]
        out = np.empty(self.info[name][1], dtype)
        read_exact(self.f, offset, out)
        return (out.astype(np.uint32) << 16).view(np.float32) if bf16 else out

    def read_into(self, name, out):
        offset, dtype, bf16 = self.offsets[name]
        if out.dtype == dtype and out.flags.c_contiguous and not bf16:
            read_exact(self.f, offset, out)
        else:
            super().read_into(name, out)

    def close(self):
        self.f.close()


class ShardedSafetensorsReader(Reader):
    """The shards of model.safetensors.index.json ({"weight_map": {name: shard file}}) as one reader."""

    def __init__(self, index: Path):
        super().__init__()
        self.where = str(index.parent)
        self.shard_of = json.loads(index.read_text())["weight_map"]
        self.shards = {}
        try:
            for file in sorted(set(self.shard_of.values())):
                self.shards[file] = SafetensorsReader(index.parent / file)
                self.info.update(self.shards[file].info)
        except BaseException:
            self.close()
            raise

    def read(self, name):
        return self.shards[self.shard_of[name]].read(name)

    def read_into(self, name, out):
        self.shards[self.shard_of[name]].read_into(name, out)

    def close(self):
        for shard in self.shards.values():
            shard.close()


def write_safetensors(path, tensors: dict, metadata: dict | None = None) -> Path:
    """Write tensors (arrays, or LazyParams) to a .safetensors file, one tensor at a time, atomically."""
    names = {np.dtype(v).str: k for k, v in ST_DTYPES.items() if k != "BF16"}
    header, offset = {}, 0
    for name, t in tensors.items():
        dtype = np.dtype(t.dtype).newbyteorder("<") if np.dtype(t.dtype).itemsize > 1 else np.dtype(t.dtype)
        nbytes = math.prod(t.shape) * dtype.itemsize
        header[name] = {"dtype": names[dtype.str], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if metadata:
        header = {"__metadata__": metadata, **header}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)                     # the data starts 8-byte aligned

    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(blob)) + blob)
            for t in tensors.values():
                a = np.ascontiguousarray(np.asarray(t), dtype=np.dtype(t.dtype).newbyteorder("<"))
                f.write(memoryview(a.reshape(-1).view(np.uint8)))

    return atomic_write(path, write)
