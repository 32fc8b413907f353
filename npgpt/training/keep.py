"""Checkpoints kept as llm.c keeps them, and what a restart loop needs to find its place.

In the run's folder OUT:
  checkpoint.h5             the latest save, always (what --resume OUT/checkpoint.h5 has always read)
  checkpoint_00005000.h5    a numbered save, named by the steps done (global_step + 1): the newest
                            keep_last of them stay (llm.c's -nk), and every keep_every-th step's
                            stays for good (-nm)
  checkpoint_best.h5        the save with the lowest validation loss (keep_best; nanoGPT's only kind)
  DONE                      written once the run has taken its last step (mark_done), so that
                            `until npgpt train ... --resume auto; do sleep 1; done` ends
Each checkpoint is written once, atomically (weights/checkpoint.py's save_checkpoint: a temporary
file renamed over the name); the other names are hard links to it, each made under a temporary
name and renamed over its target, so no name ever points at half a file and a 124M model's 1.5 GB
is written once a save, not three times. Where the file system has no hard links, a copy is
written (atomically) instead.

find_resume(OUT) is `--resume auto`: the newest checkpoint in OUT whose every tensor reads back
with its checksum, skipping any damaged or truncated one for the one before it.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import time
from pathlib import Path

import numpy as np

from ..files import _host_tag, atomic_write, remove_stale_temporaries
from ..weights.checkpoint import CheckpointError, open_checkpoint, save_checkpoint

LATEST, BEST, DONE = "checkpoint.h5", "checkpoint_best.h5", "DONE"
NUMBERED = re.compile(r"checkpoint_(\d{8,})\.h5")


def numbered_path(out_dir, steps_done: int) -> Path:
    return Path(out_dir) / f"checkpoint_{steps_done:08d}.h5"


def numbered(out_dir) -> dict[int, Path]:
    """{steps done: path} of the numbered checkpoints in out_dir."""
    found = {}
    for path in Path(out_dir).glob("checkpoint_*.h5"):
        m = NUMBERED.fullmatch(path.name)
        if m:
            found[int(m.group(1))] = path
    return found


def link_over(source: Path, target: Path) -> None:
    """target becomes another name of source's file, atomically (a copy where links fail)."""
    remove_stale_temporaries(target)
    tmp = target.parent / f".{target.name}.{os.getpid()}_{_host_tag()}_link.tmp"
    tmp.unlink(missing_ok=True)
    try:
        os.link(source, tmp)
    except OSError:                      # no hard links here (some network and FAT file systems)
        atomic_write(target, lambda t: shutil.copyfile(source, t))
        return
    os.replace(tmp, target)
    dir_fd = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def disk_use(out_dir) -> int:
    """Bytes the checkpoints in out_dir take on disk, each file once however many names it has."""
    seen, total = set(), 0
    for path in Path(out_dir).glob("checkpoint*.h5"):
        st = path.stat()
        if (st.st_dev, st.st_ino) not in seen:
            seen.add((st.st_dev, st.st_ino))
            total += st.st_size
    return total


def _evaluated_val_loss(state) -> float:
    """The validation loss of the state's own step, if it was evaluated there; else NaN."""
    if state.track_steps[-1:] == [state.global_step] and state.val_losses:
        return float(state.val_losses[-1])
    return math.nan


