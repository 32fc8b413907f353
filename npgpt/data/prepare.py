"""npgpt prepare: a corpus of any size on disk -> llm.c token shards, in bounded memory.

Pass 1 streams the documents (sources.py) in batches of about BATCH_CHARS characters through
tiktoken's encode_ordinary_batch on `workers` threads, reading the next batch meanwhile, and
appends each document's tokens, after one <|endoftext|> (50256) as llm.c does, to a temporary
file in the output folder, and each document's first token position to another. Only then is
the total known, so pass 2 cuts that stream into the val shard (the first documents, up to
val_fraction of all tokens) and train shards of at most shard_tokens, each written atomically
from a memory-mapped slice, last shard first: the stream is truncated after each, so the disk
holds the tokens about once, not twice. The manifest comes last.
"""
from __future__ import annotations

import json
import os
import re
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..tokenizer import ENDOFTEXT_ID, get_tokenizer
from ..files import atomic_write
from .shards import HEADER_BYTES, MAGIC, MAX_SHARD_TOKENS, SHARD_RE, VERSION, shard_name, write_shard
from .sources import input_files, read_pieces

BATCH_CHARS = 4 << 20
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def default_name(path: str | os.PathLike) -> str:
    """The shard name for a corpus at path: its file or folder name less .txt/.jsonl/.gz."""
    base = Path(os.path.abspath(path)).name
    for suffix in (".gz", ".jsonl", ".txt"):
        if base.lower().endswith(suffix):
            base = base[:-len(suffix)]
    return re.sub(r"[^A-Za-z0-9._-]+", "_", base).strip("._-") or "corpus"


def val_split(doc_starts: np.ndarray, n_tokens: int, val_fraction: float) -> int:
    """How many tokens the val shard takes from the front of the stream: the first whole documents
    that hold at most val_fraction of n_tokens (and at least one token), or, where the first
    document alone holds more, that many tokens of it. doc_starts: each document's first token
    position, ascending, doc_starts[0] == 0 (searched in place: a memmap is not read whole)."""
    target = max(1, int(val_fraction * n_tokens))
    last = int(np.searchsorted(doc_starts, target, side="right")) - 1    # last document starting <= target
    return int(doc_starts[last]) if last >= 1 else target


def _check_settings(val_fraction, shard_tokens, workers) -> None:
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be a number between 0 and 1 (exclusive), got {val_fraction!r}")
    for key, value, most in (("shard_tokens", shard_tokens, MAX_SHARD_TOKENS), ("workers", workers, 1024)):
        if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= most:
            raise ValueError(f"{key} must be an integer from 1 to {most}, got {value!r}")


def _outputs(out: Path, name: str) -> list[Path]:
    """The files of an earlier run of the same name in out: its shards and its manifest."""
    if not out.is_dir():
        return []
    return sorted(p for p in out.iterdir() if p.name == f"{name}_manifest.json"
                  or ((m := SHARD_RE.fullmatch(p.name)) and m["name"] == name))


def _temp_file(out: Path, prefix: str) -> Path:
    fd, path = tempfile.mkstemp(dir=out, prefix=prefix, suffix=".tmp")
    os.close(fd)
    return Path(path)


def _batches(files: list[Path], on_bytes):
    """Lists of (piece, starts_document), about BATCH_CHARS characters each, in corpus order."""
    batch, chars = [], 0
    for path in files:
        for piece, first in read_pieces(path, on_bytes):
            batch.append((piece, first))
            chars += len(piece)
            if chars >= BATCH_CHARS:
                yield batch
                batch, chars = [], 0
    if batch:
        yield batch


def _tokenize(files: list[Path], tokens_out, starts_out, workers: int, bar) -> tuple[int, int]:
    """Pass 1: every document's tokens, each after one <|endoftext|>, appended to tokens_out
    (uint16) and its first position to starts_out (int64). Returns (n_tokens, n_documents)."""
    enc = get_tokenizer()
    n_tokens = n_docs = 0

    def write(future, firsts):
        nonlocal n_tokens, n_docs
        flat, starts = [], []
        for ids, first in zip(future.result(), firsts):
            if first:
                starts.append(n_tokens + len(flat))
                flat.append(ENDOFTEXT_ID)
            flat += ids
        np.array(flat, dtype="<u2").tofile(tokens_out)
        np.array(starts, dtype="<i8").tofile(starts_out)
        n_tokens, n_docs = n_tokens + len(flat), n_docs + len(starts)
        bar.set_postfix_str(f"{n_tokens / 1e6:,.2f}M tokens", refresh=False)

    with ThreadPoolExecutor(1) as encoder:          # encodes one batch while the next is read
        in_flight = None
        for batch in _batches(files, bar.update):
            future = encoder.submit(enc.encode_ordinary_batch, [piece for piece, _ in batch], num_threads=workers)
            if in_flight:
                write(*in_flight)
            in_flight = future, [first for _, first in batch]
        if in_flight:
            write(*in_flight)
    return n_tokens, n_docs


