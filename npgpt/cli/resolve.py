"""`npgpt train`'s settings resolved once, into settings.RunSettings: each setting is the flag's
value if given, else the --config file's, else the resumed checkpoint's, else the default; the
model's shape is the --init-from weights', the resumed model's, or the --preset with the shape
flags over it. Every check that needs no model is made here (checks.check_run), before anything
is built."""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from .checks import check_run, data_fingerprint, run_tokenizer
from .settings import (CHANGEABLE, RUN_DEFAULTS, SAME_BATCHES, SHAPE_FLAGS, SHARDS_ONLY, TEXT_ONLY, TOKENIZER_VOCAB,
                       TORCH_ONLY, RunSettings)


def resolve(args: argparse.Namespace, file_values: dict) -> RunSettings:
    """The run's settings from the parsed flags (None: not given) over the --config file's values
    ({dest: value}, config_file.load_config); ValueError naming the option for anything wrong."""
    given = {k: v for k, v in vars(args).items() if v is not None}
    a = argparse.Namespace(**{**dict.fromkeys(vars(args)), **file_values, **given})   # a scratch copy
    from_config = frozenset(k for k in file_values if k not in given)
    for key in ("preset", "out", "data", "resume", "device", "init_from"):
        if getattr(a, key) == "":
            raise ValueError(f"--{key.replace('_', '-')} is empty; leave it out for the default")
    if a.resume and a.init_from:
        raise ValueError(f"--init-from {a.init_from} starts a new run from weights, --resume {a.resume} continues a "
                         "saved one: give one of them")
    saved = {}
    if a.resume:
        from ..weights.checkpoint import open_checkpoint
        with open_checkpoint(a.resume) as ckpt:
            saved = saved_settings(ckpt, a.resume)
        cfg = kept_shape(ckpt["config"], a, f"{a.resume} holds", "a resumed run keeps its model")
        if a.dtype is not None and a.dtype != ckpt["dtype"]:
            raise ValueError(f"--dtype {a.dtype}: {a.resume} was trained in {ckpt['dtype']}, and a resumed run keeps "
                             "its model (leave --dtype out)")
        a.dtype, a.preset, a.init_from = ckpt["dtype"], None, saved.get("init_from")
    else:
        cfg = new_shape(a)
        a.dtype = a.dtype or "float32"
        a.init_from = a.init_from and os.path.realpath(a.init_from)
    a.data = a.data or saved.get("data")
    a.data = a.data and os.path.realpath(a.data)
    shards = a.data is not None and os.path.isdir(a.data)
    wrong = [k for k in (SHARDS_ONLY if not shards else TEXT_ONLY) if getattr(a, k) is not None]
    if wrong:
        kind = "a folder of token shards trains by --max-steps" if shards else "a text file trains by --epochs"
        raise ValueError(f"--{wrong[0].replace('_', '-')} does not apply: {kind}")
    if shards and a.max_steps is None and "max_steps" not in saved:
        raise ValueError(f"--data {a.data} is a folder of token shards: give the run's length with --max-steps N")
    a.data_sha256 = data_fingerprint(a.data)
    if "data_sha256" in saved and saved["data_sha256"] != a.data_sha256:
        raise ValueError(f"--data {a.data or 'The Verdict'}: its contents differ from the data {a.resume} was "
                         "trained on; a resumed run must see the same batches (start a new run)")
    changed = [k for k in SAME_BATCHES[1:] if k in saved and getattr(a, k) not in (None, saved[k])]
    if changed:
        flags = " ".join(f"--{k.replace('_', '-')} {saved[k]}" for k in changed)
        raise ValueError(f"{a.resume} was trained with {flags}; a resumed run must see the same batches "
                         "(leave these options out, or start a new run)")
    if a.resume and a.decay not in (None, saved["decay"]):
        raise ValueError(f"--decay {a.decay}: {a.resume} was trained with --decay {saved['decay']}, and a resumed "
                         "run keeps its optimizer's parameter groups (leave --decay out)")
    world = int(os.environ["WORLD_SIZE"]) if "RANK" in os.environ and "WORLD_SIZE" in os.environ else 1
    if a.resume and "batch_size" in saved:
        a.batch_size = global_batch_share(a, saved, world, shards)
    changes = {k: (saved.get(k), getattr(a, k)) for k in CHANGEABLE if a.resume
               and getattr(a, k) is not None and getattr(a, k) != saved.get(k)}
    given_torch = {k for k in TORCH_ONLY if getattr(a, k) is not None}
    for key, default in RUN_DEFAULTS.items():
        if key not in ("init_from", "data") and getattr(a, key, None) is None:
            unused = key in (TEXT_ONLY if shards else SHARDS_ONLY)
            setattr(a, key, None if unused else saved.get(key, default))
    a.world_size = world
    if a.autocast == "none":
        a.autocast = None
    if a.backend == "numpy":         # a torch run resumed on numpy leaves its torch options behind
        for key in TORCH_ONLY:
            if key not in given_torch:
                setattr(a, key, RUN_DEFAULTS[key])
    n_vocab = run_tokenizer(a.init_from).n_vocab
    if cfg.vocab_size < n_vocab:
        raise ValueError(f"{a.init_from or a.resume}: its model has {cfg.vocab_size} token embeddings, fewer than the "
                         f"ids its tokenizer makes ({n_vocab})")
    a.out = a.out or (str(Path(a.resume).parent) if a.resume else "runs/npgpt")
    a.kernels = a.kernels or "fast"
    a.progress = a.progress is not False
    a.max_length = cfg.context_length if a.max_length is None else a.max_length
    a.stride = None if shards else a.max_length if a.stride is None else a.stride
    check_run(a, cfg, changes)
    if a.cosine and a.min_lr is None:
        a.min_lr = a.lr / 10
    a.log_every = None if a.progress else a.log_every or 10
    a.kernels = a.kernels if a.backend == "numpy" else None
    a.overwrite = bool(a.overwrite)
    values = {k: getattr(a, k) for k in RunSettings.__dataclass_fields__ if k not in ("cfg", "changes", "from_config")}
    return RunSettings(cfg=cfg, changes=changes, from_config=from_config, **values)


