"""The NumPy backend's pool in a default install (npgpt/numpy_backend/threads.py): threadpoolctl is an
install requirement, so `pip install .` gives the pool every CPU the process may use; platforms
without os.sched_getaffinity (macOS, Windows) count os.cpu_count(); $NPGPT_NUM_THREADS wins."""
import configparser
import os
import subprocess
import sys
from pathlib import Path

import pytest

from npgpt.numpy_backend import threads

REPO = Path(__file__).resolve().parent.parent


def test_threadpoolctl_is_an_install_requirement():
    setup = configparser.ConfigParser()
    setup.read(REPO / "setup.cfg")
    required = [line.split(">")[0].split("=")[0].strip() for line in setup["options"]["install_requires"].split("\n")]
    assert "threadpoolctl" in required, required


def test_a_default_process_runs_the_pool_on_every_cpu_it_may_use():
    """A fresh interpreter without NPGPT_NUM_THREADS: the pool's size is the process's CPUs (2 or more
    on any machine the benchmarks ran on), not the single thread of an install without threadpoolctl."""
    env = {k: v for k, v in os.environ.items() if k != "NPGPT_NUM_THREADS"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    code = "from npgpt.numpy_backend import threads; print(threads.num_threads())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120,
                         check=True).stdout
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert int(out) == cpus
    if cpus >= 2:
        assert int(out) >= 2


def test_without_sched_getaffinity_the_pool_counts_every_cpu(monkeypatch):
    monkeypatch.delenv("NPGPT_NUM_THREADS", raising=False)
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)
    assert threads.default_num_threads() == os.cpu_count()


def test_npgpt_num_threads_sets_the_pool(monkeypatch):
    monkeypatch.setenv("NPGPT_NUM_THREADS", "3")
    assert threads.default_num_threads() == 3


def test_the_description_names_the_pool_and_the_blas():
    import numpy as np
    np.ones((2, 2)) @ np.ones((2, 2))
    from threadpoolctl import threadpool_info
    blas = [i for i in threadpool_info() if i["user_api"] == "blas"]
    text = threads.describe()
    assert text.startswith(f"{threads.num_threads()} thread")
    for info in blas:
        assert info["internal_api"] in text and info["version"] in text
