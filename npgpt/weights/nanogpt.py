"""nanoGPT's weights read: the ckpt.pt its train.py writes, and a bare state_dict of its model.py GPT.

ckpt.pt is a dict: "model" (the state_dict, names prefixed "_orig_mod." when the run was
torch.compile'd), "model_args" (n_layer, n_head, n_embd, block_size, bias, vocab_size, dropout),
"optimizer", "iter_num", "best_val_loss", "config". It is read through torch.load(weights_only=True)
like every PyTorch file here; only "model" and "model_args" are used (a run started from it has a new
optimizer and schedule: npgpt's --resume continues npgpt's own checkpoints only).

nanoGPT's module names are Hugging Face's (transformer.h.0.attn.c_attn.weight, ...) but its layers
are nn.Linear, so every weight is already in npgpt's (out, in) layout: nothing is transposed. Its head
is always tied (lm_head.weight is wte), and with bias=False (its default) no LayerNorm or Linear has
a bias, which GPTConfig(bias=False) expresses. A bare state_dict is told from Hugging Face's
pytorch_model.bin by the c_attn weight's shape: (3C, C) here, Conv1D's (C, 3C) there.
"""
from __future__ import annotations

from ..config import GPTConfig
from .lazy import TorchReader, check_stored, state_dict_of
from .names import hf_source, map_params

MODEL_ARGS = ("n_layer", "n_head", "n_embd", "block_size", "bias", "vocab_size", "dropout")
IGNORED = (r"lm_head\.weight",                          # tied: the same tensor as transformer.wte.weight
           r"transformer\.h\.\d+\.attn\.bias")          # the causal mask buffer, without flash attention


def is_checkpoint(obj) -> bool:
    """Whether what torch.load read is nanoGPT's ckpt.pt."""
    return isinstance(obj, dict) and "model" in obj and "model_args" in obj


def is_state_dict(shapes: dict) -> bool:
    """Whether a state_dict's {name: shape} is nanoGPT's GPT: transformer.* names, c_attn weights (3C, C)."""
    wte, qkv = shapes.get("transformer.wte.weight"), shapes.get("transformer.h.0.attn.c_attn.weight")
    return wte is not None and qkv is not None and len(wte) == 2 and tuple(qkv) == (3 * wte[1], wte[1])


def nanogpt_source(name: str) -> tuple[list[str], str]:
    """npgpt name -> ([nanoGPT names], "copy"): h.0.attn.c_attn.weight <- transformer.h.0.attn.c_attn.weight (3C, C)."""
    return hf_source(name)[0], "copy"


def describe(obj) -> str:
    """What of a ckpt.pt is read and what is not, in one line."""
    step = obj.get("iter_num")
    return (f"nanoGPT checkpoint{f' at iter_num {step}' if isinstance(step, int) else ''}: its model weights are "
            "read; its optimizer state and iteration count are not (the run starts a new optimizer and schedule)")


def open_nanogpt(obj, path, n_heads=None, drop_rate=None):
    """(GPTConfig, {npgpt name: LazyParam}) of a ckpt.pt or bare state_dict that torch_file read."""
    reader = TorchReader(state_dict_of(obj, path), str(path))
    shapes = {name: shape for name, (_, shape) in reader.info.items()}
    if not is_state_dict(shapes):
        raise ValueError(f"{path}: not nanoGPT's GPT (expected transformer.wte.weight (V, C) and "
                         f"transformer.h.0.attn.c_attn.weight (3C, C)), found {sorted(shapes)[:6]}")
    if is_checkpoint(obj):
        args = obj["model_args"]
        if not isinstance(args, dict) or not set(MODEL_ARGS) <= set(args):
            raise ValueError(f"{path}: its model_args is {args!r:.200}; expected nanoGPT's dict of "
                             f"{', '.join(MODEL_ARGS)}")
        if n_heads is not None and n_heads != args["n_head"]:
            raise ValueError(f"{path}: the file says n_heads={args['n_head']}; the override n_heads={n_heads} "
                             "disagrees")
        fields = dict(vocab_size=args["vocab_size"], context_length=args["block_size"], emb_dim=args["n_embd"],
                      n_heads=args["n_head"], n_layers=args["n_layer"], bias=args["bias"], qkv_bias=args["bias"],
                      drop_rate=args["dropout"] if drop_rate is None else drop_rate)
    else:                                              # a bare state_dict: the shapes say all but the heads
        (V, C), (T, _) = shapes["transformer.wte.weight"], shapes["transformer.wpe.weight"]
        if n_heads is None and C % 64:
            raise ValueError(f"{path}: the file does not record the number of attention heads and n_embd {C} is "
                             "not a multiple of 64; pass n_heads (--n-head)")
        layers = {int(n.split(".")[2]) for n in shapes if n.startswith("transformer.h.")}
        bias = "transformer.ln_f.bias" in shapes
        fields = dict(vocab_size=V, context_length=T, emb_dim=C, n_heads=n_heads or C // 64,
                      n_layers=max(layers, default=-1) + 1, bias=bias, qkv_bias=bias,
                      drop_rate=0.0 if drop_rate is None else drop_rate)      # nanoGPT's default dropout
    try:
        cfg = GPTConfig(**fields, tie_weights=True, emb_init_std=0.02)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{path}: its hyperparameters do not make a GPT-2 ({e})") from None
    params = map_params(reader, cfg, nanogpt_source, IGNORED)
    check_stored(params, reader.file_bytes, reader.where)
    return cfg, params
