"""Token shards: npgpt prepare's token stream against tiktoken computed here, shard bytes parsed
with struct, the val split and shard size rules, manifests checked with hashlib, shards written
here the way llm.c and nanoGPT write them read back, the batch rules (a step's batch from
(seed, step) alone, ranks disjoint, windows inside one shard, targets shifted by one), and every
bad input's message, with nothing that looks like a shard left behind."""
import gzip
import hashlib
import importlib
import json
import os
import re
import struct
import subprocess
import sys
from array import array
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from npgpt.data import load_corpus
from npgpt.data.prepare import prepare, val_split
from npgpt.data.shards import TokenDir
from npgpt.tokenizer import get_tokenizer

prepare_mod, sources = (importlib.import_module(f"npgpt.data.{m}") for m in ("prepare", "sources"))
EOT = 50256
SUFFIXES = (".txt", ".jsonl", ".txt.gz", ".jsonl.gz")


@pytest.fixture(scope="module")
def enc():
    return get_tokenizer()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A folder of every kind of input, in nested subfolders, plus files prepare must skip."""
    root = tmp_path_factory.mktemp("input") / "corpus"
    verdict = load_corpus()
    (root / "b" / "c").mkdir(parents=True)
    (root / "gz").mkdir()
    (root / "a.txt").write_text(verdict[:3000], encoding="utf-8")
    (root / "b" / "crlf.txt").write_bytes(verdict[3000:5000].replace("\n", "\r\n").encode())
    (root / "b" / "c" / "deep.txt").write_text("naïve café — 日本語\n\n  spaced   out  \n" * 40,
                                               encoding="utf-8")
    (root / "b" / "empty.txt").write_text("")
    docs = [{"text": "A document with a literal <|endoftext|> inside, which stays text."},
            {"text": verdict[5000:6500], "id": 2}, {"text": ""}, {"text": "last\n"}]
    (root / "b" / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs) + "\n")
    with gzip.open(root / "gz" / "z.txt.gz", "wt", encoding="utf-8") as f:
        f.write(verdict[6500:9000])
    with gzip.open(root / "gz" / "y.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(json.dumps({"text": verdict[9000:10000]}) + "\n" + json.dumps({"text": "x <|endoftext|> y"}) + "\n")
    (root / "notes.md").write_text("not a corpus file")
    (root / ".hidden.txt").write_text("hidden files are skipped")
    return root


def expected_tokens(enc, root):
    """The stream as the issue defines it: files in sorted path order, each document encoded with
    encode_ordinary after one 50256."""
    files = sorted(p for p in root.rglob("*") if p.name.endswith(SUFFIXES) and not p.name.startswith("."))
    tokens = []
    for path in files:
        data = gzip.decompress(path.read_bytes()) if path.name.endswith(".gz") else path.read_bytes()
        text = data.decode("utf-8")
        docs = [text] if ".txt" in path.name else [json.loads(line)["text"] for line in text.splitlines() if line]
        for doc in docs:
            tokens += [EOT] + enc.encode_ordinary(doc)
    return tokens


def parse_shard(path):
    """An llm.c shard read with struct: (header, tokens)."""
    data = Path(path).read_bytes()
    header = struct.unpack("<256i", data[:1024])
    tokens = list(struct.unpack(f"<{header[2]}H", data[1024:]))
    return header, tokens


def shard_files(out):
    return sorted(Path(out).glob("*.bin"), key=lambda p: int(p.stem.rsplit("_", 1)[1]))


def all_tokens(out):
    return [t for path in shard_files(out) for t in parse_shard(path)[1]]


def small_pieces(monkeypatch):
    """Read, cut and batch in tiny sizes, so that every document spans several pieces and batches."""
    monkeypatch.setattr(sources, "PIECE_CHARS", 64)
    monkeypatch.setattr(sources, "READ_BYTES", 50)
    monkeypatch.setattr(prepare_mod, "BATCH_CHARS", 300)


def test_token_stream_is_tiktoken_in_sorted_path_order(enc, corpus, tmp_path):
    manifest = prepare(corpus, tmp_path / "out", progress=False)
    assert all_tokens(tmp_path / "out") == expected_tokens(enc, corpus)
    assert manifest["name"] == "corpus" and manifest["documents"] == 11
    assert "x <|endoftext|> y" in enc.decode(all_tokens(tmp_path / "out"))   # a literal stays text


def test_same_bytes_for_any_workers_and_piece_size(enc, corpus, tmp_path, monkeypatch):
    prepare(corpus, tmp_path / "w2", workers=2, shard_tokens=500, progress=False)
    small_pieces(monkeypatch)
    cut = []
    monkeypatch.setattr(prepare_mod, "read_pieces", lambda *a: (cut.append(p) or p for p in sources.read_pieces(*a)))
    prepare(corpus, tmp_path / "w1", workers=1, shard_tokens=500, progress=False)
    assert sum(1 for piece, first in cut if not first) > 50            # documents were cut into pieces
    for one, two in zip(shard_files(tmp_path / "w1"), shard_files(tmp_path / "w2"), strict=True):
        assert one.name == two.name and one.read_bytes() == two.read_bytes()
    assert all_tokens(tmp_path / "w1") == expected_tokens(enc, corpus)


@settings(max_examples=300, deadline=None)
@given(text=st.text(alphabet=st.sampled_from(list("ab Z9.,'s\n\r\t\u00a0\u3000\x1c中é-")), max_size=300),
       size=st.integers(2, 24))
def test_pieces_encode_to_the_whole_document(enc, text, size):
    parts = list(sources.pieces([text[i:i + 7] for i in range(0, len(text), 7)], size))
    assert "".join(parts) == text
    assert [t for p in parts for t in enc.encode_ordinary(p)] == enc.encode_ordinary(text)


@settings(max_examples=300, deadline=None)
@given(text=st.text(alphabet=st.sampled_from(list("aZ9.'s \n\r\u00a0\x1c中-")), max_size=40))
def test_every_safe_cut_keeps_the_tokens(enc, text):
    whole = enc.encode_ordinary(text)
    for cut in range(len(text) + 1):
        if sources.safe_cut(text, cut, cut) == cut != 0:
            assert enc.encode_ordinary(text[:cut]) + enc.encode_ordinary(text[cut:]) == whole, cut


def test_shard_headers_parsed_with_struct(corpus, tmp_path):
    prepare(corpus, tmp_path, shard_tokens=1000, progress=False)
    names = [p.name for p in shard_files(tmp_path)]
    assert names[0] == "corpus_val_000000.bin"
    assert names[1:] == [f"corpus_train_{i:06d}.bin" for i in range(1, len(names))]
    for path in shard_files(tmp_path):
        header, tokens = parse_shard(path)
        assert header[:2] == (20240520, 1) and set(header[3:]) == {0}
        assert path.stat().st_size == 1024 + 2 * header[2] == 1024 + 2 * len(tokens)


def test_manifest_sha256_counts_and_inputs(corpus, tmp_path):
    manifest = prepare(corpus, tmp_path, shard_tokens=1500, progress=False)
    assert json.loads((tmp_path / "corpus_manifest.json").read_text()) == manifest
    assert [s["file"] for s in manifest["shards"]] == [p.name for p in shard_files(tmp_path)]
    for s in manifest["shards"]:
        assert s["sha256"] == hashlib.sha256((tmp_path / s["file"]).read_bytes()).hexdigest()
        assert s["tokens"] == parse_shard(tmp_path / s["file"])[0][2]
    sizes = [p.stat().st_size for p in corpus.rglob("*") if p.name.endswith(SUFFIXES) and p.name[0] != "."]
    assert manifest["inputs"] == [{"path": str(corpus), "files": len(sizes), "bytes": sum(sizes)}]
    assert manifest["tokens"]["total"] == sum(s["tokens"] for s in manifest["shards"])


def test_val_split_rule():
    starts = np.array([0, 10, 20, 60])
    assert val_split(starts, 100, 0.15) == 10        # whole documents up to 15 tokens
    assert val_split(starts, 100, 0.59) == 20
    assert val_split(starts, 100, 0.6) == 60         # a document ending right at the fraction is in
    assert val_split(starts, 100, 0.05) == 5         # the first document alone is larger: cut inside
    assert val_split(np.array([0]), 7, 0.01) == 1    # at least one token


def test_val_shard_holds_the_first_documents(enc, corpus, tmp_path):
    manifest = prepare(corpus, tmp_path, val_fraction=0.5, progress=False)
    tokens = expected_tokens(enc, corpus)
    starts = [i for i, t in enumerate(tokens) if t == EOT]
    n_val = max(s for s in starts if s <= int(0.5 * len(tokens)))
    assert n_val > starts[1] and manifest["tokens"]["val"] == n_val
    assert parse_shard(tmp_path / "corpus_val_000000.bin")[1] == tokens[:n_val]
    assert parse_shard(tmp_path / "corpus_train_000001.bin")[1][0] == EOT


def test_single_document_is_split_inside(enc, tmp_path):
    text = load_corpus()
    (tmp_path / "book.txt").write_text(text, encoding="utf-8")
    manifest = prepare(tmp_path / "book.txt", tmp_path / "out", val_fraction=0.1, progress=False)
    tokens = [EOT] + enc.encode_ordinary(text)
    assert manifest["name"] == "book" and manifest["tokens"]["val"] == int(0.1 * len(tokens))
    assert all_tokens(tmp_path / "out") == tokens


def test_train_shards_hold_at_most_shard_tokens(corpus, tmp_path):
    manifest = prepare(corpus, tmp_path, shard_tokens=333, progress=False)
    train = [s["tokens"] for s in manifest["shards"] if s["split"] == "train"]
    assert len(train) == -(-manifest["tokens"]["train"] // 333) and set(train[:-1]) == {333} and train[-1] <= 333


def write_llmc_shard(path, tokens):
    """As llm.c's dev/data/data_common.py writes one: a 256-int32 header, then uint16 tokens."""
    Path(path).write_bytes(struct.pack("<256i", 20240520, 1, len(tokens), *[0] * 253) + array("H", tokens).tobytes())


