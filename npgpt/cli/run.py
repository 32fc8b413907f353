"""`npgpt train`'s settings: the options, the values a resumed run keeps, and every check that can be
made before a model is built or a step is taken."""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
from pathlib import Path

# The run's settings, saved in its checkpoint. With --resume, an option not given takes the saved
# value (else the default here); the ones that decide the batches must not change mid-run. The
# defaults are the book's chapter-5 run: AdamW(lr 5e-4, weight decay 0.1 on every parameter, betas
# (0.9, 0.999)), a constant lr, no clipping. min_lr and lr_decay_steps are resolved when the run
# starts (--lr / 10, the run's steps), and only with --cosine.
RUN_DEFAULTS = {"backend": "numpy", "init_from": None, "data": None, "data_sha256": None, "epochs": 10, "max_steps": None, "batch_size": 2,
                "max_length": None, "stride": None, "seed": 123, "lr": 5e-4, "weight_decay": 0.1,
                "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "decay": "all",
                "eval_freq": 5, "eval_every": 250, "eval_iter": 5, "warmup": 0, "cosine": False, "min_lr": None,
                "lr_decay_steps": None, "clip": None, "save_every": None, "start_context": "Every effort moves you",
                "autocast": None, "compile": False, "grad_accum": 1,
                "world_size": 1,    # torchrun's processes, each with its own --batch-size windows a step
                "sampling": "random"}
SAME_BATCHES = ("data_sha256", "max_length", "stride", "seed", "sampling")  # and the global batch: world_size x batch_size
# given with --resume, these apply from the next step (cmd_train prints which); --decay is refused
CHANGEABLE = ("lr", "weight_decay", "beta1", "beta2", "eps", "warmup", "cosine", "min_lr", "lr_decay_steps", "clip",
              "backend", "autocast", "compile", "grad_accum")
# the model's shape: flag -> GPTConfig field; each overrides the preset's (a resumed or --init-from run's shape is
# its weights')
SHAPE_FLAGS = {"n_layer": "n_layers", "n_head": "n_heads", "n_embd": "emb_dim", "context_length": "context_length",
               "vocab_size": "vocab_size", "qkv_bias": "qkv_bias", "bias": "bias", "tie_weights": "tie_weights",
               "drop_rate": "drop_rate"}
TOKENIZER_VOCAB = 50257                 # GPT-2's BPE: the ids the data and the samples use
TEXT_ONLY, SHARDS_ONLY = ("epochs", "stride", "eval_freq"), ("max_steps", "eval_every", "sampling")
MAX_SEED = 2**63 - 1                                   # what every RNG involved (NumPy's, torch's) accepts


