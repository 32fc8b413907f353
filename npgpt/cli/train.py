"""`npgpt train`: the book's chapter-5 run by default, or a run by steps over token shards.

Every setting is resolved and checked before a model is built (run.py); the checkpoint is written at
the end, at every evaluation of a shards run (or every --save-every steps) and when a signal stops
the run, never over another run's checkpoint without --overwrite. Every step, evaluation and save
is a line of OUT/log.jsonl (training/log.py); history.json is rewritten at each evaluation.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

from .run import RUN_DEFAULTS, check_autocast, check_device, check_out, resolve_run, run_tokenizer, torch_options

__all__ = ["cmd_train"]


class _Stopped(Exception):
    """Raised at a step boundary after a signal asked the run to stop; its checkpoint is saved."""


class _Interrupted(KeyboardInterrupt):
    """A second signal: stop now. The exit code is 128 + the signal's number, as for the first."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.exit_code = 128 + signum


class _StopOnSignal:
    """Ctrl-C (SIGINT) or SIGTERM while training: the first one only sets a flag, which the loop
    checks after each step (the run saves its checkpoint there, between two optimizer steps, and
    exits with 128 + the signal's number: 130 for Ctrl-C, 143 for SIGTERM); a second one stops at
    once, except during a save, which it lets finish first (a save is atomic either way, but an
    exception raised inside h5py's cleanup can be swallowed). Signals ignored when npgpt started
    (nohup) stay ignored; the previous handlers come back on exit."""
    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum = None
        self.previous = {}
        self.saving = False
        self.pending = None

    def _handler(self, signum, frame):
        if self.signum is None:
            self.signum = signum
        elif self.saving:
            self.pending = signum
        else:
            raise _Interrupted(signum)

    def check(self) -> None:
        if self.signum is not None:
            raise _Stopped

    def save(self, save, state) -> None:
        """save(state), with a second signal held back until the file is complete."""
        self.saving = True
        try:
            save(state)
        finally:
            self.saving = False
        if self.pending is not None:
            raise _Interrupted(self.pending)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():      # signals reach the main thread only
            for s in self.SIGNALS:
                if signal.getsignal(s) is not signal.SIG_IGN:
                    self.previous[s] = signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, signal.SIG_DFL if handler is None else handler)
        self.previous = {}


def _kept(ckpt_path) -> str:
    """What a run that stopped on an error leaves behind: its last checkpoint, as it was."""
    from ..weights.checkpoint import open_checkpoint
    try:
        with open_checkpoint(ckpt_path) as ckpt:
            state = ckpt["state"]
    except (OSError, ValueError):
        return f"no checkpoint was saved to {ckpt_path}"
    return f"the last checkpoint, {ckpt_path} (step {state.global_step}), is kept as it was"


def _model(args, options):
    """(model, optimizer, TrainState): resumed from --resume (with the optimizer settings the run
    resolved), else args.cfg built from the seed or read from --init-from's weights, with a new
    optimizer and schedule."""
    import npgpt
    from ..run_state import TrainState
    if args.resume:
        model, opt, state = npgpt.load_checkpoint(args.resume, backend=args.backend, device=args.device, **options)
        if model.backend == "numpy":
            model.kernels = args.kernels
        opt.weight_decay, opt.betas, opt.eps = args.weight_decay, (args.beta1, args.beta2), args.eps
        return model, opt, state
    numpy_options = {"kernels": args.kernels} if args.backend == "numpy" else {}
    if args.init_from:
        from ..weights.pretrained import load_pretrained
        model = load_pretrained(args.init_from, backend=args.backend, dtype=args.dtype, device=args.device,
                                n_heads=args.cfg.n_heads, drop_rate=args.cfg.drop_rate, seed=args.seed, **options)
        if model.backend == "numpy":
            model.kernels = args.kernels
    else:
        model = npgpt.build_model(args.cfg, backend=args.backend, seed=args.seed, dtype=args.dtype,
                                  device=args.device, **numpy_options, **options)
    opt = npgpt.AdamW(model, lr=args.lr, weight_decay=args.weight_decay, betas=(args.beta1, args.beta2),
                      eps=args.eps, decay=args.decay)
    return model, opt, TrainState()


