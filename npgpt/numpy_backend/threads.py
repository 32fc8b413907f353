"""npgpt's thread pool: how the NumPy backend uses every core, for matrix products and the rest.

NumPy runs each elementwise operation (a ufunc) on one core, and a chain of them over a large
array reads and writes it from main memory once per operation. for_row_blocks cuts an array's
rows into blocks and hands them to a pool of threads; NumPy releases the GIL inside its loops, so
the threads run in parallel, and the passes over a block of at most ~1 MiB mostly stay in the
core's L2 cache instead of main memory. AdamW and the attention heads share out the same way.

Matrix products share the same pool. While the model computes (one_blas_thread), BLAS runs one
thread per call and matmul cuts a large product into MATMUL_BLOCKS column (or row) blocks, one
BLAS call each. Left to itself, OpenBLAS would split every product over its own threads, which
then spin for a while after each call: on the 2 cores they compete with the pool's elementwise
work, and on a machine busy with other work a product waits for its slowest, descheduled thread
(a 124M step took 3 to 30 s here). One pool, whose threads sleep when idle and take the next
block when done with one, degrades gracefully instead. threadpoolctl (an install requirement) sets
BLAS's thread count; where it is missing (npgpt run from a bare source tree) the pool has one
thread and BLAS keeps its own threads. $NPGPT_NUM_THREADS sets the pool's size.

Determinism: blocks depend on the arrays' shapes and dtypes alone, never on the number of
threads, and results come back in block order. Row-wise math gives the same bits whatever the
blocking; sums over rows (LayerNorm's dweight) are added per block and then over the blocks in
order; each output of a product comes from one single-threaded BLAS call; uniform_float32 draws
exactly rng.random's numbers. So a step gives the same bits for any number of threads.
"""
from __future__ import annotations

import contextlib
import itertools
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

BLOCK_BYTES = 1 << 20        # row blocks of about this much of the array being cut: small enough
                             # for L2, large enough that Python's ~1 us a NumPy call is small
MATMUL_BLOCKS = 4            # blocks of a large product: enough to balance 2-4 cores, few enough
                             # that re-packing the operand every block reads costs ~1%
MATMUL_MIN_MACS = 1 << 20    # products smaller than this (multiply-adds) run as one call
RANDOM_BLOCK = 1 << 18       # numbers per block of uniform_float32 (even: see there)

try:
    from threadpoolctl import ThreadpoolController
except ImportError:          # then BLAS keeps its own threads, and the pool has one
    ThreadpoolController = None


def default_num_threads() -> int:
    """$NPGPT_NUM_THREADS, else the CPUs this process may use: its affinity where the platform has
    one (Linux), else every CPU (macOS and Windows have no os.sched_getaffinity); 1 without threadpoolctl."""
    if os.environ.get("NPGPT_NUM_THREADS"):
        return int(os.environ["NPGPT_NUM_THREADS"])
    if ThreadpoolController is None:
        return 1
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


_num_threads = default_num_threads()
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()
_blas = None                 # the ThreadpoolController, made on first use
_blas_depth = 0


def num_threads() -> int:
    return _num_threads


def describe() -> str:
    """The pool's size and the BLAS under NumPy, as `npgpt train` prints them first, e.g. "2 threads
    (the CPUs this process may use), BLAS openblas 0.3.27 (pthreads, 2 threads; 1 a call while the
    model computes)"."""
    source = "NPGPT_NUM_THREADS" if os.environ.get("NPGPT_NUM_THREADS") else "the CPUs this process may use"
    if ThreadpoolController is None:
        return (f"{_num_threads} thread{'s' if _num_threads > 1 else ''}: threadpoolctl is not installed "
                "(pip install threadpoolctl), so BLAS keeps its own threads")
    from threadpoolctl import threadpool_info
    blas = [f"{i['internal_api']} {i['version']} ({i.get('threading_layer', '?')}, {i['num_threads']} threads; 1 a "
            "call while the model computes)" for i in threadpool_info() if i["user_api"] == "blas"]
    return f"{_num_threads} thread{'s' if _num_threads > 1 else ''} ({source}), BLAS {', '.join(blas) or 'unknown'}"


def set_num_threads(n: int) -> None:
    """Threads of the pool (default: the CPUs this process may use, or $NPGPT_NUM_THREADS).
    Results do not depend on it."""
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


@contextlib.contextmanager
def one_blas_thread():
    """BLAS runs one thread per call inside (restored after; nesting is free): the pool shares
    out the work instead. Without threadpoolctl, nothing changes."""
    global _blas, _blas_depth
    if ThreadpoolController is None or _blas_depth:
        _blas_depth += 1
        try:
            yield
        finally:
            _blas_depth -= 1
        return
    if _blas is None:
        _blas = ThreadpoolController()
    _blas_depth += 1
    try:
        with _blas.limit(limits=1, user_api="blas"):
            yield
    finally:
        _blas_depth -= 1


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
            if not helper.cancel():         # a helper that has not started yet is not waited for
                helper.result()
    return results


def row_blocks(x) -> list[slice]:
    """Consecutive slices of x's first axis: their number depends on x's shape and dtype alone."""
    n, blocks = len(x), max(1, -(-x.nbytes // BLOCK_BYTES))
    step = max(1, -(-n // blocks))
    return [slice(i, min(i + step, n)) for i in range(0, n, step)] or [slice(0, 0)]


def for_row_blocks(fn, x) -> list:
    """fn(rows) for the slices `rows` of row_blocks(x), on the pool; returns fn's results in block
    order. fn writes its outputs into arrays it shares with the caller, each block into its own
    rows, so blocks may run in any order."""
    return parallel_map(fn, row_blocks(x))


def matmul(a, b, out=None):
    """a @ b for 2-D a (M, K) and b (K, N), into out (M, N) when given: a large product is cut
    into MATMUL_BLOCKS blocks of the output's longer side, one BLAS call each, on the pool."""
    (M, K), N = a.shape, b.shape[1]
    if out is None:
        out = np.empty((M, N), np.result_type(a, b))
    if M * K * N < MATMUL_MIN_MACS:
        return np.matmul(a, b, out=out)
    if N >= M:       # column blocks: each call reads all of a and a slice of b
        step = -(-N // MATMUL_BLOCKS)
        parallel_map(lambda j: np.matmul(a, b[:, j:j + step], out=out[:, j:j + step]), range(0, N, step))
    else:            # row blocks: each call reads a slice of a and all of b
        step = -(-M // MATMUL_BLOCKS)
        parallel_map(lambda i: np.matmul(a[i:i + step], b, out=out[i:i + step]), range(0, M, step))
    return out


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
