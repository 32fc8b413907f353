"""TensorFlow's tensor bundle (model.ckpt.index + model.ckpt.data-NNNNN-of-NNNNN), read without TensorFlow.

The .index file is a LevelDB-format table (an SSTable): data blocks of prefix-compressed
(key, value) entries, an index block pointing at them, and a 48-byte footer pointing at the
index block. Each value is a protobuf BundleEntryProto saying where a tensor's raw bytes lie in
the .data shards, with their crc32c; the entry with key "" is the BundleHeaderProto. Blocks and
tensors are checksummed with CRC-32C, stored masked. Protobuf and the table format are parsed
here by hand, as far as tensor bundles use them. The footer has no checksum: anything wrong in
what it points to is a ValueError naming the file, as is any tensor whose bytes lie outside its
.data file.
"""
from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np

from ..files import check_regular, open_regular, read_bounded
from .lazy import Reader, read_exact

MAX_INDEX_BYTES = 64 << 20      # GPT-2 1.5B's index is 20 kB: a name and a few numbers per tensor

# ---- CRC-32C ----


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


# ---- protobuf ----

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


# ---- the .index table ----

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
    data = read_bounded(path, "a TensorFlow checkpoint index", MAX_INDEX_BYTES)
    if len(data) < 48 or int.from_bytes(data[-8:], "little") != TABLE_MAGIC:
        raise ValueError(f"{path}: not a TensorFlow checkpoint index (no table magic number at its end)")
    footer = data[-48:]
    try:
        _, pos = _varint(footer, 0)                                   # metaindex handle: no filters here
        _, pos = _varint(footer, pos)
        entries = {}
        for _, handle in _block_entries(_table_block(data, footer[pos:], str(path))):
            for key, value in _block_entries(_table_block(data, handle, str(path))):
                entries[key.decode("utf-8")] = value
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: a tensor name is not UTF-8 ({e.reason}); the index is damaged") from None
    except ValueError as e:
        if str(e).startswith(str(path)):
            raise
        raise ValueError(f"{path}: damaged TensorFlow checkpoint index ({e})") from None
    return entries


# ---- the bundle ----

def checkpoint_prefix(folder: Path) -> Path:
    """The bundle a checkpoint folder holds: the one its `checkpoint` file names
    ('model_checkpoint_path: "model.ckpt"'), else model.ckpt, else the folder's only *.index."""
    prefix = folder / "model.ckpt"
    if (folder / "checkpoint").is_file():
        text = read_bounded(folder / "checkpoint", "a TensorFlow checkpoint file", 1 << 20)
        m = re.search(r'^model_checkpoint_path:\s*"(.*)"', text.decode("utf-8", "replace"), re.M)
        if m:
            prefix = folder / Path(m.group(1)).name
    if not Path(f"{prefix}.index").is_file():
        indexes = sorted(p for p in folder.glob("*.index") if p.is_file())
        if len(indexes) != 1:
            raise ValueError(f"{folder}: expected one TensorFlow index (model.ckpt.index), found {indexes}")
        prefix = indexes[0].with_suffix("")
    return prefix


TF_DTYPES = {1: "f4", 2: "f8", 3: "i4", 9: "i8", 19: "f2"}        # DT_FLOAT, DT_DOUBLE, ...


class TFBundleReader(Reader):
    """BundleEntryProto: dtype = 1, shape = 2 (TensorShapeProto: dim = 2, Dim: size = 1),
    shard_id = 3, offset = 4, size = 5, crc32c = 6 (fixed32, masked), slices = 7.
    The entry with key "" is the BundleHeaderProto: num_shards = 1, endianness = 2 (0 little)."""

    def __init__(self, prefix: Path, verify: bool = True):
        super().__init__()
        self.where, self.verify, self.files, self.entries = str(prefix), verify, {}, {}
        table = read_table(f"{prefix}.index")
        try:
            self._entries(prefix, table)
        except (ValueError, TypeError) as e:    # a protobuf that does not parse, or fields of the wrong type
            if str(e).startswith(str(prefix)):
                raise
            raise ValueError(f"{prefix}.index: damaged TensorFlow checkpoint index ({e})") from None

    def _entries(self, prefix: Path, table: dict) -> None:
        header = _proto(table.pop("", b""))
        num_shards, order = header.get(1, [1])[0], ">" if header.get(2, [0])[0] else "<"
        sizes = {}                                     # data file -> its size
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
            path = Path(f"{prefix}.data-{shard:05d}-of-{num_shards:05d}")
            if path not in sizes:
                sizes[path] = check_regular(path, "a TensorFlow checkpoint's data file")
            if offset + size > sizes[path]:
                raise ValueError(f"{path}: {name} lies at bytes {offset}..{offset + size}, past the end of the "
                                 f"file ({sizes[path]} bytes)")
            self.info[name] = (dtype.newbyteorder("="), shape)
            self.entries[name] = (dtype, path, offset, e.get(6, [None])[0])
        self.file_bytes = sum(sizes.values())

    def _read(self, name, out):
        dtype, path, offset, masked = self.entries[name]
        if path not in self.files:
            self.files[path] = open_regular(path, "a TensorFlow checkpoint's data file", buffering=0)
        read_exact(self.files[path], offset, out)
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
