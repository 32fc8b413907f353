"""Shared test setup: find The Verdict for tests that train or count tokens on it."""
import os
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parent.parent / "shared" / "data"

if "NPGPT_DATA_DIR" not in os.environ and (SHARED_DATA / "the-verdict.txt").is_file():
    os.environ["NPGPT_DATA_DIR"] = str(SHARED_DATA)


@pytest.fixture(scope="session")
def verdict_text():
    """The Verdict from $NPGPT_DATA_DIR (../shared/data beside the checkout when unset)."""
    path = Path(os.environ.get("NPGPT_DATA_DIR", SHARED_DATA)) / "the-verdict.txt"
    if not path.is_file():
        message = f"The Verdict not found at {path}; set NPGPT_DATA_DIR to the folder that holds it"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models, one thread each for torch and BLAS. On this 2-core machine, busy with other work,
    a second thread only adds waits: (32, 50257) @ (50257, 32) took 1.2 s with two OpenBLAS
    threads and 2 ms with one; a tiny torch forward 150 ms instead of 1 ms."""
    import importlib.util
    torch = importlib.import_module("torch") if importlib.util.find_spec("torch") else None
    threads = torch.get_num_threads() if torch else None
    if torch:
        torch.set_num_threads(1)
    limits = None
    if importlib.util.find_spec("threadpoolctl"):
        from threadpoolctl import threadpool_limits
        limits = threadpool_limits(1, "blas")
    yield
    if limits is not None:
        limits.restore_original_limits()
    if torch:
        torch.set_num_threads(threads)
