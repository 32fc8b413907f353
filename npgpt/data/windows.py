"""Batches cut from one text (the book's chapter 2 data pipeline, in NumPy).

make_loaders() splits the text by characters into train and validation parts, tokenises each,
and cuts them into sliding windows whose targets are the inputs shifted by one token.
"""
from __future__ import annotations

import numpy as np

from ..tokenizer import ENDOFTEXT


def sliding_windows(n_tokens: int, max_length: int, stride: int) -> np.ndarray:
    """Start offsets of the book's windows: inputs ids[s:s+max_length], targets ids[s+1:s+max_length+1]."""
    return np.arange(0, max(n_tokens - max_length, 0), stride)


class DataLoader:
    """Batches of (inputs, targets), int64 arrays of shape (B, T), over fixed windows of one token array.

    With shuffle=True the order is a permutation drawn from (seed, epoch): set_epoch() moves
    to the next one, so an order is reproducible and a resumed run sees the same batches.
    """

    def __init__(self, token_ids: np.ndarray, batch_size: int, max_length: int, stride: int,
                 shuffle: bool, drop_last: bool, seed: int = 123):
        self.tokens = np.asarray(token_ids, dtype=np.int64)
        self.starts = sliding_windows(len(self.tokens), max_length, stride)
        self.batch_size, self.max_length = batch_size, max_length
        self.shuffle, self.drop_last, self.seed = shuffle, drop_last, seed
        self.epoch = 0
        self.rank, self.world_size = 0, 1

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def shard(self, rank: int, world_size: int) -> None:
        """Give this process every world_size-th batch of the global order (data-parallel training)."""
        self.rank, self.world_size = rank, world_size

    def _num_global_batches(self) -> int:
        n, b = len(self.starts), self.batch_size
        return n // b if self.drop_last else -(-n // b)

    def __len__(self) -> int:
        return len(range(self.rank, self._num_global_batches(), self.world_size))

    def __iter__(self):
        order = np.arange(len(self.starts))
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.starts))
        offsets = np.arange(self.max_length + 1)
        for i in range(self.rank, self._num_global_batches(), self.world_size):
            starts = self.starts[order[i * self.batch_size:(i + 1) * self.batch_size]]
            window = self.tokens[starts[:, None] + offsets]          # (B, T+1)
            yield window[:, :-1], window[:, 1:]                       # inputs, targets: (B, T) each


def make_loaders(text: str, tokenizer, batch_size: int = 2, max_length: int = 256, stride: int = 256,
                 train_ratio: float = 0.9, seed: int = 123, shuffle: bool = True):
    """The book's train/validation loaders: split text by characters at train_ratio, tokenise each
    part, cut into windows; the train loader shuffles and drops the last partial batch."""
    for name, value in (("batch_size", batch_size), ("max_length", max_length), ("stride", stride)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if not 0.0 < train_ratio < 1.0:
        raise ValueError(f"train_ratio must be between 0 and 1 (exclusive), got {train_ratio!r}")
    split = int(train_ratio * len(text))
    loaders = []
    for part, name, is_train in ((text[:split], "training", True), (text[split:], "validation", False)):
        ids = tokenizer.encode(part, allowed_special={ENDOFTEXT})
        if len(ids) <= max_length:
            raise ValueError(f"Not enough tokens for the {name} loader: its text has {len(ids)} tokens, "
                             f"one window needs at least {max_length + 1} (max_length={max_length} + 1). "
                             "Use a longer text, a smaller max_length or a different train_ratio.")
        loader = DataLoader(ids, batch_size, max_length, stride, shuffle=shuffle and is_train,
                            drop_last=is_train, seed=seed)
        if len(loader) == 0:                # the train loader drops a partial batch: it could have none
            raise ValueError(f"Not enough windows for one {name} batch: its {len(ids)} tokens make "
                             f"{len(loader.starts)} windows of {max_length + 1} tokens (stride {stride}), "
                             f"batch_size is {batch_size}. Use a longer text or a smaller batch_size, "
                             "max_length or stride.")
        loaders.append(loader)
    return tuple(loaders)
