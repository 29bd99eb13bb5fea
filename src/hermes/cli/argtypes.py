"""Argument types of the CLI: each parses one command-line value, or fails with a message that says what to give
(checked while parsing, so that a bad value fails before any work)."""
from __future__ import annotations

import argparse
import os
import re
from pathlib import Path

from hermes.memory import format_bytes


def token_ids(text: str) -> list[int]:
    """Token ids separated by commas and/or spaces ("464,2068", "464 2068", "464, 2068")."""
    try:
        return [int(x) for x in re.split(r"[,\s]+", text.strip()) if x]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"takes integers separated by commas or spaces such as 1,2,3, got {text!r}") from None


def _int_at_least(text: str, low: int) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= {low}, got {text!r}") from None
    if n < low:
        raise argparse.ArgumentTypeError(f"must be >= {low}, got {n}")
    return n


def positive_int(text: str) -> int:
    return _int_at_least(text, 1)


def non_negative_int(text: str) -> int:
    return _int_at_least(text, 0)


def port(text: str) -> int:
    n = non_negative_int(text)
    if n > 65535:
        raise argparse.ArgumentTypeError(f"a TCP port is at most 65535, got {n}")
    return n


def positive_float(text: str) -> float:
    try:
        x = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}") from None
    if not x > 0 or x == float("inf"):
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return x


def probability(text: str) -> float:
    x = positive_float(text)
    if x > 1:
        raise argparse.ArgumentTypeError(f"must lie in (0, 1], got {text}")
    return x


def budget(text: str) -> str:
    """A budget the machine can hold (parsed now, so that a bad one fails before any work)."""
    from hermes.errors import BudgetError
    from hermes.memory import machine_ram, parse_bytes

    if text.strip().lower() == "auto":
        raise argparse.ArgumentTypeError("'auto' (the memory this process may still take) is for run and generate; "
                                         "plan and bench compare fixed budgets: give a size such as 300MiB")
    try:
        n = parse_bytes(text)
    except BudgetError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    ram = machine_ram()
    if ram is not None and n > ram:
        raise argparse.ArgumentTypeError(f"{text} is more than this machine's RAM ({format_bytes(ram)}); give at "
                                         "most the memory the device really has")
    return text


def budget_or_auto(text: str) -> str:
    """A budget, or "auto": the memory this process may still take, measured when the model opens."""
    return "auto" if text.strip().lower() == "auto" else budget(text)


def out_file(text: str) -> Path:
    """A file to write: its folder must exist and be writable (checked before any work; nothing is created)."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a folder; give a file name in it, e.g. {path / 'out.json'}")
    parent = path.parent
    if not parent.is_dir():
        raise argparse.ArgumentTypeError(f"folder {parent} does not exist; create it first (mkdir -p {parent})")
    if not os.access(parent, os.W_OK):
        raise argparse.ArgumentTypeError(f"folder {parent} is not writable; pick another place")
    return path


def out_dir(text: str) -> Path:
    """An output folder: created if missing (its parent must exist), refused if it is a file or not writable."""
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a file, not a folder; give a folder for the results")
    if not path.exists():
        out_file(text)  # its parent must exist and be writable
    elif not os.access(path, os.W_OK):
        raise argparse.ArgumentTypeError(f"folder {text} is not writable; pick another place")
    return path
