"""Shared test setup: The Verdict (bundled in the package) and a one-thread fixture for tiny models."""
import pytest

import npgpt


@pytest.fixture(scope="session")
def verdict_text():
    return npgpt.load_corpus()


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