def _schedule(args, state, total_steps: int):
    """The run's Schedule from its resolved options, into state: a new run's, or a resumed run's
    (its saved one unless an option given with --resume changed it). The cosine's length is the
    run's total_steps unless --lr-decay-steps gave it (or the resumed run saved it)."""
    from ..run_state import Schedule
    if args.cosine and args.lr_decay_steps is None:
        args.lr_decay_steps = total_steps
    saved = state.schedule
    state.schedule = Schedule(peak_lr=args.lr, warmup_steps=args.warmup, cosine=args.cosine,
                              decay_steps=args.lr_decay_steps, min_lr=args.min_lr,
                              initial_lr=None if saved is None else saved.initial_lr)


def _shape(cfg) -> str:
    """The model's shape as the flags that give it: --n-layer 12 --n-head 12 ..."""
    from .run import SHAPE_FLAGS
    def flag(name, value):
        name = name.replace("_", "-")
        return (f"--{name}" if value else f"--no-{name}") if isinstance(value, bool) else f"--{name} {value}"
    return " ".join(flag(name, getattr(cfg, field)) for name, field in SHAPE_FLAGS.items())


def _settings(run: dict) -> str:
    """The run's resolved settings (saved in its checkpoint) as flags, those that are set."""
    from .run import RUN_DEFAULTS
    hidden = ("data_sha256", "world_size")
    return " ".join(f"--{k.replace('_', '-')}" + ("" if v is True else f" {v}") for k, v in run.items()
                    if k in RUN_DEFAULTS and k not in hidden and v is not None and v is not False
                    and not (k == "grad_accum" and v == 1))


def _changes(args, step: int) -> str:
    """The one line a resumed run prints when options given with --resume change its settings."""
    def shown(key, value):
        if key == "cosine":
            return "on" if value else "off"
        return "none" if value is None else f"{value:g}" if isinstance(value, float) else str(value)
    changed = ", ".join(f"--{k.replace('_', '-')} {shown(k, new)} (saved: {shown(k, old)})"
                        for k, (old, new) in args.changes.items())
    return f"npgpt: resuming {args.resume} after step {step}: from step {step + 1} on, {changed}; the rest as saved"


def _data(args, cfg, tok, ranks):
    """The run's batches and its description: the book's loaders over a text, or batches by step
    from token shards (each rank its own windows)."""
    import npgpt
    B, T = args.batch_size, args.max_length
    if args.max_steps is not None:
        from ..data.shards import TokenDir
        tokens = TokenDir(args.data)
        rank, world = (0, 1) if ranks is None else (ranks.rank, ranks.world_size)
        train = tokens.train_batches(B, T, args.seed, rank, world, sampling=args.sampling)
        val = tokens.val_batches(B, T, args.eval_iter, rank, world)
        counts = tokens.num_tokens
        epoch = f", an epoch every {train.num_windows / (B * world):.4g} steps" if args.sampling == "epoch" else ""
        return train, val, (f"{counts['train']:,} train / {counts['val']:,} val tokens, batches of {B}x{T}, "
                            f"{args.max_steps} steps{epoch}")
    train, val = npgpt.make_loaders(npgpt.load_corpus(args.data), tok, batch_size=B, max_length=T,
                                    stride=args.stride, seed=args.seed)
    if ranks is not None:
        train, val = ranks.shard(train), ranks.shard(val)
    return train, val, f"{len(train)} train / {len(val)} val batches of {B}x{T} tokens, {args.epochs} epochs"


