"""Shared test setup: The Verdict (bundled in the package) and the one-thread fixture for tiny models."""
import pytest

import npgpt
from parity.helpers import single_thread


@pytest.fixture(scope="session")
def verdict_text():
    return npgpt.load_corpus()


@pytest.fixture(scope="session")
def verdict_start(tmp_path_factory, verdict_text):
    """verdict_start(n) -> a file holding the first n characters of The Verdict: short runs."""
    def write(n):
        path = tmp_path_factory.mktemp("data") / f"verdict-{n}.txt"
        path.write_text(verdict_text[:n], encoding="utf-8")
        return path
    return write


@pytest.fixture(scope="module")
def one_thread():
    with single_thread():
        yield
