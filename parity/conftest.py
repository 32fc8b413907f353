"""Parity suite setup. Helpers (assert_close, build_pair, ...) live in parity/helpers.py."""
import pytest
import torch


@pytest.fixture(scope="package", autouse=True)
def one_torch_thread():
    """The parity models are small: a second OpenMP thread only adds barriers, and on a loaded
    2-core machine those made torch 3-10x slower (measured). Results do not depend on it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
