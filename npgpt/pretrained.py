"""Loading GPT-2 weights from the formats they come in, and writing them for Hugging Face.

load_pretrained(path) recognises
  OpenAI's release folder  hparams.json, checkpoint, model.ckpt.index + .data-*: TensorFlow's tensor
                           bundle, read here without TensorFlow (a LevelDB-style table of
                           BundleEntryProto records, parsed by hand; every tensor's crc32c checked)
  Hugging Face GPT-2       a folder with config.json and model.safetensors (or shards, or
                           pytorch_model.bin), or one .safetensors file
  the book's GPTModel      a .pth state_dict, or its {"model_state_dict", "optimizer_state_dict"} file
  npgpt's checkpoint       .h5 (checkpoint.py)
and maps each onto npgpt's names and (out, in) layout; the transposes live here and nowhere else:
  OpenAI conv1d w (1, in, out) -> squeeze, transpose     HF Conv1D weight (in, out) -> transpose
  book W_query, W_key, W_value (C, C) -> the three row blocks of c_attn.weight (3C, C)
Tensors are read one at a time straight into the model's parameter buffer, so loading costs the
weights' size in memory, not twice that. Pickles are never run: torch.load(weights_only=True).
"""
from __future__ import annotations

import json
import math
import re
import shutil
import struct
from contextlib import ExitStack
from pathlib import Path

import numpy as np

from .checkpoint import atomic_write, open_checkpoint
from .config import GPTConfig
from .params import param_shapes

GPT2_DROP_RATE = 0.1          # GPT-2's dropout; the weight files do not record one


class LazyParam:
    """A parameter not read yet: its shape and dtype, and fill(out) to read it into an array.
    np.asarray(p) reads it into a new array, so a dict of these can go to model.load_params."""

    def __init__(self, shape, dtype, fill):
        self.shape, self.dtype, self.fill = tuple(shape), np.dtype(dtype), fill

    def __array__(self, dtype=None, copy=None):
        out = np.empty(self.shape, dtype or self.dtype)
        self.fill(out)
        return out


def build_loaded_model(cfg: GPTConfig, params: dict, backend="numpy", dtype="float32", device=None, seed=123):
    """A model whose parameters are read from params (LazyParam or arrays), one tensor at a time.

    The NumPy backend's tensors are views into one flat buffer (model.p): each is read straight
    into its view. Other backends get the lazy dict through load_params, one tensor in memory at
    a time besides the model."""
    from .backend import build_model
    zero = np.zeros((), np.dtype(dtype))
    placeholders = {name: np.broadcast_to(zero, np.shape(p)) for name, p in params.items()}
    model = build_model(cfg, backend=backend, dtype=dtype, device=device, seed=seed, params=placeholders)
    if model.backend != "numpy":
        model.load_params(params)                    # LazyParams are read as load_params asks for them
        return model
    for name, view in model.p.items():
        p = params[name]
        if isinstance(p, LazyParam):
            p.fill(view)
        else:
            view[...] = p
    return model


def _read_exact(f, offset: int, out: np.ndarray) -> None:
    """Read out.nbytes bytes at offset straight into the contiguous array out."""
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
    where = ""

    def __init__(self):
        self.info = {}                 # name -> (dtype, shape)

    def read(self, name) -> np.ndarray:
        raise NotImplementedError

    def read_into(self, name, out) -> None:
        np.copyto(out, self.read(name), casting="same_kind")

    def close(self) -> None:
        pass


# ---- safetensors: 8-byte header length, JSON header, raw little-endian data ----

ST_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2", "I64": "<i8", "I32": "<i4",
             "U8": "u1", "BOOL": "?"}


class SafetensorsReader(Reader):
    """The format is simple enough to read with plain file reads, which lets every tensor land
    in its final array (the safetensors package would map the whole file, and the mapped pages
    count in the process's memory too)."""

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
        self.offsets = {}
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
        _read_exact(self.f, offset, out)
        return (out.astype(np.uint32) << 16).view(np.float32) if bf16 else out

    def read_into(self, name, out):
        offset, dtype, bf16 = self.offsets[name]
        if out.dtype == dtype and out.flags.c_contiguous and not bf16:
            _read_exact(self.f, offset, out)
        else:
            super().read_into(name, out)

    def close(self):
        self.f.close()


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
            for name, t in tensors.items():
                a = np.ascontiguousarray(np.asarray(t), dtype=np.dtype(t.dtype).newbyteorder("<"))
                f.write(memoryview(a.reshape(-1).view(np.uint8)))

    return atomic_write(path, write)


