"""``hermes verify``: check every tensor's bytes against the checksums recorded at synth/convert time."""
from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from hermes.checksums import CHECKSUMS_NAME, read_checksums, records_are_current, tensor_checksum, write_checksums
from hermes.errors import CheckpointError, InputError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class VerifyReport:
    """Outcome of a verification."""

    ok: bool
    tensors_checked: int
    bad_unit: str | None = None  # first unit (in execution order) holding a bad tensor
    bad_tensor: str | None = None
    detail: str = ""


def verify(model_dir: str | os.PathLike[str], *, record: bool = False,
           progress: Callable[[int, int], None] | None = None) -> VerifyReport:
    """Hash every tensor of the checkpoint unit by unit and compare with ``hermes_checksums.json``.

    With ``record``, (re)write the checksum file from the current bytes instead (for checkpoints that
    were not made by ``hermes synth``/``convert``).
    """
    from hermes.api import open_model

    layout = open_model(model_dir)
    store = layout.store
    if record:
        sums = {name: tensor_checksum(info) for name, info in store.items()}
        write_checksums(model_dir, sums)
        return VerifyReport(True, len(sums), detail=f"recorded {len(sums)} checksums")
    expected = read_checksums(model_dir)
    if expected is None:
        raise CheckpointError(f"{model_dir} has no {CHECKSUMS_NAME} (it is written by `hermes synth` and "
                              f"`hermes convert`); record one from the current files with "
                              f"`hermes verify --record {model_dir}`")
    missing = sorted(set(store) - set(expected))
    if missing:
        return VerifyReport(False, 0, detail=f"{len(missing)} tensor(s) have no recorded checksum, e.g. {missing[:3]}")
    # Units in execution order, then tensors outside units (persistent buffers).
    # (the checkpoint's own tensors: not expert slices or tensors converted into Hermes' cache)
    order: list[tuple[str, str]] = [(u.name, s.key) for u in layout.units for s in u.slots if s.key in store.tensors]
    seen = {k for _, k in order}
    order += [("(buffers)", k) for k in store if k not in seen]
    done: set[str] = set()
    for i, (unit, key) in enumerate(order):
        if key in done:
            continue
        done.add(key)
        if tensor_checksum(store[key]) != expected[key]:
            return VerifyReport(False, len(done), unit, key, f"tensor {key!r} of unit {unit!r} in "
                                f"{Path(store[key].path).name} does not match its recorded checksum")
        if progress:
            progress(i + 1, len(order))
    return VerifyReport(True, len(done), detail=_refresh_fingerprints(model_dir, expected, len(done)))


def _refresh_fingerprints(model_dir: str | os.PathLike[str], expected: dict[str, str], checked: int) -> str:
    """Every tensor matched: re-record the files' fingerprints where they are stale (a format-1 record, or bytes
    outside the tensors changed). A directory that cannot be written (read-only media) keeps its record: no error,
    the report says so."""
    if records_are_current(model_dir):
        return ""
    try:
        write_checksums(model_dir, expected)
    except InputError as exc:
        log.info("%s: file fingerprints not refreshed (%s)", model_dir, exc)
        return f"{checked} tensors match their checksums; the file fingerprints are stale and could not be " \
               f"re-recorded ({CHECKSUMS_NAME} is not writable)"
    return f"{checked} tensors match their checksums; file fingerprints re-recorded"
