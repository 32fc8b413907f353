"""The two sets of kernels behind one calling convention, so that one model.py runs either.

model.py calls its layers the way layers.py (the fast kernels) takes them: a backward writes its
parameters' gradients into arrays it is given, views into the model's one flat gradient buffer.
reference.py's backwards return new arrays instead; the functions below call them and copy the
results into those arrays. Every other layer function is reference.py's own, looked up when it is
called (so a test or a notebook may replace one). Nothing else happens here: the math is reference.py's.
"""
from __future__ import annotations

import sys

from . import layers
from . import reference as R

KERNELS = ("fast", "reference")


def get(kernels: str):
    """The module of kernels the model calls: layers for "fast", this one for "reference"."""
    if kernels not in KERNELS:
        raise ValueError(f"unknown kernels {kernels!r}; expected one of {KERNELS}")
    return layers if kernels == "fast" else sys.modules[__name__]


def __getattr__(name):
    """The functions whose calling convention is the same in both forms: reference.py's, as they are."""
    return getattr(R, name)


def embedding_backward(dout, cache, dwte, dwpe):
    """Adds into dwte (a tied head's gradient may already be there) and writes dwpe."""
    d_wte, d_wpe = R.embedding_backward(dout, cache)
    dwte += d_wte
    dwpe[...] = d_wpe


def linear_backward(dout, cache, dw, db=None):
    dx, d_w, d_b = R.linear_backward(dout, cache)
    dw[...] = d_w
    if db is not None:
        db[...] = d_b
    return dx


def layernorm_backward(dout, cache, dw, db):
    dx, d_w, d_b = R.layernorm_backward(dout, cache)
    dw[...], db[...] = d_w, d_b
    return dx


def cross_entropy_loss(logits, targets):
    return R.cross_entropy_forward(logits, targets)[0]


def softmax_inplace(x):
    x[...] = R.softmax_forward(x)[0]
    return x
