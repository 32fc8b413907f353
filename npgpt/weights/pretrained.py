"""Loading GPT-2 weights from the formats they come in (export.py writes them for Hugging Face).

load_pretrained(path) recognises
  OpenAI's release folder  hparams.json, checkpoint, model.ckpt.index + .data-*: TensorFlow's tensor
                           bundle, read without TensorFlow (tfbundle.py; every tensor's crc32c checked)
  Hugging Face GPT-2       a folder with config.json and model.safetensors (or shards, or
                           pytorch_model.bin), or one .safetensors file (safetensors.py)
  the book's GPTModel      a .pth state_dict, or its {"model_state_dict", "optimizer_state_dict"} file
  nanoGPT                  its train.py's ckpt.pt, or a bare state_dict of its GPT (nanogpt.py)
  llm.c                    its model files, gpt2_124M.bin and model_*.bin (llmc.py)
  npgpt's checkpoint       .h5 (checkpoint.py)
  a GPT-2 name             gpt2, gpt2-medium, gpt2-large, gpt2-xl: found in a local Hugging Face cache (hub.py)
reads each format's hyperparameters into a GPTConfig, and maps its tensors onto npgpt's names and
(out, in) layout (names.py). Tensors are read one at a time straight into the model's
parameter buffer (lazy.py), so loading costs the weights' size in memory, not twice that.
"""
from __future__ import annotations

import re
import sys
from contextlib import ExitStack
from pathlib import Path

from ..config import GPTConfig
from ..files import check_regular, load_json, open_regular, parse_json
from .checkpoint import open_checkpoint
from .export import TOKENIZER_FILES
from . import nanogpt
from .hub import weights_path
from .lazy import TorchReader, build_loaded_model, check_stored, state_dict_of, torch_file, torch_state_dict
from .llmc import is_llmc_file, open_llmc
from .safetensors import SafetensorsReader, ShardedSafetensorsReader
from .tfbundle import TFBundleReader, checkpoint_prefix
from .names import book_source, hf_source, map_params, openai_source

__all__ = ["load_pretrained", "detect_format", "load_tokenizer"]

GPT2_DROP_RATE = 0.1          # GPT-2's dropout; the weight files do not record one
HF_IGNORED = (r"(transformer\.)?h\.\d+\.attn\.(bias|masked_bias)",)                   # causal-mask buffers


def _drop(drop_rate, default=GPT2_DROP_RATE) -> float:
    return default if drop_rate is None else drop_rate


def _default_heads(emb_dim: int, n_heads: int | None, where: str) -> int:
    """The book's .pth and a bare .safetensors do not record the number of heads. All GPT-2 sizes
    use heads of 64 dimensions (768/12, 1024/16, 1280/20, 1600/25), so emb_dim // 64 is the default."""
    if n_heads is not None:
        return n_heads
    if emb_dim % 64:
        raise ValueError(f"{where}: the file does not record the number of attention heads and emb_dim "
                         f"{emb_dim} is not a multiple of 64; pass n_heads (--n-head)")
    return emb_dim // 64


def _check_override(name, value, given, where):
    if given is not None and given != value:
        raise ValueError(f"{where}: the file says {name}={value}; the override {name}={given} disagrees")


def _recorded_config(cfg: GPTConfig, n_heads, drop_rate, where) -> GPTConfig:
    """A config npgpt wrote into the file, with drop_rate overridden if given."""
    _check_override("n_heads", cfg.n_heads, n_heads, where)
    return cfg if drop_rate is None else GPTConfig.from_dict({**cfg.to_dict(), "drop_rate": drop_rate})


def _json_object(path: Path, expected: str) -> dict:
    """A JSON file that must hold an object (a dict); anything else is a ValueError naming the file."""
    value = load_json(path, expected)
    if not isinstance(value, dict):
        raise ValueError(f"{path}: holds a JSON {type(value).__name__}; expected {expected}")
    return value


def _gpt_config(where, **fields) -> GPTConfig:
    """A GPTConfig of the numbers a file gives, an invalid one being a ValueError naming the file."""
    try:
        return GPTConfig(**fields)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{where}: its hyperparameters do not make a GPT-2 ({e})") from None


