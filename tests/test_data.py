"""The data pipeline: The Verdict's numbers from the book, the sliding-window arithmetic against
the book's GPTDatasetV1 loop, shuffling and sharding, and the bundled corpus."""
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import npgpt
from npgpt.data import DataLoader, load_corpus, make_loaders, sliding_windows

VERDICT_SHA256 = "b41e41a68f0398a3154ae69e2e4c0e2694e17fe0d66730536837f1b01935b31f"  # the book's file
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tok():
    return npgpt.get_tokenizer()


def book_starts(n_tokens, max_length, stride):
    """The book's GPTDatasetV1: `for i in range(0, len(token_ids) - max_length, stride)`."""
    return list(range(0, n_tokens - max_length, stride))


def batches(loader):
    return [(x.copy(), y.copy()) for x, y in loader]


def locate(row, tokens, candidates):
    """The start s (among candidates) with tokens[s:s+T] == row."""
    hits = [s for s in candidates if np.array_equal(tokens[s:s + len(row)], row)]
    assert len(hits) == 1, f"row matches {len(hits)} windows"
    return hits[0]


# ---------------------------------------------------------------- The Verdict, as in the book

def test_verdict_size(verdict_text, tok):
    assert len(verdict_text) == 20479
    assert len(tok.encode(verdict_text)) == 5145


def test_verdict_loaders_match_the_book(verdict_text, tok):
    train, val = make_loaders(verdict_text, tok, batch_size=2, max_length=256, stride=256,
                              train_ratio=0.9, seed=123)
    assert len(train) == 9
    assert len(val) == 1
    train_batches, val_batches = batches(train), batches(val)
    assert len(train_batches) == 9 and len(val_batches) == 1
    assert sum(x.size for x, _ in train_batches) == 4608
    assert sum(x.size for x, _ in val_batches) == 512
    for x, y in train_batches + val_batches:
        assert x.dtype == np.int64 and y.dtype == np.int64
        assert x.shape == (2, 256) and y.shape == (2, 256)


def test_verdict_targets_are_inputs_shifted_by_one(verdict_text, tok):
    split = int(0.9 * len(verdict_text))  # the book splits the text by characters
    train_tokens = np.array(tok.encode(verdict_text[:split]), dtype=np.int64)
    val_tokens = np.array(tok.encode(verdict_text[split:]), dtype=np.int64)
    train, val = make_loaders(verdict_text, tok, batch_size=2, max_length=256, stride=256,
                              train_ratio=0.9, seed=123)

    candidates = book_starts(len(train_tokens), 256, 256)
    assert len(candidates) == 18  # 9 batches of 2, nothing dropped
    seen = []
    for x, y in train:
        for row_x, row_y in zip(x, y):
            s = locate(row_x, train_tokens, candidates)
            np.testing.assert_array_equal(row_y, train_tokens[s + 1:s + 257])
            seen.append(s)
    assert sorted(seen) == candidates  # every window once per epoch

    (x, y), = list(val)  # not shuffled: windows in text order
    for b, s in enumerate(book_starts(len(val_tokens), 256, 256)):
        np.testing.assert_array_equal(x[b], val_tokens[s:s + 256])
        np.testing.assert_array_equal(y[b], val_tokens[s + 1:s + 257])


# ---------------------------------------------------------------- shuffling

def same_batches(p, q):
    return len(p) == len(q) and all(np.array_equal(x1, x2) and np.array_equal(y1, y2)
                                    for (x1, y1), (x2, y2) in zip(p, q))


def test_train_order_reproducible_from_seed(verdict_text, tok):
    kw = dict(batch_size=2, max_length=256, stride=256, train_ratio=0.9)
    a, _ = make_loaders(verdict_text, tok, seed=123, **kw)
    b, _ = make_loaders(verdict_text, tok, seed=123, **kw)
    c, _ = make_loaders(verdict_text, tok, seed=7, **kw)
    first = batches(a)
    assert same_batches(first, batches(b))      # same seed, another loader: same order
    assert same_batches(first, batches(a))      # the order depends on (seed, epoch) only
    assert not same_batches(first, batches(c))  # another seed: another order

    a.set_epoch(1)
    epoch1 = batches(a)
    assert not same_batches(first, epoch1)
    # the same windows, in another order
    assert sorted(map(bytes, np.concatenate([x for x, _ in epoch1]))) == \
        sorted(map(bytes, np.concatenate([x for x, _ in first])))
    a.set_epoch(0)
    assert same_batches(first, batches(a))


