"""The chapter-5 training loop, written once against the backend interface.

calc_loss_batch / calc_loss_loader / evaluate_model / train_model_simple follow the book; the
keyword-only extras of train_model_simple add appendix D (linear warmup, cosine decay, gradient
clipping), a progress bar, and the hooks the command line uses for checkpoints and resuming.
This file knows nothing of either backend's internals.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
from tqdm.auto import tqdm

from .sampling import generate
from .tokenizer import text_to_token_ids, token_ids_to_text


class TrainingDiverged(FloatingPointError):
    """The loss became NaN or infinite; the parameters were not updated with it."""


def calc_loss_batch(model, inputs, targets) -> float:
    return model.loss(inputs, targets)


def calc_loss_loader(model, loader, num_batches=None) -> float:
    """Mean loss over the first num_batches batches (all of them when None; capped at len(loader))."""
    if len(loader) == 0:
        return float("nan")
    num_batches = len(loader) if num_batches is None else min(num_batches, len(loader))
    total = 0.0
    for i, (inputs, targets) in enumerate(loader):
        if i >= num_batches:
            break
        total += calc_loss_batch(model, inputs, targets)
    return total / num_batches


def evaluate_model(model, train_loader, val_loader, eval_iter):
    """(train loss, val loss) over eval_iter batches each, with dropout off."""
    was_training = model.training
    model.eval()
    try:
        train_loss = calc_loss_loader(model, train_loader, num_batches=eval_iter)
        val_loss = calc_loss_loader(model, val_loader, num_batches=eval_iter)
    finally:
        if was_training:
            model.train()
    return train_loss, val_loss


def generate_and_print_sample(model, tokenizer, start_context, max_new_tokens=50, print_fn=print):
    """Greedy continuation of start_context, printed on one line (the book's sample after each epoch)."""
    context_size = model.cfg.context_length
    ids = text_to_token_ids(start_context, tokenizer)[:, -context_size:]
    out = generate(model, ids, max_new_tokens=max_new_tokens, context_size=context_size, temperature=0.0)
    print_fn(token_ids_to_text(out, tokenizer).replace("\n", " "))


def warmup_cosine_lr(step, peak_lr, total_steps, warmup_steps=0, initial_lr=3e-5, min_lr=1e-6, cosine=True):
    """Appendix D's learning rate at global step `step` (0-based): linear from initial_lr to peak_lr
    over warmup_steps, then half a cosine from peak_lr down to min_lr at total_steps (or constant)."""
    if step < warmup_steps:
        return initial_lr + step * (peak_lr - initial_lr) / warmup_steps
    if not cosine:
        return peak_lr
    progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
    return min_lr + (peak_lr - min_lr) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


@dataclass
class TrainState:
    """Everything the loop needs to carry on after a restart."""
    epoch: int = 0               # epoch in progress (0-based)
    global_step: int = -1        # last completed optimizer step (the book starts at -1)
    tokens_seen: int = 0
    train_losses: list = field(default_factory=list)
    val_losses: list = field(default_factory=list)
    track_tokens_seen: list = field(default_factory=list)
    track_steps: list = field(default_factory=list)
    lrs: list = field(default_factory=list)


def train_model_simple(model, train_loader, val_loader, optimizer, num_epochs, eval_freq, eval_iter,
                       start_context, tokenizer, *, warmup_steps=0, cosine=False, clip_norm=None,
                       initial_lr=3e-5, min_lr=1e-6, state=None, on_step=None, on_epoch_end=None,
                       progress=True, print_fn=None):
    """Train for num_epochs over train_loader, evaluating every eval_freq steps and printing a sample
    after each epoch. Returns (train_losses, val_losses, tokens_seen) as the book's function does.

    Without warmup_steps, cosine or clip_norm this is the book's loop exactly (constant lr).
    With them it is appendix D's: the lr is set before each step and gradients are clipped on
    every step from the end of warmup on. state (a TrainState) resumes an interrupted run;
    on_step(state) and on_epoch_end(state) are called after each step / epoch (checkpoints).
    """
    state = state or TrainState()
    peak_lr = optimizer.lr
    steps_per_epoch = len(train_loader)
    total_steps = num_epochs * steps_per_epoch
    scheduled = warmup_steps > 0 or cosine
    bar = tqdm(total=total_steps, initial=state.global_step + 1, disable=not progress,
               desc="train", unit="step", dynamic_ncols=True)
    say = print_fn or (bar.write if progress else print)
    try:
        for epoch in range(state.epoch, num_epochs):
            state.epoch = epoch
            model.train()
            train_loader.set_epoch(epoch)
            done_in_epoch = state.global_step + 1 - epoch * steps_per_epoch   # > 0 after a mid-epoch resume
            for i, (inputs, targets) in enumerate(train_loader):
                if i < done_in_epoch:
                    continue
                step = state.global_step + 1
                if scheduled:
                    optimizer.lr = warmup_cosine_lr(step, peak_lr, total_steps, warmup_steps,
                                                    initial_lr, min_lr, cosine)
                clip = clip_norm if step >= warmup_steps else None
                started = time.perf_counter()
                try:
                    loss = model.train_step(inputs, targets, optimizer, clip_norm=clip)
                except FloatingPointError as e:
                    raise TrainingDiverged(f"step {step} (epoch {epoch + 1}): {e}") from None
                seconds = time.perf_counter() - started
                world = getattr(train_loader, "world_size", 1)                # torchrun's processes
                tokens = int(np.size(inputs)) * world
                state.global_step = step
                state.tokens_seen += tokens                                   # over every rank
                state.lrs.append(optimizer.lr)
                bar.update(1)
                speed = {"tok/s": f"{tokens / seconds:.0f}"}
                if getattr(model, "peak_flops", None):    # model FLOPs utilisation over every rank's GPU
                    flops = model.flops_per_token(np.shape(inputs)[-1]) * tokens / seconds
                    speed["mfu"] = f"{flops / (model.peak_flops * world):.0%}"
                bar.set_postfix(epoch=epoch + 1, loss=f"{loss:.3f}", lr=f"{optimizer.lr:.2e}", **speed)
                if step % eval_freq == 0:
                    train_loss, val_loss = evaluate_model(model, train_loader, val_loader, eval_iter)
                    state.train_losses.append(train_loss)
                    state.val_losses.append(val_loss)
                    state.track_tokens_seen.append(state.tokens_seen)
                    state.track_steps.append(step)
                    say(f"Ep {epoch + 1} (Step {step:06d}): Train loss {train_loss:.3f}, Val loss {val_loss:.3f}")
                if on_step is not None:
                    on_step(state)
            generate_and_print_sample(model, tokenizer, start_context, print_fn=say)
            state.epoch = epoch + 1
            if on_epoch_end is not None:
                on_epoch_end(state)
    finally:
        bar.close()
    return state.train_losses, state.val_losses, state.track_tokens_seen
