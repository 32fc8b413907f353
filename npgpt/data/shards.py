"""Token shards on disk: llm.c's .bin format, written atomically and read memory-mapped.

A shard is a header of 256 little-endian int32, [MAGIC, VERSION, n_tokens, 0, ...], then n_tokens
little-endian uint16 token ids: the files llm.c's dev/data scripts write. A token folder holds one
set of such files whose names say their split, whatever the rest of the name: <name>_val_NNNNNN.bin
and <name>_train_NNNNNN.bin (npgpt prepare writes them, with a <name>_manifest.json beside; so does
llm.c's fineweb.py), llm.c's tiny_shakespeare_val.bin and TinyStories_train.bin, ...; or nanoGPT's
headerless uint16 train.bin and val.bin.

TokenDir opens such a folder and maps every file with np.memmap: no file is read whole, a batch
reads only the pages its windows touch. Its batches by step are batches.py's. Every header is
checked against its file's size before a file is mapped, and only regular files are opened.
"""
from __future__ import annotations

import hashlib
import mmap
import os
import re
from pathlib import Path

import numpy as np

from ..files import atomic_write, check_regular, load_json, open_regular
from .batches import TrainBatches, ValBatches

MAGIC, VERSION = 20240520, 1            # llm.c's magic number; version 1 holds uint16 GPT-2 tokens
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
MAX_SHARD_TOKENS = 2**31 - 1            # the header's token count is an int32
SHARD_RE = re.compile(r"(?P<name>.+)_(?P<split>train|val)_(?P<index>\d+)\.bin")    # what npgpt prepare writes
# What TokenDir reads: any *train*.bin or *val*.bin, the greedy prefix making the last word the split.
SPLIT_RE = re.compile(r"(?P<prefix>.*)(?P<split>train|val)(?P<rest>.*)\.bin")
RAW_NAMES = ("train.bin", "val.bin")    # nanoGPT's, headerless (an llm.c header makes them llm.c files)
# llm.c's other files, so that one given as a token shard is named: its Llama 3 token shards
# (dev/data/data_common.py, "llama-3": version 7, uint32 tokens) and its model files (train_gpt2.c)
LLAMA3_MAGIC, LLAMA3_VERSION, LLMC_MODEL_MAGIC = 20240801, 7, 20240326
LLMC_MAGICS = {m.to_bytes(4, "little") for m in (MAGIC, LLAMA3_MAGIC, LLMC_MODEL_MAGIC)}
SPLITS = ("val", "train")


def shard_name(name: str, split: str, index: int) -> str:
    """llm.c's file name of one shard: shard_name("fineweb", "train", 1) == "fineweb_train_000001.bin"."""
    return f"{name}_{split}_{index:06d}.bin"


def write_shard(path: str | Path, tokens, chunk_tokens: int = 1 << 22) -> str:
    """Write tokens (a 1-D integer array, a memmap slice is fine) as an llm.c shard at path,
    atomically and chunk by chunk (memory stays at chunk_tokens). Returns the file's sha256."""
    tokens = np.asarray(tokens)
    if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(f"{path}: tokens must be a 1-D integer array, got shape {tokens.shape} "
                         f"dtype {tokens.dtype}")
    if len(tokens) > MAX_SHARD_TOKENS:
        raise ValueError(f"{path}: {len(tokens)} tokens, a shard holds at most {MAX_SHARD_TOKENS}")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = MAGIC, VERSION, len(tokens)
    digest = hashlib.sha256(header.tobytes())

    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(header.tobytes())
            for start in range(0, len(tokens), chunk_tokens):
                chunk = tokens[start:start + chunk_tokens]
                if chunk.dtype != np.dtype("<u2"):
                    if chunk.size and (chunk.min() < 0 or chunk.max() > 0xFFFF):
                        raise ValueError(f"{path}: token ids must fit in uint16 (0..65535), "
                                         f"got {chunk.min()}..{chunk.max()}")
                    chunk = chunk.astype("<u2")
                data = memoryview(np.ascontiguousarray(chunk)).cast("B")
                f.write(data)
                digest.update(data)
    atomic_write(path, write)
    return digest.hexdigest()


def _map(path: Path, offset: int, n_tokens: int) -> np.ndarray:
    if n_tokens == 0:                   # mmap refuses a zero-length map
        return np.zeros(0, dtype="<u2")
    return np.memmap(path, dtype="<u2", mode="r", offset=offset, shape=(n_tokens,))


def advise_random(tokens: np.ndarray) -> None:
    """Tell the kernel a memmap is read at random places: no readahead, no mapping of the pages
    around a fault. Batch windows then bring in only the pages they read; without it each 2 KiB
    window mapped about 64 KiB (measured: 4000 windows from a 2 GiB file grew RSS by 250 MB, with
    it by 30 MB)."""
    mapping = getattr(tokens, "_mmap", None)
    if mapping is not None and hasattr(mmap, "MADV_RANDOM"):
        mapping.madvise(mmap.MADV_RANDOM)


