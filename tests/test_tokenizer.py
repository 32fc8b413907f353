"""The offline GPT-2 tokenizer: known token ids from the book, round trips, the sha256 guard
on the bundled ranks, and the ranks shipped as package data with their licence."""
import configparser
import hashlib
import importlib.resources
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
import tiktoken
from hypothesis import given, settings
from hypothesis import strategies as st

import npgpt
import npgpt.tokenizer as tokmod

ENDOFTEXT = "<|endoftext|>"
REPO = Path(__file__).resolve().parent.parent

# Any Unicode text that can be UTF-8 encoded (lone surrogates cannot).
unicode_text = st.text(alphabet=st.characters(exclude_categories=("Cs",)), max_size=200)


@pytest.fixture
def fresh_tokenizer_cache():
    """get_tokenizer is lru_cache'd: start uncached and leave no tokenizer built under a patch."""
    npgpt.get_tokenizer.cache_clear()
    yield
    npgpt.get_tokenizer.cache_clear()


def _no_network(*args, **kwargs):
    raise AssertionError("the tokenizer tried to open a network connection")


def test_get_tokenizer_is_gpt2_encoding_offline(monkeypatch, fresh_tokenizer_cache):
    monkeypatch.setattr(socket, "create_connection", _no_network)
    monkeypatch.setattr(socket.socket, "connect", _no_network)
    tok = npgpt.get_tokenizer()
    assert isinstance(tok, tiktoken.Encoding)
    assert tok.n_vocab == 50257
    assert tok.eot_token == 50256
    assert tok.encode(ENDOFTEXT, allowed_special={ENDOFTEXT}) == [50256]
    assert npgpt.get_tokenizer() is tok  # cached: built once per process


def test_book_example_every_effort_moves_you():
    assert npgpt.get_tokenizer().encode("Every effort moves you") == [6109, 3626, 6100, 345]


def test_book_example_with_endoftext():
    text = "Hello, do you like tea? <|endoftext|> In the sunlit terraces of someunknownPlace."
    ids = npgpt.get_tokenizer().encode(text, allowed_special={ENDOFTEXT})
    assert ids == [15496, 11, 466, 345, 588, 8887, 30, 220, 50256, 554, 262, 4252, 18250,
                   8812, 2114, 286, 617, 34680, 27271, 13]
    assert npgpt.get_tokenizer().decode(ids) == text


def test_single_bytes_and_known_ranks():
    tok = npgpt.get_tokenizer()
    # GPT-2's byte-level alphabet: "!" is rank 0, "a" is 64, " the" is 262.
    assert tok.encode("!") == [0]
    assert tok.encode("a") == [64]
    assert tok.encode(" the") == [262]


@settings(max_examples=200, deadline=None)
@given(unicode_text)
def test_roundtrip_arbitrary_text_as_plain_text(s):
    """With disallowed_special=() a literal "<|endoftext|>" is ordinary text: every string round-trips."""
    tok = npgpt.get_tokenizer()
    ids = tok.encode(s, disallowed_special=())
    assert tok.eot_token not in ids
    assert all(0 <= i < 50256 for i in ids)
    assert tok.decode(ids) == s


@settings(max_examples=100, deadline=None)
@given(st.lists(unicode_text, min_size=1, max_size=4))
def test_roundtrip_with_endoftext_allowed(pieces):
    """text_to_token_ids allows <|endoftext|>: each literal becomes id 50256 and decoding restores it."""
    s = ENDOFTEXT.join(pieces)
    ids = npgpt.text_to_token_ids(s)
    assert ids.dtype == np.int64 and ids.ndim == 2 and ids.shape[0] == 1
    # "<|endoftext|>" cannot overlap itself, so str.count is the number of specials.
    assert int((ids == 50256).sum()) == s.count(ENDOFTEXT)
    assert npgpt.token_ids_to_text(ids) == s