def _embedding_sizes(names, wte, wpe, where) -> tuple[int, int, int]:
    """(V, T, C) read from the shapes of the token (V, C) and position (T, C) embeddings."""
    (_, wte_shape), (_, wpe_shape) = names[wte], names[wpe]
    if len(wte_shape) != 2 or len(wpe_shape) != 2 or wte_shape[1] != wpe_shape[1]:
        raise ValueError(f"{where}: {wte} has shape {wte_shape} and {wpe} {wpe_shape}; expected (V, C) and (T, C)")
    return wte_shape[0], wpe_shape[0], wte_shape[1]


def _count_blocks(names, pattern) -> int:
    found = {int(m.group(1)) for n in names if (m := re.match(pattern, n))}
    return max(found) + 1 if found else 0


# ---- opening each format: -> (GPTConfig, {npgpt name: LazyParam}) ----

def _open_openai(stack, folder: Path, n_heads, drop_rate, verify):
    expected = {"n_vocab", "n_ctx", "n_embd", "n_head", "n_layer"}
    hp = _json_object(folder / "hparams.json", f"an object with {', '.join(sorted(expected))}")
    if not expected <= set(hp):
        raise ValueError(f"{folder / 'hparams.json'}: has {sorted(hp)}, expected {sorted(expected)}")
    _check_override("n_heads", hp["n_head"], n_heads, folder)
    cfg = _gpt_config(folder / "hparams.json", vocab_size=hp["n_vocab"], context_length=hp["n_ctx"],
                      emb_dim=hp["n_embd"], n_heads=hp["n_head"], n_layers=hp["n_layer"], qkv_bias=True,
                      tie_weights=True, drop_rate=_drop(drop_rate))
    reader = TFBundleReader(checkpoint_prefix(folder), verify)
    stack.callback(reader.close)
    params = map_params(reader, cfg, openai_source)
    check_stored(params, reader.file_bytes, reader.where)
    return cfg, params


def _hf_config(path: Path, n_heads, drop_rate) -> GPTConfig:
    required = ("vocab_size", "n_positions", "n_embd", "n_head", "n_layer")
    c = _json_object(path, f"a GPT-2 config with {', '.join(required)}")
    c.setdefault("n_positions", c.get("n_ctx"))
    if any(c.get(k) is None for k in required):
        raise ValueError(f"{path}: has {sorted(c)}; expected a GPT-2 config with {', '.join(required)}")
    checks = {"model_type": ("gpt2",), "activation_function": ("gelu_new", "gelu_pytorch_tanh"),
              "layer_norm_epsilon": (1e-5,), "n_inner": (None, 4 * c.get("n_embd", 0)),
              "scale_attn_weights": (True,), "scale_attn_by_inverse_layer_idx": (False,),
              "add_cross_attention": (False,)}
    for key, allowed in checks.items():
        if key in c and c[key] not in allowed:
            raise ValueError(f"{path}: {key} is {c[key]!r}; npgpt's GPT-2 needs {' or '.join(map(repr, allowed))}")
    _check_override("n_heads", c["n_head"], n_heads, path)
    return _gpt_config(path, vocab_size=c["vocab_size"], context_length=c["n_positions"],
                     emb_dim=c["n_embd"], n_heads=c["n_head"], n_layers=c["n_layer"], qkv_bias=True,
                     tie_weights=c.get("tie_word_embeddings", True),
                     drop_rate=_drop(drop_rate, c.get("resid_pdrop", GPT2_DROP_RATE)))


def _hf_reader(path: Path):
    """The reader of a Hugging Face folder's weights (or of one weight file)."""
    if path.is_dir():
        if (path / "model.safetensors.index.json").is_file():
            return ShardedSafetensorsReader(path / "model.safetensors.index.json")
        if (path / "model.safetensors").is_file():
            return SafetensorsReader(path / "model.safetensors")
        path = path / "pytorch_model.bin"
    elif path.suffix not in (".bin", ".pt", ".pth"):
        return SafetensorsReader(path)
    return TorchReader(torch_state_dict(path), str(path))