def read_shard(path: str | Path) -> np.ndarray:
    """The tokens of one llm.c shard, memory-mapped read-only (uint16, shape (n_tokens,)), after
    checking its header: magic number, version, and the token count against the file's size."""
    path = Path(path)
    with open_regular(path, "an llm.c token shard") as f:
        size = os.fstat(f.fileno()).st_size
        if size < HEADER_BYTES:
            raise ValueError(f"{path}: {size} bytes, shorter than the {HEADER_BYTES}-byte header of an llm.c shard")
        header = np.frombuffer(f.read(HEADER_BYTES), dtype="<i4")
    if header[0] == LLAMA3_MAGIC:
        raise ValueError(f"{path}: an llm.c Llama 3 token shard (magic {LLAMA3_MAGIC}, version {header[1]}, uint32 "
                         f"tokens, as dev/data's --model=llama-3 writes); npgpt trains GPT-2, whose shards have "
                         f"magic {MAGIC}, version {VERSION}: write them with --model=gpt-2, or npgpt prepare")
    if header[0] == LLMC_MODEL_MAGIC:
        raise ValueError(f"{path}: an llm.c model file (magic {LLMC_MODEL_MAGIC}, GPT-2 weights), not a token "
                         "shard; give it to --init-from or npgpt convert, and --data a folder of token shards")
    if header[0] != MAGIC:
        raise ValueError(f"{path}: magic number {header[0]}, expected {MAGIC} (an llm.c token shard)")
    if header[1] != VERSION:
        raise ValueError(f"{path}: version {header[1]}, expected {VERSION} (an llm.c GPT-2 token shard: uint16 "
                         "tokens)")
    n_tokens = int(header[2])
    if n_tokens < 0 or size != HEADER_BYTES + 2 * n_tokens:
        raise ValueError(f"{path}: the header says {n_tokens} tokens, {HEADER_BYTES + 2 * n_tokens} bytes "
                         f"in all, but the file has {size} bytes (truncated or not a shard)")
    return _map(path, HEADER_BYTES, n_tokens)


