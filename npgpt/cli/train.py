"""`npgpt train`: the book's chapter-5 run by default, or a run by steps over token shards.

Every setting is resolved and checked before anything is built (resolve.py, into the RunSettings
this command reads); then the data is opened and sized, and only then the model built. The
checkpoint is written at the end, at every evaluation of a shards run (or every --save-every
steps, exactly: the loop reads a GPU back at that step) and when a signal stops the run, never over
another run's checkpoint without --overwrite; training/keep.py's Keeper keeps the numbered and best
ones (--keep-last, --keep-every, --keep-best), and a finished run leaves OUT/DONE, which ends a
restart loop of `--resume auto` (OUT's newest whole checkpoint, or a new run).
Every step, evaluation and save is a line of OUT/log.jsonl (training/log.py); history.json is
rewritten at each evaluation.
"""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
import time
from pathlib import Path

from .checks import check_autocast, check_device, check_out, run_tokenizer
from .settings import RunSettings
from .stop import Stopped, StopOnSignal

__all__ = ["cmd_train"]


def _kept(ckpt_path) -> str:
    """What a run that stopped on an error leaves behind: its last checkpoint, as it was."""
    from ..weights.checkpoint import open_checkpoint
    try:
        with open_checkpoint(ckpt_path) as ckpt:
            state = ckpt["state"]
    except (OSError, ValueError):
        return f"no checkpoint was saved to {ckpt_path}"
    return f"the last checkpoint, {ckpt_path} (step {state.global_step}), is kept as it was"


def _last_state(path):
    """The TrainState a checkpoint holds."""
    from ..weights.checkpoint import open_checkpoint
    with open_checkpoint(path) as ckpt:
        return ckpt["state"]


def _model(s: RunSettings, device: str | None):
    """(model, optimizer, TrainState): resumed from --resume (with the optimizer settings the run
    resolved), else s.cfg built from the seed or read from --init-from's weights, with a new
    optimizer."""
    import npgpt
    from ..run_state import TrainState
    options = s.torch_options()
    if s.resume:
        model, opt, state = npgpt.load_checkpoint(s.resume, backend=s.backend, device=device, **options)
        if model.backend == "numpy":
            model.kernels = s.kernels
        opt.weight_decay, opt.betas, opt.eps = s.weight_decay, (s.beta1, s.beta2), s.eps
        return model, opt, state
    if s.init_from:
        from ..weights.pretrained import load_pretrained
        model = load_pretrained(s.init_from, backend=s.backend, dtype=s.dtype, device=device, n_heads=s.cfg.n_heads,
                                drop_rate=s.cfg.drop_rate, seed=s.seed, **options)
        if model.backend == "numpy":
            model.kernels = s.kernels
    else:
        numpy_options = {"kernels": s.kernels} if s.backend == "numpy" else {}
        model = npgpt.build_model(s.cfg, backend=s.backend, seed=s.seed, dtype=s.dtype, device=device,
                                  **numpy_options, **options)
    opt = npgpt.AdamW(model, lr=s.lr, weight_decay=s.weight_decay, betas=(s.beta1, s.beta2), eps=s.eps,
                      decay=s.decay)
    return model, opt, TrainState()


def _schedule(s: RunSettings, state):
    """The run's Schedule, into state: a new run's, or a resumed run's (its saved one unless an
    option given with --resume changed it)."""
    from ..run_state import Schedule
    saved = state.schedule
    state.schedule = Schedule(peak_lr=s.lr, warmup_steps=s.warmup, kind=s.schedule, decay_steps=s.lr_decay_steps,
                              min_lr=s.min_lr, decay_fraction=s.decay_fraction,
                              initial_lr=None if saved is None else saved.initial_lr)


def _changes(s: RunSettings, step: int) -> str:
    """The one line a resumed run prints when options given with --resume change its settings."""
    def shown(key, value):
        if isinstance(value, bool):
            return "on" if value else "off"
        return "none" if value is None else f"{value:g}" if isinstance(value, float) else str(value)
    changed = ", ".join(f"--{k.replace('_', '-')} {shown(k, new)} (saved: {shown(k, old)})"
                        for k, (old, new) in s.changes.items())
    return f"npgpt: resuming {s.resume} after step {step}: from step {step + 1} on, {changed}; the rest as saved"


