"""The training text: The Verdict, shipped inside the package, or a UTF-8 file of the user's."""
from __future__ import annotations

import hashlib
from pathlib import Path

VERDICT_FILE = Path(__file__).resolve().parent.parent / "assets" / "the-verdict.txt"
VERDICT_SHA256 = "b41e41a68f0398a3154ae69e2e4c0e2694e17fe0d66730536837f1b01935b31f"


def read_text(path: str | Path) -> str:
    """A UTF-8 text file, with errors that name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"corpus file not found: {path}")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def load_corpus(path: str | Path | None = None) -> str:
    """The text at path, or with no path The Verdict from npgpt/assets (no network, no setup)."""
    if path is not None:
        return read_text(path)
    data = VERDICT_FILE.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != VERDICT_SHA256:
        raise ValueError(f"{VERDICT_FILE}: sha256 is {digest}, expected {VERDICT_SHA256}; "
                         "the file is damaged, reinstall npgpt")
    return data.decode("utf-8")
