"""argparse as a well-kept command line uses it: no abbreviations (`--warm 5` is an error, never a
silent --warmup), every usage error one line on stderr and exit code 2, an unknown option answered
with the real one it resembles (nanoGPT's and llm.c's spellings mapped to npgpt's), and help that
gives each option's default and choices."""
from __future__ import annotations

import argparse
import difflib
import re
import sys

# Spellings from nanoGPT (train.py's and sample.py's config names, given as --name=value) and from
# llm.c (train_gpt2.cu's one-letter flags) -> npgpt's flag, or a few words where there is none.
# A tuple: the first flag the command has.
NANOGPT = {
    "max_iters": "--max-steps", "learning_rate": "--lr", "block_size": "--context-length",
    "gradient_accumulation_steps": "--grad-accum (per process: nanoGPT's total / the processes)",
    "warmup_iters": "--warmup", "lr_decay_iters": "--lr-decay-steps", "decay_lr": "--schedule cosine",
 "eval_interval": ("--eval-every", "--eval-freq"), "eval_iters": "--eval-iter",
    "log_interval": "--log-every", "grad_clip": "--clip", "dropout": "--drop-rate",
    "out_dir": ("--out", "--checkpoint"),
    "dataset": "--data", "init_from": "--init-from (nanoGPT's init_from='resume' is --resume)",
    "always_save_checkpoint": "--save-every", "eval_only": "the eval command: npgpt eval --checkpoint CKPT",
    "wandb_log": "no such option: every step is a line of OUT/log.jsonl", "start": ("--prompt", "--start-context"),
    "num_samples": "no such option: run npgpt generate again with another --seed", "n_layer": "--n-layer",
    "n_head": "--n-head", "n_embd": "--n-embd",
}
LLMC = {
    "-i": "--data (a folder of shards: its train and val files)", "-j": "--data (the val shards beside the train's)",
    "-e": ("--init-from", "--pretrained"), "-o": "--out", "-b": "--batch-size (the micro-batch)",
    "-t": "--max-length (tokens per window; the model's own context is --context-length)",
    "-d": "--tokens-per-step", "-l": "--lr", "-u": "--warmup", "-q": "--final-lr-frac", "-c": "--weight-decay",
    "-k": "--schedule", "-x": "--max-steps", "-v": "--eval-every", "-m": "--eval-iter", "-s": "--sample-every",
    "-n": "--save-every", "-y": "--resume auto", "-g": ("--max-new-tokens (npgpt generate)", "--sample-tokens"),
    "-sl": "--skip-loss-z", "-sg": "--skip-grad-z", "-nk": "--keep-last", "-nm": "--keep-every",
}
# (option, value refused) -> what to write instead
VALUES = {
    ("--dtype", "bfloat16"): "for bf16 mixed precision give --backend torch --autocast bf16 (--dtype is the "
                             "parameters': float32 or float64)",
    ("--dtype", "float16"): "npgpt keeps float32 parameters; for fp16 mixed precision give --backend torch "
                            "--autocast fp16",
    ("--dtype", "bf16"): "for bf16 mixed precision give --backend torch --autocast bf16",
    ("--backend", "nccl"): "--backend is npgpt's (numpy or torch); torchrun's processes use nccl on CUDA by themselves",
    ("--backend", "gloo"): "--backend is npgpt's (numpy or torch); torchrun's processes use gloo on CPUs by themselves",
}


def unknown_option(parser: argparse.ArgumentParser, extras: list[str]) -> str:
    """The one line that answers options the parser does not have: the real flag they resemble."""
    options = [o for a in parser._actions for o in a.option_strings]
    word = next((e for e in extras if e.startswith("-") and not re.fullmatch(r"-\.?\d[\d.e+-]*", e)), None)
    if word is None:
        return f"unrecognized argument{'s' if len(extras) > 1 else ''} {' '.join(extras)}"
    name = word.split("=", 1)[0]
    said = f"unrecognized option {name}"
    bare = name.lstrip("-")
    if name in LLMC and not name.startswith("--"):
        return f"{said}: llm.c's {name} is {first_option(LLMC[name], options)}"
    if bare in NANOGPT:
        return f"{said}: nanoGPT's {bare} is {first_option(NANOGPT[bare], options)}"
    dashed = "--" + bare.replace("_", "-")
    if dashed in options:
        return f"{said}: did you mean {dashed}? (npgpt's options are spelled with -, not _)"
    # compared without the dashes every long option shares, which would make any two look alike
    close = difflib.get_close_matches(dashed[2:], [o[2:] for o in options if o.startswith("--")], n=1, cutoff=0.7)
    if close:
        return f"{said}: did you mean --{close[0]}?"
    return f"{said} ({parser.prog} --help lists them)"


def first_option(target, options) -> str:
    """The flag a spelling maps to: of a tuple, the first one the command has."""
    if isinstance(target, tuple):
        return next((t for t in target if t in options), target[0])
    return target


class HelpFormatter(argparse.HelpFormatter):
    """Each option's help ends with its choices and its default, unless the text gives them already
    (an option whose default is resolved later says so in its own words)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if not action.option_strings or isinstance(action, argparse._HelpAction):
            return text
        if action.choices is not None and "choices" not in text:
            text += f" (choices: {', '.join(map(str, action.choices))})"
        if "default" not in text and not action.required:
            text += f" (default: {'off' if action.default in (None, False) else action.default})"
        return text


class Parser(argparse.ArgumentParser):
    """ArgumentParser with no abbreviations, one-line errors and hints for unknown options; its
    subcommands' parsers are of this class too."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def parse_args(self, args=None, namespace=None):
        namespace, extras = self.parse_known_args(args, namespace)
        if extras:
            sub = getattr(self, "subcommands", {}).get(getattr(namespace, "command", None), self)
            sub.error(unknown_option(sub, extras))
        return namespace

    def error(self, message):
        """One line, `npgpt CMD: error: ...`, exit code 2: no usage block (--help has it)."""
        refused = re.match(r"argument (\S+?)(?:/\S+)?: invalid choice: '(.*?)'", message)
        if refused and (refused[1], refused[2]) in VALUES:
            message = f"{message.split(' (choose')[0]}: {VALUES[refused[1], refused[2]]}"
        elif refused and hasattr(self, "subcommands"):
            close = difflib.get_close_matches(refused[2], getattr(self, "subcommands", {}), n=1)
            message = f"{message}{f'; did you mean {close[0]}?' if close else ''}"
        flag = re.match(r"argument (--[\w-]+)/(--no-[\w-]+): ignored explicit argument '(.*)'", message)
        if flag:
            message = f"{flag[1]}={flag[3]}: a switch takes no value; write {flag[1]} or {flag[2]}"
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(2)
