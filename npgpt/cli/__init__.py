"""The `npgpt` command line: train, generate, eval, convert, prepare, gradcheck. `python -m npgpt ...` is the same program.

`npgpt train` with no arguments is the book's chapter-5 run: the 124M model on The Verdict with
the NumPy backend, 10 epochs, batch 2, AdamW lr 5e-4 and weight decay 0.1. The checkpoint is saved
at the end, at every evaluation of a run on token shards (or every --save-every steps) and on
Ctrl-C / SIGTERM; it keeps the run's settings, so
`npgpt train --resume CKPT` carries on with the same batches and schedule.
"""
from __future__ import annotations

import argparse
import sys

from . import config_file, models, prepare, run, train

def cmd_gradcheck(args):
    from ..gradcheck import run
    return run(args)


COMMANDS = {"train": train.cmd_train, "generate": models.cmd_generate, "eval": models.cmd_eval,
            "convert": models.cmd_convert, "prepare": prepare.cmd_prepare, "gradcheck": cmd_gradcheck}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="npgpt", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)
    run.add_parser(sub)
    config_file.add_argument(sub.choices["train"])
    parser.subcommands = sub.choices        # main() reads a --config file into train's defaults
    models.add_parsers(sub)
    prepare.add_parser(sub)
    from ..gradcheck import add_arguments
    add_arguments(sub.add_parser("gradcheck", help="check the NumPy backward passes against finite differences "
                                                   "(and torch autograd); run it after changing reference.py or layers.py"))
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    command = COMMANDS[args.command]
    try:
        if getattr(args, "config", None):       # the file's options become defaults; flags given override them
            train_parser = parser.subcommands["train"]
            train_parser.set_defaults(**config_file.load_config(args.config, train_parser))
            args = parser.parse_args(argv)
        return command(args)
    except KeyboardInterrupt as e:                  # a second Ctrl-C / SIGTERM while training: 130 / 143
        print("npgpt: interrupted", file=sys.stderr)
        return getattr(e, "exit_code", 130)
    # the readers refuse bad files with a ValueError naming them; the rest is a last line of defence
    except (ValueError, TypeError, OSError, FloatingPointError, OverflowError, RecursionError, MemoryError) as e:
        if args.debug:
            raise
        message = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
        print(f"npgpt {args.command}: error: {message or type(e).__name__}", file=sys.stderr)
        return 2