def _cut(stream: Path, n_tokens: int, n_val: int, out: Path, name: str, shard_tokens: int,
         written: list[Path]) -> list[dict]:
    """Pass 2: the stream's val part, then its train part, in shards of at most shard_tokens,
    written last first, the stream truncated behind each. Appends each path to written."""
    spans = []                                      # (split, index, first token, end)
    for split, lo, hi in (("val", 0, n_val), ("train", n_val, n_tokens)):
        for a in range(lo, hi, shard_tokens):
            spans.append((split, len(spans), a, min(a + shard_tokens, hi)))
    shards = [None] * len(spans)
    for split, index, a, b in reversed(spans):
        path = out / shard_name(name, split, index)
        tokens = np.memmap(stream, dtype="<u2", mode="r", offset=2 * a, shape=(b - a,))
        digest = write_shard(path, tokens)
        written.append(path)
        del tokens                                  # unmapped before the file shrinks under it
        os.truncate(stream, 2 * a)
        shards[index] = {"file": path.name, "split": split, "tokens": b - a, "sha256": digest}
    return shards


def prepare(inputs, out_dir: str | os.PathLike, *, name: str | None = None, val_fraction: float = 0.005,
            shard_tokens: int = 100_000_000, workers: int = 2, progress: bool = True,
            overwrite: bool = False) -> dict:
    """Tokenise a corpus into llm.c shards in out_dir and return the manifest written beside them.

    inputs: one path or a list: .txt (a document), .jsonl (a document per line, its "text"),
    either gzipped, or folders of them (recursively). Files are taken in sorted path order,
    whatever workers is. Writes <name>_val_000000.bin, <name>_train_000001.bin, ... and
    <name>_manifest.json (name: default_name(first input)). Refuses, naming the file, to replace
    an earlier run's files of the same name unless overwrite=True; bad input is a ValueError
    naming the file, and leaves no shard or temporary file behind.
    """
    inputs = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    if not inputs:
        raise ValueError("prepare needs at least one input file or folder")
    _check_settings(val_fraction, shard_tokens, workers)
    per_input = [input_files([given]) for given in inputs]
    files = sorted(set().union(*per_input))
    name = default_name(inputs[0]) if name is None else name
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise ValueError(f"name must be letters, digits, '.', '_' or '-', not starting with '.', '_' "
                         f"or '-'; got {name!r}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out}: not a folder")
    old = _outputs(out, name)
    if old and not overwrite:
        raise FileExistsError(f"{old[0]}: already exists; give --overwrite (in Python: overwrite=True) to replace "
                              f"the {name!r} shards in {out}")
    out.mkdir(parents=True, exist_ok=True)

    sizes = {f: f.stat().st_size for f in files}
    bar = tqdm(total=sum(sizes.values()), unit="B", unit_scale=True, desc=f"prepare {name}",
               disable=not progress, mininterval=0.5)
    temps = [_temp_file(out, f".{name}_{part}.") for part in ("tokens", "starts")]
    written: list[Path] = []
    try:
        with open(temps[0], "wb") as tokens_out, open(temps[1], "wb") as starts_out:
            n_tokens, n_docs = _tokenize(files, tokens_out, starts_out, workers, bar)
        if n_tokens < 2:
            raise ValueError(f"{', '.join(map(str, inputs))}: {n_docs} documents, {n_tokens} tokens; "
                             "a val and a train shard need at least 2")
        n_val = val_split(np.memmap(temps[1], dtype="<i8", mode="r", shape=(n_docs,)), n_tokens, val_fraction)
        for p in old:                               # the old set goes only once the new stream is whole
            p.unlink()
        bar.set_description(f"prepare {name}: writing shards")
        shards = _cut(temps[0], n_tokens, n_val, out, name, shard_tokens, written)
        manifest = {
            "name": name,
            "format": {"magic": MAGIC, "version": VERSION, "header_bytes": HEADER_BYTES, "dtype": "uint16"},
            "tokenizer": f"gpt2, encode_ordinary, {ENDOFTEXT_ID} (<|endoftext|>) before each document",
            "settings": {"val_fraction": val_fraction, "shard_tokens": shard_tokens, "workers": workers},
            "inputs": [{"path": str(given), "files": len(found), "bytes": sum(sizes[f] for f in found)}
                       for given, found in zip(inputs, per_input)],
            "documents": n_docs,
            "tokens": {"total": n_tokens, "val": n_val, "train": n_tokens - n_val},
            "shards": shards,
        }
        manifest_path = out / f"{name}_manifest.json"
        atomic_write(manifest_path, lambda tmp: Path(tmp).write_text(json.dumps(manifest, indent=1)))
        written.append(manifest_path)
    except BaseException:
        for p in written:
            p.unlink(missing_ok=True)
        raise
    finally:
        bar.close()
        for p in temps:
            p.unlink(missing_ok=True)
    return manifest