def saved_settings(ckpt, path) -> dict:
    """A checkpoint's run settings, as a resumed run starts from them: the command line's as saved
    (none in a checkpoint saved from Python), over them the optimizer's hyperparameters as it holds
    them, and the schedule the run followed."""
    o = ckpt["optimizer"]
    if o is None:
        raise ValueError(f"{path}: holds no optimizer state, so training cannot resume from it")
    saved = {"lr": o["lr"], "weight_decay": o["weight_decay"], "beta1": o["betas"][0], "beta2": o["betas"][1],
             "eps": o["eps"], **ckpt["run"], "decay": o["decay"]}
    saved.setdefault("sampling", "random")          # saved before --sampling: drawn at random
    s = ckpt["state"].schedule
    if s is not None:
        saved.update(lr=s.peak_lr, warmup=s.warmup_steps, cosine=s.cosine, min_lr=s.min_lr,
                     lr_decay_steps=s.decay_steps)
    return saved


def _given_shape(a) -> dict:
    """{GPTConfig field: value} of the shape flags given."""
    return {field: getattr(a, flag) for flag, field in SHAPE_FLAGS.items() if getattr(a, flag) is not None}


def _flag(field: str) -> str:
    return "--" + next(flag for flag, f in SHAPE_FLAGS.items() if f == field).replace("_", "-")


def new_shape(a):
    """The GPTConfig of a new run: --init-from's weights (with --drop-rate), else --preset (default
    book-124m) with the shape flags over it; each flag checked by name."""
    from ..config import GPTConfig
    given = _given_shape(a)
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
    if a.init_from:
        from ..weights.pretrained import pretrained_config
        cfg = pretrained_config(a.init_from, n_heads=a.n_head, drop_rate=a.drop_rate)
        if a.preset is not None:
            preset = GPTConfig.preset(a.preset, drop_rate=cfg.drop_rate, emb_init_std=cfg.emb_init_std)
            if preset != cfg:
                raise ValueError(f"--preset {a.preset}: {a.init_from} holds another model ({cfg}); the shape of an "
                                 "--init-from run is its weights' (leave --preset out)")
        a.preset = None
        return kept_shape(cfg, a, f"{a.init_from} holds", "the shape of an --init-from run is its weights'")
    a.preset = a.preset or "book-124m"
    cfg = GPTConfig.preset(a.preset)                                # an unknown name fails here
    heads, width = given.get("n_heads", cfg.n_heads), given.get("emb_dim", cfg.emb_dim)
    if width % heads:
        raise ValueError(f"--n-embd {width} must be divisible by --n-head {heads} (the head size is their "
                         f"quotient){' (the preset ' + a.preset + ' gives the other)' if len(given) < 2 else ''}")
    return GPTConfig.preset(a.preset, **given)


def kept_shape(cfg, a, holder: str, rule: str):
    """cfg, refusing a --preset or shape flag that differs from it (a resumed model or --init-from
    weights); --drop-rate may differ for --init-from only (rule's "resumed" says which)."""
    from ..config import GPTConfig
    resumed = rule.startswith("a resumed")
    if resumed and a.preset is not None and GPTConfig.preset(a.preset, drop_rate=cfg.drop_rate) != cfg:
        raise ValueError(f"--preset {a.preset}: {holder} another model ({cfg}), and {rule} (leave --preset out)")
    for field, value in _given_shape(a).items():
        if field == "drop_rate" and not resumed:
            continue
        if value != getattr(cfg, field):
            given = (_flag(field) if value else "--no-" + _flag(field)[2:]) if isinstance(value, bool) \
                else f"{_flag(field)} {value}"
            shown = {True: "on", False: "off"}.get(getattr(cfg, field), getattr(cfg, field))
            raise ValueError(f"{given}: {holder} a model with {field} {shown}, and {rule} (leave it out)")
    return cfg


def global_batch_share(a, saved: dict, world: int, shards: bool) -> int:
    """A resumed run's --batch-size on `world` processes: its saved world_size x batch_size windows a
    step (the same windows of step s, on shards) shared among the processes there are now."""
    saved_world, saved_batch = saved.get("world_size", 1), saved["batch_size"]
    total = saved_world * saved_batch
    if world == saved_world:
        if a.batch_size not in (None, saved_batch):
            raise ValueError(f"{a.resume} was trained with --batch-size {saved_batch}; a resumed run must see the "
                             "same batches (leave these options out, or start a new run)")
        return saved_batch
    if not shards:
        raise ValueError(f"{a.resume} was trained by {saved_world} processes (torchrun ranks), this run has {world}; "
                         f"a text run's batches depend on the number of processes, so resume it with {saved_world}")
    if total % world:
        raise ValueError(f"{a.resume} was trained with {saved_world} processes x --batch-size {saved_batch} = {total} "
                         f"windows a step, which {world} processes cannot share equally; resume it with a number of "
                         f"processes that divides {total}")
    if a.batch_size not in (None, total // world):
        raise ValueError(f"--batch-size {a.batch_size}: {a.resume} was trained with {saved_world} processes x "
                         f"--batch-size {saved_batch} = {total} windows a step; on {world} processes that is "
                         f"--batch-size {total // world} (or leave it out)")
    return total // world
