"""Command-line interface ``hermes``: parses arguments, calls the library with keywords, prints.

``parser`` builds the argument parser (``argtypes``: its value types), ``commands`` runs each subcommand,
``format`` renders results as text.
"""
from __future__ import annotations

import logging
import sys

from hermes.cli.commands import COMMANDS
from hermes.cli.format import format_generation, format_run
from hermes.cli.parser import build_parser
from hermes.errors import HermesError

__all__ = ["build_parser", "format_generation", "format_run", "main"]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return COMMANDS[args.command](args)
    except HermesError as exc:
        print(f"hermes: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("hermes: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into e.g. `head`
        sys.stderr.close()
        return 0
    except OSError as exc:  # a file that cannot be read or written (disk full, permissions, a special filesystem)
        where = f" {exc.filename}" if exc.filename else ""
        print(f"hermes: error: cannot access{where}: {exc.strerror or exc}", file=sys.stderr)
        return 2