def read_raw_tokens(path: str | Path) -> np.ndarray:
    """The tokens of one of nanoGPT's headerless uint16 files (train.bin, val.bin), memory-mapped."""
    path = Path(path)
    size = check_regular(path, "a file of uint16 tokens")
    if size % 2:
        raise ValueError(f"{path}: {size} bytes, an odd number; expected uint16 tokens, 2 bytes each")
    return _map(path, 0, size // 2)


def _natural(name: str) -> list:
    """Sort key that orders the numbers in a file name by value: shard 2 before shard 10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _has_header(path: Path) -> bool:
    """Whether a file starts with one of llm.c's magic numbers (then it is no headerless nanoGPT file)."""
    with open_regular(path, "a token file") as f:
        return f.read(4) in LLMC_MAGICS


def _in_order(found: dict[str, list]) -> dict[str, list[Path]]:
    """A set's files by split, numbers in their names ordered by value."""
    return {s: sorted((p for _, p in found[s]), key=lambda p: _natural(p.name)) for s in SPLITS}


def _listing(files, most: int = 3) -> str:
    """The names of files, the first few of them: "a.bin, b.bin, c.bin and 5 more"."""
    names = [p.name for p in files]
    return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")


class TokenDir:
    """A folder of token files, every one memory-mapped: files in llm.c's format (the header)
    whose names hold "train" or "val" (npgpt prepare's and fineweb's NAME_train_000001.bin, llm.c's
    tiny_shakespeare_val.bin and TinyStories_train.bin, ...), or nanoGPT's headerless train.bin
    and val.bin. A file's split is the last "train" or "val" in its name, its set the part of the
    name before that (less a trailing "_", "-" or "."); a folder holds one set (name= picks one
    where it holds several). .val and .train are the uint16 token arrays in file order (numbers
    in the names by value), .files their paths."""

    def __init__(self, path: str | Path, name: str | None = None):
        self.path = path = Path(path)
        if not path.is_dir():
            raise ValueError(f"{path}: not a folder (expected a folder of token shards)")
        sets: dict[str, dict[str, list]] = {}        # set name -> split -> [(match, path)]
        raw = {}                                     # nanoGPT's headerless files: split -> path
        for p in sorted(path.iterdir()):
            m = SPLIT_RE.fullmatch(p.name)
            if not m or p.name.startswith(".") or not p.is_file():
                continue
            if p.name in RAW_NAMES and not _has_header(p):
                raw[m["split"]] = p
            else:
                sets.setdefault(m["prefix"].rstrip("_-."), {s: [] for s in SPLITS})[m["split"]].append((m, p))
        if name is not None:
            if name not in sets:
                raise ValueError(f"{path}: no {name}_val_*.bin or {name}_train_*.bin shards "
                                 f"(shard sets here: {sorted(sets) or 'none'})")
            sets = {name: sets[name]}
        elif len(sets) > 1:
            described = "; ".join(f"{key or '(no name)'}: {_listing(sum(_in_order(found).values(), []))}"
                                  for key, found in sorted(sets.items()))
            raise ValueError(f"{path}: holds {len(sets)} sets of token files ({described}); keep one set per "
                             "folder, or pass a name to pick one")
        if not sets and not raw:
            raise ValueError(f"{path}: no token shards (expected llm.c-format *train*.bin and *val*.bin files: "
                             "npgpt prepare's and fineweb's NAME_train_000001.bin, llm.c's "
                             "tiny_shakespeare_train.bin, ...; or nanoGPT's train.bin and val.bin)")
        if sets:
            if name is None and raw:
                llmc = _listing(sum(_in_order(*sets.values()).values(), []))
                nanogpt = _listing(raw[s] for s in ("train", "val") if s in raw)
                raise ValueError(f"{path}: holds both llm.c-format files ({llmc}) and nanoGPT's headerless "
                                 f"{nanogpt}; keep one kind per folder")
            (self.name, found), = sets.items()
            for split in SPLITS:
                if not found[split]:
                    other, = {s for s in SPLITS if s != split}
                    m = found[other][0][0]
                    expected = f"{m['prefix']}{split}{re.sub(r'[0-9]+', '*', m['rest'])}.bin"
                    raise ValueError(f"{path}: no {expected} shard; a token folder needs both a val and a "
                                     f"train part (found {_listing(_in_order(found)[other])})")
            self.format = "llm.c"
            self.files = _in_order(found)
            self.val, self.train = ([read_shard(p) for p in self.files[s]] for s in SPLITS)
            self._check_manifest()
        else:
            for split in SPLITS:
                if split not in raw:
                    raise ValueError(f"{path / (split + '.bin')}: missing; nanoGPT's format needs both train.bin "
                                     "and val.bin")
            if (path / "meta.pkl").exists():     # a pickle: never opened, the run is refused instead
                raise ValueError(f"{path / 'meta.pkl'}: nanoGPT's character-level vocabulary (its prepare.py "
                                 "for shakespeare_char); npgpt trains GPT-2's BPE tokens only: tokenize the text "
                                 "with npgpt prepare, or use nanoGPT's BPE data (shakespeare, openwebtext)")
            self.name, self.format = None, "nanogpt"
            self.files = {s: [raw[s]] for s in SPLITS}
            self.val, self.train = [read_raw_tokens(raw["val"])], [read_raw_tokens(raw["train"])]
        for tokens in self.train:
            advise_random(tokens)

    def _check_manifest(self) -> None:
        """Where npgpt prepare left a manifest, the folder must hold exactly its shards: catches a
        set left incomplete by an interrupted run, or shards removed or replaced since."""
        manifest = self.path / f"{self.name}_manifest.json"
        if not manifest.is_file():
            return
        value = load_json(manifest, "an npgpt manifest")
        try:
            listed = {(s["file"], s["tokens"]) for s in value["shards"]}
        except (KeyError, TypeError) as e:
            raise ValueError(f"{manifest}: not a readable npgpt manifest ({e})") from None
        here = {(p.name, len(a)) for s in SPLITS for p, a in zip(self.files[s], getattr(self, s))}
        if listed != here:
            differ = sorted(listed ^ here)[0]
            raise ValueError(f"{manifest}: lists {len(listed)} shards, the folder has {len(here)} that "
                             f"differ (first: {differ[0]} with {differ[1]} tokens); rerun npgpt prepare")

    @property
    def num_tokens(self) -> dict[str, int]:
        return {s: sum(len(a) for a in getattr(self, s)) for s in SPLITS}

    def train_batches(self, batch_size: int, max_length: int, seed: int = 0, rank: int = 0,
                      world_size: int = 1, sampling: str = "random") -> TrainBatches:
        """Training batches by step, sampling "random" or "epoch" (see TrainBatches)."""
        return TrainBatches(self.train, batch_size, max_length, seed, rank, world_size,
                            files=self.files["train"], sampling=sampling)

    def val_batches(self, batch_size: int, max_length: int, num_batches: int | None = None, rank: int = 0,
                    world_size: int = 1) -> ValBatches:
        """The val shards' batches, in order from the start (see ValBatches)."""
        return ValBatches(self.val, batch_size, max_length, num_batches, files=self.files["val"], rank=rank,
                          world_size=world_size)
