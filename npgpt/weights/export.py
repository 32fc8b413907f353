"""Writing a model for Hugging Face: config.json + model.safetensors that
transformers.GPT2LMHeadModel.from_pretrained reads, or one .safetensors file that carries npgpt's
config in its metadata (which load_pretrained reads back alone)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from ..config import GPTConfig
from ..files import atomic_write
from .names import hf_tensors
from .safetensors import write_safetensors

TOKENIZER_FILES = (("encoder.json", "vocab.bpe"), ("vocab.json", "merges.txt"))      # OpenAI's, Hugging Face's


def hf_config(cfg: GPTConfig, dtype) -> dict:
    """config.json of a GPT2LMHeadModel with npgpt's hyperparameters."""
    eos = 50256 if cfg.vocab_size > 50256 else None                   # GPT-2's <|endoftext|>
    return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": cfg.vocab_size,
            "n_positions": cfg.context_length, "n_embd": cfg.emb_dim, "n_head": cfg.n_heads,
            "n_layer": cfg.n_layers, "n_inner": None, "activation_function": "gelu_new",
            "resid_pdrop": cfg.drop_rate, "embd_pdrop": cfg.drop_rate, "attn_pdrop": cfg.drop_rate,
            "layer_norm_epsilon": 1e-5, "initializer_range": 0.02, "scale_attn_weights": True,
            "tie_word_embeddings": cfg.tie_weights, "use_cache": True, "dtype": str(np.dtype(dtype)),
            "bos_token_id": eos, "eos_token_id": eos}


def save_safetensors(model, path) -> Path:
    """One .safetensors file with Hugging Face's names; npgpt's config rides in its metadata, so
    load_pretrained reads the file alone."""
    return write_safetensors(path, hf_tensors(model), {"format": "pt", "npgpt_config": model.cfg.to_json()})


def export_hf(model, out_dir, tokenizer_from=None) -> Path:
    """Write config.json + model.safetensors for transformers.GPT2LMHeadModel.from_pretrained(out_dir).

    An untied head (the book's 124M model) is written as lm_head.weight with
    tie_word_embeddings: false, which GPT2LMHeadModel honours. tokenizer_from: a folder whose
    encoder.json + vocab.bpe (or vocab.json + merges.txt) are copied as vocab.json + merges.txt."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"{out_dir}: exists and is not a folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    save_safetensors(model, out_dir / "model.safetensors")
    config = json.dumps(hf_config(model.cfg, model.dtype), indent=2) + "\n"
    atomic_write(out_dir / "config.json", lambda tmp: Path(tmp).write_text(config))
    if tokenizer_from is not None:
        src = Path(tokenizer_from)
        src = src if src.is_dir() else src.parent
        for names in TOKENIZER_FILES:
            if all((src / n).is_file() for n in names):
                for n, target in zip(names, TOKENIZER_FILES[1]):            # under Hugging Face's names
                    if (src / n).resolve() != (out_dir / target).resolve():
                        shutil.copyfile(src / n, out_dir / target)
                break
    return out_dir
