"""Docs that cannot drift: every shell command in a ```bash block of README.md and docs/*.md is run
here, on a tiny configuration, and must exit 0.

A command is a logical line of a bash block (backslash continuations joined, comment lines
skipped). It is left out only where the page says why: `# needs: REASON` at the end of its line, or
on its own line directly above it (so that the README's two commands stay exactly the ones .ci/run
runs). The test prints what it left out and why, and fails on a command it does not know how to run.

How a command runs, the same for every page:
- `npgpt ARGS` as `npgpt.cli.main(ARGS)` (what the `npgpt` script calls; in this process, which
  saves each command the imports), `torchrun ARGS` as `python -m torch.distributed.run ARGS` (2 CPU
  processes where the page says so), `python ARGS` with this Python;
- in a folder of the page's own that stands for the repository root (the checkout's CHECKOUT
  entries linked in), the page's commands in order: `npgpt prepare ... --out shards/` makes the shards that the
  next command trains on;
- `npgpt train` (not a resume, which keeps its saved settings) gets a few flags appended, which win
  over the command's and its config file's: the tiny preset, short windows, 2 steps on shards, and
  for a run on the default text, The Verdict's first SHORT_TEXT characters (an epoch of 3 steps).
  Nothing else of the command changes;
- what a reader brings (a corpus, a HellaSwag file) and what a left-out command would have made (the
  book run's checkpoint) are made small before the page runs: STAND_INS.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from npgpt.cli import main

REPO = Path(__file__).resolve().parent.parent
PAGES = ["README.md", *sorted(str(p.relative_to(REPO)) for p in (REPO / "docs").glob("*.md"))]
NEEDS = re.compile(r"#.*\bneeds: (.+?)\s*$")
TIMEOUT_S = 120
# appended to `npgpt train`: a tiny model, windows that fit a val part, few steps, one batch an evaluation
SHRINK = ["--preset", "tiny", "--max-length", "32", "--eval-iter", "1"]
SHRINK_SHARDS = [*SHRINK, "--batch-size", "2", "--max-steps", "2"]
SHRINK_TEXT = [*SHRINK, "--batch-size", "4"]
# the checkout's entries the pages name, linked into each page's folder; never runs/ or data/, which the
# commands write into and which may hold a reader's own runs
CHECKOUT = ("npgpt", "configs", "benchmarks", "tests", "parity", "docs", "README.md", "setup.cfg", "pyproject.toml")
SHORT_TEXT = 2000           # characters: 12 train windows of 32 tokens (3 steps an epoch), 1 val window


@pytest.fixture(scope="module", autouse=True)
def one_thread_here(one_thread):
    """The in-process commands run on one thread, as torchrun's ranks do (OMP_NUM_THREADS=1): on a
    machine busy with other work, two spinning threads a command cost more than they give."""


def commands(page: str) -> list[tuple[int, str, str | None]]:
    """(line number, command, why it is left out or None) for every command of the page's bash blocks."""
    lines = (REPO / page).read_text(encoding="utf-8").splitlines()
    found, fence, above, i = [], None, None, 0
    while i < len(lines):
        line, start = lines[i], i + 1
        i += 1
        if line.startswith("```"):
            fence = line[3:].strip() if fence is None else None
            above = None
            continue
        if fence != "bash" or not line.strip():
            above = None
            continue
        if line.lstrip().startswith("#"):
            above = NEEDS.match(line.strip())
            continue
        while line.endswith("\\") and i < len(lines):
            line = line[:-1] + " " + lines[i].strip()
            i += 1
        own = NEEDS.search(line)
        reason = own or above
        found.append((start, line.strip(), reason.group(1) if reason else None))
        above = None
    return found


def sandbox(page: str, tmp_path: Path, verdict_text: str) -> Path:
    """A folder that stands for the repository root, with the page's stand-ins in it."""
    root = tmp_path / "repo"
    root.mkdir()
    for name in CHECKOUT:
        (root / name).symlink_to(REPO / name)
    (root / "short-verdict.txt").write_text(verdict_text[:SHORT_TEXT], encoding="utf-8")
    for path, make in STAND_INS.get(page, {}).items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        make(root / path, root, verdict_text)
    return root


def train_run(*args):
    """A stand-in made by `npgpt train ARGS` shrunk, as the page's own train commands are."""
    def make(path, root, verdict_text):
        run(["npgpt", "train", *args, "--out", str(path.parent)], root)
    return make


