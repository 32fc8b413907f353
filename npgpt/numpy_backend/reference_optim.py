"""AdamW and gradient clipping in plain NumPy, the textbook form: one tensor (or one dict of
gradients) at a time, whole arrays, nothing in place. optim.py is the same update made fast (one
flat buffer, cache-sized chunks, every core); a model on kernels="reference" steps with these.
"""
from __future__ import annotations

import math

import numpy as np


def adamw_update(p, g, m, v, t, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
    """One AdamW step on one tensor -> the new (p, m, v). t counts the steps from 1.

    torch.optim.AdamW's form (llm.c's too): the decay is scaled by the learning rate.
        p = p - lr * weight_decay * p            decoupled weight decay: not added to the gradient
        m = b1 * m + (1 - b1) * g                running mean of the gradient
        v = b2 * v + (1 - b2) * g^2              running mean of its square
        m_hat = m / (1 - b1^t)                   m and v start at 0: these undo the bias toward 0
        v_hat = v / (1 - b2^t)
        p = p - lr * m_hat / (sqrt(v_hat) + eps)
    Loshchilov & Hutter's paper (Algorithm 2) decouples the decay the same way but scales it by the
    schedule multiplier eta_t, not by the learning rate alpha:
        p = p - eta_t * (alpha * m_hat / (sqrt(v_hat) + eps) + weight_decay * p)
    so the paper's weight_decay is a fraction of p per step (times the schedule), torch's a fraction
    per unit of lr: the book's weight_decay=0.1 at lr=4e-4 multiplies p by 1 - 4e-5 each step. With
    lr = eta_t * alpha the two are the same update when torch's weight_decay is the paper's / alpha.
    """
    b1, b2 = betas
    p = p - lr * weight_decay * p
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    m_hat = m / (1 - b1 ** t)
    v_hat = v / (1 - b2 ** t)
    p = p - lr * m_hat / (np.sqrt(v_hat) + eps)
    return p, m, v


def clip_grad_norm(grads, max_norm):
    """grads: {name: array} -> (the grads scaled so their global L2 norm is at most max_norm, the norm
    before clipping), as torch.nn.utils.clip_grad_norm_. The squares are summed in float64."""
    norm = math.sqrt(sum(float(np.sum(g.astype(np.float64) ** 2)) for g in grads.values()))
    scale = min(1.0, max_norm / (norm + 1e-6))
    return {name: g * g.dtype.type(scale) for name, g in grads.items()}, norm