def _open_hf(stack, path: Path, n_heads, drop_rate):
    folder = path if path.is_dir() else path.parent
    reader = _hf_reader(path)
    stack.callback(reader.close)
    names = reader.info
    prefix = "transformer." if any(n.startswith("transformer.") for n in names) else ""
    if (folder / "config.json").is_file():
        cfg = _hf_config(folder / "config.json", n_heads, drop_rate)
    elif getattr(reader, "metadata", {}).get("npgpt_config"):          # written by save_safetensors
        recorded = parse_json(reader.metadata["npgpt_config"], reader.where,
                              "an npgpt_config in its metadata: a GPTConfig as JSON")
        try:
            recorded = GPTConfig.from_dict(recorded)
        except (ValueError, TypeError, AttributeError) as e:
            raise ValueError(f"{reader.where}: its npgpt_config metadata is not a valid config ({e})") from None
        cfg = _recorded_config(recorded, n_heads, drop_rate, reader.where)
    else:                                             # a bare GPT-2 .safetensors: the shapes tell the rest
        if f"{prefix}wte.weight" not in names or f"{prefix}wpe.weight" not in names:
            raise ValueError(f"{reader.where}: no config.json beside it and no wte.weight / wpe.weight inside "
                             f"(found {sorted(names)[:6]}); expected a Hugging Face GPT-2")
        V, T, C = _embedding_sizes(names, f"{prefix}wte.weight", f"{prefix}wpe.weight", reader.where)
        cfg = _gpt_config(reader.where, vocab_size=V, context_length=T, emb_dim=C,
                          n_heads=_default_heads(C, n_heads, reader.where), qkv_bias=True,
                          n_layers=_count_blocks(names, rf"{re.escape(prefix)}h\.(\d+)\."),
                          tie_weights="lm_head.weight" not in names, drop_rate=_drop(drop_rate))
    ignore = HF_IGNORED + ((r"lm_head\.weight",) if cfg.tie_weights else ())
    if not cfg.qkv_bias:                   # npgpt's own file: hf_tensors wrote zeros for GPT-2's format
        ignore += (rf"{re.escape(prefix)}h\.\d+\.attn\.c_attn\.bias",)
    if not cfg.bias:                       # and for every other bias
        ignore += (rf"{re.escape(prefix)}(h\.\d+\.)?[\w.]+\.bias",)
    params = map_params(reader, cfg, lambda n: hf_source(n, prefix), ignore)
    check_stored(params, reader.file_bytes, reader.where)
    return cfg, params


def _open_book(path: Path, n_heads, drop_rate):
    reader = TorchReader(torch_state_dict(path), str(path))
    names = reader.info
    if "tok_emb.weight" not in names or "pos_emb.weight" not in names:
        raise ValueError(f"{path}: expected the book's GPTModel state_dict (tok_emb.weight, pos_emb.weight, "
                         f"trf_blocks.N...), found {sorted(names)[:6]}")
    V, T, C = _embedding_sizes(names, "tok_emb.weight", "pos_emb.weight", path)
    cfg = _gpt_config(path, vocab_size=V, context_length=T, emb_dim=C, n_heads=_default_heads(C, n_heads, str(path)),
                      n_layers=_count_blocks(names, r"trf_blocks\.(\d+)\."),
                      qkv_bias="trf_blocks.0.att.W_query.bias" in names, tie_weights="out_head.weight" not in names,
                      drop_rate=_drop(drop_rate))
    params = map_params(reader, cfg, book_source, ignore=(r"trf_blocks\.\d+\.att\.mask",))
    check_stored(params, reader.file_bytes, reader.where)
    return cfg, params


def _open_npgpt(stack, path: Path, n_heads, drop_rate):
    ckpt = stack.enter_context(open_checkpoint(path))
    return _recorded_config(ckpt["config"], n_heads, drop_rate, path), ckpt["params"]