def test_text_to_token_ids_shape_and_dtype():
    tok = npgpt.get_tokenizer()
    ids = npgpt.text_to_token_ids("Every effort moves you", tok)
    assert isinstance(ids, np.ndarray)
    assert ids.dtype == np.int64
    assert ids.shape == (1, 4)
    np.testing.assert_array_equal(ids, [[6109, 3626, 6100, 345]])
    empty = npgpt.text_to_token_ids("", tok)
    assert empty.shape == (1, 0) and empty.dtype == np.int64


def test_token_ids_to_text_accepts_1d_and_2d():
    tok = npgpt.get_tokenizer()
    assert npgpt.token_ids_to_text(np.array([[6109, 3626, 6100, 345]]), tok) == "Every effort moves you"
    assert npgpt.token_ids_to_text(np.array([6109, 3626, 6100, 345]), tok) == "Every effort moves you"
    assert npgpt.token_ids_to_text([6109, 3626, 6100, 345], tok) == "Every effort moves you"


def test_token_ids_to_text_rejects_a_batch():
    ids = np.array([[6109, 3626], [6100, 345]])
    with pytest.raises(ValueError, match=r"\(2, 2\)"):
        npgpt.token_ids_to_text(ids)
    with pytest.raises(ValueError):
        npgpt.token_ids_to_text(np.zeros((1, 2, 3), dtype=np.int64))


def _damaged_copy(tmp_path):
    damaged = tmp_path / "gpt2.tiktoken"
    data = bytearray(tokmod.RANKS_FILE.read_bytes())
    # "IQ== 0" -> "IQ== 1": still parses, only the checksum can catch it.
    assert data[:6] == b"IQ== 0"
    data[5] = ord("1")
    damaged.write_bytes(bytes(data))
    return damaged


def test_bundled_ranks_match_their_sha256():
    digest = hashlib.sha256(tokmod.RANKS_FILE.read_bytes()).hexdigest()
    assert digest == "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"


def test_damaged_ranks_are_refused_by_the_loader(tmp_path):
    damaged = _damaged_copy(tmp_path)
    with pytest.raises(ValueError, match="sha256"):
        tokmod._read_ranks(damaged, tokmod.RANKS_SHA256)


def test_damaged_ranks_are_refused_by_get_tokenizer(tmp_path, monkeypatch, fresh_tokenizer_cache):
    damaged = _damaged_copy(tmp_path)
    monkeypatch.setattr(tokmod, "RANKS_FILE", damaged)
    with pytest.raises(ValueError, match="sha256") as excinfo:
        npgpt.get_tokenizer()
    assert str(damaged) in str(excinfo.value)


def test_ranks_file_copied_intact_loads(tmp_path, monkeypatch, fresh_tokenizer_cache):
    """The check passes for an exact copy: the guard compares content, not location."""
    copy = tmp_path / "gpt2.tiktoken"
    shutil.copyfile(tokmod.RANKS_FILE, copy)
    monkeypatch.setattr(tokmod, "RANKS_FILE", copy)
    assert npgpt.get_tokenizer().encode("Every effort moves you") == [6109, 3626, 6100, 345]


def test_ranks_and_licence_ship_as_package_data():
    assets = importlib.resources.files("npgpt") / "assets"
    ranks = assets / "gpt2.tiktoken"
    licence = assets / "LICENSE.gpt2-tiktoken"
    assert ranks.is_file()
    assert licence.is_file()
    assert Path(str(ranks)) == tokmod.RANKS_FILE
    text = licence.read_text(encoding="utf-8")
    assert "MIT License" in text and "OpenAI" in text
    # 50,000 merges + 256 single bytes; <|endoftext|> is a special token, not a rank.
    assert len(ranks.read_bytes().splitlines()) == 50256

    cfg = configparser.ConfigParser()
    assert cfg.read(REPO / "setup.cfg"), "setup.cfg not found"
    declared = {p.strip() for p in cfg["options.package_data"]["npgpt"].replace("\n", ",").split(",")}
    assert {"assets/gpt2.tiktoken", "assets/LICENSE.gpt2-tiktoken"} <= declared