def _data(s: RunSettings, tok, ranks):
    """The run's batches and their description: the book's loaders over a text, or batches by step
    from token shards (each rank its own windows). Each refuses data too short for one batch."""
    import npgpt
    B, T = s.step_windows, s.max_length
    if s.shards:
        from ..data.shards import TokenDir
        tokens = TokenDir(s.data)
        rank, world = (0, 1) if ranks is None else (ranks.rank, ranks.world_size)
        train = tokens.train_batches(B, T, s.seed, rank, world, sampling=s.sampling)
        val = tokens.val_batches(B, T, s.eval_iter, rank, world)
        counts = tokens.num_tokens
        epoch = f", an epoch every {train.num_windows / (B * world):.4g} steps" if s.sampling == "epoch" else ""
        return train, val, (f"{counts['train']:,} train / {counts['val']:,} val tokens, batches of {B}x{T}, "
                            f"{s.max_steps} steps{epoch}")
    train, val = npgpt.make_loaders(npgpt.load_corpus(s.data), tok, batch_size=B, max_length=T, stride=s.stride,
                                    seed=s.seed)
    if ranks is not None:
        train, val = ranks.shard(train), ranks.shard(val)
    return train, val, (f"{len(train)} train / {len(val)} val batches of {B}x{T} tokens, {s.epochs} "
                        f"epoch{'s' if s.epochs != 1 else ''}")


def _hellaswag(s: RunSettings, tok):
    """--hellaswag's examples, loaded and each scored one rendered for the model (so that a bad file
    fails before the model is built); None without it."""
    if s.hellaswag is None:
        return None
    from ..hellaswag import load_examples, render
    try:
        examples = load_examples(s.hellaswag)
        for example in examples[:s.hellaswag_limit]:
            render(example, tok, s.cfg.context_length, example["where"])
    except ValueError as e:
        raise ValueError(f"--hellaswag: {e}") from None
    return examples


