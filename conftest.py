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