def test_val_keeps_last_partial_batch_and_is_not_shuffled(verdict_text, tok):
    max_length, stride, ratio = 200, 160, 0.9
    split = int(ratio * len(verdict_text))
    val_tokens = np.array(tok.encode(verdict_text[split:]), dtype=np.int64)
    starts = book_starts(len(val_tokens), max_length, stride)
    assert len(starts) == 3  # the case under test: 3 windows, batch size 2

    _, val = make_loaders(verdict_text, tok, batch_size=2, max_length=max_length, stride=stride,
                          train_ratio=ratio, seed=123)
    got = batches(val)
    assert len(val) == 2 and len(got) == 2
    assert [x.shape for x, _ in got] == [(2, max_length), (1, max_length)]
    rows = np.concatenate([x for x, _ in got])
    for row, s in zip(rows, starts):
        np.testing.assert_array_equal(row, val_tokens[s:s + max_length])
    val.set_epoch(5)  # epochs do not reorder the validation set
    np.testing.assert_array_equal(np.concatenate([x for x, _ in val]), rows)


def test_train_drops_last_partial_batch(verdict_text, tok):
    max_length, stride, ratio = 200, 160, 0.9
    split = int(ratio * len(verdict_text))
    n_windows = len(book_starts(len(tok.encode(verdict_text[:split])), max_length, stride))
    train, _ = make_loaders(verdict_text, tok, batch_size=3, max_length=max_length, stride=stride,
                            train_ratio=ratio, seed=123)
    assert n_windows % 3 != 0  # there is a partial batch to drop
    got = batches(train)
    assert len(train) == len(got) == n_windows // 3
    assert all(x.shape == (3, max_length) for x, _ in got)


# ---------------------------------------------------------------- errors

def test_not_enough_tokens_for_training(verdict_text, tok):
    text = verdict_text[:1000]
    n_train = len(tok.encode(text[:int(0.9 * len(text))]))
    assert n_train <= 256
    with pytest.raises(ValueError, match="Not enough tokens") as excinfo:
        make_loaders(text, tok, batch_size=2, max_length=256, stride=256, train_ratio=0.9)
    message = str(excinfo.value)
    assert "training" in message
    assert str(n_train) in message and "257" in message


def test_not_enough_tokens_for_validation(verdict_text, tok):
    ratio = 0.99
    n_val = len(tok.encode(verdict_text[int(ratio * len(verdict_text)):]))
    assert n_val <= 256
    with pytest.raises(ValueError, match="Not enough tokens") as excinfo:
        make_loaders(verdict_text, tok, batch_size=2, max_length=256, stride=256, train_ratio=ratio)
    message = str(excinfo.value)
    assert "validation" in message
    assert str(n_val) in message and "257" in message


def test_exactly_one_window_is_enough(tok):
    # 2 * 300 tokens of " a"; 90% -> 270 train tokens, 30 val tokens.
    text = " a" * 300
    train, val = make_loaders(text, tok, batch_size=1, max_length=29, stride=29, train_ratio=0.9)
    assert len(val) == 1  # 30 tokens = max_length + 1: one window
    with pytest.raises(ValueError, match="30"):
        make_loaders(text, tok, batch_size=1, max_length=30, stride=30, train_ratio=0.9)


@pytest.mark.parametrize("name", ["batch_size", "max_length", "stride"])
@pytest.mark.parametrize("bad", [0, -1, 2.5, "4", None, True])
def test_invalid_loader_sizes(verdict_text, tok, name, bad):
    kw = dict(batch_size=2, max_length=256, stride=256)
    kw[name] = bad
    with pytest.raises(ValueError, match=name):
        make_loaders(verdict_text, tok, train_ratio=0.9, **kw)


@pytest.mark.parametrize("ratio", [0.0, 1.0, -0.5, 1.5])
def test_invalid_train_ratio(verdict_text, tok, ratio):
    with pytest.raises(ValueError, match="train_ratio"):
        make_loaders(verdict_text, tok, train_ratio=ratio)


# ---------------------------------------------------------------- window arithmetic (property tests)

sizes = dict(n_tokens=st.integers(0, 500), max_length=st.integers(1, 64), stride=st.integers(1, 64))


@settings(max_examples=300, deadline=None)
@given(**sizes)
def test_sliding_windows_match_the_book(n_tokens, max_length, stride):
    starts = sliding_windows(n_tokens, max_length, stride)
    expected = book_starts(n_tokens, max_length, stride)
    assert len(starts) == len(expected)
    assert [int(s) for s in starts] == expected
    if len(starts):
        assert starts[0] == 0
        assert np.all(np.diff(starts) == stride)
        # the last target index, s + max_length, stays inside the tokens
        assert int(starts[-1]) + max_length <= n_tokens - 1
        # and the book's loop stops at the last window that fits
        assert int(starts[-1]) + stride + max_length > n_tokens - 1


