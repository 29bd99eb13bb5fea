"""Error hierarchy. Every error Hermes raises on purpose is a HermesError whose message says what is
wrong and how to fix it."""
from __future__ import annotations


class HermesError(Exception):
    """Base class of all errors raised by Hermes on purpose."""


class CheckpointError(HermesError):
    """The checkpoint directory or one of its files is missing, malformed or does not match the config."""


class BudgetError(HermesError):
    """A memory budget that does not parse, or that is too small for the model."""


class InputError(HermesError):
    """An input that does not fit the model (wrong length, wrong image size, empty text, ...)."""


class LoadError(HermesError):
    """A loading agent failed while reading a unit's weights."""


class EngineError(HermesError):
    """The streamed model was used in a way the engine cannot serve (concurrent calls, unexpected order)."""


def versioned_json(text: str, expected: int, *, what: str, command: str) -> dict:
    """Parse a versioned JSON document (plan, profile); a wrong ``format_version`` says which command
    re-creates it."""
    import json

    d = json.loads(text)
    if not isinstance(d, dict) or d.get("format_version") != expected:
        found = d.get("format_version") if isinstance(d, dict) else None
        raise HermesError(f"{what} format_version {found} is not {expected}; re-run `{command}`")
    return d
