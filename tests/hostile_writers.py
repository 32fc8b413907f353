"""Writers of hostile files for tests/test_hostile.py, independent of npgpt's readers: TensorFlow's
table and protobuf by hand (with a bitwise CRC-32C), safetensors headers by struct, checkpoints
changed with h5py and resealed, the book's .pth by torch.save and re-zipped by zipfile."""
import json
import os
import shutil
import struct
import zipfile
from pathlib import Path

import h5py
import numpy as np

import npgpt
from npgpt.params import param_shapes
from npgpt.weights.checkpoint import _digest
from npgpt.weights.names import openai_source


# ---- an independent writer of TensorFlow's table and protobuf ----

def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def masked(data: bytes) -> bytes:
    c = crc32c(data)
    return ((((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF).to_bytes(4, "little")


def varint(n: int) -> bytes:
    out = b""
    while n >= 0x80:
        out += bytes([n & 0x7F | 0x80])
        n >>= 7
    return out + bytes([n])


def field(number: int, value) -> bytes:
    if isinstance(value, int):
        return varint(number << 3) + varint(value)
    return varint(number << 3 | 2) + varint(len(value)) + value


def block(entries) -> bytes:
    body = b"".join(varint(0) + varint(len(k)) + varint(len(v)) + k + v for k, v in entries)
    return body + struct.pack("<II", 0, 1)          # one restart point, at 0


def table(entries) -> bytes:
    """A LevelDB table of sorted (key, value) byte pairs: one data block, the index block, the footer."""
    data = block(entries)
    out = data + b"\0" + masked(data + b"\0")
    index = block([(entries[-1][0], varint(0) + varint(len(data)))])
    footer = (varint(0) + varint(0) + varint(len(out)) + varint(len(index))).ljust(40, b"\0")
    return out + index + b"\0" + masked(index + b"\0") + footer + struct.pack("<Q", 0xDB4775248B80FB57)


def tf_bundle(folder: Path, hparams: dict, offset=lambda i: 0, data_bytes=1 << 16, keys=None) -> Path:
    """An OpenAI-style folder whose index lists every tensor of hparams' model as float32 at offset(i)
    of a data file of data_bytes zeros."""
    folder.mkdir()
    (folder / "hparams.json").write_text(json.dumps(hparams))
    cfg = npgpt.GPTConfig(vocab_size=hparams["n_vocab"], context_length=hparams["n_ctx"], emb_dim=hparams["n_embd"],
                          n_heads=hparams["n_head"], n_layers=hparams["n_layer"], qkv_bias=True, tie_weights=True)
    entries = []
    for i, (name, shape) in enumerate(param_shapes(cfg).items()):
        (source,), kind = openai_source(name)
        shape = (1, *shape[::-1]) if kind == "conv1d" else shape
        dims = b"".join(field(2, field(1, d)) for d in shape)
        entry = field(1, 1) + field(2, dims) + field(3, 0) + field(4, offset(i)) + field(5, 4 * int(np.prod(shape)))
        entries.append((source.encode(), entry))
    entries = sorted(keys or entries)
    (folder / "model.ckpt.index").write_bytes(table([(b"", field(1, 1))] + entries))
    (folder / "model.ckpt.data-00000-of-00001").write_bytes(bytes(data_bytes))
    return folder


def reseal(src: Path, dst: Path, change) -> Path:
    """A copy of the checkpoint src changed by change(f) and given a matching root checksum, as a
    crafted file would be (the checksum is a crc32, not a signature)."""
    shutil.copy(src, dst)
    with h5py.File(dst, "r+") as f:
        change(f)
        f.attrs["checksum"] = _digest(f)
    return dst


def copy_with(src: Path, dst: Path, **files) -> Path:
    shutil.copytree(src, dst)
    for name, content in files.items():
        name = name.replace("__", ".")
        (dst / name).unlink(missing_ok=True)
        if isinstance(content, Path):
            (dst / name).symlink_to(content)
        elif content == "fifo":
            os.mkfifo(dst / name)
        else:
            (dst / name).write_bytes(content.encode() if isinstance(content, str) else content)
    return dst


def safetensors_with(src: Path, dst: Path, change) -> Path:
    raw = src.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = change(json.loads(raw[8:8 + n]))
    blob = header if isinstance(header, bytes) else json.dumps(header).encode()
    dst.write_bytes(struct.pack("<Q", len(blob)) + blob + raw[8 + n:])
    return dst


def book_pth(path: Path, rows: int, C: int = 64, rezip: bool = False) -> Path:
    """The book's GPTModel state_dict of one block, every tensor a stride-0 view of one element
    (torch saves the element, not the rows), tok_emb and out_head of `rows` rows."""
    import torch
    one = torch.zeros(1)
    shapes = {"tok_emb.weight": (rows, C), "pos_emb.weight": (16, C), "out_head.weight": (rows, C),
              "final_norm.scale": (C,), "final_norm.shift": (C,)}
    b = "trf_blocks.0."
    for w in ("W_query", "W_key", "W_value"):
        shapes[f"{b}att.{w}.weight"] = (C, C)
    shapes.update({f"{b}att.out_proj.weight": (C, C), f"{b}att.out_proj.bias": (C,),
                   f"{b}ff.layers.0.weight": (4 * C, C), f"{b}ff.layers.0.bias": (4 * C,),
                   f"{b}ff.layers.2.weight": (C, 4 * C), f"{b}ff.layers.2.bias": (C,),
                   f"{b}norm1.scale": (C,), f"{b}norm1.shift": (C,), f"{b}norm2.scale": (C,), f"{b}norm2.shift": (C,)})
    if rezip:                                       # real tensors, their zip members then compressed
        state = {k: torch.full(s, 0.5) for k, s in shapes.items()}
    else:
        state = {k: one.expand(*s) for k, s in shapes.items()}
    torch.save(state, path)
    if rezip:
        packed = path.with_suffix(".zip")
        with zipfile.ZipFile(path) as src, zipfile.ZipFile(packed, "w", zipfile.ZIP_DEFLATED) as dst:
            for info in src.infolist():
                dst.writestr(info.filename, src.read(info.filename))
        packed.replace(path)
    return path
