"""The documents of a corpus on disk, streamed for npgpt prepare: a .txt file is one document, a
.jsonl file one document per line (its "text" field), either may be gzipped (.txt.gz, .jsonl.gz),
and a folder stands for every such file below it.

A document comes in pieces of about PIECE_CHARS characters, cut only where GPT-2's
pre-tokenisation regex cuts too, so that encoding the pieces one by one gives exactly the tokens
of the whole document: memory stays bounded however large a document is (as long as such places
come: see safe_cut; where none comes for MAX_PIECE_CHARS characters the piece is cut anyway,
see pieces), and the threads of a batch encode share the work of one large document. A .jsonl
line, parsed whole, may hold at most MAX_LINE_BYTES. Only regular files are read: a FIFO or a
device (a symbolic link to /dev/zero in a folder, say) is refused by name.

Bad input is a ValueError naming the file, with the line number (.jsonl) and the byte offset of
undecodable UTF-8 (in the decompressed text for .gz).
"""
from __future__ import annotations

import codecs
import gzip
import json
import os
import re
import zlib
from pathlib import Path
from typing import Callable, Iterable, Iterator

from ..files import check_regular, open_regular

SUFFIXES = (".txt", ".jsonl", ".txt.gz", ".jsonl.gz")
READ_BYTES = 1 << 20
PIECE_CHARS = 1 << 20
MAX_PIECE_CHARS = 4 * PIECE_CHARS       # a piece with no safe cut is cut here anyway (see pieces)
MAX_LINE_BYTES = 64 << 20               # one .jsonl document
# An ASCII letter or digit, then ASCII punctuation other than "'" (which starts a contraction):
# no piece of GPT-2's regex holds both, and neither depends on what lies beyond the cut.
_CLASS_CHANGE = re.compile(r"[A-Za-z0-9](?=[!-&(-/:-@\[-`{-~])")


def corpus_kind(path: Path) -> str | None:
    """"txt" or "jsonl" for a corpus file's name (gzipped or not), None for any other name."""
    name = path.name.lower()
    for suffix in SUFFIXES:
        if name.endswith(suffix):
            return suffix.split(".")[1]
    return None


def input_files(inputs: Iterable[str | os.PathLike]) -> list[Path]:
    """Every corpus file of inputs, in sorted path order: files as given, folders searched
    recursively (hidden files and folders, names starting with ".", skipped). A file named twice
    is taken once. ValueError naming the input for a path that does not exist, a file of another
    kind, or a folder with no corpus file."""
    files = set()
    for given in inputs:
        path = Path(given)
        if path.is_dir():
            found = []
            for root, dirs, names in os.walk(path):
                dirs[:] = [d for d in dirs if not d.startswith(".")]
                found += [Path(root, n) for n in names if not n.startswith(".") and corpus_kind(Path(n))]
            if not found:
                raise ValueError(f"{path}: no {', '.join(SUFFIXES)} files in this folder or below")
            for f in found:
                check_regular(f, "a corpus file")
            files.update(Path(os.path.abspath(f)) for f in found)
        elif path.exists():
            if not corpus_kind(path):
                raise ValueError(f"{path}: not a corpus file; expected a name ending in "
                                 f"{', '.join(SUFFIXES)}, or a folder of them")
            check_regular(path, "a corpus file")
            files.add(Path(os.path.abspath(path)))
        else:
            raise ValueError(f"{path}: no such file or folder")
    return sorted(files)


def safe_cut(text: str, lo: int, hi: int) -> int:
    """The largest P in [lo, hi] where encoding text[:P] and text[P:] apart gives the tokens of
    text, by one of two rules that need only the characters around P; 0 where there is none.

    1. text[P-1] is "\\n" between two non-whitespace characters. The regex's "\\n" piece is the
       same with or without what follows: alone before "X" (\\s++$ and \\s+(?!\\S) fail, \\s takes it)
       and at the end of text[:P] (\\s++$ takes it). Python's isspace() holds every character of
       the regex's \\s (Unicode White_Space), so "not isspace()" is never whitespace to the regex.
    2. an ASCII letter or digit, then ASCII punctuation other than "'" (see _CLASS_CHANGE).
    """
    lo, hi = max(lo, 2), min(hi, len(text) - 1)
    i = text.rfind("\n", lo - 1, hi)            # a "\n" at i is a cut at P = i + 1
    while i != -1:
        if not text[i - 1].isspace() and not text[i + 1].isspace():
            return i + 1
        i = text.rfind("\n", lo - 1, i)
    for start in (max(lo, hi - 4096), lo):     # rule 2: look near hi first, then everywhere
        cut = 0
        for m in _CLASS_CHANGE.finditer(text, start - 1, hi + 1):
            cut = m.end()
        if cut:
            return cut
    return 0


