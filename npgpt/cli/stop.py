"""Stopping a training run cleanly: the first Ctrl-C (SIGINT) or SIGTERM asks the loop to stop at
the next step boundary, where the run saves its checkpoint; a second one stops at once. In one
process that is the step being taken, on every device (cli/train.py's save_due makes the loop read
a GPU back there); under torchrun the ranks first agree on it, which they do where they read the
device back: after every step on CPUs, every 10 steps (and at evaluations) on GPUs."""
from __future__ import annotations

import signal
import threading


class Stopped(Exception):
    """Raised at a step boundary after a signal asked the run to stop; its checkpoint is saved."""


class Interrupted(KeyboardInterrupt):
    """A second signal: stop now. The exit code is 128 + the signal's number, as for the first."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.exit_code = 128 + signum


class StopOnSignal:
    """Ctrl-C (SIGINT) or SIGTERM while training: the first one only sets a flag, which the loop
    checks after each step (the run saves its checkpoint there, between two optimizer steps, and
    exits with 128 + the signal's number: 130 for Ctrl-C, 143 for SIGTERM); a second one stops at
    once, except during a save, which it lets finish first (a save is atomic either way, but an
    exception raised inside h5py's cleanup can be swallowed). Signals ignored when npgpt started
    (nohup) stay ignored; the previous handlers come back on exit."""
    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum = None
        self.previous = {}
        self.saving = False
        self.pending = None

    def _handler(self, signum, frame):
        if self.signum is None:
            self.signum = signum
        elif self.saving:
            self.pending = signum
        else:
            raise Interrupted(signum)

    def check(self) -> None:
        if self.signum is not None:
            raise Stopped

    def save(self, save, state) -> None:
        """save(state), with a second signal held back until the file is complete."""
        self.saving = True
        try:
            save(state)
        finally:
            self.saving = False
        if self.pending is not None:
            raise Interrupted(self.pending)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():      # signals reach the main thread only
            for s in self.SIGNALS:
                if signal.getsignal(s) is not signal.SIG_IGN:
                    self.previous[s] = signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, signal.SIG_DFL if handler is None else handler)
        self.previous = {}
