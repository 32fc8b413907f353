"""llm.c's GPT-2 model files (gpt2_124M.bin, the model_*.bin its trainers save), read and written.

The format, as train_gpt2.c's gpt2_build_from_checkpoint reads it and train_gpt2.py's write_model
writes it: a header of 256 little-endian int32,
    [20240326, version, maxT, V, L, NH, C, Vp, 0, ...]
version 3: every tensor float32; version 5: every tensor bfloat16. V is the vocabulary (GPT-2's
50,257), Vp the rows of wte, padded with zeros to a multiple of 128 (50,304). Then 16 tensors,
each layer's slices one after another, every weight in PyTorch's (out, in) layout (llm.c's
matmul_forward takes weight (OC, C)), so nothing is transposed:
    wte (Vp, C)  wpe (maxT, C)  ln1w ln1b (L, C)  qkvw (L, 3C, C)  qkvb (L, 3C)  attprojw (L, C, C)
    attprojb (L, C)  ln2w ln2b (L, C)  fcw (L, 4C, C)  fcb (L, 4C)  fcprojw (L, C, 4C)  fcprojb (L, C)
    lnfw lnfb (C)
The head is wte itself (tied); llm.c's softmax and loss take the first V logits only. Every
model file has every bias: a model of npgpt without some (qkv_bias=False, bias=False) is written
with zeros there, which computes the same; an untied head cannot be written.

Reading checks every header field and the file's size against the sizes it declares before any
tensor is allocated; each refusal names the field and its value.
"""
from __future__ import annotations

import math
import os

import numpy as np

from ..config import GPTConfig
from ..files import atomic_write
from ..params import param_shapes
from .lazy import LazyParam, read_exact

MAGIC = 20240326
VERSIONS = {3: "float32", 5: "bfloat16"}
HEADER_INTS = 256
HEADER_BYTES = 4 * HEADER_INTS
FIELDS = ("magic", "version", "maxT", "V", "L", "NH", "C", "Vp")
GPT2_VOCAB = 50257                                      # the vocabulary of GPT-2's tokenizer
PAD_MULTIPLE = 128                                      # llm.c pads wte's rows to a multiple of this
# what a file with another of llm.c's magic numbers is
OTHER_MAGICS = {20240520: "an llm.c GPT-2 token shard (give its folder to --data)",
                20240801: "an llm.c Llama 3 token shard",
                20240803: "an llm.c Llama 3 model file (npgpt's model is GPT-2)"}
# llm.c's tensors in file order: (name, npgpt's name in layer i (or the model), shape per layer or None)
TENSORS = (("wte", "wte"), ("wpe", "wpe"), ("ln1w", "ln_1.weight"), ("ln1b", "ln_1.bias"),
           ("qkvw", "attn.c_attn.weight"), ("qkvb", "attn.c_attn.bias"), ("attprojw", "attn.c_proj.weight"),
           ("attprojb", "attn.c_proj.bias"), ("ln2w", "ln_2.weight"), ("ln2b", "ln_2.bias"),
           ("fcw", "mlp.c_fc.weight"), ("fcb", "mlp.c_fc.bias"), ("fcprojw", "mlp.c_proj.weight"),
           ("fcprojb", "mlp.c_proj.bias"), ("lnfw", "ln_f.weight"), ("lnfb", "ln_f.bias"))


def is_llmc_file(path) -> bool:
    """Whether a file starts with one of llm.c's magic numbers (a model file or a token shard)."""
    with open(path, "rb") as f:
        head = f.read(4)
    return len(head) == 4 and int.from_bytes(head, "little") in (MAGIC, *OTHER_MAGICS)


def _layout(cfg: GPTConfig, Vp: int):
    """[(npgpt name, shape)] in the file's order: 16 tensors, the layered ones layer by layer.
    Every bias is listed, whether the model has it or not; wte has Vp rows."""
    full = param_shapes(GPTConfig(**{**cfg.to_dict(), "bias": True, "qkv_bias": True, "tie_weights": True}))
    order = []
    for _, name in TENSORS:
        if name in ("wte", "wpe") or name.startswith("ln_f"):
            order.append((name, (Vp, cfg.emb_dim) if name == "wte" else full[name]))
        else:
            order += [(f"h.{i}.{name}", full[f"h.{i}.{name}"]) for i in range(cfg.n_layers)]
    return order


def read_header(path, size: int) -> dict:
    """The header's fields, each checked, and the file's size against the bytes they declare."""
    if size < HEADER_BYTES:
        raise ValueError(f"{path}: {size} bytes, shorter than the {HEADER_BYTES}-byte header of an llm.c model file")
    with open(path, "rb") as f:
        ints = np.frombuffer(f.read(HEADER_BYTES), dtype="<i4").tolist()
    h = dict(zip(FIELDS, ints))
    if h["magic"] != MAGIC:
        what = OTHER_MAGICS.get(h["magic"], "not an llm.c model file")
        raise ValueError(f"{path}: magic {h['magic']}, {what}; an llm.c GPT-2 model file has magic {MAGIC}")
    if h["version"] not in VERSIONS:
        raise ValueError(f"{path}: version {h['version']}; npgpt reads llm.c's versions 3 (float32) and 5 "
                         "(bfloat16), with a padded vocabulary (re-export older files with llm.c's train_gpt2.py)")
    for field in ("maxT", "V", "L", "NH", "C", "Vp"):
        if h[field] <= 0:
            raise ValueError(f"{path}: {field} {h[field]} in the header; expected a positive integer")
    if h["C"] % h["NH"]:
        raise ValueError(f"{path}: C {h['C']} is not divisible by NH {h['NH']} (the head size is their quotient)")
    if h["Vp"] < h["V"]:
        raise ValueError(f"{path}: Vp {h['Vp']} is smaller than V {h['V']}; wte's rows are the vocabulary padded up")
    rest = [(i, v) for i, v in enumerate(ints[len(FIELDS):], len(FIELDS)) if v]
    if rest:
        raise ValueError(f"{path}: header int {rest[0][0]} is {rest[0][1]}; llm.c writes zeros after Vp")
    C, itemsize = h["C"], 4 if h["version"] == 3 else 2
    # wte, wpe, each block's 12C^2 weights and 13C biases and LayerNorm values, ln_f: Python's ints, no overflow
    expected = HEADER_BYTES + itemsize * ((h["Vp"] + h["maxT"]) * C + h["L"] * (12 * C * C + 13 * C) + 2 * C)
    if size != expected:
        raise ValueError(f"{path}: {size} bytes; its header (maxT {h['maxT']}, Vp {h['Vp']}, L {h['L']}, "
                         f"C {C}, {VERSIONS[h['version']]}) declares {expected}: truncated or damaged")
    h["cfg"] = GPTConfig(vocab_size=h["V"], context_length=h["maxT"], emb_dim=C, n_heads=h["NH"], n_layers=h["L"],
                         qkv_bias=True, tie_weights=True, emb_init_std=0.02, drop_rate=0.0)
    return h


