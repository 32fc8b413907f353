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
from .derive import check_z, new_batch, resumed_batch, schedule_kind, schedule_numbers
from .settings import (CHANGEABLE, RUN_DEFAULTS, SAME_BATCHES, SHAPE_FLAGS, SHARDS_ONLY, TEXT_ONLY, TOKENIZER_VOCAB,
                       TORCH_ONLY, RunSettings)


def resolve(args: argparse.Namespace, file_values: dict) -> RunSettings:
    """The run's settings from the parsed flags (None: not given) over the --config file's values
    ({dest: value}, config_file.load_config); ValueError naming the option for anything wrong."""
    given = {k: v for k, v in vars(args).items() if v is not None}
    a = argparse.Namespace(**{**dict.fromkeys(vars(args)), **file_values, **given})   # a scratch copy
    from_config = frozenset(k for k in file_values if k not in given)
    explicit = {*given, *file_values}
    for key in ("preset", "out", "data", "resume", "device", "init_from"):
        if getattr(a, key) == "":
            raise ValueError(f"--{key.replace('_', '-')} is empty; leave it out for the default")
    a.auto = a.resume == "auto"
    if a.auto:
        a.resume = auto_resume(a)
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
        a.steps_done = ckpt["state"].global_step + 1
    else:
        cfg = new_shape(a)
        a.dtype = a.dtype or "float32"
        a.init_from = a.init_from and os.path.realpath(a.init_from)
        a.steps_done = 0
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
    a.max_length = cfg.context_length if a.max_length is None and "max_length" not in saved else a.max_length
    a.max_length = saved["max_length"] if a.max_length is None else a.max_length
    if a.resume and "batch_size" in saved:
        resumed_batch(a, saved, world, shards)
    else:
        new_batch(a, world)
    if a.hellaswag in ("", "none"):                 # --hellaswag none: off, whatever the resumed run had
        a.hellaswag = "none"
    elif a.hellaswag is not None:
        a.hellaswag = os.path.realpath(a.hellaswag)
    schedule_kind(a, explicit)
    check_z(a)
    changes = {k: (saved.get(k), getattr(a, k)) for k in CHANGEABLE if a.resume
               and getattr(a, k) is not None and getattr(a, k) != saved.get(k)}
    if changes.get("hellaswag", (None, None))[0] is None and a.hellaswag == "none":
        changes.pop("hellaswag")
    given_torch = {k for k in TORCH_ONLY if getattr(a, k) is not None}
    for key, default in RUN_DEFAULTS.items():
        if key not in ("init_from", "data") and getattr(a, key, None) is None:
            unused = key in (TEXT_ONLY if shards else SHARDS_ONLY)
            setattr(a, key, None if unused else saved.get(key, default))
    a.world_size = world
    if a.autocast == "none":
        a.autocast = None
    if a.hellaswag == "none":
        a.hellaswag = None
        if "hellaswag_limit" not in explicit:       # the resumed run's limit went with its --hellaswag
            a.hellaswag_limit = None
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
    a.stride = None if shards else a.max_length if a.stride is None else a.stride
    schedule_numbers(a, explicit)
    check_run(a, cfg, changes)
    if a.resume and not a.auto and shards and a.max_steps <= a.steps_done:
        raise ValueError(f"--max-steps {a.max_steps}: {a.resume} has done {a.steps_done} steps already, so this "
                         f"resume would train nothing (give a --max-steps above {a.steps_done})")
    a.log_every = None if a.progress else a.log_every or 10
    a.kernels = a.kernels if a.backend == "numpy" else None
    a.overwrite = bool(a.overwrite)
    values = {k: getattr(a, k) for k in RunSettings.__dataclass_fields__ if k not in ("cfg", "changes", "from_config")}
    return RunSettings(cfg=cfg, changes=changes, from_config=from_config, **values)


def auto_resume(a) -> str | None:
    """--resume auto: OUT's newest whole checkpoint (training/keep.py's find_resume), or None to start
    the run (there is none); damaged ones passed over are said on stderr."""
    import sys
    from ..training.keep import find_resume
    from ..weights.checkpoint import CheckpointError
    if a.out is None:
        raise ValueError("--resume auto continues the run in --out DIR: give --out")
    if a.overwrite:
        raise ValueError("--resume auto continues the run in --out; --overwrite would start it again: give one")
    try:
        path = find_resume(a.out, say=lambda line: print(line, file=sys.stderr))
    except CheckpointError as e:
        raise ValueError(f"--resume auto: {e}") from None
    return None if path is None else str(path)


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
    if "tokens_per_step" not in saved and "batch_size" in saved:    # its batch_size was a step's windows
        saved["batch_size"] //= saved.get("grad_accum", 1)
    s = ckpt["state"].schedule
    if s is not None:
        saved.update(lr=s.peak_lr, warmup=s.warmup_steps, cosine=s.cosine, min_lr=s.min_lr,
                     lr_decay_steps=s.decay_steps, schedule=s.kind, decay_fraction=s.decay_fraction)
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
