"""One optimizer step as both training loops take it (loop.py's train_model_simple and
train_steps): the run's learning-rate schedule, gradient clipping, the spike guard, the step, the
run's bookkeeping in TrainState, the progress bar, the per-step and per-evaluation records of the
log, and HellaSwag at each evaluation.
"""
from __future__ import annotations

import bisect
import time

import numpy as np
from tqdm.auto import tqdm

from ..base import loss_value
from ..hellaswag import hellaswag as score_hellaswag
from ..run_state import Schedule, TrainingDiverged
from .guard import SpikeGuard
from .schedule import scheduled_lr


FLUSH_EVERY = 10      # steps between reads of a device that queues its work (a GPU): loss, clock, MFU


def run_schedule(state, optimizer, total_steps, warmup_steps, cosine, initial_lr, min_lr, decay_steps,
                 schedule=None, decay_fraction=None) -> Schedule:
    """state.schedule, set first for a new run: from the keywords, its peak the optimizer's lr, its
    kind `schedule` (constant, cosine, linear or wsd; None: cosine if cosine else constant), the
    decay's length total_steps unless decay_steps is given, its floor peak / 10 unless min_lr is,
    and wsd's decay_fraction 0.2 (llm.c's) unless given. A resumed state keeps its own (replace
    state.schedule to change it)."""
    if state.schedule is None:
        kind = schedule or ("cosine" if cosine else "constant")
        if kind == "constant" and (decay_steps is not None or min_lr is not None):
            raise ValueError("decay_steps and min_lr shape the decay: give cosine=True or a schedule with them")
        peak, decays = optimizer.lr, kind != "constant"
        state.schedule = Schedule(peak_lr=peak, warmup_steps=warmup_steps, initial_lr=initial_lr, kind=kind,
                                  decay_steps=(total_steps if decay_steps is None else decay_steps) if decays else None,
                                  min_lr=(peak / 10 if min_lr is None else min_lr) if decays else None,
                                  decay_fraction=(0.2 if decay_fraction is None else decay_fraction)
                                  if kind == "wsd" else None)
    return state.schedule