def add_parser(sub):
    p = sub.add_parser("train", help="pretrain on a text file (default: The Verdict) or a folder of token shards")
    d = RUN_DEFAULTS
    p.add_argument("--backend", choices=("numpy", "torch"), help="default: numpy, or the --resume checkpoint's")
    p.add_argument("--kernels", choices=("fast", "reference"), default="fast",
                   help="numpy: the layers to run, fast (layers.py, the default) or reference (reference.py, "
                        "the textbook form: slower, the same math)")
    p.add_argument("--data", metavar="PATH", help="a UTF-8 text file (default: The Verdict, bundled), or a folder "
                                                 "of token shards (npgpt prepare, llm.c, nanoGPT's train.bin)")
    p.add_argument("--preset", help="model size (book-124m, gpt2-small, ..., tiny; default: book-124m, "
                                    "or the --resume checkpoint's)")
    shape = p.add_argument_group("the model's shape", "each overrides the --preset's; a resumed run keeps its "
                                 "model's and --init-from takes the weights' (a different value is refused)")
    shape.add_argument("--n-layer", type=int, metavar="L", help="transformer blocks")
    shape.add_argument("--n-head", type=int, metavar="NH", help="attention heads (they divide --n-embd)")
    shape.add_argument("--n-embd", type=int, metavar="C", help="width of the residual stream")
    shape.add_argument("--context-length", type=int, metavar="T", help="positions the model covers")
    shape.add_argument("--vocab-size", type=int, metavar="V",
                       help=f"token embeddings, at least GPT-2's {TOKENIZER_VOCAB:,} (50304, a multiple of 64, "
                            "runs faster on a GPU; the padded rows are never targets)")
    shape.add_argument("--qkv-bias", action=argparse.BooleanOptionalAction,
                       help="a bias in the query/key/value projection (GPT-2's; not the book's 124M)")
    shape.add_argument("--bias", action=argparse.BooleanOptionalAction,
                       help="biases in every LayerNorm and Linear (GPT-2's, the book's); --no-bias is nanoGPT's "
                            "default bias=False, and needs --no-qkv-bias")
    shape.add_argument("--tie-weights", action=argparse.BooleanOptionalAction,
                       help="the output head shares the token embedding (GPT-2's; not the book's 124M)")
    shape.add_argument("--drop-rate", type=float, help="dropout rate (default: the preset's, or the --init-from "
                                                       "weights' file's, else 0.1)")
    p.add_argument("--init-from", metavar="PATH",
                   help="start from pretrained weights (an OpenAI GPT-2 folder, a Hugging Face folder or "
                        ".safetensors, a book .pth, an npgpt .h5) with a new optimizer and schedule; the shape "
                        "is the weights'")
    p.add_argument("--epochs", type=int, help=f"text: total epochs of the run (default: {d['epochs']})")
    p.add_argument("--max-steps", type=int, help="shards: total optimizer steps of the run")
    p.add_argument("--batch-size", type=int, help=f"default: {d['batch_size']}")
    p.add_argument("--max-length", type=int, help="tokens per window (default: the context length)")
    p.add_argument("--stride", type=int, help="text: step between windows (default: max length)")
    p.add_argument("--sampling", choices=("random", "epoch"),
                   help="shards: how a step's windows are drawn. random (the default): distinct windows at "
                        "random positions, drawn anew each step (some tokens seen several times, some never); "
                        "epoch: one pass over non-overlapping windows an epoch, in an order shuffled by --seed "
                        "and the epoch. Either way step s's windows depend on (seed, s) alone")
    p.add_argument("--lr", type=float, help=f"peak learning rate (default: {d['lr']}, the book's; the GPT-2 "
                                            "recipe: 6e-4)")
    p.add_argument("--weight-decay", type=float, help=f"AdamW's (default: {d['weight_decay']})")
    p.add_argument("--decay", choices=("all", "matrices", "none"),
                   help="the parameters weight decay applies to: all (the default, the book's), matrices (every "
                        "tensor of 2 or more dimensions, the linear weights and the embeddings, as nanoGPT and "
                        "llm.c: biases and LayerNorm exempt), or none")
    p.add_argument("--beta1", type=float, help=f"AdamW's beta1 (default: {d['beta1']})")
    p.add_argument("--beta2", type=float, help=f"AdamW's beta2 (default: {d['beta2']}, the book's and torch's; "
                                               "the GPT-2 recipe: 0.95)")
    p.add_argument("--eps", type=float, help=f"AdamW's epsilon (default: {d['eps']})")
    p.add_argument("--eval-freq", type=int, help=f"text: evaluate every N steps (default: {d['eval_freq']})")
    p.add_argument("--eval-every", type=int, help=f"shards: evaluate and sample every N steps "
                                                  f"(default: {d['eval_every']})")
    p.add_argument("--eval-iter", type=int, help=f"batches per evaluation (default: {d['eval_iter']})")
    p.add_argument("--hellaswag", metavar="FILE", help="also score HellaSwag (a jsonl as hellaswag_val.jsonl) at "
                                                       "each evaluation: acc and acc_norm (not kept on --resume)")
    p.add_argument("--hellaswag-limit", type=int, metavar="N", help="only the first N HellaSwag examples")
    p.add_argument("--warmup", type=int, metavar="STEPS",
                   help="linear warmup: step s < STEPS runs at lr*(s+1)/(STEPS+1), from near zero to just below "
                        "--lr, as nanoGPT (appendix D starts at 3e-5 instead) (default: 0)")
    p.add_argument("--cosine", action="store_true", default=None,
                   help="after warmup, half a cosine from --lr down to --min-lr at step --lr-decay-steps, then "
                        "--min-lr (default: off, a constant lr)")
    p.add_argument("--min-lr", type=float, help="--cosine: its floor (default: --lr / 10, as nanoGPT)")
    p.add_argument("--lr-decay-steps", type=int, metavar="STEPS",
                   help="--cosine: the step at which it reaches --min-lr (default: the run's length: --max-steps "
                        "on shards, --epochs x the batches of an epoch on a text); a resumed run keeps its own, "
                        "so a larger --max-steps or --epochs continues at --min-lr unless this is given")
    p.add_argument("--clip", type=float, metavar="NORM",
                   help="clip the global gradient norm to NORM on every step from the first, warmup included "
                        "(appendix D starts after warmup) (default: off, the book's)")
    p.add_argument("--out", metavar="DIR", help="checkpoint, history.json, log.jsonl, loss plot (default: runs/npgpt, "
                                                "or the folder of the --resume checkpoint)")
    p.add_argument("--overwrite", action="store_true", help="replace a checkpoint already in --out")
    p.add_argument("--save-every", type=int, metavar="STEPS",
                   help="checkpoint every N steps (default: shards, at every evaluation; a text, at the end only); "
                        "0: at the end only (a kill loses the run)")
    p.add_argument("--resume", metavar="CKPT",
                   help="continue the run saved in a checkpoint, with its settings and schedule; the optimizer "
                        "and schedule options given with it apply from the next step, and the run says so")
    p.add_argument("--device", help="torch device (default: cuda if present, else cpu)")
    p.add_argument("--autocast", choices=("bf16", "none"),
                   help="torch: bf16 autocast (CUDA, or a CPU with bf16); none turns a resumed run's off "
                        "(default: none, or the --resume checkpoint's)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction,
                   help="torch: torch.compile the training step (default: off, or the --resume checkpoint's)")
    p.add_argument("--grad-accum", type=int, metavar="K",
                   help="torch: run each batch as K micro-batches, evaluation too (same gradients, less memory; "
                        "default: 1, or the --resume checkpoint's)")
    p.add_argument("--dtype", choices=("float32", "float64"), help="default: float32, or the --resume "
                                                                  "checkpoint's")
    p.add_argument("--seed", type=int, help=f"initialisation and batch order (default: {d['seed']})")
    p.add_argument("--start-context", help=f"prompt of the samples (default: {d['start_context']!r})")
    p.add_argument("--no-progress", action="store_true", help="no progress bar: a line every --log-every steps")
    p.add_argument("--log-every", type=int, metavar="N", help="--no-progress: print every N-th step's loss, lr, "
                                                              "gradient norm and speed (default: 10; OUT/log.jsonl "
                                                              "has every step)")


