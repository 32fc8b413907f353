"""The chapter-5 training loop, written once against the backend interface.

calc_loss_batch / calc_loss_loader / evaluate_model / train_model_simple follow the book; the
keyword-only extras of train_model_simple add appendix D's linear warmup, cosine decay and gradient
clipping (as the GPT-2 recipe runs them: see train_model_simple), a progress bar, HellaSwag at each
evaluation, and the hooks the command line uses for checkpoints, resuming and its log (on_log).
train_steps is the same step by steps over token shards, for corpora larger than memory.
Both take each optimizer step through stepper.py's Stepper (schedule, clipping, spike guard,
bookkeeping, log). The loop talks to the model through the Backend interface only (npgpt/base.py):
train_step, loss, train/eval, flops_per_token and peak_flops.
"""
from __future__ import annotations

import itertools

import numpy as np

from ..sampling import generate
from ..tokenizer import text_to_token_ids, token_ids_to_text
from ..run_state import TrainState
from .stepper import Stepper, run_schedule


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
    out = generate(model, ids, max_new_tokens=max_new_tokens, context_size=context_size, temperature=0.0)[0]
    # a vocabulary padded past the tokenizer's (--vocab-size 50304) has rows no text decodes to
    runs = itertools.groupby(out.tolist(), key=lambda i: i < tokenizer.n_vocab)
    print_fn("".join(token_ids_to_text(list(ids), tokenizer) if known else "\N{REPLACEMENT CHARACTER}" * len(list(ids))
                     for known, ids in runs).replace("\n", " "))


def sample_due(step: int, sample_every: int | None, sample_tokens: int) -> bool:
    """Whether a --sample-every sample follows this step (0-based: the steps done are step + 1)."""
    return bool(sample_tokens and sample_every and (step + 1) % sample_every == 0)


def train_model_simple(model, train_loader, val_loader, optimizer, num_epochs, eval_freq, eval_iter,
                       start_context, tokenizer, *, warmup_steps=0, cosine=False, clip_norm=None,
                       initial_lr=None, min_lr=None, decay_steps=None, clip_after_warmup=False, state=None,
                       on_step=None, on_epoch_end=None, progress=True, print_fn=None, on_log=None,
                       hellaswag=None, hellaswag_limit=None, schedule=None, decay_fraction=None,
                       skip_loss_z=None, skip_grad_z=None, hellaswag_batch=8, sample_every=None,
                       sample_tokens=50, flush_after=None):
    """Train for num_epochs over train_loader, evaluating every eval_freq steps and printing a sample
    after each epoch. Returns (train_losses, val_losses, tokens_seen) as the book's function does.

    Without warmup_steps, cosine or clip_norm this is the book's loop exactly (constant lr).
    With them it is appendix D's as the GPT-2 recipe runs it (training/schedule.py): the lr is set
    before each step, warming up from near zero (initial_lr=None: peak·(s+1)/(warmup_steps+1), the
    peak being the optimizer's lr) and decaying along a cosine to min_lr (None: peak / 10) at step
    decay_steps (None: the run's last, num_epochs * len(train_loader)); the gradients' global norm
    is clipped to clip_norm on every step, from the first. Appendix D itself is initial_lr=3e-5,
    min_lr=1e-6, clip_after_warmup=True (no clipping during warmup).

    state (a TrainState) resumes an interrupted run, and its schedule with it: the schedule
    keywords only set the schedule of a new state. on_step(state) is called once the steps so far
    are done and read back (after every step on the CPU, every FLUSH_EVERY steps and at evaluations
    and epoch ends on a GPU), on_epoch_end(state) after each epoch: checkpoints are saved from these.
    on_log(record) gets a dict for every step and every evaluation (Stepper.flush and .record, in stepper.py: the
    command line writes them to log.jsonl). hellaswag: examples (npgpt.hellaswag.load_examples), the
    first hellaswag_limit of them (all: None) scored at each evaluation. schedule: "constant",
    "cosine", "linear" or "wsd" (training/schedule.py; None: cosine or constant as `cosine` says),
    decay_fraction wsd's (0.2). skip_loss_z, skip_grad_z: the spike guard (stepper.py, guard.py).
    hellaswag_batch: its examples a forward. sample_every: a sample every that many steps instead
    of after each epoch (train_steps: of each evaluation); sample_tokens: its length (0: none).
    flush_after(state): True to flush (and call on_step) right after this step, not FLUSH_EVERY
    steps later on a GPU: the command line's --save-every and signals, exact to the step.
    """
    state = state or TrainState()
    steps_per_epoch = len(train_loader)
    world_size = getattr(train_loader, "world_size", 1)                # torchrun's processes
    run_schedule(state, optimizer, num_epochs * steps_per_epoch, warmup_steps, cosine, initial_lr, min_lr,
                 decay_steps, schedule, decay_fraction)
    step_once = Stepper(model, optimizer, state, num_epochs * steps_per_epoch, world_size, clip_norm,
                         clip_after_warmup, progress, print_fn, on_log,
                         None if hellaswag is None else (hellaswag, tokenizer, hellaswag_limit, hellaswag_batch),
                         skip_loss_z, skip_grad_z, flush_after)
    try:
        for epoch in range(state.epoch, num_epochs):
            state.epoch = epoch
            model.train()
            train_loader.set_epoch(epoch)
            done_in_epoch = state.global_step + 1 - epoch * steps_per_epoch   # > 0 after a mid-epoch resume
            for i, (inputs, targets) in enumerate(train_loader):
                if i < done_in_epoch:
                    continue
                step_once(inputs, targets, f"epoch {epoch + 1}", epoch=epoch + 1)
                evaluate = state.global_step % eval_freq == 0
                sample = sample_due(state.global_step, sample_every, sample_tokens)
                if not (step_once.due or evaluate or sample or i == len(train_loader) - 1):
                    continue
                step_once.flush()
                if evaluate:
                    step_once.record(f"Ep {epoch + 1}", *evaluate_model(model, train_loader, val_loader, eval_iter))
                if sample:
                    generate_and_print_sample(model, tokenizer, start_context, sample_tokens, step_once.say)
                step_once.restart_clock(on_step)
            if sample_tokens and sample_every is None:
                generate_and_print_sample(model, tokenizer, start_context, sample_tokens, step_once.say)
            state.epoch = epoch + 1
            step_once.restart_clock(on_epoch_end)
    finally:
        step_once.bar.close()
    return state.train_losses, state.val_losses, state.track_tokens_seen


