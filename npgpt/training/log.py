"""A training run's log, OUT/log.jsonl: one JSON object a line, so that any tool reads it a line at
a time (json.loads, jq, pandas.read_json(lines=True)), and a run killed at any moment leaves every
line it wrote whole.

The file is opened for appending (a resumed run adds to its own) and each record goes out as one
write() of a whole line, unbuffered: once written, a record survives the process being killed.
Every record has "kind" ("run", "step", "eval" or "save"), "time" (unix seconds) and "elapsed_s"
(seconds since this process started the run); the loop's records are described in
training/stepper.py (Stepper.flush and .record). Numbers that are not finite are written as null.
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

__all__ = ["RunLog", "step_line"]


def _finite(value):
    """value with every non-finite float replaced by None (JSON has no NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def step_line(record: dict, total_steps: int) -> str:
    """A step record as one line, nanoGPT's way:
    step 120/5000 | loss 3.4512 | lr 6.00e-04 | norm 0.82 | 1234 ms | 10,567 tok/s | mfu 31%
    with "| 3 skipped" once the spike guard has skipped updates."""
    parts = [f"step {record['step']}/{total_steps}", f"loss {record['loss']:.4f}", f"lr {record['lr']:.2e}"]
    if record.get("norm") is not None:
        parts.append(f"norm {record['norm']:.2f}")
    parts += [f"{record['ms']:.0f} ms", f"{record['tok_s']:,.0f} tok/s"]
    if record.get("mfu") is not None:
        parts.append(f"mfu {record['mfu']:.0%}")
    if record.get("skipped_steps"):
        parts.append(f"{record['skipped_steps']} skipped")
    return " | ".join(parts)


class RunLog:
    """log.jsonl of a run, appended to; called with the loop's records (its on_log).

    print_every: also print every print_every-th step's record as step_line (step % print_every
    == 0) with say; None prints none (the progress bar shows them). started: the run's start
    (time.time()), from which elapsed_s counts."""

    def __init__(self, path, total_steps: int, print_every: int | None = None, say=print,
                 started: float | None = None):
        self.path = Path(path)
        self.total_steps, self.print_every, self.say = total_steps, print_every, say
        self.started = time.time() if started is None else started
        self.file = open(self.path, "ab", buffering=0)
        if self.file.tell() and not self._ends_with_newline():
            self.file.write(b"\n")       # a line torn by a crash (power, disk) stays alone on its own line

    def _ends_with_newline(self) -> bool:
        with open(self.path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            return f.read(1) == b"\n"

    def write(self, record: dict) -> None:
        """Append record, with its time and elapsed_s, as one line."""
        now = time.time()
        record = {**record, "time": round(now, 3), "elapsed_s": round(now - self.started, 3)}
        data = (json.dumps(_finite(record), allow_nan=False) + "\n").encode()
        written = self.file.write(data)
        while written < len(data):                       # a short write: only on a full disk or a signal
            written += self.file.write(data[written:])

    def __call__(self, record: dict) -> None:
        self.write(record)
        if record["kind"] == "step" and self.print_every and record["step"] % self.print_every == 0:
            self.say(step_line(record, self.total_steps))

    def close(self) -> None:
        self.file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
