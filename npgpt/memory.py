"""Keep freed memory for reuse: the one process-wide allocator setting both backends make.

Why. A training step allocates and frees the same few hundred MB of activations every time. By
default glibc's malloc gives each block above its mmap threshold (128 KiB, rising with use to at
most 32 MiB) its own mapping and hands it back to the kernel when it is freed, and trims the top
of the heap once 128 KiB there are free. The next step then pays a page fault, and the kernel's
zeroing, for every 4 KiB page it touches again. Measured with benchmarks/bench_backends.py on the
124M model at B=2, T=256, 2 cores: the book's torch model paid 405,440 faults a step (4.52 s a
step) and 14,996 with this setting (3.87 s; 2026-12-02, AMD EPYC); npgpt's torch backend paid
about 250,000 without it (2.4 s instead of 1.7 s; 2026-12-01, an Intel CPU). Raising the mmap
threshold to 1 GiB and turning trimming off keeps freed blocks in the heap, where the next step
finds them; on the GPU, PyTorch's caching allocator does the same by design. (A trim threshold of
2 GiB was not enough: GPT-2 small at B=2, T=1024 with dropout frees more than that each step, and
paid 85,000 to 96,000 faults a step, none with trimming off: 13.9-16.4 s a step against
12.9-13.8 s, 2026-12-07, AMD EPYC, 2 cores.)

A process-wide choice. mallopt changes malloc for every library in the process (NumPy, torch,
everything else), exactly as MALLOC_MMAP_THRESHOLD_=1073741824 and MALLOC_TRIM_THRESHOLD_ set to
the largest size_t in the environment would. Each backend makes it when a model is built
(NumpyGPT, TorchGPT), and a benchmark that compares backends gives every contender the same
setting. The cost: memory a step frees stays with the process (peak RSS, not more) until it
exits. Only glibc has mallopt; elsewhere this does nothing.
"""
from __future__ import annotations

import ctypes
import os

MMAP_THRESHOLD = 1 << 30          # blocks up to 1 GiB come from the heap, not from their own mmap
TRIM_THRESHOLD = -1               # never give the heap's top back: glibc reads -1 as the largest size_t
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3      # glibc's <malloc.h>

_applied = False


def keep_freed_memory() -> bool:
    """Ask glibc to keep freed memory for reuse (see the module's docstring); True when the
    setting is in force. Idempotent: the second call does nothing."""
    global _applied
    if _applied:
        return True
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False                  # not glibc (macOS, musl): their allocators decide
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    _applied = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) & bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return _applied


def allocator_settings() -> dict:
    """What a benchmark reports: whether this process keeps freed memory, and the environment's
    MALLOC_* settings."""
    return {"keep_freed_memory": _applied,
            **{k: v for k, v in sorted(os.environ.items()) if k.startswith("MALLOC_")}}
