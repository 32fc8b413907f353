"""Token shards on disk: llm.c's .bin format, written atomically and read memory-mapped.

A shard is a header of 256 little-endian int32, [MAGIC, VERSION, n_tokens, 0, ...], then n_tokens
little-endian uint16 token ids: the files llm.c's dev/data scripts write. A token folder holds one
set of such files whose names say their split, whatever the rest of the name: <name>_val_NNNNNN.bin
and <name>_train_NNNNNN.bin (npgpt prepare writes them, with a <name>_manifest.json beside; so does
llm.c's fineweb.py), llm.c's tiny_shakespeare_val.bin and TinyStories_train.bin, ...; or nanoGPT's
headerless uint16 train.bin and val.bin.

TokenDir opens such a folder and maps every file with np.memmap: no file is read whole, a batch
reads only the pages its windows touch. TrainBatches draws a step's windows from (seed, step) alone,
at random or one pass over the data an epoch, so a resumed run sees exactly the batches of an
uninterrupted one; ValBatches tiles the val shards from the start.

Shape letters: B windows per batch (per rank), T time (max_length), W world size (ranks).
"""
from __future__ import annotations

import hashlib
import json
import mmap
import re
from pathlib import Path

import numpy as np

from ..files import atomic_write

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
SAMPLINGS = ("random", "epoch")          # how TrainBatches draws a step's windows


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
    size = path.stat().st_size
    if size < HEADER_BYTES:
        raise ValueError(f"{path}: {size} bytes, shorter than the {HEADER_BYTES}-byte header of an llm.c shard")
    with open(path, "rb") as f:
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
    size = path.stat().st_size
    if size % 2:
        raise ValueError(f"{path}: {size} bytes, an odd number; expected uint16 tokens, 2 bytes each")
    return _map(path, 0, size // 2)


def _positive(**values) -> None:
    for key, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
            raise ValueError(f"{key} must be a positive integer, got {value!r}")


class TrainBatches:
    """Training batches by step over the train shards: batch(step) -> (inputs, targets).

    Each step takes W * B windows of T + 1 tokens, each inside one shard, and rank r takes the r-th
    B of them. Which windows, sampling says:

    random (the default): W * B distinct start positions drawn from np.random.default_rng([seed, step])
    among every start whose window lies inside one shard, anew each step, so some tokens come in
    several steps and some in none.

    epoch: one pass over the data per epoch. An epoch's windows are the n windows that start at
    multiples of T in each shard (n = the sum of (len - 1) // T over the shards; they overlap by one
    token, so each token after a shard's first is a target once an epoch, but for its last
    (len - 1) % T, which are never; ValBatches cuts the val shards so), taken in the order
    np.random.default_rng([seed, epoch, 1]).permutation(n) (1, not 0: NumPy's SeedSequence reads
    [seed, epoch, 0] as [seed, epoch], random's stream at step epoch). The
    run's windows follow one another across steps: window i of step s (i < W * B) is the run's
    window g = s * W * B + i, the window at g % n in epoch g // n's order. A step across the end of
    an epoch takes the last windows of one order and the first of the next (a window may then come
    twice in that step). The current epoch's order is kept: n int64, 8 bytes a window (10B tokens
    at T = 1024 are about 10M windows, 80 MB). Needs n >= W * B.

    Either way a step's windows depend on nothing but (seed, step), and NumPy's version (its
    Generator streams may change between releases: resume under the same one), so a resumed run
    sees the batches of an uninterrupted one and W ranks of B see those of one process of W * B.
    Batches are plain NumPy arrays; pass out= (an int64 (B, T + 1) array, say a view of pinned host
    memory) to have the windows written there instead.
    """

    def __init__(self, shards: list[np.ndarray], batch_size: int, max_length: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1, files: list | None = None, sampling: str = "random"):
        _positive(batch_size=batch_size, max_length=max_length, world_size=world_size)
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank!r}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        if sampling not in SAMPLINGS:
            raise ValueError(f"sampling must be one of {', '.join(SAMPLINGS)}, got {sampling!r}")
        self.shards, self.batch_size, self.max_length = shards, batch_size, max_length
        self.seed, self.rank, self.world_size, self.sampling = seed, rank, world_size, sampling
        lengths = np.array([len(s) for s in shards], dtype=np.int64)
        if sampling == "random":
            self.windows = np.maximum(lengths - max_length, 0)      # start positions per shard
        else:
            self.windows = np.maximum((lengths - 1) // max_length, 0)  # windows at multiples of T per shard
        self.ends = np.cumsum(self.windows)                      # window numbers [end - windows, end)
        self.num_windows = int(self.ends[-1]) if len(shards) else 0
        self._epoch, self._order = None, None                    # epoch mode: the last epoch's order
        if self.num_windows == 0:
            where = files[int(lengths.argmax())] if files and len(shards) else "train"
            raise ValueError(f"{where}: the train shards are too short: the longest has "
                             f"{lengths.max(initial=0)} tokens, a window needs max_length + 1 = {max_length + 1}")
        if self.num_windows < world_size * batch_size:
            held = "windows" if sampling == "random" else "non-overlapping windows (an epoch)"
            raise ValueError(f"the train shards hold {self.num_windows} {held} of {max_length + 1} tokens, "
                             f"a step needs {world_size * batch_size} distinct ones "
                             f"(world_size {world_size} x batch_size {batch_size})")

    def order(self, epoch: int) -> np.ndarray:
        """Epoch mode: the epoch's window numbers in the order it takes them, (n,) int64."""
        if epoch != self._epoch:
            rng = np.random.default_rng([self.seed, epoch, 1])    # the 1 keeps it apart from random's streams
            self._epoch, self._order = epoch, rng.permutation(self.num_windows)
        return self._order

    def starts(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """(shard index, offset in that shard) of this rank's B windows at step: (B,), (B,)."""
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
            raise ValueError(f"step must be a non-negative integer, got {step!r}")
        B, W = self.batch_size, self.world_size
        if self.sampling == "random":
            rng = np.random.default_rng([self.seed, step])
            drawn = rng.choice(self.num_windows, size=W * B, replace=False)     # (W * B,) distinct
            mine = drawn[self.rank * B:(self.rank + 1) * B]                        # (B,)
        else:
            first = int(step) * W * B + self.rank * B                           # the run's window number
            epoch, place = np.divmod(np.arange(first, first + B, dtype=np.int64), self.num_windows)  # (B,) each
            mine = np.empty(B, dtype=np.int64)
            for e in np.unique(epoch):                                          # one, or two across an epoch's end
                here = epoch == e
                mine[here] = self.order(int(e))[place[here]]
        shard = np.searchsorted(self.ends, mine, side="right")
        number = mine - (self.ends[shard] - self.windows[shard])                # window number in its shard
        return shard, number if self.sampling == "random" else number * self.max_length

    def batch(self, step: int, out: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """This rank's (inputs, targets) at step: int64 arrays (B, T), targets shifted by one token."""
        B, T = self.batch_size, self.max_length
        if out is None:
            out = np.empty((B, T + 1), dtype=np.int64)
        elif out.shape != (B, T + 1) or out.dtype != np.int64:
            raise ValueError(f"out must be an int64 array of shape {(B, T + 1)}, got {out.dtype} {out.shape}")
        for row, (shard, offset) in enumerate(zip(*self.starts(step))):
            out[row] = self.shards[shard][offset:offset + T + 1]
        return out[:, :-1], out[:, 1:]                                         # (B, T) each


class ValBatches:
    """Validation batches: the val shards cut from their start into windows of T + 1 tokens that
    advance by T (each token after a shard's first is a target once), in order, B to a batch.
    All windows when num_batches is None, else those of the first num_batches batches (fewer when
    the val shards hold fewer); the last batch may be smaller. Iterate it again for the same batches.
    Data-parallel: a batch is W * B windows and rank r gets rows r*B .. r*B + B - 1 of it (maybe
    none of the last), so W ranks evaluate exactly the batches of one process with batch W * B."""

    def __init__(self, shards: list[np.ndarray], batch_size: int, max_length: int,
                 num_batches: int | None = None, files: list | None = None, rank: int = 0, world_size: int = 1):
        _positive(batch_size=batch_size, max_length=max_length, world_size=world_size)
        self.rank, self.rows = rank, slice(rank * batch_size, (rank + 1) * batch_size)
        batch_size *= world_size
        if num_batches is not None:
            _positive(num_batches=num_batches)
        self.shards, self.batch_size, self.max_length = shards, batch_size, max_length
        self.windows = np.array([max((len(s) - 1) // max_length, 0) for s in shards], dtype=np.int64)
        self.ends = np.cumsum(self.windows)
        total = int(self.ends[-1]) if len(shards) else 0
        where = files[0] if files else "val"
        if total == 0:
            raise ValueError(f"{where}: the val shards are too short: the longest has "
                             f"{max((len(s) for s in shards), default=0)} tokens, a window needs "
                             f"max_length + 1 = {max_length + 1}")
        self.num_windows = total if num_batches is None else min(num_batches * batch_size, total)

    def __len__(self) -> int:
        return -(-self.num_windows // self.batch_size)

    def __iter__(self):
        T = self.max_length
        for first in range(0, self.num_windows, self.batch_size):
            number = np.arange(first, min(first + self.batch_size, self.num_windows))   # (B,)
            shard = np.searchsorted(self.ends, number, side="right")
            offset = (number - (self.ends[shard] - self.windows[shard])) * T
            window = np.empty((len(number), T + 1), dtype=np.int64)                     # (B, T+1)
            for row, (s, o) in enumerate(zip(shard, offset)):
                window[row] = self.shards[s][o:o + T + 1]
            window = window[self.rows]                                                  # this rank's
            yield window[:, :-1], window[:, 1:]                                         # (B, T) each


def _natural(name: str) -> list:
    """Sort key that orders the numbers in a file name by value: shard 2 before shard 10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _has_header(path: Path) -> bool:
    """Whether a file starts with one of llm.c's magic numbers (then it is no headerless nanoGPT file)."""
    with open(path, "rb") as f:
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
        try:
            listed = {(s["file"], s["tokens"]) for s in json.loads(manifest.read_text())["shards"]}
        except (ValueError, KeyError, TypeError) as e:
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