@settings(max_examples=200, deadline=None)
@given(**sizes, batch_size=st.integers(1, 8), drop_last=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_loader_windows_unshuffled(n_tokens, max_length, stride, batch_size, drop_last, seed):
    tokens = np.random.default_rng(seed).integers(0, 50257, n_tokens)
    loader = DataLoader(tokens, batch_size, max_length, stride, shuffle=False, drop_last=drop_last)
    starts = book_starts(n_tokens, max_length, stride)
    n_batches = len(starts) // batch_size if drop_last else -(-len(starts) // batch_size)
    got = batches(loader)
    assert len(loader) == len(got) == n_batches
    k = 0
    for x, y in got:
        assert x.dtype == np.int64 and y.dtype == np.int64
        assert x.shape == y.shape and x.shape[1] == max_length
        assert 1 <= x.shape[0] <= batch_size
        if drop_last:
            assert x.shape[0] == batch_size
        for row_x, row_y in zip(x, y):
            s = starts[k]
            np.testing.assert_array_equal(row_x, tokens[s:s + max_length])
            np.testing.assert_array_equal(row_y, tokens[s + 1:s + max_length + 1])
            k += 1
        np.testing.assert_array_equal(x[:, 1:], y[:, :-1])
    assert k == (n_batches * batch_size if drop_last else len(starts))


@settings(max_examples=200, deadline=None)
@given(**sizes, batch_size=st.integers(1, 8), drop_last=st.booleans(),
       seed=st.integers(0, 2**32 - 1), epoch=st.integers(0, 100))
def test_loader_shuffled_is_a_permutation(n_tokens, max_length, stride, batch_size, drop_last, seed, epoch):
    tokens = np.arange(n_tokens, dtype=np.int64)  # a row's first token is its start
    loader = DataLoader(tokens, batch_size, max_length, stride, shuffle=True, drop_last=drop_last, seed=seed)
    loader.set_epoch(epoch)
    starts = book_starts(n_tokens, max_length, stride)
    got = batches(loader)
    seen = [int(s) for x, _ in got for s in x[:, 0]]
    for x, y in got:
        np.testing.assert_array_equal(x, x[:, :1] + np.arange(max_length))  # contiguous windows
        np.testing.assert_array_equal(y, x + 1)
    assert len(seen) == len(set(seen))
    assert set(seen) <= set(starts)
    if drop_last:
        assert len(seen) == len(starts) // batch_size * batch_size
        assert all(x.shape[0] == batch_size for x, _ in got)
    else:
        assert sorted(seen) == starts


@settings(max_examples=150, deadline=None)
@given(**sizes, batch_size=st.integers(1, 8), drop_last=st.booleans(), shuffle=st.booleans(),
       world=st.integers(1, 5), seed=st.integers(0, 1000))
def test_shard_partitions_batches(n_tokens, max_length, stride, batch_size, drop_last, shuffle, world, seed):
    tokens = np.arange(n_tokens, dtype=np.int64)

    def loader():
        return DataLoader(tokens, batch_size, max_length, stride, shuffle=shuffle,
                          drop_last=drop_last, seed=seed)

    whole = batches(loader())
    shards = []
    for rank in range(world):
        part = loader()
        part.shard(rank, world)
        shards.append(batches(part))
        assert len(part) == len(shards[-1])
    assert sum(map(len, shards)) == len(whole)
    for i, (x, y) in enumerate(whole):  # global batch i lives on rank i % world, at i // world
        sx, sy = shards[i % world][i // world]
        np.testing.assert_array_equal(sx, x)
        np.testing.assert_array_equal(sy, y)


# ---------------------------------------------------------------- corpus lookup

def test_default_corpus_is_the_bundled_verdict_with_no_environment(tmp_path):
    """A fresh machine: empty HOME, no NPGPT_DATA_DIR, no network, run from an empty folder."""
    import subprocess
    import sys
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "PYTHONPATH": str(ROOT)}
    code = "import hashlib, npgpt; print(hashlib.sha256(npgpt.load_corpus().encode()).hexdigest())"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True,
                         text=True, check=True)
    assert out.stdout.strip() == VERDICT_SHA256
    assert out.stderr == ""                     # no notice, no fallback


def test_damaged_bundled_verdict_is_refused(tmp_path, monkeypatch):
    import npgpt.data.corpus as corpus
    damaged = tmp_path / "the-verdict.txt"
    damaged.write_bytes(corpus.VERDICT_FILE.read_bytes()[:-1])
    monkeypatch.setattr(corpus, "VERDICT_FILE", damaged)
    with pytest.raises(ValueError, match=f"{damaged}: sha256"):
        load_corpus()


def test_load_corpus_explicit_path(tmp_path):
    path = tmp_path / "book.txt"
    path.write_text("naïve café — ünïcode\nsecond line\n", encoding="utf-8")
    assert load_corpus(path) == "naïve café — ünïcode\nsecond line\n"
    assert load_corpus(str(path)) == "naïve café — ünïcode\nsecond line\n"


def test_load_corpus_missing_path(tmp_path):
    path = tmp_path / "nowhere" / "missing.txt"
    with pytest.raises(FileNotFoundError) as excinfo:
        load_corpus(path)
    assert str(path) in str(excinfo.value)


def test_load_corpus_not_utf8(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("café\n".encode("latin-1") + b"\xff\xfe")
    with pytest.raises(ValueError) as excinfo:
        load_corpus(path)
    assert str(path) in str(excinfo.value)
    assert "UTF-8" in str(excinfo.value)