def data_fingerprint(path: str | None) -> str:
    """sha256 of what decides the batches: the text's bytes (the bundled Verdict's when None), or for a
    folder of shards its manifest (which lists every shard's sha256) or else each shard's name and size."""
    from ..data.corpus import VERDICT_FILE
    from ..data.shards import TokenDir
    if path is None or not os.path.isdir(path):
        if path is not None and not os.path.isfile(path):
            raise FileNotFoundError(f"corpus file not found: {path}")
        return hashlib.sha256(Path(path or VERDICT_FILE).read_bytes()).hexdigest()
    tokens = TokenDir(path)
    manifest = Path(path) / f"{tokens.name}_manifest.json"
    if manifest.is_file():
        return hashlib.sha256(manifest.read_bytes()).hexdigest()
    sizes = [(p.name, p.stat().st_size) for split in ("val", "train") for p in tokens.files[split]]
    return hashlib.sha256(json.dumps(sizes).encode()).hexdigest()


def resolve_run(args) -> None:
    """Fill the run settings not given: from the resumed checkpoint's, else RUN_DEFAULTS (a checkpoint
    saved without them keeps its optimizer's lr and weight decay); resolve the model's shape into
    args.cfg; then check them all."""
    from ..weights.checkpoint import open_checkpoint
    for key in ("preset", "out", "data", "resume", "device", "init_from"):
        if getattr(args, key) == "":
            raise ValueError(f"--{key.replace('_', '-')} is empty; leave it out for the default")
    if args.resume and args.init_from:
        raise ValueError(f"--init-from {args.init_from} starts a new run from weights, --resume {args.resume} "
                         "continues a saved one: give one of them")
    saved = {}
    if args.resume:
        with open_checkpoint(args.resume) as ckpt:
            saved = saved_settings(ckpt, args.resume)
        saved.setdefault("sampling", "random")          # saved before --sampling: drawn at random
        args.cfg = kept_shape(ckpt["config"], args, f"{args.resume} holds", "a resumed run keeps its model")
        if args.dtype is not None and args.dtype != ckpt["dtype"]:
            raise ValueError(f"--dtype {args.dtype}: {args.resume} was trained in {ckpt['dtype']}, and a resumed "
                             "run keeps its model (leave --dtype out)")
    else:
        args.cfg = new_shape(args)
        args.dtype = args.dtype or "float32"
        if args.init_from:
            args.init_from = os.path.realpath(args.init_from)
    if args.data is None:
        args.data = saved.get("data")
    args.data = None if args.data is None else os.path.realpath(args.data)
    shards = args.data is not None and os.path.isdir(args.data)
    wrong = [k for k in (SHARDS_ONLY if not shards else TEXT_ONLY) if getattr(args, k) is not None]
    if wrong:
        kind = "a folder of token shards trains by --max-steps" if shards else "a text file trains by --epochs"
        raise ValueError(f"--{wrong[0].replace('_', '-')} does not apply: {kind}")
    if shards and args.max_steps is None and "max_steps" not in saved:
        raise ValueError(f"--data {args.data} is a folder of token shards: give the run's length with --max-steps N")
    args.data_sha256 = data_fingerprint(args.data)
    if "data_sha256" in saved and saved["data_sha256"] != args.data_sha256:
        raise ValueError(f"--data {args.data or 'The Verdict'}: its contents differ from the data {args.resume} "
                         "was trained on; a resumed run must see the same batches (start a new run)")
    changed = [k for k in SAME_BATCHES[1:] if k in saved and getattr(args, k) not in (None, saved[k])]
    if changed:
        flags = " ".join(f"--{k.replace('_', '-')} {saved[k]}" for k in changed)
        raise ValueError(f"{args.resume} was trained with {flags}; a resumed run must see the same batches "
                         f"(leave these options out, or start a new run)")
    if args.resume and args.decay not in (None, saved["decay"]):
        raise ValueError(f"--decay {args.decay}: {args.resume} was trained with --decay {saved['decay']}, and a "
                         "resumed run keeps its optimizer's parameter groups (leave --decay out)")
    world = int(os.environ["WORLD_SIZE"]) if "RANK" in os.environ and "WORLD_SIZE" in os.environ else 1
    if args.resume and "batch_size" in saved:
        args.batch_size = global_batch_share(args, saved, world, shards)
    args.changes = {k: (saved.get(k), getattr(args, k)) for k in CHANGEABLE if args.resume
                    and getattr(args, k) is not None and getattr(args, k) != saved.get(k)}
    given_torch = {k for k in ("autocast", "compile", "grad_accum") if getattr(args, k) is not None}
    for key, default in RUN_DEFAULTS.items():
        if getattr(args, key, None) is None:
            unused = key in (TEXT_ONLY if shards else SHARDS_ONLY)
            setattr(args, key, None if unused else saved.get(key, default))
    args.world_size = world
    tok = run_tokenizer(args)
    if args.cfg.vocab_size < tok.n_vocab:
        raise ValueError(f"{args.init_from or args.resume}: its model has {args.cfg.vocab_size} token embeddings, "
                         f"fewer than the ids its tokenizer makes ({tok.n_vocab})")
    if args.autocast == "none":
        args.autocast = None
    if args.backend == "numpy":         # a torch run resumed on numpy leaves its torch options behind
        for key in ("autocast", "compile", "grad_accum"):
            if key not in given_torch:
                setattr(args, key, RUN_DEFAULTS[key])
    if args.out is None:
        args.out = str(Path(args.resume).parent) if args.resume else "runs/npgpt"
    check_run(args)
    if args.cosine and args.min_lr is None:
        args.min_lr = args.lr / 10


