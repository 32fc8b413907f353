"""What the tests that kill a real `python -m npgpt train` share: the child's environment (one BLAS
thread, unbuffered, this checkout's npgpt first on the path) and a small folder of token shards in
llm.c's format, its header packed here with struct rather than by npgpt's writer."""
import os
import struct
from array import array
from pathlib import Path

import numpy as np

import npgpt

CHILD_ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1",
             "MKL_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
             "PYTHONPATH": os.pathsep.join([str(Path(npgpt.__file__).resolve().parent.parent),
                                            os.environ.get("PYTHONPATH", "")])}


def write_shards(folder, seed: int):
    """600 val and 3,000 train tokens (ids below 1,000) drawn from seed, as t_val_000000.bin and
    t_train_000001.bin; returns the folder."""
    rng = np.random.default_rng(seed)
    for name, n in (("t_val_000000.bin", 600), ("t_train_000001.bin", 3000)):
        tokens = rng.integers(0, 1000, n).tolist()
        (folder / name).write_bytes(struct.pack("<256i", 20240520, 1, n, *[0] * 253) + array("H", tokens).tobytes())
    return folder
