"""Parity suite setup. Helpers (assert_close, build_pair, ...) live in parity/helpers.py."""
import pytest

from .helpers import single_thread


@pytest.fixture(scope="package", autouse=True)
def one_thread_for_the_suite():
    """The parity models are small: a second thread only adds barriers (see single_thread)."""
    with single_thread():
        yield
