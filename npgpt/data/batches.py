"""Batches by step from token shards: TrainBatches draws a step's windows from (seed, step) alone,
at random or one pass over the data an epoch, so a resumed run sees exactly the batches of an
uninterrupted one; ValBatches tiles the val shards from the start. The shards are 1-D uint16
token arrays, memory-mapped by shards.py (TokenDir), so a batch reads only the pages it touches.

Shape letters: B windows per batch (per rank), T time (max_length), W world size (ranks).
"""
from __future__ import annotations

import numpy as np

SAMPLINGS = ("random", "epoch")          # how TrainBatches draws a step's windows


def _positive(**values) -> None:
    for key, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
            raise ValueError(f"{key} must be a positive integer, got {value!r}")


class TrainBatches:
    """Training batches by step over the train shards: batch(step) -> (inputs, targets).

    Each step takes W * B windows of T + 1 tokens, each inside one shard, and rank r takes the r-th
    B of them. Which windows, sampling says:

    random (the default): W * B distinct start positions drawn from np.random.default_rng([seed, step])
    among every start whose window lies inside one shard, anew each step, so some tokens come in
    several steps and some in none.

    epoch: one pass over the data per epoch. An epoch's windows are the n windows that start at
    multiples of T in each shard (n = the sum of (len - 1) // T over the shards; they overlap by one
    token, so each token after a shard's first is a target once an epoch, but for its last
    (len - 1) % T, which are never; ValBatches cuts the val shards so), taken in the order
    np.random.default_rng([seed, epoch, 1]).permutation(n) (1, not 0: NumPy's SeedSequence reads
    [seed, epoch, 0] as [seed, epoch], random's stream at step epoch). The
    run's windows follow one another across steps: window i of step s (i < W * B) is the run's
    window g = s * W * B + i, the window at g % n in epoch g // n's order. A step across the end of
    an epoch takes the last windows of one order and the first of the next (a window may then come
    twice in that step). The current epoch's order is kept: n int64, 8 bytes a window (10B tokens
    at T = 1024 are about 10M windows, 80 MB). Needs n >= W * B.

    Either way a step's windows depend on nothing but (seed, step), and NumPy's version (its
    Generator streams may change between releases: resume under the same one), so a resumed run
    sees the batches of an uninterrupted one and W ranks of B see those of one process of W * B.
    Batches are plain NumPy arrays; pass out= (an int64 (B, T + 1) array, say a view of pinned host
    memory) to have the windows written there instead.
    """

    def __init__(self, shards: list[np.ndarray], batch_size: int, max_length: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1, files: list | None = None, sampling: str = "random"):
        _positive(batch_size=batch_size, max_length=max_length, world_size=world_size)
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank!r}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        if sampling not in SAMPLINGS:
            raise ValueError(f"sampling must be one of {', '.join(SAMPLINGS)}, got {sampling!r}")
        self.shards, self.batch_size, self.max_length = shards, batch_size, max_length
        self.seed, self.rank, self.world_size, self.sampling = seed, rank, world_size, sampling
        lengths = np.array([len(s) for s in shards], dtype=np.int64)
        if sampling == "random":
            self.windows = np.maximum(lengths - max_length, 0)      # start positions per shard
        else:
            self.windows = np.maximum((lengths - 1) // max_length, 0)  # windows at multiples of T per shard
        self.ends = np.cumsum(self.windows)                      # window numbers [end - windows, end)
        self.num_windows = int(self.ends[-1]) if len(shards) else 0
        self._epoch, self._order = None, None                    # epoch mode: the last epoch's order
        if self.num_windows == 0:
            where = files[int(lengths.argmax())] if files and len(shards) else "train"
            raise ValueError(f"{where}: the train shards are too short: the longest has "
                             f"{lengths.max(initial=0)} tokens, a window needs max_length + 1 = {max_length + 1}")
        if self.num_windows < world_size * batch_size:
            held = "windows" if sampling == "random" else "non-overlapping windows (an epoch)"
            raise ValueError(f"the train shards hold {self.num_windows} {held} of {max_length + 1} tokens, "
                             f"a step needs {world_size * batch_size} distinct ones "
                             f"(world_size {world_size} x batch_size {batch_size})")

    def order(self, epoch: int) -> np.ndarray:
        """Epoch mode: the epoch's window numbers in the order it takes them, (n,) int64."""
        if epoch != self._epoch:
            rng = np.random.default_rng([self.seed, epoch, 1])    # the 1 keeps it apart from random's streams
            self._epoch, self._order = epoch, rng.permutation(self.num_windows)
        return self._order

    def starts(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """(shard index, offset in that shard) of this rank's B windows at step: (B,), (B,)."""
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
            raise ValueError(f"step must be a non-negative integer, got {step!r}")
        B, W = self.batch_size, self.world_size
        if self.sampling == "random":
            rng = np.random.default_rng([self.seed, step])
            drawn = rng.choice(self.num_windows, size=W * B, replace=False)     # (W * B,) distinct
            mine = drawn[self.rank * B:(self.rank + 1) * B]                        # (B,)
        else:
            first = int(step) * W * B + self.rank * B                           # the run's window number
            epoch, place = np.divmod(np.arange(first, first + B, dtype=np.int64), self.num_windows)  # (B,) each
            mine = np.empty(B, dtype=np.int64)
            for e in np.unique(epoch):                                          # one, or two across an epoch's end
                here = epoch == e
                mine[here] = self.order(int(e))[place[here]]
        shard = np.searchsorted(self.ends, mine, side="right")
        number = mine - (self.ends[shard] - self.windows[shard])                # window number in its shard
        return shard, number if self.sampling == "random" else number * self.max_length

    def batch(self, step: int, out: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """This rank's (inputs, targets) at step: int64 arrays (B, T), targets shifted by one token."""
        B, T = self.batch_size, self.max_length
        if out is None:
            out = np.empty((B, T + 1), dtype=np.int64)
        elif out.shape != (B, T + 1) or out.dtype != np.int64:
            raise ValueError(f"out must be an int64 array of shape {(B, T + 1)}, got {out.dtype} {out.shape}")
        for row, (shard, offset) in enumerate(zip(*self.starts(step))):
            out[row] = self.shards[shard][offset:offset + T + 1]
        return out[:, :-1], out[:, 1:]                                         # (B, T) each


class ValBatches:
    """Validation batches: the val shards cut from their start into windows of T + 1 tokens that
    advance by T (each token after a shard's first is a target once), in order, B to a batch.
    All windows when num_batches is None, else those of the first num_batches batches (fewer when
    the val shards hold fewer); the last batch may be smaller. Iterate it again for the same batches.
    Data-parallel: a batch is W * B windows and rank r gets rows r*B .. r*B + B - 1 of it (maybe
    none of the last), so W ranks evaluate exactly the batches of one process with batch W * B."""

    def __init__(self, shards: list[np.ndarray], batch_size: int, max_length: int,
                 num_batches: int | None = None, files: list | None = None, rank: int = 0, world_size: int = 1):
        _positive(batch_size=batch_size, max_length=max_length, world_size=world_size)
        self.rank, self.rows = rank, slice(rank * batch_size, (rank + 1) * batch_size)
        batch_size *= world_size
        if num_batches is not None:
            _positive(num_batches=num_batches)
        self.shards, self.batch_size, self.max_length = shards, batch_size, max_length
        self.windows = np.array([max((len(s) - 1) // max_length, 0) for s in shards], dtype=np.int64)
        self.ends = np.cumsum(self.windows)
        total = int(self.ends[-1]) if len(shards) else 0
        where = files[0] if files else "val"
        if total == 0:
            raise ValueError(f"{where}: the val shards are too short: the longest has "
                             f"{max((len(s) for s in shards), default=0)} tokens, a window needs "
                             f"max_length + 1 = {max_length + 1}")
        self.num_windows = total if num_batches is None else min(num_batches * batch_size, total)

    def __len__(self) -> int:
        return -(-self.num_windows // self.batch_size)

    def __iter__(self):
        T = self.max_length
        for first in range(0, self.num_windows, self.batch_size):
            number = np.arange(first, min(first + self.batch_size, self.num_windows))   # (B,)
            shard = np.searchsorted(self.ends, number, side="right")
            offset = (number - (self.ends[shard] - self.windows[shard])) * T
            window = np.empty((len(number), T + 1), dtype=np.int64)                     # (B, T+1)
            for row, (s, o) in enumerate(zip(shard, offset)):
                window[row] = self.shards[s][o:o + T + 1]
            window = window[self.rows]                                                  # this rank's
            yield window[:, :-1], window[:, 1:]                                         # (B, T) each
