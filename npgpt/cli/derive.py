"""The settings `npgpt train` derives from others while it resolves a run (resolve.py): the batch
(micro-batch, accumulation, processes, tokens a step) and the learning-rate schedule (--schedule,
its --cosine alias, --final-lr-frac). Each refuses, in one line naming the flags, what does not fit.

A step's batch is nanoGPT's and llm.c's: --batch-size B is the micro-batch (windows one forward
takes on one process, nanoGPT's batch_size, llm.c's -b), --grad-accum K the micro-batches a step
(nanoGPT's gradient_accumulation_steps per process), and a step trains B x K x W windows of T
tokens over W processes: --tokens-per-step (llm.c's -d) is that product, and given, K follows
from it."""
from __future__ import annotations

import math

KINDS = ("constant", "cosine", "linear", "wsd")


def _positive(a, key):
    value = getattr(a, key)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"--{key.replace('_', '-')} must be a positive integer, got {value!r}")


def new_batch(a, world: int) -> None:
    """A new run's a.batch_size, a.grad_accum and a.tokens_per_step (a.max_length known)."""
    for key in ("batch_size", "grad_accum", "tokens_per_step", "max_length"):
        _positive(a, key)
    a.batch_size = a.batch_size or 2
    per_micro = a.batch_size * world * a.max_length          # tokens of one micro-batch over every process
    if a.tokens_per_step is not None:
        if a.tokens_per_step % per_micro:
            raise ValueError(f"--tokens-per-step {a.tokens_per_step} is not a multiple of --batch-size "
                             f"{a.batch_size} x {world} processes x --max-length {a.max_length} = {per_micro:,} "
                             "tokens (one micro-batch on every process)")
        k = a.tokens_per_step // per_micro
        if a.grad_accum not in (None, k):
            raise ValueError(f"--grad-accum {a.grad_accum}: --tokens-per-step {a.tokens_per_step} with --batch-size "
                             f"{a.batch_size} on {world} processes is {k} micro-batches a step (give one of them)")
        a.grad_accum = k
    a.grad_accum = a.grad_accum or 1
    a.tokens_per_step = a.grad_accum * per_micro


def resumed_batch(a, saved: dict, world: int, shards: bool) -> None:
    """A resumed run's batch on `world` processes: the saved step's windows (processes x micro-batch x
    accumulation), shared among the processes there are now, the micro-batch and the accumulation
    free to trade with each other (the same windows a step, the same gradients)."""
    for key in ("batch_size", "grad_accum", "tokens_per_step", "max_length"):
        _positive(a, key)
    saved_world, saved_b, saved_k = saved.get("world_size", 1), saved["batch_size"], saved.get("grad_accum", 1)
    total = saved_world * saved_b * saved_k                 # windows a step over every process
    T = a.max_length
    was = f"{a.resume} was trained with {saved_world} process(es) x --batch-size {saved_b} x --grad-accum {saved_k}"
    if a.tokens_per_step not in (None, total * T):
        raise ValueError(f"--tokens-per-step {a.tokens_per_step}: {was} = {total * T:,} tokens a step; a resumed "
                         "run must see the same batches (leave it out, or start a new run)")
    if world != saved_world and not shards:
        raise ValueError(f"{a.resume} was trained by {saved_world} processes (torchrun ranks), this run has {world}; "
                         f"a text run's batches depend on the number of processes, so resume it with {saved_world}")
    if total % world:
        raise ValueError(f"{was} = {total} windows a step, which {world} processes cannot share equally; resume it "
                         f"with a number of processes that divides {total}")
    per = total // world
    b, k = a.batch_size, a.grad_accum
    if b is None and k is None:         # the same as saved, else the micro-batch (the memory) kept if it can be
        if world == saved_world:
            b, k = saved_b, saved_k
        elif per % saved_b == 0:
            b = saved_b
        else:
            k = saved_k if per % saved_k == 0 else 1
    if b is None:
        b = per // k if per % k == 0 else None
    if k is None:
        k = per // b if per % b == 0 else None
    if b is None or k is None or b * k != per:
        raise ValueError(f"{was} = {total} windows a step, {per} on each of {world} process(es): give --batch-size "
                         f"and --grad-accum whose product is {per}")
    a.batch_size, a.grad_accum, a.tokens_per_step = b, k, total * T


def schedule_kind(a, explicit: set) -> None:
    """a.schedule from --schedule and its older alias --cosine (explicit: the keys given by a flag or
    the config file; the others may be a resumed run's)."""
    if a.schedule is not None and a.schedule not in KINDS:
        raise ValueError(f"--schedule must be one of {', '.join(KINDS)}, got {a.schedule!r}")
    if "cosine" in explicit:
        if a.schedule not in (None, "cosine") and a.cosine:
            raise ValueError(f"--cosine is --schedule cosine, and --schedule {a.schedule} was given: give one of them")
        if a.schedule == "cosine" and not a.cosine:
            raise ValueError("--no-cosine contradicts --schedule cosine: give one of them")
        a.schedule = a.schedule or ("cosine" if a.cosine else "constant")


def schedule_numbers(a, explicit: set) -> None:
    """The decay's floor, length and fraction, once a.schedule and a.lr are known: --final-lr-frac Q
    is --min-lr Q x --lr (llm.c's -q); a constant schedule drops a resumed run's decay settings, and
    a decaying one refuses what shapes no decay."""
    q = a.final_lr_frac
    if q is not None:
        if isinstance(q, bool) or not isinstance(q, (int, float)) or not 0 <= q <= 1:
            raise ValueError(f"--final-lr-frac must be a number in [0, 1], got {q!r}")
        if "min_lr" in explicit:
            raise ValueError(f"--final-lr-frac {q} and --min-lr {a.min_lr} both set the floor: give one of them")
        a.min_lr = q * a.lr
        explicit.add("min_lr")
    f = a.decay_fraction
    if f is not None and (isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 < f <= 1):
        raise ValueError(f"--decay-fraction must be a number in (0, 1], got {f!r}")
    shapes = (("min_lr", "floor"), ("lr_decay_steps", "length")) if a.schedule == "constant" else ()
    for key, what in (*shapes, ("decay_fraction", "wsd decay's share")) if a.schedule != "wsd" else shapes:
        if getattr(a, key) is None:
            continue
        if key not in explicit:               # a resumed run's, for a schedule it no longer follows
            setattr(a, key, None)
        else:
            needs = "--schedule wsd" if key == "decay_fraction" else "a decaying --schedule (cosine, linear, wsd)"
            raise ValueError(f"--{key.replace('_', '-')} {getattr(a, key)} needs {needs} (it is the "
                             f"schedule's {what}); --schedule is {a.schedule}")
    if a.schedule != "constant" and a.min_lr is None:
        a.min_lr = a.lr / 10
    if a.schedule == "wsd" and a.decay_fraction is None:
        a.decay_fraction = 0.2
    a.cosine = a.schedule == "cosine"


def check_z(a) -> None:
    """--skip-loss-z / --skip-grad-z: a finite number > 0, or 0 for off (as llm.c's)."""
    for key in ("skip_loss_z", "skip_grad_z"):
        z = getattr(a, key)
        if z is None:
            continue
        if isinstance(z, bool) or not isinstance(z, (int, float)) or not 0 <= z < math.inf:
            raise ValueError(f"--{key.replace('_', '-')} must be a number > 0 (0: off), got {z!r}")
        setattr(a, key, float(z) or None)
