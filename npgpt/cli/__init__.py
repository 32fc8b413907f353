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

from . import config_file, models, prepare, train, train_flags
from .parser import Parser
from .resolve import resolve

def cmd_gradcheck(args):
    from ..gradcheck import run
    return run(args)


COMMANDS = {"train": train.cmd_train, "generate": models.cmd_generate, "eval": models.cmd_eval,
            "convert": models.cmd_convert, "prepare": prepare.cmd_prepare, "gradcheck": cmd_gradcheck}


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="npgpt", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action=argparse.BooleanOptionalAction, help="show tracebacks (default: off)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    train_flags.add_parser(sub)
    parser.subcommands = sub.choices        # main() reads train's --config file; errors name the command
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
        if args.command == "train":             # the settings resolved once: the flags over the --config file's
            file_values = config_file.load_config(args.config, parser.subcommands["train"]) if args.config else {}
            return command(resolve(args, file_values))
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