def open_llmc(stack, path, vocab_size=None, drop_rate=None):
    """(GPTConfig, {npgpt name: LazyParam}) of an llm.c model file, open until stack closes.
    vocab_size: None or V drops wte's padded rows (the model llm.c computes), Vp keeps them."""
    h = read_header(path, os.path.getsize(path))
    V, Vp = h["V"], h["Vp"]
    if vocab_size not in (None, V, Vp):
        raise ValueError(f"{path}: vocab_size {vocab_size}; this llm.c file has V {V} and Vp {Vp} (its rows "
                         f"padded): give {V} to drop the padding or {Vp} to keep it")
    cfg = GPTConfig(**{**h["cfg"].to_dict(), "vocab_size": vocab_size or V,
                       "drop_rate": 0.0 if drop_rate is None else drop_rate})
    bf16 = h["version"] == 5
    f = stack.enter_context(open(path, "rb", buffering=0))
    params, offset = {}, HEADER_BYTES
    for name, shape in _layout(cfg, Vp):
        rows = (cfg.vocab_size, cfg.emb_dim) if name == "wte" else shape    # wte: the first rows of (Vp, C)
        params[name] = LazyParam(rows, np.float32, _filler(f, offset, bf16))
        offset += (2 if bf16 else 4) * math.prod(shape)
    return cfg, params


def _filler(f, offset, bf16):
    def fill(out):
        if bf16:                                          # bfloat16: the top 16 bits of a float32
            raw = np.empty(out.shape, "<u2")
            read_exact(f, offset, raw)
            np.copyto(out, (raw.astype(np.uint32) << 16).view(np.float32), casting="same_kind")
        elif out.dtype == np.float32 and out.flags.c_contiguous:
            read_exact(f, offset, out)
        else:
            tmp = np.empty(out.shape, "<f4")
            read_exact(f, offset, tmp)
            np.copyto(out, tmp, casting="same_kind")
    return fill


def to_bf16(a: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits (uint16), rounded to nearest, ties to even, as torch's .to(torch.bfloat16)."""
    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    return ((u + np.uint32(0x7FFF) + ((u >> 16) & np.uint32(1))) >> 16).astype("<u2")


def write_llmc(model, path, dtype="float32", vocab_size=None):
    """Write model as an llm.c model file: version 3 (dtype float32) or 5 (bfloat16), atomically.
    vocab_size: the header's V (default: GPT-2's 50,257, or the model's rows if fewer); wte is padded
    with zero rows up to a multiple of 128 (the model's own rows beyond V are kept)."""
    cfg = model.cfg
    if not cfg.tie_weights:
        raise ValueError(f"{path}: llm.c's GPT-2 has a tied head (the logits are wte's), this model an untied "
                         "lm_head.weight; only a model with tie_weights=True can be written")
    version = {v: k for k, v in VERSIONS.items()}.get(str(dtype))
    if version is None:
        raise ValueError(f"dtype {dtype!r}: llm.c's model files hold float32 (version 3) or bfloat16 (version 5)")
    V = min(cfg.vocab_size, GPT2_VOCAB) if vocab_size is None else vocab_size
    if not 0 < V <= cfg.vocab_size:
        raise ValueError(f"vocab_size {V}: expected 1 to the model's {cfg.vocab_size} rows")
    Vp = -(-cfg.vocab_size // PAD_MULTIPLE) * PAD_MULTIPLE
    header = np.zeros(HEADER_INTS, "<i4")
    header[:len(FIELDS)] = MAGIC, version, cfg.context_length, V, cfg.n_layers, cfg.n_heads, cfg.emb_dim, Vp
    params = model.param_views() if hasattr(model, "param_views") else model.params()

    def tensor(name, shape):
        p = params.get(name)
        if p is None:                                   # a bias the model does not have: zeros, the same
            return np.zeros(shape, np.float32)
        if name == "wte" and Vp > cfg.vocab_size:
            return np.concatenate([p, np.zeros((Vp - cfg.vocab_size, cfg.emb_dim), p.dtype)])
        return p

    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(header.tobytes())
            for name, shape in _layout(cfg, Vp):
                a = tensor(name, shape)
                a = to_bf16(a) if version == 5 else np.ascontiguousarray(a, dtype="<f4")
                f.write(memoryview(a.reshape(-1).view(np.uint8)))
    return atomic_write(path, write)