def forced_cut(text: str, lo: int) -> int:
    """Where to cut text, at lo or after, when safe_cut finds no place: the last " " between two
    non-whitespace characters (each of GPT-2's regex pieces starts at such a space, so this cut
    too keeps the tokens), else the end of text, which may change the tokens of the word cut there."""
    i = text.rfind(" ", max(lo, 1), len(text) - 1)
    while i != -1:
        if not text[i - 1].isspace() and not text[i + 1].isspace():
            return i
        i = text.rfind(" ", max(lo, 1), i)
    return len(text)


def pieces(chunks: Iterable[str], size: int | None = None, most: int | None = None) -> Iterator[str]:
    """One document's text, given as chunks of any length, again as pieces cut at safe_cut:
    "".join(pieces) == "".join(chunks), and there is always one, if only "". A piece holds
    size // 2 to 2 * size characters (the last fewer) where safe cuts come that often; without
    one it grows to about most characters (MAX_PIECE_CHARS) and is cut at forced_cut, so that memory
    stays bounded: only a run of millions of characters of one kind (a word of a million
    letters) is then tokenised differently, near that cut, from the document encoded whole."""
    size = size or PIECE_CHARS
    most = most or MAX_PIECE_CHARS
    pending, scanned = "", 0
    for chunk in chunks:
        for start in range(0, len(chunk), size):
            pending += chunk[start:start + size]
            if len(pending) > size:
                cut = safe_cut(pending, max(scanned, size // 2), len(pending) - 1)
                if not cut and len(pending) >= most:
                    cut = forced_cut(pending, size // 2)
                if cut:
                    yield pending[:cut]
                    pending, scanned = pending[cut:], 0
                else:
                    scanned = len(pending) - 2  # the next search starts in the new text
    yield pending


def _txt_chunks(path: Path, f) -> Iterator[str]:
    decoder = codecs.getincrementaldecoder("utf-8")()
    fed = 0
    while True:
        data = f.read(READ_BYTES)
        held = len(decoder.getstate()[0])       # bytes of a character cut by the last read
        try:
            yield decoder.decode(data, final=not data)
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {fed - held + e.start})") from None
        fed += len(data)
        if not data:
            return


def _json_type(value) -> str:
    for kind, name in ((dict, "an object"), (list, "an array"), (str, "a string"), (bool, "a boolean"),
                       ((int, float), "a number")):
        if isinstance(value, kind):
            return name
    return "null"


def _lines(path: Path, f) -> Iterator[bytes]:
    """The lines of f, each read with a bound: a longer one is refused with its line number."""
    number = 0
    while line := f.readline(MAX_LINE_BYTES + 1):
        number += 1
        if len(line) > MAX_LINE_BYTES:
            raise ValueError(f"{path} line {number}: longer than {MAX_LINE_BYTES:,} bytes; a .jsonl document "
                             "must be smaller (put a longer one in a .txt file of its own)")
        yield line


def _jsonl_texts(path: Path, f) -> Iterator[str]:
    offset = 0
    for number, line in enumerate(_lines(path, f), start=1):
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{path} line {number}: not UTF-8 text ({e.reason} at byte {offset + e.start})") from None
        offset += len(line)
        if not text.strip():                    # blank lines (a trailing one, say) hold no document
            continue
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} line {number}: not JSON ({e.msg} at column {e.colno})") from None
        except RecursionError:
            raise ValueError(f"{path} line {number}: JSON nested deeper than Python's recursion limit") from None
        except ValueError as e:                 # Python's limit of 4,300 digits on an integer
            raise ValueError(f"{path} line {number}: not JSON npgpt reads ({e})") from None
        if not isinstance(doc, dict):
            raise ValueError(f"{path} line {number}: expected a JSON object with a string \"text\" field, "
                             f"got {_json_type(doc)}")
        if "text" not in doc:
            raise ValueError(f"{path} line {number}: no \"text\" field (fields: {', '.join(list(doc)[:8])})")
        if not isinstance(doc["text"], str):
            raise ValueError(f"{path} line {number}: \"text\" is {_json_type(doc['text'])}, expected a string")
        yield doc["text"]


def read_pieces(path: Path, on_bytes: Callable[[int], None] = lambda n: None) -> Iterator[tuple[str, bool]]:
    """(piece, starts_document) for every document of one corpus file, in file order. on_bytes
    is told how many bytes of the file (compressed, for .gz) each step has read."""
    path = Path(path)
    kind, gz = corpus_kind(path), path.name.lower().endswith(".gz")
    with open_regular(path, "a corpus file") as raw:
        f = gzip.GzipFile(fileobj=raw, mode="rb") if gz else raw
        told = 0
        try:
            if kind == "txt":
                for i, piece in enumerate(pieces(_txt_chunks(path, f))):
                    on_bytes(raw.tell() - told)
                    told = raw.tell()
                    yield piece, i == 0
            else:
                for text in _jsonl_texts(path, f):
                    for i, piece in enumerate(pieces([text])):
                        yield piece, i == 0
                    on_bytes(raw.tell() - told)
                    told = raw.tell()
        except (EOFError, zlib.error, gzip.BadGzipFile) as e:
            raise ValueError(f"{path}: not a readable gzip file ({e})") from None
        on_bytes(raw.tell() - told)