def hellaswag_file(path, root, verdict_text):
    """Three examples in the dataset's jsonl form (ctx, 4 endings, label)."""
    rows = [{"ctx": verdict_text[k:k + 120], "endings": [verdict_text[k + 120 + 30 * e:k + 150 + 30 * e]
                                                           for e in range(4)], "label": k % 4}
            for k in (0, 1000, 2000)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


STAND_INS = {
    "docs/book.md": {"runs/npgpt/checkpoint.h5": train_run()},                  # `npgpt train`, left out in the README
    "docs/command-line.md": {"hellaswag_val.jsonl": hellaswag_file},            # a download
    "docs/own-corpus.md": {
        "my_corpus/verdict.txt": lambda p, root, text: p.write_text(text * 10, encoding="utf-8"),
        "kjv.txt": lambda p, root, text: p.write_text(text, encoding="utf-8"),   # what `bible` prints
        "runs/gpt2-124m/checkpoint.h5": train_run("--epochs", "1"),             # the GPU run's checkpoint
    },
}


def argv_of(tokens: list[str], cwd: Path) -> list[str]:
    """The command as this test runs it (see the module's docstring)."""
    prog, args = tokens[0], tokens[1:]
    if prog == "npgpt":
        return [*args, *shrink(args, cwd)]
    if prog == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", *args, *shrink(args[args.index("npgpt") + 1:], cwd)]
    if prog == "python":
        return [sys.executable, *args]
    pytest.fail(f"no way to run `{prog}`: give the command a `# needs:` comment or teach test_docs.py")


def shrink(args: list[str], cwd: Path) -> list[str]:
    if not args or args[0] != "train" or "--resume" in args:
        return []
    data = [args[k + 1] for k, a in enumerate(args[:-1]) if a == "--data"]
    if not data:
        return [*SHRINK_TEXT, "--data", "short-verdict.txt"]
    return SHRINK_SHARDS if (cwd / data[-1]).is_dir() else SHRINK_TEXT


def run(tokens: list[str], cwd: Path) -> None:
    argv = argv_of(tokens, cwd)
    if tokens[0] == "npgpt":
        with contextlib.chdir(cwd):
            try:
                code = main(argv)
            except SystemExit as e:             # argparse's answer to a flag it does not know
                code = e.code
        assert code == 0, f"`{shlex.join(tokens)}` exited {code} (npgpt {shlex.join(argv)})"
        return
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", NPGPT_NUM_THREADS="1")
    proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"`{shlex.join(tokens)}` ran past {TIMEOUT_S} s\n{out[-2000:]}\n{err[-2000:]}")
    assert proc.returncode == 0, f"`{shlex.join(tokens)}` exited {proc.returncode}\n{out[-2000:]}\n{err[-2000:]}"


def split_and(tokens: list[str]) -> list[list[str]]:
    """`a && b` -> [a, b]; any other shell syntax is the page's to mark."""
    parts, part = [], []
    for t in tokens + ["&&"]:
        if t == "&&":
            parts.append(part)
            part = []
        else:
            assert t not in ("|", ";", ">", "<", "||", "&"), f"shell syntax `{t}`: mark the command `# needs:`"
            part.append(t)
    return parts


@pytest.mark.parametrize("page", PAGES)
def test_every_command_of_the_page_runs(page, tmp_path, verdict_text):
    found = commands(page)
    cwd = sandbox(page, tmp_path, verdict_text)
    ran, left_out = [], [(n, c, why) for n, c, why in found if why]
    for n, command, why in found:
        if why:
            continue
        started = time.perf_counter()
        for tokens in split_and(shlex.split(command, comments=True)):
            run(tokens, cwd)
        ran.append((n, command, time.perf_counter() - started))
    for n, command, s in ran:
        print(f"ran {page}:{n} in {s:.1f} s: {command[:100]}")
    for n, command, why in left_out:
        print(f"left out {page}:{n} (needs: {why}): {command[:100]}")


def test_the_pages_commands_are_found_and_the_slow_ones_marked():
    """The extraction sees what the pages hold: the README's two commands, marked and byte for byte
    what .ci/run runs; a torchrun on 2 CPU processes among the commands that run."""
    readme = {c: why for _, c, why in commands("README.md")}
    assert readme.get("pip install . && npgpt train")
    ci = (REPO / ".ci" / "run").read_text().splitlines()[-1]
    assert readme.get(ci), ci
    everything = [(c, why) for page in PAGES for _, c, why in commands(page)]
    assert any(c.startswith("torchrun --standalone --nproc_per_node=2") and not why for c, why in everything)
    assert sum(not why for _, why in everything) >= 20
