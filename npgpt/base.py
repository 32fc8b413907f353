"""The interface both backends implement, and what they share.

Both hold the same flat dict of GPT-2-named parameters and offer the same methods: logits, loss,
loss_and_grads, params, load_params, train, eval, train_step, clip_grad_norm, grad_norm, rng_state,
set_rng_state, synchronize, masked_loss_sums and generate. The training loop, sampling, checkpoints and weight
loaders are written once against these.
"""
from __future__ import annotations

import math

import numpy as np

from .training.perf import flops_per_token


class Backend:
    """What both models share. Each backend provides
      forward_backward(inputs, targets) -> float   the mean loss, leaving the gradients in the model
      clip_grad_norm(max_norm) -> float            the norm before clipping
      grad_norm() -> float                         the gradients' global L2 norm, nothing changed
      new_kv_cache(batch_size, capacity)           an npgpt.sampling.KVCache in the backend's arrays
      next_logits(ids, cache) -> (B, V)            the forward step of generation, in its arrays
      sampler(seed) -> pick(logits, temperature, top_k, top_p) -> NumPy ids (B,)
    and the training step and the generation loop (npgpt.sampling) are written once from them."""

    peak_flops = None     # the device's dense matmul FLOP/s at the training precision, when known
    synchronous = True    # a step's work is done when train_step returns (False: queued on a GPU)
    last_grad_norm = None  # the last train_step's gradient norm before clipping (see train_step)
    last_applied = True    # whether the last train_step updated the parameters (see train_step)

    def flops_per_token(self, T: int) -> float:
        return flops_per_token(self.cfg, T)

    def batch_gradients(self, inputs, targets) -> float:
        """The batch's mean loss, its gradients left in the model: forward_backward, which a backend
        may run in micro-batches (grad_accum) as long as the gradients are the whole batch's."""
        return self.forward_backward(inputs, targets)

    def train_step(self, inputs, targets, optimizer, clip_norm: float | None = None, sync: bool = True,
                   apply_update=None):
        """Forward, backward, optional gradient clipping, one optimizer step; returns the loss.
        A NaN or infinite loss raises FloatingPointError before the parameters are touched.

        sync=False lets a backend whose work is queued on a device return before that work is done
        (the torch backend on a GPU): the loss may then come back as a 0-dim device tensor, a
        non-finite one skips its update on the device, and loss_value() turns it into a float,
        raising FloatingPointError there. On the CPU the step is done when it returns either way.

        The gradients' global norm before clipping is left in self.last_grad_norm (clipping computes
        it anyway; without clip_norm it is one more pass over the gradients): a float, or after
        sync=False a 0-dim device tensor that float() reads once the device is done.

        apply_update (the spike guard, training/guard.py): None, or fn(loss, norm) -> bool, asked
        with the loss and the norm before clipping once both are known, and before the optimizer
        is touched: False leaves the parameters and the optimizer's state as they were. Whether
        the update was applied is left in self.last_applied."""
        loss = self.batch_gradients(inputs, targets)
        if not math.isfinite(loss):
            raise FloatingPointError(f"loss is {loss}; the optimizer step was skipped")
        self.last_grad_norm = self.grad_norm() if clip_norm is None else self.clip_grad_norm(clip_norm)
        self.last_applied = apply_update is None or bool(apply_update(loss, float(self.last_grad_norm)))
        if self.last_applied:
            optimizer.step()
        return loss

    def masked_loss_sums(self, tokens, mask):
        """Each row's summed token losses over its masked tokens, (R,) float64: token t of row r
        (where mask[r, t]) is predicted by the logits at t - 1 of tokens[:, :-1] (R, L). The
        HellaSwag scorer's (npgpt/hellaswag.py). Here from the NumPy logits, only the masked
        positions' log-softmax taken, in float64; the torch backend computes it on its device."""
        logits = self.logits(tokens[:, :-1])                           # (R, L-1, V)
        targets, scored = tokens[:, 1:], mask[:, 1:]
        rows, cols = np.nonzero(scored)                                # one entry per scored token
        picked = np.asarray(logits[rows, cols], dtype=np.float64)      # (n, V)
        top = picked.max(axis=1)
        logsumexp = top + np.log(np.exp(picked - top[:, None]).sum(axis=1))
        losses = logsumexp - picked[np.arange(len(rows)), targets[rows, cols]]
        return np.bincount(rows, weights=losses, minlength=len(tokens))

    def synchronize(self) -> None:
        """Wait until the work queued on the device is done (a no-op where nothing is queued):
        read a clock after this, not before, or the time leaves out the kernels still running."""


def loss_value(loss) -> float:
    """A loss from train_step(..., sync=False) as a float (this waits for the device); a NaN or
    infinite one raises FloatingPointError: its step's update was skipped."""
    value = float(loss)
    if not math.isfinite(value):
        raise FloatingPointError(f"loss is {value}; the optimizer step was skipped")
    return value