class Keeper:
    """Saves a run's checkpoints in out_dir and prunes the numbered ones (see the module docstring).
    keep_last K >= 0: numbered checkpoints kept (0: none but keep_every's); keep_every M >= 0:
    every checkpoint whose steps done are a multiple of M is numbered and kept for good (0: none);
    keep_best: keep checkpoint_best.h5, the save at the lowest validation loss so far (a save
    counts when its step was evaluated). Numbered files of steps beyond the save (a longer run
    resumed from an earlier checkpoint) are never removed."""

    def __init__(self, out_dir, keep_last: int = 0, keep_every: int = 0, keep_best: bool = False):
        for name, value in (("keep_last", keep_last), ("keep_every", keep_every)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
        self.out = Path(out_dir)
        self.keep_last, self.keep_every, self.keep_best = keep_last, keep_every, bool(keep_best)
        self._best = None                   # the best file's val loss, read on first need

    def best_val_loss(self) -> float:
        """The validation loss checkpoint_best.h5 was saved at (inf when there is none, or it is
        unreadable: the next evaluated save replaces it)."""
        if self._best is None:
            try:
                with open_checkpoint(self.out / BEST) as ckpt:
                    loss = _evaluated_val_loss(ckpt["state"])
            except (OSError, CheckpointError):
                loss = math.nan
            self._best = loss if math.isfinite(loss) else math.inf
        return self._best

    def save(self, model, optimizer, state, run: dict | None = None) -> dict:
        """Save the state's step; -> a record for the log: {"kind": "save", "step", "path" (the
        file written), "best" (True if it became checkpoint_best.h5), "removed" (paths pruned),
        "disk_bytes" (disk_use after the save)}."""
        steps = state.global_step + 1
        latest = self.out / LATEST
        if self.keep_last or (self.keep_every and steps % self.keep_every == 0):
            path = save_checkpoint(numbered_path(self.out, steps), model, optimizer, state=state, run=run)
            link_over(path, latest)
        else:
            path = save_checkpoint(latest, model, optimizer, state=state, run=run)
        best, val = False, _evaluated_val_loss(state)
        if self.keep_best and val < self.best_val_loss():
            link_over(path, self.out / BEST)
            self._best, best = val, True
        removed = self.prune(steps)
        return {"kind": "save", "step": state.global_step, "path": str(path), "best": best,
                "removed": [str(p) for p in removed], "disk_bytes": disk_use(self.out)}

    def prune(self, steps: int) -> list[Path]:
        """Remove the numbered checkpoints up to `steps` done that are neither among the newest
        keep_last (kept-for-good ones count among them, as llm.c's) nor a multiple of keep_every;
        -> the paths removed."""
        files = numbered(self.out)
        older = sorted((s for s in files if s <= steps), reverse=True)[self.keep_last:]
        removed = []
        for s in (s for s in older if not (self.keep_every and s % self.keep_every == 0)):
            files[s].unlink(missing_ok=True)
            removed.append(files[s])
        return removed


def _whole(path: Path) -> int:
    """The checkpoint's global_step once every tensor in it has been read against its checksum
    (one at a time); raises CheckpointError or OSError for a damaged or truncated file."""
    with open_checkpoint(path) as ckpt:
        tensors = [ckpt["params"]]
        if ckpt["optimizer"] is not None:
            tensors += [ckpt["optimizer"]["exp_avg"], ckpt["optimizer"]["exp_avg_sq"]]
        for group in tensors:
            for lazy in group.values():
                np.asarray(lazy)                   # fills an array, checks its crc32
        return ckpt["state"].global_step


def find_resume(out_dir, say=None) -> Path | None:
    """The checkpoint `--resume auto` continues: the newest (by global_step) whole one in out_dir,
    checkpoint.h5 preferred on a tie; None when out_dir holds no checkpoint (a new run starts).
    A damaged or truncated file is passed over, and say(line) (if given) told why. Checkpoints
    present but none whole is a CheckpointError: starting anew would hide the damage."""
    out = Path(out_dir)
    names = [out / LATEST, *sorted(numbered(out).values(), reverse=True), out / BEST]
    present = [p for p in names if p.is_file()]
    candidates = []
    for path in present:          # the cheap look first (attributes and layout), the tensors below
        try:
            with open_checkpoint(path) as ckpt:
                candidates.append((ckpt["state"].global_step, path.name == LATEST, path))
        except (OSError, CheckpointError) as e:
            if say:
                say(f"npgpt: --resume auto passes over {path}: {e}")
    for _, _, path in sorted(candidates, key=lambda c: c[:2], reverse=True):
        try:
            _whole(path)
            return path
        except (OSError, CheckpointError) as e:
            if say:
                say(f"npgpt: --resume auto passes over {path}: {e}")
    if present:
        raise CheckpointError(f"{out}: none of its {len(present)} checkpoints is whole "
                              f"({', '.join(p.name for p in present)}); resume from one by name or start "
                              "the run again with --overwrite")
    return None


def mark_done(out_dir, state, max_steps: int) -> Path:
    """Write OUT/DONE: the run took its last step (state.global_step + 1 == max_steps)."""
    record = {"steps": state.global_step + 1, "max_steps": int(max_steps), "time": round(time.time(), 3)}
    return atomic_write(Path(out_dir) / DONE, lambda tmp: Path(tmp).write_text(json.dumps(record) + "\n"))


def done(out_dir, max_steps: int) -> bool:
    """Whether OUT/DONE says the run already reached max_steps (a larger max_steps is not done:
    the run continues, and its next mark_done replaces the file). A DONE that is not npgpt's
    small JSON is a ValueError naming it."""
    path = Path(out_dir) / DONE
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        data = f.read(4097)
    try:
        record = json.loads(data) if len(data) <= 4096 else None
        steps = record["steps"]
    except (ValueError, TypeError, KeyError):
        steps = None
    if isinstance(steps, bool) or not isinstance(steps, int):
        raise ValueError(f"{path}: not npgpt's DONE marker (expected a small JSON object with \"steps\"); "
                         "remove it to continue the run")
    return steps >= max_steps