def _hellaswag(args, tok):
    """--hellaswag's examples, loaded and each scored one rendered for the model (so that a bad file
    fails before the model is built); None without it."""
    if args.hellaswag_limit is not None and (args.hellaswag is None or args.hellaswag_limit < 1):
        raise ValueError(f"--hellaswag-limit {args.hellaswag_limit}: expected a positive number of examples of a "
                         "--hellaswag FILE")
    if args.hellaswag is None:
        return None
    from ..hellaswag import load_examples, render
    if not os.path.isfile(args.hellaswag):
        raise ValueError(f"--hellaswag {args.hellaswag}: no such file")
    try:
        examples = load_examples(args.hellaswag)
        for example in examples[:args.hellaswag_limit]:
            render(example, tok, args.cfg.context_length, example["where"])
    except ValueError as e:
        raise ValueError(f"--hellaswag: {e}") from None
    return examples


def cmd_train(args):
    import npgpt
    from ..files import atomic_write
    from ..plot import plot_losses
    from ..training.log import RunLog

    resolve_run(args)
    if args.log_every is not None and (args.log_every < 1 or not args.no_progress):
        raise ValueError(f"--log-every {args.log_every}: " + ("expected a positive number of steps"
                         if args.log_every < 1 else "the lines replace the progress bar: give --no-progress"))
    options = torch_options(args)
    ranks = None                                # started by torchrun: data-parallel, one rank per process
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        if args.backend != "torch":
            raise ValueError("under torchrun, train with --backend torch (DistributedDataParallel); "
                             "the numpy backend runs in one process")
        from ..torch_backend.distributed import Ranks
        ranks = Ranks(args.device)
        args.device = str(ranks.device)
    check_device(args.backend, args.device)
    check_autocast(args)
    world_size = 1 if ranks is None else ranks.world_size          # resolve_run read it from torchrun's WORLD_SIZE
    is_main = ranks is None or ranks.is_main    # rank 0 alone prints and writes files
    out = Path(args.out)
    ckpt_path = out / "checkpoint.h5"
    if is_main:
        check_out(out, ckpt_path, args)
    tok = run_tokenizer(args)
    examples = _hellaswag(args, tok)
    model, opt, state = _model(args, options)
    cfg = model.cfg
    args.max_length = args.max_length or cfg.context_length
    args.stride = args.stride or (None if args.max_steps else args.max_length)
    train_batches, val_batches, described = _data(args, cfg, tok, ranks)
    _schedule(args, state, args.max_steps or args.epochs * len(train_batches))
    if not state.schedule.scheduled:            # else the loop sets the lr of every step
        opt.lr = args.lr
    if ranks is not None:
        ranks.wrap(model)
    run = {key: getattr(args, key) for key in RUN_DEFAULTS}
    started = time.time()
    log = None
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        log = RunLog(out / "log.jsonl", args.max_steps or args.epochs * len(train_batches),
                     print_every=(args.log_every or 10) if args.no_progress else None, started=started)
        log.write({"kind": "run", "first_step": state.global_step + 1, "resume": args.resume,
                   "backend": model.backend, "world_size": world_size})

    def write_history(state):
        history = {"train_losses": state.train_losses, "val_losses": state.val_losses,
                   "tokens_seen": state.track_tokens_seen, "steps": state.track_steps, "lrs": state.lrs,
                   "hellaswag": state.hellaswag,
                   "epoch": state.epoch, "global_step": state.global_step, "config": cfg.to_dict(),
                   "backend": model.backend, "wall_time_s": round(time.time() - started, 1),
                   "train_step_s": round(state.step_seconds, 1)}
        atomic_write(out / "history.json", lambda tmp: Path(tmp).write_text(json.dumps(history, indent=1)))

    def save(state):
        if not is_main:
            return
        npgpt.save_checkpoint(ckpt_path, model, opt, state=state, run=run)
        write_history(state)
        log.write({"kind": "save", "path": str(ckpt_path), "step": state.global_step})
        saved_at[1] = state.global_step

    def on_log(record):         # rank 0's: every step and evaluation into log.jsonl
        log(record)
        if record["kind"] == "eval":
            write_history(state)

    stop = _StopOnSignal()
    saved_at = [state.global_step, None]        # the step the interval counts from; the last step saved
    at_evaluations = args.save_every is None and args.max_steps is not None
    if args.save_every == 0 and is_main:
        print("npgpt: warning: --save-every 0 saves no checkpoint before the end (Ctrl-C and SIGTERM still do); "
              "a kill or a crash loses the run", file=sys.stderr)

    def on_step(state):         # after every step on the CPU, every few on a GPU (see training/loop.py)
        if ranks:               # every rank stops at the same step, whichever got the signal
            stop.signum = ranks.agree_max(stop.signum or 0) or None
        evaluated = state.track_steps[-1:] == [state.global_step]
        if (args.save_every and state.global_step - saved_at[0] >= args.save_every or stop.signum is not None
                or at_evaluations and evaluated):
            stop.save(save, state)
            saved_at[0] = state.global_step
        stop.check()

    if is_main:
        print(f"npgpt: {args.backend} backend, {npgpt.num_params(cfg):,} parameters, {described}"
              f"{f' on each of {world_size} processes' if ranks else ''}", file=sys.stderr)
        print(f"npgpt: model {_shape(cfg)}; run {_settings(run)}", file=sys.stderr)
        if args.changes:
            print(_changes(args, state.global_step), file=sys.stderr)
    # the schedule is state.schedule; clipping (--clip) acts on every step, warmup included
    common = dict(clip_norm=args.clip, state=state, on_step=on_step, progress=not args.no_progress and is_main,
                  print_fn=None if is_main else (lambda *_: None), on_log=on_log if is_main else None,
                  hellaswag=examples, hellaswag_limit=args.hellaswag_limit)
    try:
        with stop:
            if args.max_steps is not None:
                npgpt.train_steps(model, train_batches, val_batches, opt, args.max_steps, args.eval_every,
                                  args.start_context, tok, **common)
            else:
                npgpt.train_model_simple(model, train_batches, val_batches, opt, args.epochs, args.eval_freq,
                                         args.eval_iter, args.start_context, tok, **common)
            if saved_at[1] != state.global_step:            # not saved at the last evaluation already
                stop.save(save, state)
    except _Stopped:
        if is_main:
            launcher = f"torchrun --nproc_per_node={world_size} -m npgpt" if ranks else "npgpt"
            where = "" if args.max_steps else f" (epoch {state.global_step // len(train_batches) + 1})"
            print(f"npgpt: {signal.Signals(stop.signum).name} at step {state.global_step}{where}; saved {ckpt_path}; "
                  f"continue with: {launcher} train --resume {ckpt_path}", file=sys.stderr)
        if ranks:
            ranks.finish()
        return 128 + stop.signum
    except npgpt.TrainingDiverged as e:
        raise npgpt.TrainingDiverged(f"training diverged at {e}; {_kept(ckpt_path)}") from e
    except OSError as e:                                     # a save failed: disk full, no permission, ...
        raise OSError(f"training stopped: {e}; {_kept(ckpt_path)}") from e
    finally:
        if log is not None:
            log.close()
    if ranks is not None:
        ranks.finish()
        if not is_main:
            return 0
    if state.train_losses:
        plot_losses(args.epochs, state.track_tokens_seen, state.train_losses, state.val_losses, out / "loss.png",
                    steps=state.track_steps if args.max_steps else None)
    print(f"npgpt: done in {time.time() - started:.0f} s ({state.step_seconds:.0f} s of it in training steps); "
          f"wrote {ckpt_path}, {out / 'history.json'}, {out / 'log.jsonl'}"
          f"{', ' + str(out / 'loss.png') if state.train_losses else ''}",
          file=sys.stderr)
    return 0
