"""GPT-2's byte-pair tokenizer, offline: tiktoken with the BPE ranks shipped in npgpt/assets.

`tiktoken.get_encoding("gpt2")` downloads its files on first use; this module builds the same
Encoding from the bundled gpt2.tiktoken (OpenAI, MIT licence) after checking its sha256.
tokenizer_from_openai_files builds one from the encoder.json and vocab.bpe that come with a
checkpoint, parsed and checked here.
"""
from __future__ import annotations

import base64
import functools
import hashlib
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .config import check_token_ids

if TYPE_CHECKING:
    import tiktoken

ENDOFTEXT = "<|endoftext|>"
ENDOFTEXT_ID = 50256
RANKS_FILE = Path(__file__).with_name("assets") / "gpt2.tiktoken"
RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"


def _read_ranks(path: Path, sha256: str) -> dict[bytes, int]:
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != sha256:
        raise ValueError(f"{path}: sha256 is {digest}, expected {sha256}; the file is damaged, "
                         "reinstall npgpt")
    ranks = {}
    for line in data.splitlines():
        token, rank = line.split()
        ranks[base64.b64decode(token)] = int(rank)
    return ranks


@functools.lru_cache(maxsize=None)
def get_tokenizer() -> tiktoken.Encoding:
    """The GPT-2 tokenizer (a tiktoken.Encoding), built from the bundled ranks: no network."""
    return _gpt2_encoding("gpt2", _read_ranks(RANKS_FILE, RANKS_SHA256), {ENDOFTEXT: ENDOFTEXT_ID},
                          explicit_n_vocab=50257)


def _gpt2_encoding(name: str, ranks: dict[bytes, int], specials: dict[str, int], **kwargs) -> tiktoken.Encoding:
    """A tiktoken Encoding with GPT-2's split pattern. tiktoken is imported here,
    not at the top, so that importing this module stays cheap."""
    import tiktoken
    from tiktoken_ext.openai_public import r50k_pat_str        # GPT-2's pre-tokenisation regex
    return tiktoken.Encoding(name=name, pat_str=r50k_pat_str, mergeable_ranks=ranks,
                             special_tokens=specials, **kwargs)


def _byte_alphabet() -> dict[str, int]:
    """GPT-2's bytes_to_unicode, inverted: the character that spells each byte in encoder.json and
    vocab.bpe -> that byte. Printable Latin-1 bytes spell themselves; the other 68 (control
    characters, space, ...) take the characters from U+0100 on, in byte order (space is 'Ġ')."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{chr(b): b for b in printable}, **{chr(256 + i): b for i, b in enumerate(others)}}


def tokenizer_from_openai_files(encoder_json: str | Path, vocab_bpe: str | Path) -> tiktoken.Encoding:
    """The tokenizer described by an OpenAI checkpoint folder's encoder.json and vocab.bpe (or
    Hugging Face's vocab.json and merges.txt: the same files under other names).

    encoder.json maps every token, spelled in GPT-2's byte alphabet, to its id; "<|...|>" tokens are
    special. vocab.bpe is a "#version" line, then the merges "a b" in the order BPE applies them.
    tiktoken applies the merge whose result has the lowest id, so each merge must make a token
    with a higher id than the merges before it; this is checked, as is that every token of two
    or more bytes is made by a merge. The files are read afresh on every call (tiktoken's own
    loader caches them by path, and would miss a rewritten file)."""
    encoder_json, vocab_bpe = Path(encoder_json), Path(vocab_bpe)
    from .files import load_json
    encoder = load_json(encoder_json, "a JSON object of token -> id")    # bounded; a failure names the file
    if not isinstance(encoder, dict) or not all(type(i) is int for i in encoder.values()):
        raise ValueError(f"{encoder_json}: expected a JSON object of token -> integer id")
    if sorted(encoder.values()) != list(range(len(encoder))):
        raise ValueError(f"{encoder_json}: the ids are not 0..{len(encoder) - 1}, each once")
    alphabet = _byte_alphabet()
    specials = {t: i for t, i in encoder.items() if t.startswith("<|") and t.endswith("|>")}
    ranks = {}
    for token, i in encoder.items():
        if token not in specials:
            if not token or any(ch not in alphabet for ch in token):
                raise ValueError(f"{encoder_json}: token {token!r} is not spelled in GPT-2's byte alphabet")
            ranks[bytes(alphabet[ch] for ch in token)] = i
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise ValueError(f"{encoder_json}: no token for the bytes {missing[:8]}; every byte needs one")

    lines = vocab_bpe.read_text(encoding="utf-8").splitlines()
    if not lines or not lines[0].startswith("#version"):
        raise ValueError(f"{vocab_bpe}: expected a '#version' line first, found {lines[:1]}")
    made, last = set(), -1
    for n, line in enumerate(lines[1:], start=2):
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2 or any(p not in encoder or p in specials for p in parts):
            raise ValueError(f"{vocab_bpe} line {n}: expected a merge of two tokens of {encoder_json.name}, "
                             f"got {line!r}")
        token = parts[0] + parts[1]
        if token not in encoder or token in specials:
            raise ValueError(f"{vocab_bpe} line {n}: merge {line!r} makes {token!r}, which is not a token of "
                             f"{encoder_json.name}")
        if encoder[token] <= last:
            raise ValueError(f"{vocab_bpe} line {n}: merge {line!r} makes id {encoder[token]} after a merge "
                             f"that made id {last}; the merges must come in the order of their ids")
        made.add(token)
        last = encoder[token]
    unmade = [t for t in encoder if len(t) > 1 and t not in specials and t not in made]
    if unmade:
        raise ValueError(f"{encoder_json}: tokens {unmade[:5]} are made by no merge of {vocab_bpe}")
    return _gpt2_encoding("gpt2-local", ranks, specials)


def text_to_token_ids(text: str, tokenizer: tiktoken.Encoding | None = None) -> np.ndarray:
    """Encode text (with <|endoftext|> allowed) into an int64 array of shape (1, T)."""
    tokenizer = tokenizer or get_tokenizer()
    ids = tokenizer.encode(text, allowed_special={ENDOFTEXT})
    return np.asarray(ids, dtype=np.int64)[None, :]


def token_ids_to_text(ids, tokenizer: tiktoken.Encoding | None = None) -> str:
    """Decode ids of shape (T,) or (1, T) back to text."""
    tokenizer = tokenizer or get_tokenizer()
    ids = np.asarray(ids)
    if ids.size:
        check_token_ids(ids.reshape(1, -1), tokenizer.n_vocab)
    if ids.ndim == 2:
        if ids.shape[0] != 1:
            raise ValueError(f"token_ids_to_text expects one sequence, shape (T,) or (1, T); got {ids.shape}")
        ids = ids[0]
    if ids.ndim != 1:
        raise ValueError(f"token_ids_to_text expects shape (T,) or (1, T), got {ids.shape}")
    return tokenizer.decode(ids.tolist())
