"""`npgpt train --config FILE.toml`: a run's options in a file, as nanoGPT's config/*.py files hold
its runs. configs/ in the repository has the book's run, a CPU-sized one and GPT-2's recipe.

The file holds any `npgpt train` option under its flag's name, without the leading dashes:
    preset = "gpt2-small"
    max-steps = 19073
    lr = 6e-4
    cosine = true           # a switch: true or false (no-progress = true is progress = false)
Options given on the command line override the file's (--no-cosine turns the file's cosine off).
A key that is no option of `npgpt train`, or a value of the wrong type, is refused in one line
naming the key and the file.
"""
from __future__ import annotations

import argparse

from ..files import load_toml

from .parser import NANOGPT, first_option

NOT_IN_FILES = ("config", "help")


def load_config(path, parser: argparse.ArgumentParser) -> dict:
    """The file's options as {dest: value}, under the flags given (resolve.py); ValueError naming
    the file and the key."""
    try:
        data = load_toml(path, "a readable TOML file")       # bounded: a FIFO, /dev/zero, deep nesting refused
    except FileNotFoundError:
        raise ValueError(f"--config {path}: no such file") from None
    except OSError as e:
        raise ValueError(f"--config {path}: not a readable TOML file ({e})") from None
    except ValueError as e:
        raise ValueError(f"--config {e}") from None
    actions = {option[2:]: action for action in parser._actions for option in action.option_strings
               if option.startswith("--") and option[2:] not in NOT_IN_FILES}
    values = {}
    for key, value in data.items():
        action = actions.get(key)
        if action is None:
            hint = f" (write it {key.replace('_', '-')!r})" if key.replace("_", "-") in actions else ""
            if key in NANOGPT:          # nanoGPT's config files name its options so
                hint = f" (nanoGPT's {key} is {first_option(NANOGPT[key], ['--' + k for k in actions])})"
            raise ValueError(f"{path}: {key!r} is no option of npgpt train{hint}")
        value = check_value(path, key, action, value)
        values[action.dest] = not value if key.startswith("no-") and "--" + key in action.option_strings[1:] \
            else value                  # no-progress = true: --no-progress, the negative of --progress
    return values


def check_value(path, key: str, action: argparse.Action, value):
    """value as the command line would have given it, or a ValueError naming the key and what it needs."""
    if action.nargs == 0 or isinstance(action, argparse.BooleanOptionalAction):     # a flag: true or false
        ok, expected = isinstance(value, bool), "true or false"
        if ok and isinstance(action, argparse._StoreConstAction):      # store_true: its const, or not given
            value = action.const if value else action.default
    elif action.type is int:
        ok, expected = isinstance(value, int) and not isinstance(value, bool), "an integer"
    elif action.type is float:
        ok, expected = isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
        value = float(value) if ok else value
    else:
        ok, expected = isinstance(value, str), "a string"
    if ok and action.choices is not None and value not in action.choices:
        ok, expected = False, "one of " + ", ".join(map(repr, action.choices))
    if not ok:
        raise ValueError(f"{path}: {key} must be {expected}, got {value!r}")
    return value