def run_tokenizer(args):
    """The run's tokenizer: the one beside the --init-from weights (or those a resumed run started
    from), else GPT-2's."""
    from ..tokenizer import get_tokenizer
    if args.init_from and os.path.exists(args.init_from):
        from ..weights.pretrained import load_tokenizer
        return load_tokenizer(args.init_from)
    return get_tokenizer()


def _given_shape(args) -> dict:
    """{GPTConfig field: value} of the shape flags given."""
    return {field: getattr(args, flag) for flag, field in SHAPE_FLAGS.items() if getattr(args, flag) is not None}


def _flag(field: str) -> str:
    return "--" + next(flag for flag, f in SHAPE_FLAGS.items() if f == field).replace("_", "-")


def new_shape(args):
    """The GPTConfig of a new run: --init-from's weights (with --drop-rate), else --preset (default
    book-124m) with the shape flags over it; each flag checked by name."""
    from ..config import GPTConfig
    given = _given_shape(args)
    for field in ("n_layers", "n_heads", "emb_dim", "context_length", "vocab_size"):
        value = given.get(field)
        if value is not None and value < 1:
            raise ValueError(f"{_flag(field)} must be a positive integer, got {value}")
    if given.get("vocab_size", TOKENIZER_VOCAB) < TOKENIZER_VOCAB:
        raise ValueError(f"--vocab-size {given['vocab_size']}: GPT-2's tokenizer makes {TOKENIZER_VOCAB} ids, so "
                         f"the model needs at least {TOKENIZER_VOCAB} token embeddings (50304 pads them to a "
                         "multiple of 64)")
    if not 0 <= given.get("drop_rate", 0) < 1:
        raise ValueError(f"--drop-rate must be a number in [0, 1), got {given['drop_rate']}")
    if args.init_from:
        from ..weights.pretrained import pretrained_config
        cfg = pretrained_config(args.init_from, n_heads=args.n_head, drop_rate=args.drop_rate)
        if args.preset is not None:
            preset = GPTConfig.preset(args.preset, drop_rate=cfg.drop_rate, emb_init_std=cfg.emb_init_std)
            if preset != cfg:
                raise ValueError(f"--preset {args.preset}: {args.init_from} holds another model ({cfg}); the shape "
                                 "of an --init-from run is its weights' (leave --preset out)")
        return kept_shape(cfg, args, f"{args.init_from} holds", "the shape of an --init-from run is its weights'")
    args.preset = args.preset or "book-124m"
    cfg = GPTConfig.preset(args.preset)                                # an unknown name fails here
    heads, width = given.get("n_heads", cfg.n_heads), given.get("emb_dim", cfg.emb_dim)
    if width % heads:
        raise ValueError(f"--n-embd {width} must be divisible by --n-head {heads} (the head size is their "
                         f"quotient){' (the preset ' + args.preset + ' gives the other)' if len(given) < 2 else ''}")
    return GPTConfig.preset(args.preset, **given)


