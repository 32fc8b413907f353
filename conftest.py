"""Shared test setup: The Verdict (bundled in the package) and the one-thread fixture for tiny models."""
import pytest

import npgpt
from parity.helpers import single_thread


@pytest.fixture(scope="session")
def verdict_text():
    return npgpt.load_corpus()


@pytest.fixture(scope="module")
def one_thread():
    with single_thread():
        yield
