"""Where each of npgpt's parameters lives in GPT-2's other weight formats, and in which layout.

npgpt's names are GPT-2's (wte, h.0.attn.c_attn.weight, ...) with weights in PyTorch's (out, in)
layout. Each format's source function maps an npgpt name to the tensors that hold it and how to
lay them out (kind); the transposes live here and nowhere else:
  OpenAI (TF)   model/h0/attn/c_attn/w, conv1d (1, in, out)       "conv1d": squeeze, transpose
  Hugging Face  transformer.h.0.attn.c_attn.weight, Conv1D (in, out)  "T": transpose
  the book      trf_blocks.0.att.W_query, W_key, W_value (C, C)    "copy", one per row block of
                                                                   c_attn.weight (3C, C)
map_params checks a reader's tensors against these (names, shapes, a floating-point dtype) and
turns them into LazyParams.
"""
from __future__ import annotations

import re

import numpy as np

from ..config import GPTConfig
from ..params import param_shapes
from .lazy import LazyParam, Reader


def openai_source(name: str) -> tuple[list[str], str]:
    """npgpt name -> ([OpenAI TF names], kind): h.0.attn.c_attn.weight <- model/h0/attn/c_attn/w (1, C, 3C)."""
    if name in ("wte", "wpe"):
        return [f"model/{name}"], "copy"
    parts = name.split(".")
    scope = ["model", f"h{parts[1]}", *parts[2:-1]] if parts[0] == "h" else ["model", *parts[:-1]]
    is_ln = scope[-1].startswith("ln_")
    leaf = "b" if parts[-1] == "bias" else "g" if is_ln else "w"
    return ["/".join(scope + [leaf])], "conv1d" if leaf == "w" else "copy"


def hf_source(name: str, prefix: str = "transformer.") -> tuple[list[str], str]:
    """npgpt name -> ([HF names], kind): h.0.attn.c_attn.weight <- transformer.h.0.attn.c_attn.weight (C, 3C)."""
    if name == "lm_head.weight":
        return [name], "copy"
    if name in ("wte", "wpe"):
        return [f"{prefix}{name}.weight"], "copy"
    conv1d = name.endswith(".weight") and (".c_attn." in name or ".c_proj." in name or ".c_fc." in name)
    return [prefix + name], "T" if conv1d else "copy"


BOOK_NAMES = {"ln_1.weight": "norm1.scale", "ln_1.bias": "norm1.shift", "ln_2.weight": "norm2.scale",
              "ln_2.bias": "norm2.shift", "attn.c_proj.weight": "att.out_proj.weight",
              "attn.c_proj.bias": "att.out_proj.bias", "mlp.c_fc.weight": "ff.layers.0.weight",
              "mlp.c_fc.bias": "ff.layers.0.bias", "mlp.c_proj.weight": "ff.layers.2.weight",
              "mlp.c_proj.bias": "ff.layers.2.bias", "wte": "tok_emb.weight", "wpe": "pos_emb.weight",
              "ln_f.weight": "final_norm.scale", "ln_f.bias": "final_norm.shift", "lm_head.weight": "out_head.weight"}


def book_source(name: str) -> tuple[list[str], str]:
    """npgpt name -> ([book names], kind): c_attn is the book's W_query, W_key, W_value stacked by rows."""
    if not name.startswith("h."):
        return [BOOK_NAMES[name]], "copy"
    _, i, rest = name.split(".", 2)
    block = f"trf_blocks.{i}."
    if rest.startswith("attn.c_attn."):
        kind = rest.rsplit(".", 1)[1]
        return [f"{block}att.{w}.{kind}" for w in ("W_query", "W_key", "W_value")], "copy"
    return [block + BOOK_NAMES[rest]], "copy"


def _source_shape(target: tuple, kind: str, parts: int) -> tuple:
    rows = (target[0] // parts, *target[1:])
    return rows if kind == "copy" else rows[::-1] if kind == "T" else (1, *rows[::-1])


def map_params(reader: Reader, cfg: GPTConfig, source, ignore=()) -> dict[str, LazyParam]:
    """npgpt's parameters as LazyParams over reader's tensors, after checking that every tensor
    is there with the right shape and that nothing unexplained is left over.
    source: one of the functions above; ignore: regexes of tensors to leave (buffers, tied heads)."""
    specs = {name: source(name) for name in param_shapes(cfg)}
    wanted = [s for sources, _ in specs.values() for s in sources]
    missing = [s for s in wanted if s not in reader.info]
    extra = sorted(set(reader.info) - set(wanted) - {n for n in reader.info if any(re.fullmatch(p, n) for p in ignore)})
    if missing or extra:
        raise ValueError(f"{reader.where}: does not hold a GPT-2 of {cfg.n_layers} layers as expected: missing "
                         f"{missing[:6]}{' ...' if len(missing) > 6 else ''}, unexpected {extra[:6]}"
                         f"{' ...' if len(extra) > 6 else ''}; found {len(reader.info)} tensors "
                         f"({', '.join(sorted(reader.info)[:4])}, ...)")
    params = {}
    for name, shape in param_shapes(cfg).items():
        sources, kind = specs[name]
        want = _source_shape(shape, kind, len(sources))
        for s in sources:
            if reader.info[s][1] != want:
                raise ValueError(f"{reader.where}: {s} (npgpt {name}): expected shape {want}, got {reader.info[s][1]}")
            if reader.info[s][0].kind != "f":
                raise ValueError(f"{reader.where}: {s} (npgpt {name}) holds {reader.info[s][0]}; expected "
                                 "floating-point weights (float16, bfloat16, float32 or float64)")
        params[name] = LazyParam(shape, reader.info[sources[0]][0], _filler(reader, sources, kind))
    return params


def _filler(reader: Reader, sources: list[str], kind: str):
    def fill(out):                          # out (rows, ...) in npgpt's layout; k sources fill k row blocks
        rows = out.shape[0] // len(sources)
        for i, s in enumerate(sources):
            part = out[i * rows:(i + 1) * rows]
            if kind == "copy":
                reader.read_into(s, part)
            else:
                a = reader.read(s)
                np.copyto(part, (a[0] if kind == "conv1d" else a).T, casting="same_kind")
    return fill


def hf_tensors(model) -> dict:
    """The model's parameters under GPT2LMHeadModel's names and layout (Conv1D weights (in, out)).
    GPT-2 always has every bias: a model without some (qkv_bias=False, bias=False) gets zeros there,
    which is the same. The NumPy backend's arrays are its own (param_views), and each transposed weight
    a LazyParam, so a writer holds one transposed tensor at a time, not a copy of the model."""
    cfg = model.cfg
    params = model.param_views() if hasattr(model, "param_views") else model.params()
    transposed = lambda p: LazyParam(p.shape[::-1], p.dtype, lambda out: np.copyto(out, p.T))
    every = param_shapes(GPTConfig(**{**cfg.to_dict(), "bias": True, "qkv_bias": True}))
    dtype = params["wte"].dtype
    out = {}
    for name, shape in every.items():
        (source,), kind = hf_source(name)
        p = params.get(name)
        out[source] = np.zeros(shape, dtype) if p is None else transposed(p) if kind == "T" else p
    return out