def test_reads_llmc_and_nanogpt_folders(tmp_path):
    rng = np.random.default_rng(0)
    val, train1, train2 = (rng.integers(0, 50257, n).tolist() for n in (300, 500, 400))
    (tmp_path / "llmc").mkdir()
    write_llmc_shard(tmp_path / "llmc" / "fw_val_000000.bin", val)
    write_llmc_shard(tmp_path / "llmc" / "fw_train_000002.bin", train2)
    write_llmc_shard(tmp_path / "llmc" / "fw_train_000001.bin", train1)
    (tmp_path / "llmc" / ".fw_train_000003.bin.1f2e.tmp").write_bytes(b"half a shard")   # a killed write
    d = TokenDir(tmp_path / "llmc")
    assert d.format == "llm.c" and d.name == "fw" and all(isinstance(a, np.memmap) for a in d.val + d.train)
    assert [a.tolist() for a in d.val] == [val] and [a.tolist() for a in d.train] == [train1, train2]
    (tmp_path / "nano").mkdir()
    np.array(train1, dtype=np.uint16).tofile(tmp_path / "nano" / "train.bin")
    np.array(val, dtype=np.uint16).tofile(tmp_path / "nano" / "val.bin")
    d = TokenDir(tmp_path / "nano")
    assert d.format == "nanogpt" and d.val[0].tolist() == val and d.train[0].tolist() == train1
    assert d.num_tokens == {"val": 300, "train": 500}


