"""Blocks on a thread pool: how layers.py's elementwise math and AdamW use every core.

NumPy runs each elementwise operation (a ufunc) on one core, and a chain of them over a large
array reads and writes it from main memory once per operation. BLAS already uses every core for
the matrix products, but GELU, LayerNorm, softmax, cross-entropy and AdamW would run on one.
for_row_blocks cuts an array's rows into blocks of about BLOCK_BYTES (small enough that all the
passes over a block stay in the core's L2 cache) and hands the blocks to a pool of threads;
NumPy releases the GIL inside its loops, so the threads run in parallel.

Determinism: a block is a fixed number of rows, computed from the row size alone, never from the
number of threads, and results come back in block order. Row-wise math gives the same bits
whatever the blocking; sums over rows (LayerNorm's dweight) are added per block and then over the
blocks in order, so they too are the same for any number of threads. uniform_float32 draws exactly
rng.random's numbers.
"""
from __future__ import annotations

import itertools
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

BLOCK_BYTES = 1 << 18        # per array and block: the ~8 arrays a kernel touches fit a 2 MiB L2
RANDOM_BLOCK = 1 << 18       # numbers per block of uniform_float32 (even: see there)

_num_threads = int(os.environ.get("NPGPT_NUM_THREADS", 0)) or len(os.sched_getaffinity(0))
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def num_threads() -> int:
    return _num_threads


def set_num_threads(n: int) -> None:
    """Threads for the elementwise work (default: the CPUs this process may use, or
    $NPGPT_NUM_THREADS). Results do not depend on it."""
    global _num_threads, _pool
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"number of threads must be a positive integer, got {n!r}")
    with _pool_lock:
        _num_threads = n
        if _pool is not None:
            _pool.shutdown(wait=True)
            _pool = None


def _get_pool() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=_num_threads - 1, thread_name_prefix="npgpt")
        return _pool


def parallel_map(fn, items) -> list:
    """[fn(item) for item in items], the items shared out over the pool (the calling thread works
    too); results in the items' order. A thread takes the next item when it is done with one,
    so a core slowed by other work takes fewer."""
    items = list(items)
    workers = min(_num_threads, len(items))
    if workers <= 1:
        return [fn(item) for item in items]
    results = [None] * len(items)
    next_item = itertools.count()

    def work():
        while (i := next(next_item)) < len(items):
            results[i] = fn(items[i])

    helpers = [_get_pool().submit(work) for _ in range(workers - 1)]
    try:
        work()
    finally:
        for helper in helpers:
            helper.result()
    return results


def for_row_blocks(fn, x, block_bytes: int = BLOCK_BYTES) -> list:
    """fn(rows) for consecutive slices `rows` of x's first axis, about block_bytes of x each, on
    the pool; returns fn's results in block order. fn writes its outputs into arrays it shares
    with the caller, each block into its own rows, so blocks may run in any order."""
    n = len(x)
    step = max(1, block_bytes * n // max(1, x.nbytes)) if n else 1
    return parallel_map(fn, [slice(i, min(i + step, n)) for i in range(0, n, step)])


def uniform_float32(rng: np.random.Generator, shape) -> np.ndarray:
    """rng.random(shape, dtype=np.float32), bit for bit, leaving rng in the same state, but drawn
    on every core (the draws cost ~2 ns a number, most of dropout's time).

    PCG64 makes each float32 from half of one 64-bit output, and can jump ahead: block b starts
    from a copy of the generator advanced past the blocks before it (RANDOM_BLOCK / 2 outputs
    each). Other generators, odd sizes and a half-used output fall back to rng.random."""
    bitgen = rng.bit_generator
    state = bitgen.state
    size = int(np.prod(shape))
    if (type(bitgen) is not np.random.PCG64 or state["has_uint32"] or size % 2
            or size <= RANDOM_BLOCK or _num_threads == 1):
        return rng.random(shape, dtype=np.float32)
    out = np.empty(size, np.float32)

    def draw(start):
        block = np.random.PCG64(0)
        block.state = state
        block.advance(start // 2)
        np.random.Generator(block).random(out=out[start:start + RANDOM_BLOCK], dtype=np.float32)
        return block

    generators = parallel_map(draw, range(0, size, RANDOM_BLOCK))
    bitgen.state = generators[-1].state      # where drawing them one after another ends
    return out.reshape(shape)
