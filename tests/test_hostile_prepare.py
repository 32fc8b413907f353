"""npgpt prepare on hostile input: memory stays bounded on a document with no place to cut, a
.jsonl line past the bound is refused with its size, and the forced cut keeps the tokens."""
import gzip
import os
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np

import npgpt

REPO = Path(__file__).resolve().parent.parent


def limited():
    resource.setrlimit(resource.RLIMIT_AS, (3 << 29, 3 << 29))         # 1.5 GiB of address space


def test_prepare_keeps_memory_bounded_on_a_document_without_a_place_to_cut(tmp_path):
    """A .txt.gz holding one run of a single letter (nothing to cut at: no newline, no space, no
    punctuation), 8 million characters from a 10 kB file, in a subprocess under a memory limit
    with the piece sizes scaled down 64 times: the run is cut into pieces of MAX_PIECE_CHARS, and
    the shards hold tiktoken's tokens of each piece. Encoded whole, as before the cut, the run
    grew the process by about 400 MB (16 million: 763 MB and 22 s)."""
    n = 8_000_000
    path = tmp_path / "run.txt.gz"
    with gzip.open(path, "wb") as f:
        for _ in range(n // 1_000_000):
            f.write(b"a" * 1_000_000)
    assert path.stat().st_size < 50_000
    code = f"""
import resource, sys
import numpy as np
from npgpt.data import sources
sources.PIECE_CHARS, sources.MAX_PIECE_CHARS = 1 << 14, 1 << 16
from npgpt.data.prepare import prepare
from npgpt.data.shards import TokenDir
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
m = prepare({str(path)!r}, {str(tmp_path / 'out')!r}, val_fraction=0.01, progress=False)
grew = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
tokens = TokenDir({str(tmp_path / 'out')!r})
ids = np.concatenate(tokens.val + tokens.train)
print(grew // 1024, m["tokens"]["total"], int(ids[0]), len(set(ids[1:].tolist())))
"""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", code], preexec_fn=limited, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    grew_mb, total, first, kinds = map(int, proc.stdout.split())
    enc = npgpt.get_tokenizer()                 # tiktoken's GPT-2 encoding
    piece, rest = enc.encode_ordinary("a" * (1 << 16)), enc.encode_ordinary("a" * (n % (1 << 16)))
    assert first == 50256 and total == 1 + n // (1 << 16) * len(piece) + len(rest)
    assert kinds <= 4                            # runs of "a" are tokens of a few lengths of "a"s
    assert grew_mb < 150, f"prepare grew by {grew_mb} MB"


def test_a_jsonl_line_longer_than_the_bound_is_refused_with_its_size(tmp_path, capsys):
    from npgpt.cli import main
    from npgpt.data.sources import MAX_LINE_BYTES
    path = tmp_path / "long.jsonl.gz"
    with gzip.open(path, "wb", compresslevel=1) as f:
        f.write(b'{"text": "')
        for _ in range(MAX_LINE_BYTES // (1 << 20) + 1):
            f.write(b"a" * (1 << 20))
        f.write(b'"}\n')
    assert main(["prepare", str(path), "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err == (f"npgpt prepare: error: {path} line 1: longer than {MAX_LINE_BYTES:,} bytes; a .jsonl document "
                   "must be smaller (put a longer one in a .txt file of its own)\n")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_a_forced_cut_at_a_space_keeps_the_tokens():
    """Words and single spaces with no newline or punctuation (safe_cut finds nothing): pieces cut
    at forced_cut's spaces encode, one by one, to the tokens of the whole text."""
    from npgpt.data.sources import pieces
    rng = np.random.default_rng(0)
    words = ["".join(rng.choice(list("abcdeé1 "), size=rng.integers(1, 9))) for _ in range(3000)]
    text = " ".join(words)                  # runs of several spaces come too, where no cut is taken
    enc = npgpt.get_tokenizer()
    cut = list(pieces([text], size=256, most=512))
    assert "".join(cut) == text and len(cut) > 20 and max(map(len, cut)) < 512 + 256
    assert [t for piece in cut for t in enc.encode_ordinary(piece)] == enc.encode_ordinary(text)
