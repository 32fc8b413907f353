"""How the fast layers (layers.py, softmax_layers.py) see their arguments: as (N, C) rows.

Every fast layer takes the shapes its reference.py twin takes, (..., C) with any leading axes, and
works on a reshape of its input to N = (the product of the leading axes) rows: a view, so no copy
for a contiguous array, and the model's (N, C) arrays pass through unchanged. A shape that does not
fit raises shape_error's ValueError, naming the argument and the shape expected.
"""
from __future__ import annotations

import numpy as np


def shape_error(name, expected, a):
    return ValueError(f"{name}: expected shape {expected}, got {np.shape(a)}")


def as_rows(a, name, expected="(..., C)"):
    """a (..., C) -> its (N, C) view (a reshape: no copy for a contiguous array, none at all for
    an (N, C) one). A non-contiguous a is copied, which is fine where a is only read."""
    if np.ndim(a) < 1:
        raise shape_error(name, expected, a)
    return a.reshape(-1, a.shape[-1])


def as_entries(a):
    """as_rows for math entry by entry, which also takes a 0-d a: as one (1, 1) row."""
    return a.reshape(-1, a.shape[-1]) if np.ndim(a) else np.reshape(a, (1, 1))


def as_rows_in_place(a, name, expected):
    """as_rows for an array that is overwritten in place: a copy would leave the caller's unchanged."""
    r = as_rows(a, name, expected)
    if r.size and not np.may_share_memory(r, a):
        raise ValueError(f"{name}: expected an array whose (N, V) rows are a view of it, as it is "
                         f"overwritten in place (a contiguous one); got shape {a.shape}, "
                         f"strides {a.strides}")
    return r