class Stepper:
    """One optimizer step as both loops take it: the schedule's learning rate, gradient clipping, the
    step itself, the run's bookkeeping in state, the progress bar and the records given to on_log.

    Steps are taken with sync=False, so on a GPU the host queues step after step without waiting;
    flush() waits for the device, reads the pending losses back (a NaN or infinite one ends the run
    naming its step; its update was skipped on the device) and times the window of steps. A
    synchronous backend (the CPU) is flushed after every step, a GPU every FLUSH_EVERY steps and
    before every evaluation, sample, save and the end.

    on_log(record), if given, is called at each flush with one dict per step of the window (see
    flush) and at each evaluation with its scores (see record). hellaswag: (examples, tokenizer,
    limit, batch_examples) to score at each evaluation, or None.

    skip_loss_z, skip_grad_z: the spike guard's thresholds (training/guard.py; None: no check).
    With either, each step's loss and norm are read on the host before its update (so a GPU
    waits for every step) and a step the guard refuses leaves the parameters untouched; its
    windows start from and are kept in state (guard_losses, guard_norms), the skipped steps in
    state.skipped_steps. Without, the windows are still filled (at each flush), so a resumed run
    that turns the guard on has them ready."""

    def __init__(self, model, optimizer, state, total_steps, world_size, clip_norm, clip_after_warmup, progress,
                 print_fn, on_log=None, hellaswag=None, skip_loss_z=None, skip_grad_z=None, flush_after=None):
        self.model, self.optimizer, self.state, self.world_size = model, optimizer, state, world_size
        self.clip_norm, self.clip_after_warmup = clip_norm, clip_after_warmup
        self.guard = SpikeGuard(skip_loss_z, skip_grad_z, state.guard_losses, state.guard_norms)
        self.on_log, self.hellaswag = on_log, hellaswag
        self.flush_every = 1 if model.synchronous else FLUSH_EVERY
        self.flush_after = flush_after
        self.bar = tqdm(total=total_steps, initial=state.global_step + 1, disable=not progress,
                        desc="train", unit="step", dynamic_ncols=True)
        self.say = print_fn or (self.bar.write if progress else print)
        self.pending, self.window_tokens, self.postfix = [], 0, {}
        self.restart_clock()

    def restart_clock(self, callback=None) -> None:
        """Call callback(state) if given (checkpoints), then count time from here on as step time:
        called after the evaluations, samples and saves that follow a flush."""
        if callback is not None:
            callback(self.state)
        self.window_start = time.perf_counter()

    def __call__(self, inputs, targets, where: str, **postfix) -> None:
        """Queue one batch's step as step global_step + 1; where names it in an error ("epoch 3")."""
        state, model, optimizer = self.state, self.model, self.optimizer
        step = state.global_step + 1
        schedule = state.schedule
        if schedule.scheduled:                 # a constant lr is the optimizer's own, as in the book's loop
            optimizer.lr = scheduled_lr(schedule, step)
        unclipped = self.clip_after_warmup and step < schedule.warmup_steps        # appendix D's warmup
        why = []                                   # the guard's reason to skip this step's update, if any

        def apply_update(loss, norm):
            why.append(self.guard.skip(loss, norm))
            return why[0] is None
        try:
            loss = model.train_step(inputs, targets, optimizer, clip_norm=None if unclipped else self.clip_norm,
                                    sync=False, **({"apply_update": apply_update} if self.guard.active else {}))
        except FloatingPointError as e:
            raise TrainingDiverged(f"step {step} ({where}): {e}") from None
        skipped = None if getattr(model, "last_applied", True) else why[0] if why and why[0] else "fp16 overflow"
        if skipped:
            state.skipped_steps.append(step)
        tokens = int(np.size(inputs)) * self.world_size                    # over every rank
        state.global_step = step
        state.tokens_seen += tokens
        state.lrs.append(optimizer.lr)
        # the norm before clipping: on a GPU a device tensor, read at the flush with the loss
        self.pending.append((step, where, loss, np.shape(inputs)[-1], optimizer.lr,
                             getattr(model, "last_grad_norm", None), skipped))
        self.window_tokens += tokens
        self.postfix = postfix
        self.bar.update(1)

    @property
    def due(self) -> bool:
        """Time to flush: every flush_every steps, or at a step flush_after(step) asks for."""
        return len(self.pending) >= self.flush_every or bool(self.flush_after and self.flush_after(self.state))

    def flush(self) -> list[float]:
        """Wait for the device, read the pending losses, report the window's speed; -> the losses.
        on_log gets one record a step: {"kind": "step", "step", "loss", "lr", "norm" (the gradient
        norm before clipping), "ms" and "tok_s" (the window's: ms a step and tokens/s over every
        rank), "mfu" (a fraction) where the device's peak is known, "skipped" (why: "loss z
        7.1 > 6", "fp16 overflow") on a step whose update was skipped, and "skipped_steps" (how
        many of the run's updates were skipped so far) once there is one}."""
        if not self.pending:
            return []
        self.model.synchronize()
        seconds = time.perf_counter() - self.window_start
        self.state.step_seconds += seconds
        losses = []
        for step, where, loss, *_ in self.pending:
            try:
                losses.append(loss_value(loss))
            except FloatingPointError as e:
                raise TrainingDiverged(f"step {step} ({where}): {e}") from None
        T = self.pending[-1][3]
        speed = {"ms": 1000 * seconds / len(self.pending), "tok_s": self.window_tokens / seconds}
        if self.model.peak_flops:                 # model FLOPs utilisation over every rank's device
            flops = self.model.flops_per_token(T) * self.window_tokens / seconds
            speed["mfu"] = flops / (self.model.peak_flops * self.world_size)
        shown = {"tok/s": f"{speed['tok_s']:.0f}", **({"mfu": f"{speed['mfu']:.0%}"} if "mfu" in speed else {})}
        if self.state.skipped_steps:
            shown["skipped"] = len(self.state.skipped_steps)
        self.bar.set_postfix(**self.postfix, loss=f"{losses[-1]:.3f}", lr=f"{self.optimizer.lr:.2e}", **shown)
        for (step, _, _, _, lr, norm, skipped), loss in zip(self.pending, losses):
            norm = None if norm is None else float(norm)
            if not self.guard.active:                 # an active guard saw the step before its update
                self.guard.observe(loss, norm)
            if skipped:
                self.say(f"step {step}: update skipped ({skipped}); {len(self.state.skipped_steps)} skipped so far")
            if self.on_log is not None:
                so_far = bisect.bisect_right(self.state.skipped_steps, step)   # the run's skipped updates
                self.on_log({"kind": "step", "step": step, "loss": loss, "lr": lr, "norm": norm, **speed,
                             **({"skipped": skipped} if skipped else {}),
                             **({"skipped_steps": so_far} if so_far else {})})
        self.state.guard_losses, self.state.guard_norms = self.guard.window()
        self.pending, self.window_tokens = [], 0
        return losses

    def record(self, label: str, train_loss: float, val_loss: float) -> None:
        """Keep an evaluation's losses in state, score HellaSwag if asked (kept in state.hellaswag),
        print the line and give on_log {"kind": "eval", "step", "train_loss", "val_loss",
        "tokens_seen"} with "hellaswag_n", "hellaswag_acc", "hellaswag_acc_norm" when scored."""
        state = self.state
        state.train_losses.append(train_loss)
        state.val_losses.append(val_loss)
        state.track_tokens_seen.append(state.tokens_seen)
        state.track_steps.append(state.global_step)
        line = f"{label} (Step {state.global_step:06d}): Train loss {train_loss:.3f}, Val loss {val_loss:.3f}"
        record = {"kind": "eval", "step": state.global_step, "train_loss": train_loss, "val_loss": val_loss,
                  "tokens_seen": state.tokens_seen}
        if self.hellaswag is not None:
            examples, tokenizer, limit, batch = self.hellaswag
            ranks = getattr(self.model, "ranks", None)      # under torchrun: each rank its share, summed
            r = score_hellaswag(self.model, examples, tokenizer, limit=limit, reduce=ranks is not None,
                                batch_examples=batch,
                                **({"rank": ranks.rank, "world_size": ranks.world_size} if ranks else {}))
            state.hellaswag.append({"step": state.global_step, "n": r["n"], "acc": r["acc"],
                                    "acc_norm": r["acc_norm"]})
            line += f", HellaSwag acc {r['acc']:.4f} acc_norm {r['acc_norm']:.4f} ({r['n']} examples)"
            record.update(hellaswag_n=r["n"], hellaswag_acc=r["acc"], hellaswag_acc_norm=r["acc_norm"])
        self.say(line)
        if self.on_log is not None:
            self.on_log(record)
