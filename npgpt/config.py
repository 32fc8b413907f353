"""GPTConfig: the model's hyperparameters, with the presets of the book and of GPT-2; check_token_ids: ids the
model can take (in its vocabulary, within its context)."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

import numpy as np

# Sane upper bounds, far above any GPT-2-like model (GPT-3 175B: 96 layers, 96 heads, width 12,288):
# checked before anything is sized from a config, so that a file declaring n_layer 2**40 is refused
# at once instead of looping over 2**40 blocks. What a file declares is then checked against its bytes.
MAX_SIZES = {"vocab_size": 1 << 21, "context_length": 1 << 20, "emb_dim": 1 << 16, "n_heads": 1 << 12,
             "n_layers": 1 << 12}


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int = 50257      # GPT-2's BPE vocabulary: 50,000 merges + 256 bytes + <|endoftext|>
    context_length: int = 256    # longest sequence the position embedding covers
    emb_dim: int = 768           # C: width of the residual stream
    n_heads: int = 12            # NH: attention heads; head size is emb_dim // n_heads
    n_layers: int = 12           # L: transformer blocks
    drop_rate: float = 0.1       # dropout after embeddings, on attention weights and on both residual branches
    qkv_bias: bool = False       # bias in the query/key/value projection (GPT-2 has one, the book's 124M run not)
    bias: bool = True            # biases in every LayerNorm and the other Linears (GPT-2's, the book's); False is
                                 # nanoGPT's default bias=False, "a bit better and faster"; then qkv_bias must be False
    tie_weights: bool = False    # output head shares wte (GPT-2) or has its own lm_head.weight (the book)
    emb_init_std: float = 1.0    # std of wte and wpe at initialisation: 1.0 as the book's nn.Embedding, 0.02 in GPT-2

    def __post_init__(self):
        for name, most in MAX_SIZES.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= most:
                raise ValueError(f"GPTConfig.{name} must be an integer from 1 to {most:,}, got {value!r}")
        if self.emb_dim % self.n_heads:
            raise ValueError(f"GPTConfig.emb_dim ({self.emb_dim}) must be divisible by "
                             f"n_heads ({self.n_heads})")
        rate = self.drop_rate
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 <= rate < 1.0:
            raise ValueError(f"GPTConfig.drop_rate must be a number in [0, 1), got {rate!r}")
        std = self.emb_init_std
        if isinstance(std, bool) or not isinstance(std, (int, float)) or not 0.0 < std < float("inf"):
            raise ValueError(f"GPTConfig.emb_init_std must be a positive number, got {std!r}")
        for name in ("qkv_bias", "bias", "tie_weights"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"GPTConfig.{name} must be True or False, got {getattr(self, name)!r}")
        if self.qkv_bias and not self.bias:
            raise ValueError("GPTConfig.qkv_bias=True needs bias=True (--no-bias needs --no-qkv-bias): bias=False, "
                             "nanoGPT's, has no bias in any Linear, the query/key/value projection included")

    @property
    def head_dim(self) -> int:
        return self.emb_dim // self.n_heads

    @classmethod
    def preset(cls, name: str, **overrides) -> "GPTConfig":
        """One of PRESETS by name; keyword arguments replace single fields."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; expected one of {', '.join(PRESETS)}")
        return dataclasses.replace(PRESETS[name], **overrides)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "GPTConfig":
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - fields
        if unknown:
            raise ValueError(f"unknown GPTConfig fields {sorted(unknown)}; expected some of {sorted(fields)}")
        return cls(**d)


def _gpt2(emb_dim, n_layers, n_heads):
    return GPTConfig(context_length=1024, emb_dim=emb_dim, n_heads=n_heads, n_layers=n_layers,
                     drop_rate=0.1, qkv_bias=True, tie_weights=True, emb_init_std=0.02)


# Sizes from the book's table of GPT-2 models (chapter 4) and OpenAI's hparams.json files.
PRESETS = {
    "book-124m": GPTConfig(),                  # the book's GPT_CONFIG_124M (context 256, untied head)
    "gpt2-small": _gpt2(768, 12, 12),          # 124M
    "gpt2-medium": _gpt2(1024, 24, 16),        # 355M
    "gpt2-large": _gpt2(1280, 36, 20),         # 774M
    "gpt2-xl": _gpt2(1600, 48, 25),            # 1558M
    "tiny": GPTConfig(context_length=64, emb_dim=32, n_heads=2, n_layers=2, drop_rate=0.0),  # tests
}


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