# ---- TensorFlow's tensor bundle (model.ckpt.index + model.ckpt.data-NNNNN-of-NNNNN) ----

def _crc32c_tables():
    t0 = np.arange(256, dtype=np.uint32)
    for _ in range(8):
        t0 = np.where(t0 & 1, (t0 >> 1) ^ np.uint32(0x82F63B78), t0 >> 1).astype(np.uint32)
    tables = [t0]
    for _ in range(3):                                  # slicing-by-4: a byte followed by k zero bytes
        tables.append((tables[-1] >> 8) ^ t0[tables[-1] & 0xFF])
    return tables


_CRC = _crc32c_tables()


def _crc_words(x):
    """Advance CRC registers x (uint32 array) over one 4-byte word that has been xor-ed into them."""
    t0, t1, t2, t3 = _CRC
    return t3[x & 0xFF] ^ t2[(x >> 8) & 0xFF] ^ t1[(x >> 16) & 0xFF] ^ t0[x >> 24]


def crc32c(data) -> int:
    """CRC-32C (Castagnoli), as TensorFlow checksums tensors, in NumPy.

    The bytes are cut into k lanes of L bytes (plus a head) that are checksummed side by side, one
    word column at a time; then the lanes are chained: crc(A + B) = shift_L(crc(A)) ^ crc0(B),
    where crc0 starts from 0 and shift_L (advance over L zero bytes) is linear, so four byte
    tables hold it."""
    buf = np.frombuffer(data, np.uint8) if not isinstance(data, np.ndarray) else data.reshape(-1).view(np.uint8)
    n = buf.size
    lane = max(64, int(math.sqrt(n / 4)) // 4 * 4)
    k = n // lane
    head = n - k * lane
    t0 = _CRC[0].tolist()
    crc = 0xFFFFFFFF
    for b in buf[:head].tolist():
        crc = t0[(crc ^ b) & 0xFF] ^ (crc >> 8)
    if k:
        words = buf[head:].view("<u4").reshape(k, lane // 4)
        lanes = np.zeros(k, np.uint32)
        z = np.concatenate([np.arange(256, dtype=np.uint32) << np.uint32(8 * i) for i in range(4)])
        for j in range(lane // 4):
            lanes = _crc_words(lanes ^ words[:, j])
            z = _crc_words(z)
        z0, z1, z2, z3 = (z[256 * i:256 * (i + 1)].tolist() for i in range(4))
        for c in lanes.tolist():
            crc = z0[crc & 0xFF] ^ z1[(crc >> 8) & 0xFF] ^ z2[(crc >> 16) & 0xFF] ^ z3[crc >> 24] ^ c
    return crc ^ 0xFFFFFFFF


def unmask_crc(masked: int) -> int:
    """TensorFlow and LevelDB store crc32c values masked: ((crc >> 15 | crc << 17) + 0xa282ead8)."""
    rot = (masked - 0xA282EAD8) & 0xFFFFFFFF
    return ((rot >> 17) | (rot << 15)) & 0xFFFFFFFF


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise ValueError("truncated or overlong varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos
        shift += 7


def _proto(buf: bytes) -> dict[int, list]:
    """A protobuf message as {field number: [values]}: ints for varint/fixed fields, bytes otherwise."""
    fields, pos = {}, 0
    while pos < len(buf):
        tag, pos = _varint(buf, pos)
        wire = tag & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire in (1, 5):
            width = 8 if wire == 1 else 4
            value, pos = int.from_bytes(buf[pos:pos + width], "little"), pos + width
        elif wire == 2:
            n, pos = _varint(buf, pos)
            value, pos = bytes(buf[pos:pos + n]), pos + n
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        fields.setdefault(tag >> 3, []).append(value)
    if pos != len(buf):
        raise ValueError("truncated protobuf message")
    return fields


TABLE_MAGIC = 0xDB4775248B80FB57


def _table_block(data: bytes, handle: bytes, where: str) -> bytes:
    """A block from its BlockHandle (varint offset, varint size); a 5-byte trailer follows it:
    compression type and the masked crc32c of block + type."""
    offset, pos = _varint(handle, 0)
    size, _ = _varint(handle, pos)
    end = offset + size
    if end + 5 > len(data):
        raise ValueError(f"{where}: table block {offset}+{size} runs past the end of the file")
    if unmask_crc(int.from_bytes(data[end + 1:end + 5], "little")) != crc32c(data[offset:end + 1]):
        raise ValueError(f"{where}: table block at {offset} fails its crc32c check; the file is damaged")
    if data[end] != 0:
        raise ValueError(f"{where}: compressed table block (type {data[end]}); TensorFlow writes "
                         "checkpoint indexes uncompressed, and only those are read")
    return data[offset:end]


def _block_entries(block: bytes):
    """(key, value) pairs of a block; each key stores only what it does not share with the last."""
    n_restarts = int.from_bytes(block[-4:], "little")
    limit, pos, key = len(block) - 4 * (n_restarts + 1), 0, b""
    while pos < limit:
        shared, pos = _varint(block, pos)
        unshared, pos = _varint(block, pos)
        size, pos = _varint(block, pos)
        key = key[:shared] + block[pos:pos + unshared]
        yield key, block[pos + unshared:pos + unshared + size]
        pos += unshared + size


def read_table(path) -> dict[str, bytes]:
    """All entries of a TensorFlow (LevelDB-format) table: footer -> index block -> data blocks."""
    data = Path(path).read_bytes()
    if len(data) < 48 or int.from_bytes(data[-8:], "little") != TABLE_MAGIC:
        raise ValueError(f"{path}: not a TensorFlow checkpoint index (no table magic number at its end)")
    footer = data[-48:]
    _, pos = _varint(footer, 0)                                   # metaindex handle: no filters here
    _, pos = _varint(footer, pos)
    entries = {}
    for _, handle in _block_entries(_table_block(data, footer[pos:], str(path))):
        for key, value in _block_entries(_table_block(data, handle, str(path))):
            entries[key.decode()] = value
    return entries


TF_DTYPES = {1: "f4", 2: "f8", 3: "i4", 9: "i8", 19: "f2"}        # DT_FLOAT, DT_DOUBLE, ...


class TFBundleReader(Reader):
    """BundleEntryProto: dtype = 1, shape = 2 (TensorShapeProto: dim = 2, Dim: size = 1),
    shard_id = 3, offset = 4, size = 5, crc32c = 6 (fixed32, masked), slices = 7.
    The entry with key "" is the BundleHeaderProto: num_shards = 1, endianness = 2 (0 little)."""

    def __init__(self, prefix: Path, verify: bool = True):
        super().__init__()
        self.where, self.verify, self.files, self.entries = str(prefix), verify, {}, {}
        table = read_table(f"{prefix}.index")
        header = _proto(table.pop("", b""))
        num_shards, order = header.get(1, [1])[0], ">" if header.get(2, [0])[0] else "<"
        for name, value in table.items():
            e = _proto(value)
            if 7 in e:
                raise ValueError(f"{prefix}: {name} is saved in slices (a partitioned variable); not supported")
            code = e.get(1, [0])[0]
            if code not in TF_DTYPES:
                raise ValueError(f"{prefix}: {name} has TensorFlow dtype {code}; expected one of {sorted(TF_DTYPES)}")
            dims = _proto(e.get(2, [b""])[0]).get(2, [])
            shape = tuple(_proto(d).get(1, [0])[0] for d in dims)
            dtype = np.dtype(order + TF_DTYPES[code])
            shard, offset, size = (e.get(i, [0])[0] for i in (3, 4, 5))
            if size != math.prod(shape) * dtype.itemsize or shard >= num_shards:
                raise ValueError(f"{prefix}: {name} of shape {shape} has {size} bytes in shard {shard}")
            self.info[name] = (dtype.newbyteorder("="), shape)
            self.entries[name] = (dtype, Path(f"{prefix}.data-{shard:05d}-of-{num_shards:05d}"), offset,
                                  e.get(6, [None])[0])

    def _read(self, name, out):
        dtype, path, offset, masked = self.entries[name]
        if path not in self.files:
            self.files[path] = open(path, "rb", buffering=0)
        _read_exact(self.files[path], offset, out)
        if self.verify and masked is not None and crc32c(out) != unmask_crc(masked):
            raise ValueError(f"{self.where}: {name} fails its crc32c check; the data file is damaged")

    def read(self, name):
        out = np.empty(self.info[name][1], self.entries[name][0])
        self._read(name, out)
        return out.astype(out.dtype.newbyteorder("="), copy=False)

    def read_into(self, name, out):
        if out.dtype == self.entries[name][0] and out.flags.c_contiguous:
            self._read(name, out)
        else:
            super().read_into(name, out)

    def close(self):
        for f in self.files.values():
            f.close()


class TorchReader(Reader):
    """A state_dict from torch.load(..., weights_only=True): plain tensors, no pickled code."""

    def __init__(self, state: dict, where: str):
        super().__init__()
        self.where, self.state = where, state
        for name, t in state.items():
            self.info[name] = (np.dtype(str(t.dtype).replace("torch.", "").replace("bfloat16", "float32")),
                               tuple(t.shape))

    def read(self, name):
        import torch
        t = self.state[name].detach()
        return (t.float() if t.dtype == torch.bfloat16 else t).numpy()


def torch_state_dict(path) -> dict:
    """A .pth / .bin state_dict through torch.load(weights_only=True): tensors and plain
    containers only; a file that needs any other class to unpickle is refused, never run."""
    import pickle
    import torch
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:           # torch's legacy (pre-zip) format cannot be memory-mapped
            state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as e:
        raise ValueError(f"{path}: not loadable as plain tensors with torch.load(weights_only=True); "
                         f"npgpt never unpickles arbitrary objects ({str(e).strip().splitlines()[0]})") from None
    if isinstance(state, dict) and "model_state_dict" in state:
        state = state["model_state_dict"]                         # the book's model + optimizer file
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a state_dict (names -> tensors), got {type(state).__name__}")
    strip = re.compile(r"^(module\.|_orig_mod\.)+")                # DDP / torch.compile wrappers
    return {strip.sub("", k): v for k, v in state.items()}


# ---- each format's names, mapped onto npgpt's ----

def openai_source(name: str) -> tuple[list[str], str]:
    """npgpt name -> ([OpenAI TF names], kind): h.0.attn.c_attn.weight <- model/h0/attn/c_attn/w (1, C, 3C)."""
    if name in ("wte", "wpe"):
        return [f"model/{name}"], "copy"
    parts = name.split(".")
    scope = ["model", f"h{parts[1]}", *parts[2:-1]] if parts[0] == "h" else ["model", *parts[:-1]]
    is_ln = scope[-1].startswith("ln_")
    leaf = "b" if parts[-1] == "bias" else "g" if is_ln else "w"
    return ["/".join(scope + [leaf])], "conv1d" if leaf == "w" else "copy"


def hf_source(name: str, prefix: str = "transformer.") -> tuple[list[str], str]:
    """npgpt name -> ([HF names], kind): h.0.attn.c_attn.weight <- transformer.h.0.attn.c_attn.weight (C, 3C)."""
    if name == "lm_head.weight":
        return [name], "copy"
    if name in ("wte", "wpe"):
        return [f"{prefix}{name}.weight"], "copy"
    conv1d = name.endswith(".weight") and (".c_attn." in name or ".c_proj." in name or ".c_fc." in name)
    return [prefix + name], "T" if conv1d else "copy"


BOOK_NAMES = {"ln_1.weight": "norm1.scale", "ln_1.bias": "norm1.shift", "ln_2.weight": "norm2.scale",
              "ln_2.bias": "norm2.shift", "attn.c_proj.weight": "att.out_proj.weight",
              "attn.c_proj.bias": "att.out_proj.bias", "mlp.c_fc.weight": "ff.layers.0.weight",
              "mlp.c_fc.bias": "ff.layers.0.bias", "mlp.c_proj.weight": "ff.layers.2.weight",
              "mlp.c_proj.bias": "ff.layers.2.bias", "wte": "tok_emb.weight", "wpe": "pos_emb.weight",
              "ln_f.weight": "final_norm.scale", "ln_f.bias": "final_norm.shift", "lm_head.weight": "out_head.weight"}


def book_source(name: str) -> tuple[list[str], str]:
    """npgpt name -> ([book names], kind): c_attn is the book's W_query, W_key, W_value stacked by rows."""
    if not name.startswith("h."):
        return [BOOK_NAMES[name]], "copy"
    _, i, rest = name.split(".", 2)
    block = f"trf_blocks.{i}."
    if rest.startswith("attn.c_attn."):
        kind = rest.rsplit(".", 1)[1]
        return [f"{block}att.{w}.{kind}" for w in ("W_query", "W_key", "W_value")], "copy"
    return [block + BOOK_NAMES[rest]], "copy"


def _source_shape(target: tuple, kind: str, parts: int) -> tuple:
    rows = (target[0] // parts, *target[1:])
    return rows if kind == "copy" else rows[::-1] if kind == "T" else (1, *rows[::-1])


def map_params(reader: Reader, cfg: GPTConfig, source, ignore=()) -> dict[str, LazyParam]:
    """npgpt's parameters as LazyParams over reader's tensors, after checking that every tensor
    is there with the right shape and that nothing unexplained is left over."""
    specs = {name: source(name) for name in param_shapes(cfg)}
    wanted = [s for sources, _ in specs.values() for s in sources]
    missing = [s for s in wanted if s not in reader.info]
    extra = sorted(set(reader.info) - set(wanted) - {n for n in reader.info if any(re.fullmatch(p, n) for p in ignore)})
    if missing or extra:
        raise ValueError(f"{reader.where}: does not hold a GPT-2 of {cfg.n_layers} layers as expected: missing "
                         f"{missing[:6]}{' ...' if len(missing) > 6 else ''}, unexpected {extra[:6]}"
                         f"{' ...' if len(extra) > 6 else ''}; found {len(reader.info)} tensors "
                         f"({', '.join(sorted(reader.info)[:4])}, ...)")
    params = {}
    for name, shape in param_shapes(cfg).items():
        sources, kind = specs[name]
        want = _source_shape(shape, kind, len(sources))
        for s in sources:
            if reader.info[s][1] != want:
                raise ValueError(f"{reader.where}: {s} (npgpt {name}): expected shape {want}, got {reader.info[s][1]}")
        params[name] = LazyParam(shape, reader.info[sources[0]][0], _filler(reader, sources, kind))
    return params


def _filler(reader: Reader, sources: list[str], kind: str):
    def fill(out):                          # out (rows, ...) in npgpt's layout; k sources fill k row blocks
        rows = out.shape[0] // len(sources)
        for i, s in enumerate(sources):
            part = out[i * rows:(i + 1) * rows]
            if kind == "copy":
                reader.read_into(s, part)
            else:
                a = reader.read(s)
                np.copyto(part, (a[0] if kind == "conv1d" else a).T, casting="same_kind")
    return fill


def _default_heads(emb_dim: int, n_heads: int | None, where: str) -> int:
    """The book's .pth and a bare .safetensors do not record the number of heads. All GPT-2 sizes
    use heads of 64 dimensions (768/12, 1024/16, 1280/20, 1600/25), so emb_dim // 64 is the default."""
    if n_heads is not None:
        return n_heads
    if emb_dim % 64:
        raise ValueError(f"{where}: the file does not record the number of attention heads and emb_dim "
                         f"{emb_dim} is not a multiple of 64; pass n_heads (--n-heads)")
    return emb_dim // 64


def _check_override(name, value, given, where):
    if given is not None and given != value:
        raise ValueError(f"{where}: the file says {name}={value}; the override {name}={given} disagrees")


def _count_blocks(names, pattern) -> int:
    found = {int(m.group(1)) for n in names if (m := re.match(pattern, n))}
    return max(found) + 1 if found else 0


# ---- opening each format: -> (GPTConfig, {npgpt name: LazyParam}) ----

def _open_openai(stack, folder: Path, n_heads, drop_rate, verify):
    hp = json.loads((folder / "hparams.json").read_text())
    expected = {"n_vocab", "n_ctx", "n_embd", "n_head", "n_layer"}
    if not expected <= set(hp):
        raise ValueError(f"{folder / 'hparams.json'}: has {sorted(hp)}, expected {sorted(expected)}")
    _check_override("n_heads", hp["n_head"], n_heads, folder)
    cfg = GPTConfig(vocab_size=hp["n_vocab"], context_length=hp["n_ctx"], emb_dim=hp["n_embd"],
                    n_heads=hp["n_head"], n_layers=hp["n_layer"], qkv_bias=True, tie_weights=True,
                    drop_rate=GPT2_DROP_RATE if drop_rate is None else drop_rate)
    prefix = folder / "model.ckpt"
    if (folder / "checkpoint").is_file():              # 'model_checkpoint_path: "model.ckpt"'
        m = re.search(r'^model_checkpoint_path:\s*"(.*)"', (folder / "checkpoint").read_text(), re.M)
        if m:
            prefix = folder / Path(m.group(1)).name
    if not Path(f"{prefix}.index").is_file():
        indexes = sorted(folder.glob("*.index"))
        if len(indexes) != 1:
            raise ValueError(f"{folder}: expected one TensorFlow index (model.ckpt.index), found {indexes}")
        prefix = indexes[0].with_suffix("")
    reader = TFBundleReader(prefix, verify)
    stack.callback(reader.close)
    return cfg, map_params(reader, cfg, openai_source)


HF_IGNORED = (r"(transformer\.)?h\.\d+\.attn\.(bias|masked_bias)",)       # causal-mask buffers


def _hf_config(path: Path, n_heads, drop_rate) -> GPTConfig:
    c = json.loads(path.read_text())
    c.setdefault("n_positions", c.get("n_ctx"))
    required = ("vocab_size", "n_positions", "n_embd", "n_head", "n_layer")
    if any(c.get(k) is None for k in required):
        raise ValueError(f"{path}: has {sorted(c)}; expected a GPT-2 config with {', '.join(required)}")
    checks = {"model_type": ("gpt2",), "activation_function": ("gelu_new", "gelu_pytorch_tanh"),
              "layer_norm_epsilon": (1e-5,), "n_inner": (None, 4 * c.get("n_embd", 0)),
              "scale_attn_weights": (True,), "scale_attn_by_inverse_layer_idx": (False,),
              "add_cross_attention": (False,)}
    for key, allowed in checks.items():
        if key in c and c[key] not in allowed:
            raise ValueError(f"{path}: {key} is {c[key]!r}; npgpt's GPT-2 needs {' or '.join(map(repr, allowed))}")
    _check_override("n_heads", c["n_head"], n_heads, path)
    return GPTConfig(vocab_size=c["vocab_size"], context_length=c["n_positions"],
                     emb_dim=c["n_embd"], n_heads=c["n_head"], n_layers=c["n_layer"], qkv_bias=True,
                     tie_weights=c.get("tie_word_embeddings", True),
                     drop_rate=c.get("resid_pdrop", GPT2_DROP_RATE) if drop_rate is None else drop_rate)


def _open_hf(stack, path: Path, n_heads, drop_rate):
    folder = path if path.is_dir() else path.parent
    if path.is_dir() and (folder / "model.safetensors.index.json").is_file():
        shards = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
        readers = {f: SafetensorsReader(folder / f) for f in sorted(set(shards.values()))}
        reader = Reader()
        reader.where = str(folder)
        for r in readers.values():
            stack.callback(r.close)
            reader.info.update(r.info)
        reader.read = lambda name: readers[shards[name]].read(name)
        reader.read_into = lambda name, out: readers[shards[name]].read_into(name, out)
    elif path.is_dir() and not (folder / "model.safetensors").is_file():
        reader = TorchReader(torch_state_dict(folder / "pytorch_model.bin"), str(folder / "pytorch_model.bin"))
    elif path.suffix in (".bin", ".pt", ".pth"):
        reader = TorchReader(torch_state_dict(path), str(path))
    else:
        reader = SafetensorsReader(path if path.is_file() else folder / "model.safetensors")
        stack.callback(reader.close)
    names = reader.info
    prefix = "transformer." if any(n.startswith("transformer.") for n in names) else ""
    if (folder / "config.json").is_file():
        cfg = _hf_config(folder / "config.json", n_heads, drop_rate)
    elif getattr(reader, "metadata", {}).get("npgpt_config"):
        cfg = GPTConfig.from_dict(json.loads(reader.metadata["npgpt_config"]))
        _check_override("n_heads", cfg.n_heads, n_heads, reader.where)
        cfg = GPTConfig.from_dict({**cfg.to_dict(), **({} if drop_rate is None else {"drop_rate": drop_rate})})
    else:                                             # a bare GPT-2 .safetensors: the shapes tell the rest
        if f"{prefix}wte.weight" not in names or f"{prefix}wpe.weight" not in names:
            raise ValueError(f"{reader.where}: no config.json beside it and no wte.weight / wpe.weight inside "
                             f"(found {sorted(names)[:6]}); expected a Hugging Face GPT-2")
        V, C = names[f"{prefix}wte.weight"][1]
        cfg = GPTConfig(vocab_size=V, context_length=names[f"{prefix}wpe.weight"][1][0], emb_dim=C,
                        n_heads=_default_heads(C, n_heads, reader.where), qkv_bias=True,
                        n_layers=_count_blocks(names, rf"{re.escape(prefix)}h\.(\d+)\."),
                        tie_weights="lm_head.weight" not in names,
                        drop_rate=GPT2_DROP_RATE if drop_rate is None else drop_rate)
    ignore = HF_IGNORED + ((r"lm_head\.weight",) if cfg.tie_weights else ())
    if not cfg.qkv_bias:                   # npgpt's own file: hf_tensors wrote zeros for GPT-2's format
        ignore += (rf"{re.escape(prefix)}h\.\d+\.attn\.c_attn\.bias",)
    return cfg, map_params(reader, cfg, lambda n: hf_source(n, prefix), ignore)


def _open_book(path: Path, n_heads, drop_rate):
    state = torch_state_dict(path)
    reader = TorchReader(state, str(path))
    names = reader.info
    if "tok_emb.weight" not in names or "pos_emb.weight" not in names:
        raise ValueError(f"{path}: expected the book's GPTModel state_dict (tok_emb.weight, pos_emb.weight, "
                         f"trf_blocks.N...), found {sorted(names)[:6]}")
    V, C = names["tok_emb.weight"][1]
    cfg = GPTConfig(vocab_size=V, context_length=names["pos_emb.weight"][1][0], emb_dim=C,
                    n_heads=_default_heads(C, n_heads, str(path)),
                    n_layers=_count_blocks(names, r"trf_blocks\.(\d+)\."),
                    qkv_bias="trf_blocks.0.att.W_query.bias" in names, tie_weights="out_head.weight" not in names,
                    drop_rate=GPT2_DROP_RATE if drop_rate is None else drop_rate)
    return cfg, map_params(reader, cfg, book_source, ignore=(r"trf_blocks\.\d+\.att\.mask",))


def detect_format(path) -> str:
    """'openai', 'hf', 'book' or 'npgpt', from the files a path holds."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p.name for p in path.iterdir())
        if "hparams.json" in files and any(f.endswith(".index") for f in files):
            return "openai"
        weights = {"model.safetensors", "model.safetensors.index.json", "pytorch_model.bin"}
        if "config.json" in files and weights & set(files):
            return "hf"
        raise ValueError(f"{path}: cannot tell which weights this folder holds (found {files[:10]}); expected "
                         "an OpenAI GPT-2 folder (hparams.json, checkpoint, model.ckpt.index, "
                         "model.ckpt.data-00000-of-00001) or a Hugging Face one (config.json and "
                         "model.safetensors or pytorch_model.bin)")
    if not path.is_file():
        if Path(f"{path}.index").is_file():                        # a checkpoint prefix: .../model.ckpt
            return "openai"
        raise FileNotFoundError(f"weights not found: {path}")
    if path.name.endswith(".index") or path.name.startswith("model.ckpt"):
        return "openai"
    with open(path, "rb") as f:
        magic = f.read(8)
    if magic == b"\x89HDF\r\n\x1a\n":
        return "npgpt"
    if path.suffix == ".safetensors":
        return "hf"
    if magic[:2] == b"PK" or path.suffix in (".pth", ".pt", ".bin"):
        names = torch_state_dict(path)
        return "book" if "tok_emb.weight" in names else "hf"
    raise ValueError(f"{path}: not a weight file npgpt reads; expected an npgpt .h5, a .safetensors, a book "
                     ".pth or a Hugging Face pytorch_model.bin, or an OpenAI / Hugging Face GPT-2 folder")


def load_pretrained(path, backend="numpy", dtype="float32", device=None, *, n_heads: int | None = None,
                    drop_rate: float | None = None, verify: bool = True, seed: int = 123):
    """A model with the weights at path (any format of this module's docstring).

    n_heads: for files that do not record it (the book's .pth, a bare .safetensors); default
    emb_dim // 64. drop_rate: dropout for further training (default: the file's, else GPT-2's 0.1).
    verify: check the crc32c of every tensor of an OpenAI checkpoint (about 2 s per GB here).
    """
    path = Path(path)
    kind = detect_format(path)
    with ExitStack() as stack:
        if kind == "openai":
            folder = path if path.is_dir() else path.parent
            cfg, params = _open_openai(stack, folder, n_heads, drop_rate, verify)
        elif kind == "hf":
            cfg, params = _open_hf(stack, path, n_heads, drop_rate)
        elif kind == "book":
            cfg, params = _open_book(path, n_heads, drop_rate)
        else:
            ckpt = stack.enter_context(open_checkpoint(path))
            cfg = ckpt["config"]
            _check_override("n_heads", cfg.n_heads, n_heads, path)
            if drop_rate is not None:
                cfg = GPTConfig.from_dict({**cfg.to_dict(), "drop_rate": drop_rate})
            params = ckpt["params"]
        return build_loaded_model(cfg, params, backend=backend, dtype=dtype, device=device, seed=seed)


def load_tokenizer(path):
    """The tokenizer that comes with the weights at path: encoder.json + vocab.bpe (OpenAI) or
    vocab.json + merges.txt (Hugging Face) beside them, else the bundled GPT-2 one."""
    from .tokenizer import get_tokenizer, tokenizer_from_openai_files
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    for encoder, merges in (("encoder.json", "vocab.bpe"), ("vocab.json", "merges.txt")):
        if (folder / encoder).is_file() and (folder / merges).is_file():
            return tokenizer_from_openai_files(folder / encoder, folder / merges)
    return get_tokenizer()


# ---- writing for Hugging Face ----

def hf_tensors(model) -> dict[str, np.ndarray]:
    """The model's parameters under GPT2LMHeadModel's names and layout (Conv1D weights (in, out)).
    GPT-2 always has a c_attn bias: a model without one (qkv_bias=False) gets zeros, which is the same."""
    cfg, params = model.cfg, model.params()
    out = {}
    for name, p in params.items():
        (source,), kind = hf_source(name)
        out[source] = np.ascontiguousarray(p.T) if kind == "T" else p
        if name.endswith("attn.c_attn.weight") and not cfg.qkv_bias:
            out[source.replace(".weight", ".bias")] = np.zeros(3 * cfg.emb_dim, p.dtype)
    return out


def hf_config(cfg: GPTConfig, dtype) -> dict:
    return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": cfg.vocab_size,
            "n_positions": cfg.context_length, "n_embd": cfg.emb_dim, "n_head": cfg.n_heads,
            "n_layer": cfg.n_layers, "n_inner": None, "activation_function": "gelu_new",
            "resid_pdrop": cfg.drop_rate, "embd_pdrop": cfg.drop_rate, "attn_pdrop": cfg.drop_rate,
            "layer_norm_epsilon": 1e-5, "initializer_range": 0.02, "scale_attn_weights": True,
            "tie_word_embeddings": cfg.tie_weights, "use_cache": True, "dtype": str(np.dtype(dtype)),
            "bos_token_id": 50256 if cfg.vocab_size > 50256 else None,
            "eos_token_id": 50256 if cfg.vocab_size > 50256 else None}


def save_safetensors(model, path) -> Path:
    """One .safetensors file with Hugging Face's names; npgpt's config rides in its metadata, so
    load_pretrained reads the file alone."""
    return write_safetensors(path, hf_tensors(model), {"format": "pt", "npgpt_config": model.cfg.to_json()})


def export_hf(model, out_dir, tokenizer_from=None) -> Path:
    """Write config.json + model.safetensors for transformers.GPT2LMHeadModel.from_pretrained(out_dir).

    An untied head (the book's 124M model) is written as lm_head.weight with
    tie_word_embeddings: false, which GPT2LMHeadModel honours. tokenizer_from: a folder whose
    encoder.json + vocab.bpe (or vocab.json + merges.txt) are copied as vocab.json + merges.txt."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"{out_dir}: exists and is not a folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    save_safetensors(model, out_dir / "model.safetensors")
    config = json.dumps(hf_config(model.cfg, model.dtype), indent=2) + "\n"
    atomic_write(out_dir / "config.json", lambda tmp: Path(tmp).write_text(config))
    if tokenizer_from is not None:
        src = Path(tokenizer_from)
        src = src if src.is_dir() else src.parent
        for names in (("encoder.json", "vocab.bpe"), ("vocab.json", "merges.txt")):
            if all((src / n).is_file() for n in names):
                for n, target in zip(names, ("vocab.json", "merges.txt")):
                    if (src / n).resolve() != (out_dir / target).resolve():
                        shutil.copyfile(src / n, out_dir / target)
                break
    return out_dir