def cmd_train(s: RunSettings) -> int:
    import npgpt
    from ..files import atomic_write
    from ..plot import plot_losses
    from ..training.log import RunLog

    ranks = None                                # started by torchrun: data-parallel, one rank per process
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        if s.backend != "torch":
            raise ValueError("under torchrun, train with --backend torch (DistributedDataParallel); "
                             "the numpy backend runs in one process")
        from ..torch_backend.distributed import Ranks
        ranks = Ranks(s.device)
    device = str(ranks.device) if ranks else s.device
    check_device(s.backend, device)
    check_autocast(s)
    world_size = 1 if ranks is None else ranks.world_size          # resolve read it from torchrun's WORLD_SIZE
    is_main = ranks is None or ranks.is_main    # rank 0 alone prints and writes files
    out = Path(s.out)
    ckpt_path = out / "checkpoint.h5"
    if is_main:
        check_out(s, ckpt_path)
    from ..training.keep import DONE, Keeper, done, mark_done
    tok = run_tokenizer(s.init_from)
    examples = _hellaswag(s, tok)
    train_batches, val_batches, described = _data(s, tok, ranks)    # sized and checked before the model exists
    total_steps = s.max_steps or s.epochs * len(train_batches)
    if s.auto and (done(out, total_steps) or s.resume and s.steps_done >= total_steps):
        if is_main and not done(out, total_steps):        # killed between its last save and the marker
            mark_done(out, _last_state(s.resume), total_steps)
        if is_main:
            print(f"npgpt: {out} holds a finished run ({out / DONE}, {total_steps} steps): nothing to train",
                  file=sys.stderr)
        if ranks:
            ranks.finish()
        return 0
    if s.resume and not s.auto and s.steps_done >= total_steps:
        raise ValueError(f"--epochs {s.epochs}: {s.resume} has done {s.steps_done} steps already, of the "
                         f"{total_steps} these epochs take, so this resume would train nothing")
    if s.schedule != "constant" and s.lr_decay_steps is None:      # the decay's length: the run's, by default
        s = dataclasses.replace(s, lr_decay_steps=total_steps)
    if s.schedule == "wsd":                     # known once the run's length is: before the model is built
        start = s.lr_decay_steps - round(s.decay_fraction * s.lr_decay_steps)
        if start < s.warmup:
            raise ValueError(f"--decay-fraction {s.decay_fraction}: the wsd decay, the last {s.decay_fraction:g} "
                             f"of {s.lr_decay_steps} steps, would start at step {start}, inside --warmup {s.warmup} "
                             "(give a smaller --decay-fraction or --warmup)")
    if is_main:                                 # the first lines: the settings complete, where the math runs
        print(f"npgpt: run: {s.as_command()}", file=sys.stderr)
        if s.backend == "numpy":
            from ..numpy_backend import threads
            print(f"npgpt: numpy backend: {threads.describe()}", file=sys.stderr)
        print(f"npgpt: batch: {s.batch_line()}", file=sys.stderr)
    model, opt, state = _model(s, device)
    cfg = model.cfg
    _schedule(s, state)
    if not state.schedule.scheduled:            # else the loop sets the lr of every step
        opt.lr = s.lr
    if ranks is not None:
        ranks.wrap(model)
    run = s.saved()
    started = time.time()
    log = None
    keeper = Keeper(out, s.keep_last, s.keep_every, s.keep_best)
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        if not s.resume:                    # a new run (--overwrite or --resume auto's first) is not done
            (out / DONE).unlink(missing_ok=True)
        log = RunLog(out / "log.jsonl", total_steps, print_every=s.log_every, started=started)
        log.write({"kind": "run", "first_step": state.global_step + 1, "resume": s.resume,
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
        record = keeper.save(model, opt, state, run)        # the record says the disk use
        write_history(state)
        log.write(record)
        saved_at[1] = state.global_step

    def on_log(record):         # rank 0's: every step and evaluation into log.jsonl
        log(record)
        if record["kind"] == "eval":
            write_history(state)

    stop = StopOnSignal()
    saved_at = [state.global_step, None]        # the step the interval counts from; the last step saved
    at_evaluations = s.save_every is None and s.shards or s.keep_best       # the best is an evaluated save
    if s.save_every == 0 and is_main:
        print("npgpt: warning: --save-every 0 saves no checkpoint before the end (Ctrl-C and SIGTERM still do); "
              "a kill or a crash loses the run", file=sys.stderr)

    def save_due(state) -> bool:            # --save-every or a signal: flush and save after this very step
        return bool(s.save_every and state.global_step - saved_at[0] >= s.save_every
                    or stop.signum is not None and not ranks)

    def on_step(state):         # after every step on the CPU; on a GPU every few, and whenever save_due
        if ranks:               # every rank stops at the same step, whichever got the signal
            stop.signum = ranks.agree_max(stop.signum or 0) or None
        evaluated = state.track_steps[-1:] == [state.global_step]
        if (s.save_every and state.global_step - saved_at[0] >= s.save_every or stop.signum is not None
                or at_evaluations and evaluated):
            stop.save(save, state)
            saved_at[0] = state.global_step
        stop.check()

    if is_main:
        print(f"npgpt: {s.backend} backend, {npgpt.num_params(cfg):,} parameters, {described}"
              f"{f' on each of {world_size} processes' if ranks else ''}", file=sys.stderr)
        if s.changes:
            print(_changes(s, state.global_step), file=sys.stderr)
    # the schedule is state.schedule; clipping (--clip) acts on every step, warmup included
    common = dict(clip_norm=s.clip, state=state, on_step=on_step, progress=s.progress and is_main,
                  print_fn=None if is_main else (lambda *_: None), on_log=on_log if is_main else None,
                  hellaswag=examples, hellaswag_limit=s.hellaswag_limit, hellaswag_batch=s.hellaswag_batch,
                  skip_loss_z=s.skip_loss_z, skip_grad_z=s.skip_grad_z, sample_every=s.sample_every,
                  sample_tokens=s.sample_tokens, flush_after=save_due)
    try:
        with stop:
            if s.shards:
                npgpt.train_steps(model, train_batches, val_batches, opt, s.max_steps, s.eval_every,
                                  s.start_context, tok, **common)
            else:
                npgpt.train_model_simple(model, train_batches, val_batches, opt, s.epochs, s.eval_freq,
                                         s.eval_iter, s.start_context, tok, **common)
            if saved_at[1] != state.global_step:            # not saved at the last evaluation already
                stop.save(save, state)
            if is_main:
                mark_done(out, state, total_steps)          # a restart loop with --resume auto ends here
    except Stopped:
        if is_main:
            launcher = f"torchrun --nproc_per_node={world_size} -m npgpt" if ranks else "npgpt"
            where = "" if s.shards else f" (epoch {state.global_step // len(train_batches) + 1})"
            again = f"--resume auto --out {out}" if s.auto else f"--resume {ckpt_path}"
            print(f"npgpt: {signal.Signals(stop.signum).name} at step {state.global_step}{where}; saved {ckpt_path}; "
                  f"continue with: {launcher} train {again}", file=sys.stderr)
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
        plot_losses(s.epochs, state.track_tokens_seen, state.train_losses, state.val_losses, out / "loss.png",
                    steps=state.track_steps if s.shards else None)
    print(f"npgpt: done in {time.time() - started:.0f} s ({state.step_seconds:.0f} s of it in training steps); "
          f"wrote {ckpt_path}, {out / 'history.json'}, {out / 'log.jsonl'}"
          f"{', ' + str(out / 'loss.png') if state.train_losses else ''}",
          file=sys.stderr)
    return 0
