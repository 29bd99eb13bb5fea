"""``hermes verify``: check every tensor's bytes against the checksums recorded at synth/convert time."""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from hermes.checksums import CHECKSUMS_NAME, read_checksums, tensor_checksum, write_checksums
from hermes.errors import CheckpointError


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
    write_checksums(model_dir, expected)  # the bytes match: refresh the files' size/mtime stamps (a copied model)
    return VerifyReport(True, len(done))
