"""The safetensors format, read and written by hand: an 8-byte little-endian header length, a JSON
header {name: {dtype, shape, data_offsets}} (plus an optional "__metadata__" of strings), then
the raw little-endian data. Nothing in the header is trusted: every entry's offsets must lie in the
data section, hold exactly shape x dtype bytes and overlap no other entry's.

The format is simple enough to read with plain file reads, which lets every tensor land in its
final array (the safetensors package would map the whole file, and the mapped pages count in the
process's memory too). Hugging Face splits large models into shards listed by an index file;
ShardedSafetensorsReader reads those as one.
"""
from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

import numpy as np

from ..files import atomic_write, load_json, open_regular, parse_json
from .lazy import Reader, read_exact

# The format allows headers of up to 100 MB; GPT-2 1.5B's is 60 kB. Python's JSON objects cost up to
# about 20 times the text they come from, so npgpt reads headers of up to 16 MiB.
MAX_HEADER_BYTES = 16 << 20

# bfloat16 has no NumPy dtype: its 2-byte words are read as uint16 and widened to float32
ST_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2", "I64": "<i8", "I32": "<i4",
             "U8": "u1", "BOOL": "?"}


def _short(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _entry(path, name, t) -> tuple[str, tuple, int, int]:
    """A header entry {"dtype", "shape", "data_offsets"} -> (dtype, shape, start, end), checked:
    a known dtype, dimensions and offsets that are integers >= 0, start <= end."""
    is_int = lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0
    if not isinstance(t, dict):
        raise ValueError(f"{path}: the header entry of {name} is {_short(t)}; expected an object with "
                         "dtype, shape and data_offsets")
    kind, shape, offsets = t.get("dtype"), t.get("shape"), t.get("data_offsets")
    if not isinstance(kind, str) or kind not in ST_DTYPES:
        raise ValueError(f"{path}: {name} has dtype {_short(kind)}; expected one of {sorted(ST_DTYPES)}")
    if not isinstance(shape, list) or not all(is_int(d) for d in shape):
        raise ValueError(f"{path}: {name} has shape {_short(shape)}; expected a list of integers >= 0")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(is_int(o) for o in offsets) \
            or offsets[0] > offsets[1]:
        raise ValueError(f"{path}: {name} has data_offsets {_short(offsets)}; expected [start, end], "
                         "integers with 0 <= start <= end, counted from the start of the data section")
    return kind, tuple(shape), offsets[0], offsets[1]


class SafetensorsReader(Reader):
    """One .safetensors file; metadata is its "__metadata__" dict."""

    def __init__(self, path):
        super().__init__()
        self.where = str(path)
        with open_regular(path, "a safetensors file") as f:
            size = self.file_bytes = os.fstat(f.fileno()).st_size
            n = struct.unpack("<Q", f.read(8))[0] if size >= 8 else -1
            if not 0 < n <= min(size - 8, MAX_HEADER_BYTES):
                raise ValueError(f"{path}: not a safetensors file (header length {n}, file size {size})")
            header = parse_json(f.read(n), path, "the JSON header of a safetensors file")
        if not isinstance(header, dict):
            raise ValueError(f"{path}: not a safetensors file (its header is a JSON {type(header).__name__}, "
                             "expected an object of tensors)")
        metadata = header.pop("__metadata__", None)
        strings = isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())
        if metadata is not None and not strings:
            raise ValueError(f"{path}: its __metadata__ is {_short(metadata)}; expected an object of strings")
        self.metadata = metadata or {}
        self.offsets = {}                  # name -> (file offset, stored dtype, is bfloat16)
        spans = []
        for name, t in header.items():
            kind, shape, start, end = _entry(path, name, t)
            dtype = np.dtype(ST_DTYPES[kind])
            if end - start != math.prod(shape) * dtype.itemsize:
                raise ValueError(f"{path}: {name} of shape {shape} and dtype {kind} needs "
                                 f"{math.prod(shape) * dtype.itemsize} bytes; its data offsets {start}..{end} "
                                 f"hold {end - start}")
            if end > size - 8 - n:
                raise ValueError(f"{path}: {name}: data offsets {start}..{end} run past the data section "
                                 f"({size - 8 - n} bytes)")
            spans.append((start, end, name))
            self.info[name] = (np.dtype(np.float32) if kind == "BF16" else dtype, shape)
            self.offsets[name] = (8 + n + start, dtype, kind == "BF16")
        spans.sort()
        for (_, end, a), (start, _, b) in zip(spans, spans[1:]):
            if start < end:
                raise ValueError(f"{path}: the data of {a} (ending at {end}) and {b} (starting at {start}) "
                                 "overlap; each tensor must have bytes of its own")
        self.f = open_regular(path, "a safetensors file", buffering=0)

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
        value = load_json(index, "a safetensors index (a JSON object with a weight_map)")
        weight_map = value.get("weight_map") if isinstance(value, dict) else None
        beside = lambda f: isinstance(f, str) and f == Path(f).name and f not in ("", ".", "..")
        if not isinstance(weight_map, dict) or not all(beside(f) for f in weight_map.values()):
            raise ValueError(f"{index}: its weight_map is {_short(weight_map)}; expected an object of "
                             "tensor name -> shard file name (a file beside the index)")
        self.shard_of, self.shards = weight_map, {}
        try:
            for file in sorted(set(weight_map.values())):
                self.shards[file] = SafetensorsReader(index.parent / file)
            for name, file in weight_map.items():
                if name not in self.shards[file].info:
                    raise ValueError(f"{index}: its weight_map puts {name} in {file}, which does not hold it")
                self.info[name] = self.shards[file].info[name]
            self.file_bytes = sum(shard.file_bytes for shard in self.shards.values())
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