def train_steps(model, train_batches, val_batches, optimizer, max_steps, eval_every, start_context, tokenizer,
                *, warmup_steps=0, cosine=False, clip_norm=None, initial_lr=None, min_lr=None, decay_steps=None,
                clip_after_warmup=False, state=None, on_step=None, progress=True, print_fn=None, on_log=None,
                hellaswag=None, hellaswag_limit=None, schedule=None, decay_fraction=None, skip_loss_z=None,
                skip_grad_z=None, hellaswag_batch=8, sample_every=None, sample_tokens=50, flush_after=None):
    """Train by steps on a corpus of token shards: step s trains on train_batches.batch(s), which
    depends on (seed, s) alone, so a resumed run (state) takes the same batches as one that never
    stopped, and a larger max_steps continues it (on its saved schedule: at min_lr past its
    decay_steps). Every eval_every steps (and at the last) it prints the mean training loss of the
    steps since the last report and the loss over val_batches (dropout off), then a greedy sample.
    The schedule, clipping, on_log, hellaswag, spike-guard, sample and flush_after keywords are
    train_model_simple's; decay_steps defaults to max_steps.
    """
    state = state or TrainState()
    run_schedule(state, optimizer, max_steps, warmup_steps, cosine, initial_lr, min_lr, decay_steps, schedule,
                 decay_fraction)
    step_once = Stepper(model, optimizer, state, max_steps, train_batches.world_size, clip_norm, clip_after_warmup,
                         progress, print_fn, on_log,
                         None if hellaswag is None else (hellaswag, tokenizer, hellaswag_limit, hellaswag_batch),
                         skip_loss_z, skip_grad_z, flush_after)
    # the losses of the steps since the last evaluation, which its reported training loss averages; a
    # resumed run takes them from the spike guard's window (the last 128 steps' losses, saved)
    since = state.global_step - (state.track_steps[-1] if state.track_steps else -1)
    recent = list(state.guard_losses[-since:]) if 0 < since <= len(state.guard_losses) else []
    try:
        model.train()
        while state.global_step + 1 < max_steps:
            inputs, targets = train_batches.batch(state.global_step + 1)
            step_once(inputs, targets, f"of {max_steps}")
            step = state.global_step
            evaluate = step % eval_every == 0 or step == max_steps - 1
            sample = sample_due(step, sample_every, sample_tokens) or (evaluate and sample_tokens
                                                                      and sample_every is None)
            if not (step_once.due or evaluate or sample):
                continue
            recent += step_once.flush()
            if evaluate or sample:
                model.eval()
                if evaluate:
                    step_once.record("Steps", float(np.mean(recent)), calc_loss_loader(model, val_batches))
                    recent = []
                if sample:
                    generate_and_print_sample(model, tokenizer, start_context, sample_tokens, step_once.say)
                model.train()
            step_once.restart_clock(on_step)
    finally:
        step_once.bar.close()
    return state.train_losses, state.val_losses, state.track_tokens_seen