def kept_shape(cfg, args, holder: str, rule: str):
    """cfg, refusing a --preset or shape flag that differs from it (a resumed model or --init-from
    weights); --drop-rate may differ for --init-from only (rule's "resumed" says which)."""
    from ..config import GPTConfig
    resumed = rule.startswith("a resumed")
    if resumed and args.preset is not None and GPTConfig.preset(args.preset, drop_rate=cfg.drop_rate) != cfg:
        raise ValueError(f"--preset {args.preset}: {holder} another model ({cfg}), and {rule} (leave --preset out)")
    for field, value in _given_shape(args).items():
        if field == "drop_rate" and not resumed:
            continue
        if value != getattr(cfg, field):
            given = (_flag(field) if value else "--no-" + _flag(field)[2:]) if isinstance(value, bool) \
                else f"{_flag(field)} {value}"
            shown = {True: "on", False: "off"}.get(getattr(cfg, field), getattr(cfg, field))
            raise ValueError(f"{given}: {holder} a model with {field} {shown}, and {rule} (leave it out)")
    return cfg


def global_batch_share(args, saved: dict, world: int, shards: bool) -> int:
    """A resumed run's --batch-size on `world` processes: its saved world_size x batch_size windows a
    step (the same windows of step s, on shards) shared among the processes there are now."""
    saved_world, saved_batch = saved.get("world_size", 1), saved["batch_size"]
    total = saved_world * saved_batch
    if world == saved_world:
        if args.batch_size not in (None, saved_batch):
            raise ValueError(f"{args.resume} was trained with --batch-size {saved_batch}; a resumed run must see "
                             "the same batches (leave these options out, or start a new run)")
        return saved_batch
    if not shards:
        raise ValueError(f"{args.resume} was trained by {saved_world} processes (torchrun ranks), this run has "
                         f"{world}; a text run's batches depend on the number of processes, so resume it with "
                         f"{saved_world}")
    if total % world:
        raise ValueError(f"{args.resume} was trained with {saved_world} processes x --batch-size {saved_batch} = "
                         f"{total} windows a step, which {world} processes cannot share equally; resume it with a "
                         f"number of processes that divides {total}")
    if args.batch_size not in (None, total // world):
        raise ValueError(f"--batch-size {args.batch_size}: {args.resume} was trained with {saved_world} processes x "
                         f"--batch-size {saved_batch} = {total} windows a step; on {world} processes that is "
                         f"--batch-size {total // world} (or leave it out)")
    return total // world


def saved_settings(ckpt, path) -> dict:
    """A checkpoint's run settings, as a resumed run starts from them: the command line's as saved
    (none in a checkpoint saved from Python), over them the optimizer's hyperparameters as it holds
    them, and the schedule the run followed."""
    o = ckpt["optimizer"]
    if o is None:
        raise ValueError(f"{path}: holds no optimizer state, so training cannot resume from it")
    saved = {"lr": o["lr"], "weight_decay": o["weight_decay"], "beta1": o["betas"][0], "beta2": o["betas"][1],
             "eps": o["eps"], **ckpt["run"], "decay": o["decay"]}
    s = ckpt["state"].schedule
    if s is not None:
        saved.update(lr=s.peak_lr, warmup=s.warmup_steps, cosine=s.cosine, min_lr=s.min_lr, lr_decay_steps=s.decay_steps)
    return saved


def check_run(args) -> None:
    """The run's numbers, given or resumed, before anything is built: each error names the option."""
    def check(key, ok, expected):
        value = getattr(args, key)
        if value is not None and (isinstance(value, bool) or not ok(value)):
            raise ValueError(f"--{key.replace('_', '-')} must be {expected}, got {value!r}")
    for key in ("epochs", "max_steps", "batch_size", "max_length", "stride", "eval_freq", "eval_every",
                "eval_iter", "grad_accum", "lr_decay_steps"):
        check(key, lambda v: isinstance(v, int) and v >= 1, "a positive integer")
    for key in ("save_every", "warmup"):
        check(key, lambda v: isinstance(v, int) and v >= 0, "an integer >= 0")
    check("seed", lambda v: isinstance(v, int) and 0 <= v <= MAX_SEED, f"an integer in [0, {MAX_SEED}]")
    for key in ("clip", "eps"):
        check(key, lambda v: isinstance(v, (int, float)) and 0 < v < math.inf, "a positive number")
    for key in ("lr", "weight_decay", "min_lr"):
        check(key, lambda v: isinstance(v, (int, float)) and 0 <= v < math.inf, "a number >= 0")
    for key in ("beta1", "beta2"):
        check(key, lambda v: isinstance(v, (int, float)) and 0 <= v < 1, "a number in [0, 1)")
    for key, what in (("min_lr", "floor"), ("lr_decay_steps", "length")):
        if getattr(args, key) is not None and not args.cosine:
            raise ValueError(f"--{key.replace('_', '-')} {getattr(args, key)} needs --cosine (it is the cosine's "
                             f"{what})")
    if args.min_lr is not None and args.min_lr > args.lr:
        resumed = args.resume and "min_lr" not in getattr(args, "changes", {})
        raise ValueError(f"--min-lr {args.min_lr} must be at most --lr {args.lr}: the cosine decays from --lr "
                         f"down to it{' (the resumed run saved this --min-lr: give another)' if resumed else ''}")
    if args.lr_decay_steps is not None and args.lr_decay_steps <= args.warmup:
        raise ValueError(f"--lr-decay-steps {args.lr_decay_steps} must be more than --warmup {args.warmup}: the "
                         "cosine runs from the end of warmup to step --lr-decay-steps")
    if args.batch_size % args.grad_accum:
        raise ValueError(f"--grad-accum {args.grad_accum} must divide --batch-size {args.batch_size}: each step runs "
                         f"its batch as {args.grad_accum} equal micro-batches")
    if args.max_length is not None and args.max_length > args.cfg.context_length:
        raise ValueError(f"--max-length {args.max_length} exceeds the model's context length "
                         f"{args.cfg.context_length}")
    check("start_context", lambda v: v.strip() != "", "some text (the samples continue it)")
    torch_only = [f"--{k.replace('_', '-')}" for k, v in torch_options(args).items()]
    if torch_only and args.backend != "torch":
        raise ValueError(f"{torch_only[0]} needs --backend torch")
    if args.kernels != "fast" and args.backend != "numpy":
        raise ValueError(f"--kernels {args.kernels} needs --backend numpy (the torch backend's gradients are "
                         "autograd's)")


def torch_options(args) -> dict:
    """The torch backend's build options the command line gives (none of them by default)."""
    options = {}
    if args.autocast:
        options["autocast"] = args.autocast
    if args.compile:
        options["compile"] = True
    if args.grad_accum != 1:
        options["grad_accum"] = args.grad_accum
    return options


def check_device(backend: str, device: str | None) -> None:
    """--device names a device this machine has, before a model is built."""
    if device is None:
        return
    if backend == "numpy":
        if device != "cpu":
            raise ValueError(f"--device {device}: the numpy backend runs on the CPU; use --backend torch")
        return
    import torch
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"--device {device}: not a torch device (expected cpu, cuda or cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: this machine has no CUDA device (torch {torch.__version__})")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {device}: npgpt trains on cpu or cuda")


def check_autocast(args) -> None:
    """--autocast bf16 on the CPU only where torch has fast bf16 matrix products (device.cpu_bf16_missing)."""
    if args.autocast != "bf16":
        return
    import torch
    from ..torch_backend.device import cpu_bf16_missing
    on_cpu = torch.device(args.device).type == "cpu" if args.device else not torch.cuda.is_available()
    reason = on_cpu and cpu_bf16_missing()
    if reason:
        raise ValueError(f"--autocast bf16: {reason}")


def check_out(out: Path, ckpt_path: Path, args) -> None:
    """A new run never replaces a checkpoint without --overwrite, and --out must be writable: both are
    known before the first step, so both fail before it."""
    resuming_here = args.resume and ckpt_path.exists() and os.path.samefile(args.resume, ckpt_path)
    if ckpt_path.exists() and not resuming_here and not args.overwrite:
        how = f"--resume {ckpt_path} to continue it" if not args.resume else "another --out"
        raise ValueError(f"{ckpt_path} already exists; use {how}, or --overwrite to replace it")
    existing = next(p for p in (out, *out.absolute().parents) if p.exists())   # out itself is made later
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(f"--out {out}: cannot write in {existing}, so no checkpoint could be saved")
