"""GPT-2's byte-pair tokenizer, offline: tiktoken with the BPE ranks shipped in npgpt/assets.

`tiktoken.get_encoding("gpt2")` downloads its files on first use; this module builds the same
Encoding from the bundled gpt2.tiktoken (OpenAI, MIT licence) after checking its sha256.
"""
from __future__ import annotations

import base64
import functools
import hashlib
import json
from pathlib import Path

import numpy as np
import tiktoken
from tiktoken_ext.openai_public import r50k_pat_str  # GPT-2's pre-tokenisation regex

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
    return tiktoken.Encoding(name="gpt2", pat_str=r50k_pat_str,
                             mergeable_ranks=_read_ranks(RANKS_FILE, RANKS_SHA256),
                             special_tokens={ENDOFTEXT: ENDOFTEXT_ID}, explicit_n_vocab=50257)


def tokenizer_from_openai_files(encoder_json: str | Path, vocab_bpe: str | Path) -> tiktoken.Encoding:
    """The tokenizer described by an OpenAI checkpoint folder's encoder.json and vocab.bpe."""
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    ranks = data_gym_to_mergeable_bpe_ranks(vocab_bpe_file=str(vocab_bpe), encoder_json_file=str(encoder_json))
    encoder = json.loads(Path(encoder_json).read_text(encoding="utf-8"))
    specials = {tok: i for tok, i in encoder.items() if tok.startswith("<|") and tok.endswith("|>")}
    return tiktoken.Encoding(name="gpt2-local", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                             special_tokens=specials)


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


def check_token_ids(ids, vocab_size, what="token ids", context_length=None) -> np.ndarray:
    """ids as an int64 (B, T) array, every id in [0, vocab_size) and T <= context_length if given."""
    arr = np.asarray(ids)
    if arr.dtype == object or not (np.issubdtype(arr.dtype, np.integer) or arr.size == 0):
        raise TypeError(f"{what} must be integers, got dtype {arr.dtype}")
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2:
        raise ValueError(f"{what} must have shape (B, T), got {arr.shape}")
    if arr.size and (arr.min() < 0 or arr.max() >= vocab_size):
        bad = arr[(arr < 0) | (arr >= vocab_size)][0]
        raise ValueError(f"{what}: token id {bad} is out of range [0, {vocab_size})")
    if context_length is not None and arr.shape[1] > context_length:
        raise ValueError(f"{what}: a sequence of {arr.shape[1]} tokens is longer than context_length "
                         f"{context_length}")
    return arr.astype(np.int64, copy=False)