@pytest.fixture()
def token_dir(tmp_path):
    """Train shards of 40, 17, 55 and 9 tokens (the last shorter than a window) and a val shard."""
    stream = np.random.default_rng(1).integers(0, 50257, 200).tolist()
    for i, (a, b) in enumerate([(0, 79), (79, 119), (119, 136), (136, 191), (191, 200)]):
        write_llmc_shard(tmp_path / f"t_{'val' if i == 0 else 'train'}_{i:06d}.bin", stream[a:b])
    return tmp_path, stream


def test_batch_depends_on_seed_and_step_alone(token_dir):
    path, _ = token_dir
    batches = TokenDir(path).train_batches(4, 12, seed=7)
    x, y = batches.batch(3)
    x2, y2 = TokenDir(path).train_batches(4, 12, seed=7).batch(3)      # a new reader, as after a resume
    assert x.dtype == y.dtype == np.int64 and x.shape == y.shape == (4, 12)
    assert np.array_equal(x, x2) and np.array_equal(y, y2)
    assert not np.array_equal(x, batches.batch(4)[0])
    assert not np.array_equal(x, TokenDir(path).train_batches(4, 12, seed=8).batch(3)[0])
    out = np.zeros((4, 13), dtype=np.int64)                              # the pinned-memory hook
    assert np.array_equal(batches.batch(3, out=out)[0], x) and np.shares_memory(out, batches.batch(3, out=out)[0])