def detect_format(path) -> str:
    """'openai', 'hf', 'book', 'nanogpt', 'llmc' or 'npgpt', from the files a path holds."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p.name for p in path.iterdir())
        if "hparams.json" in files and any(f.endswith(".index") for f in files):
            return "openai"
        weights = {"model.safetensors", "model.safetensors.index.json", "pytorch_model.bin"}
        if "config.json" in files and weights & set(files):
            return "hf"
        raise ValueError(f"{path}: cannot tell which weights this folder holds (found {files[:10]}); expected "
                         "an OpenAI GPT-2 folder (hparams.json, checkpoint, model.ckpt.index, "
                         "model.ckpt.data-00000-of-00001) or a Hugging Face one (config.json and "
                         "model.safetensors or pytorch_model.bin)")
    if not path.is_file():
        if Path(f"{path}.index").is_file():                        # a checkpoint prefix: .../model.ckpt
            return "openai"
        if path.exists():
            check_regular(path, "a weight file")                   # a FIFO or a device: refused by name
        raise FileNotFoundError(f"weights not found: {path}")
    if path.name.endswith(".index") or path.name.startswith("model.ckpt"):
        return "openai"
    with open_regular(path, "a weight file") as f:
        magic = f.read(8)
    if magic == b"\x89HDF\r\n\x1a\n":
        return "npgpt"
    if is_llmc_file(path):
        return "llmc"
    if path.suffix == ".safetensors":
        return "hf"
    if magic[:2] == b"PK" or path.suffix in (".pth", ".pt", ".bin"):
        obj = torch_file(path)
        if nanogpt.is_checkpoint(obj):
            return "nanogpt"
        names = state_dict_of(obj, path)
        if "tok_emb.weight" in names:
            return "book"
        return "nanogpt" if nanogpt.is_state_dict({n: tuple(t.shape) for n, t in names.items()}) else "hf"
    raise ValueError(f"{path}: not a weight file npgpt reads; expected an npgpt .h5, a .safetensors, a book "
                     ".pth, a Hugging Face pytorch_model.bin, a nanoGPT ckpt.pt, an llm.c model .bin, or an "
                     "OpenAI / Hugging Face GPT-2 folder")


def _open(stack, path: Path, n_heads, drop_rate, verify, vocab_size=None, notes=None):
    """(GPTConfig, {name: LazyParam}) of the weights at path, open until stack closes; what the
    file holds besides the weights that is not read goes into notes."""
    path = weights_path(path)
    kind = detect_format(path)
    if vocab_size is not None and kind != "llmc":
        raise ValueError(f"{path}: vocab_size applies to llm.c's model files (their padded rows); the "
                         "vocabulary of other weights is theirs")
    if kind == "openai":
        return _open_openai(stack, path if path.is_dir() else path.parent, n_heads, drop_rate, verify)
    if kind == "hf":
        return _open_hf(stack, path, n_heads, drop_rate)
    if kind == "book":
        return _open_book(path, n_heads, drop_rate)
    if kind == "nanogpt":
        obj = torch_file(path)
        if notes is not None and nanogpt.is_checkpoint(obj):
            notes.append(f"{path}: {nanogpt.describe(obj)}")
        return nanogpt.open_nanogpt(obj, path, n_heads, drop_rate)
    if kind == "llmc":
        cfg, params = open_llmc(stack, path, vocab_size, drop_rate)
        _check_override("n_heads", cfg.n_heads, n_heads, path)
        return cfg, params
    return _open_npgpt(stack, path, n_heads, drop_rate)


def pretrained_config(path, *, n_heads: int | None = None, drop_rate: float | None = None,
                      vocab_size: int | None = None) -> GPTConfig:
    """The GPTConfig of the weights at path, read without reading the weights (load_pretrained's
    arguments)."""
    with ExitStack() as stack:
        return _open(stack, Path(path), n_heads, drop_rate, verify=False, vocab_size=vocab_size)[0]


def load_pretrained(path, backend="numpy", dtype="float32", device=None, *, n_heads: int | None = None,
                    drop_rate: float | None = None, verify: bool = True, seed: int = 123,
                    vocab_size: int | None = None, **torch_options):
    """A model with the weights at path (any format of this module's docstring).

    n_heads: for files that do not record it (the book's .pth, a bare .safetensors); default
    emb_dim // 64. drop_rate: dropout for further training (default: the file's, else GPT-2's 0.1).
    verify: check the crc32c of every tensor of an OpenAI checkpoint (about 2 s per GB here).
    vocab_size: an llm.c file's rows: its V (the default) drops the padded rows of wte, its Vp keeps them.
    torch_options: build_model's (autocast, compile, grad_accum), for the torch backend.
    A nanoGPT ckpt.pt's optimizer state is not read, and a line on stderr says so.
    """
    notes = []
    with ExitStack() as stack:
        cfg, params = _open(stack, Path(path), n_heads, drop_rate, verify, vocab_size, notes)
        for note in notes:
            print(f"npgpt: {note}", file=sys.stderr)
        return build_loaded_model(cfg, params, backend=backend, dtype=dtype, device=device, seed=seed,
                                  **torch_options)


def load_tokenizer(path):
    """The tokenizer that comes with the weights at path: encoder.json + vocab.bpe (OpenAI) or
    vocab.json + merges.txt (Hugging Face) beside them, else the bundled GPT-2 one."""
    from ..tokenizer import get_tokenizer, tokenizer_from_openai_files
    path = weights_path(path)
    folder = path if path.is_dir() else path.parent
    for encoder, merges in TOKENIZER_FILES:
        if (folder / encoder).is_file() and (folder / merges).is_file():
            return tokenizer_from_openai_files(folder / encoder, folder / merges)
    return get_tokenizer()