def test_ranks_get_disjoint_slices_of_one_draw(token_dir):
    path, _ = token_dir
    d, B, W = TokenDir(path), 3, 4
    for step in range(20):
        whole = d.train_batches(B * W, 12, seed=5).batch(step)[0]
        ranks = [d.train_batches(B, 12, seed=5, rank=r, world_size=W) for r in range(W)]
        starts = {tuple(s) for r in ranks for s in zip(*r.starts(step))}
        assert len(starts) == B * W
        assert np.array_equal(np.concatenate([r.batch(step)[0] for r in ranks]), whole)


def test_windows_stay_inside_a_shard_and_targets_shift_by_one(token_dir):
    path, stream = token_dir
    T, bounds = 12, [(79, 119), (119, 136), (136, 191), (191, 200)]
    every = {(i, o) for i, (a, b) in enumerate(bounds) for o in range(b - a - T)}
    batches = TokenDir(path).train_batches(len(every), T, seed=0)       # a step that takes every window
    assert {tuple(s) for s in zip(*batches.starts(0))} == every
    x, y = batches.batch(0)
    for row, (shard, offset) in enumerate(zip(*batches.starts(0))):
        first = bounds[shard][0] + offset
        assert x[row].tolist() == stream[first:first + T] and y[row].tolist() == stream[first + 1:first + T + 1]
    with pytest.raises(ValueError, match=f"a step needs {len(every) + 1} distinct ones"):
        TokenDir(path).train_batches(len(every) + 1, T)


def test_val_batches_tile_the_val_shards_from_the_start(token_dir):
    path, stream = token_dir
    batches = TokenDir(path).val_batches(2, 10)
    got = [(x.copy(), y.copy()) for x, y in batches]
    assert len(got) == len(batches) == 4 and [len(x) for x, _ in got] == [2, 2, 2, 1]   # 78 // 10 windows
    assert np.concatenate([x for x, _ in got]).ravel().tolist() == stream[:70]
    assert np.concatenate([y for _, y in got]).ravel().tolist() == stream[1:71]
    assert [x.tolist() for x, _ in TokenDir(path).val_batches(2, 10, num_batches=2)] == [x.tolist() for x, _ in got[:2]]
    fewer = TokenDir(path).val_batches(2, 10, num_batches=9)              # more than there are: all 7 windows
    assert [x.tolist() for x, _ in fewer] == [x.tolist() for x, _ in got]


def test_reader_errors_name_the_file(token_dir, tmp_path_factory):
    path, _ = token_dir
    with pytest.raises(ValueError, match="the train shards are too short: the longest has 55 tokens, .* 56"):
        TokenDir(path).train_batches(1, 55)
    with pytest.raises(ValueError, match="the val shards are too short: the longest has 79 tokens"):
        TokenDir(path).val_batches(1, 79)
    empty = tmp_path_factory.mktemp("empty")
    with pytest.raises(ValueError, match="no token shards"):
        TokenDir(empty)
    write_llmc_shard(empty / "x_train_000001.bin", [1, 2, 3])
    with pytest.raises(ValueError, match="no x_val_\\*.bin shard"):
        TokenDir(empty)
    bad = path / "t_train_000001.bin"
    data = bad.read_bytes()
    for broken, message in [(data[:-2], "the header says 40 tokens, 1104 bytes in all, but the file has 1102"),
                            (struct.pack("<i", 20240521) + data[4:], "magic number 20240521, expected 20240520"),
                            (data[:4] + struct.pack("<i", 2) + data[8:], "version 2, expected 1"),
                            (data[:100], "100 bytes, shorter than the 1024-byte header")]:
        bad.write_bytes(broken)
        with pytest.raises(ValueError, match=f"t_train_000001.bin: {message}"):
            TokenDir(path)
    nano = tmp_path_factory.mktemp("nano")
    (nano / "train.bin").write_bytes(b"\0" * 9)
    with pytest.raises(ValueError, match="val.bin: missing"):
        TokenDir(nano)
    (nano / "val.bin").write_bytes(b"\0" * 8)
    with pytest.raises(ValueError, match="train.bin: 9 bytes, an odd number"):
        TokenDir(nano)


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads RSS from /proc")
def test_batches_map_only_the_pages_they_read(tmp_path):
    with open(tmp_path / "train.bin", "wb") as f:            # 512 MiB, sparse
        f.truncate(512 << 20)
    np.zeros(2000, dtype=np.uint16).tofile(tmp_path / "val.bin")
    script = ("import sys; from npgpt.data.shards import TokenDir\n"
              "rss = lambda: int(open('/proc/self/statm').read().split()[1]) * 4096\n"
              "batches = TokenDir(sys.argv[1]).train_batches(8, 1024, seed=0)\n"
              "before = rss()\n"
              "for step in range(300): batches.batch(step)\n"
              "print(rss() - before)")
    grown = int(subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True,
                               check=True).stdout)
    assert grown < 40 << 20, f"reading 2400 windows of 2 KiB grew RSS by {grown / 2**20:.0f} MiB"


def test_manifest_catches_a_missing_shard(corpus, tmp_path):
    prepare(corpus, tmp_path, shard_tokens=1000, progress=False)
    TokenDir(tmp_path)
    (tmp_path / "corpus_train_000002.bin").unlink()
    with pytest.raises(ValueError, match="corpus_manifest.json: lists .* corpus_train_000002.bin"):
        TokenDir(tmp_path)


def test_refuses_to_overwrite_unless_asked(corpus, tmp_path):
    prepare(corpus, tmp_path, shard_tokens=500, progress=False)
    with pytest.raises(FileExistsError, match=r"corpus_manifest.json: already exists; give --overwrite \(in Python: overwrite=True\)"):
        prepare(corpus, tmp_path, progress=False)
    prepare(corpus, tmp_path, progress=False, overwrite=True)            # one train shard now
    assert [p.name for p in shard_files(tmp_path)] == ["corpus_val_000000.bin", "corpus_train_000001.bin"]
    TokenDir(tmp_path)


def leftovers(out):
    """Whatever a run could have left: shards, temporary files, a manifest."""
    return sorted(p.name for p in Path(out).glob("*") if p.suffix in (".bin", ".tmp", ".json"))


def bad_jsonl(line):
    return '{"text": "fine"}\n' + line + "\n"


@pytest.mark.parametrize("name, data, message", [
    ("b.txt", b"good text " * 30 + b"\xc3(", "b.txt: not UTF-8 text (invalid continuation byte at byte 300)"),
    ("b.txt", "é".encode() * 100 + b"\xff", "b.txt: not UTF-8 text (invalid start byte at byte 200)"),
    ("b.txt", b"cut short \xe2\x82", "b.txt: not UTF-8 text (unexpected end of data at byte 10)"),
    ("b.txt.gz", gzip.compress(b"x" * 75 + b"\x80"), "b.txt.gz: not UTF-8 text (invalid start byte at byte 75)"),
    ("b.txt.gz", b"not gzip at all", "b.txt.gz: not a readable gzip file"),
    ("b.jsonl", bad_jsonl('{"text": "a"'), "b.jsonl line 2: not JSON"),
    ("b.jsonl", bad_jsonl('["text"]'),
     "b.jsonl line 2: expected a JSON object with a string \"text\" field, got an array"),
    ("b.jsonl", bad_jsonl('{"body": "x"}'), "b.jsonl line 2: no \"text\" field (fields: body)"),
    ("b.jsonl", bad_jsonl('{"text": 5}'), "b.jsonl line 2: \"text\" is a number, expected a string"),
    ("b.jsonl.gz", gzip.compress(b'{"text": "ok"}\n\n{"text": "\xff"}\n'),
     "b.jsonl.gz line 3: not UTF-8 text (invalid start byte at byte 26)"),
])
def test_bad_input_is_refused_and_leaves_nothing(tmp_path, monkeypatch, name, data, message):
    monkeypatch.setattr(sources, "READ_BYTES", 7)            # errors found across read boundaries
    monkeypatch.setattr(prepare_mod, "BATCH_CHARS", 20)      # after a batch or two went to the stream
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_text("A good document first. " * 20)
    (tmp_path / "in" / name).write_bytes(data.encode() if isinstance(data, str) else data)
    with pytest.raises(ValueError, match=re.escape(message)):
        prepare(tmp_path / "in", tmp_path / "out", progress=False)
    assert leftovers(tmp_path / "out") == []


def test_bad_paths_are_refused_before_writing(tmp_path):
    (tmp_path / "nothing").mkdir()
    (tmp_path / "nothing" / "x.md").write_text("no corpus here")
    (tmp_path / "a.csv").write_text("x")
    for inputs, message in [(tmp_path / "missing.txt", "missing.txt: no such file or folder"),
                            (tmp_path / "nothing", "nothing: no .txt, .jsonl, .txt.gz, .jsonl.gz files"),
                            (tmp_path / "a.csv", "a.csv: not a corpus file"),
                            ([], "at least one input")]:
        with pytest.raises(ValueError, match=message):
            prepare(inputs, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    for key, value in [("val_fraction", 0), ("val_fraction", 1.0), ("shard_tokens", 2**31), ("workers", 0)]:
        with pytest.raises(ValueError, match=key):
            prepare(tmp_path / "nothing", tmp_path / "out", progress=False, **{key: value})


def test_a_failed_shard_write_leaves_nothing(corpus, tmp_path, monkeypatch):
    calls = []
    real = os.replace

    def replace(src, dst):                                   # the disk fills at the third shard
        calls.append(dst)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        real(src, dst)
    monkeypatch.setattr(os, "replace", replace)            # the rename of files.atomic_write
    with pytest.raises(OSError, match="No space left"):
        prepare(corpus, tmp_path, shard_tokens=500, progress=False)
    assert leftovers(tmp_path) == []


def test_progress_bar_shows_bytes_and_tokens(corpus, tmp_path, capsys):
    prepare(corpus, tmp_path, progress=True)
    err = capsys.readouterr().err
    assert "B/s" in err and "M tokens" in err
