"""Writing safetensors checkpoints: tensor by tensor (one tensor in memory at a time), atomically, with
checksums; and the one-time conversion of ``pytorch_model*.bin`` weights (no pickle code runs)."""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import struct
from collections.abc import Mapping
from pathlib import Path

import torch

from hermes.atomic import atomic_path
from hermes.checksums import write_checksums
from hermes.errors import CheckpointError
from hermes.store import DTYPE_NAMES, SINGLE_NAME


class SafetensorsWriter:
    """Write a safetensors file tensor by tensor, so that only one tensor is in memory at a time.

    The header is computed up front from ``(name, dtype, shape)`` entries, sorted by name as Hugging Face
    writes them (hence each block's tensors are contiguous). Tensors must then be written in that order.
    The file appears atomically at ``path`` on :meth:`close`.
    """

    def __init__(self, path: str | os.PathLike[str], entries: list[tuple[str, torch.dtype, tuple[int, ...]]],
                 *, metadata: dict[str, str] | None = None, align: int = 8) -> None:
        self.path = Path(path)
        self.order = sorted(entries, key=lambda e: e[0])
        header: dict[str, object] = {"__metadata__": metadata or {"format": "pt"}}
        offset = 0
        for name, dtype, shape in self.order:
            n = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
            offset += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-(len(raw) + 8) % align)  # align the data section (8 bytes, as safetensors does)
        self._ctx = atomic_path(self.path)
        self._tmp = self._ctx.__enter__()
        self._file = open(self._tmp, "wb")  # noqa: SIM115 - closed in close()/abort()
        self._file.write(struct.pack("<Q", len(raw)) + raw)
        self._next = 0
        self.checksums: dict[str, str] = {}  # tensor name -> sha256 of its bytes

    @property
    def names(self) -> list[str]:
        return [e[0] for e in self.order]

    def write(self, name: str, tensor: torch.Tensor) -> None:
        exp_name, dtype, shape = self.order[self._next]
        if name != exp_name or tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
            raise ValueError(f"expected {exp_name} {dtype} {shape}, got {name} {tensor.dtype} {tuple(tensor.shape)}")
        data = tensor.detach().contiguous().cpu()
        raw = memoryview(data.view(torch.uint8).reshape(-1).numpy()) if data.numel() else memoryview(b"")
        self._file.write(raw)
        self.checksums[name] = hashlib.sha256(raw).hexdigest()
        self._next += 1

    def close(self) -> None:
        if self._next != len(self.order):
            self.abort()
            raise ValueError(f"{self.path}: only {self._next} of {len(self.order)} tensors written")
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self._ctx.__exit__(None, None, None)

    def abort(self) -> None:
        self._file.close()
        with contextlib.suppress(BaseException):
            self._ctx.__exit__(RuntimeError, RuntimeError("aborted"), None)


def write_safetensors(path: str | os.PathLike[str], entries: list[tuple[str, torch.dtype, tuple[int, ...]]],
                      tensors: Mapping[str, torch.Tensor], *, align: int = 8) -> dict[str, str]:
    """Write ``tensors`` (those named by ``entries``) as one safetensors file, atomically; returns checksums."""
    writer = SafetensorsWriter(path, entries, align=align)
    try:
        for name in writer.names:
            writer.write(name, tensors[name])
    except BaseException:
        writer.abort()
        raise
    writer.close()
    return writer.checksums


def convert_bin_checkpoint(model_dir: str | os.PathLike[str]) -> Path:
    """Convert ``pytorch_model*.bin`` weights to ``model.safetensors`` (one time, no pickle execution).

    The .bin files are read with ``torch.load(weights_only=True)``, which refuses arbitrary pickled objects.
    Returns the path written.
    """
    d = Path(model_dir)
    bins = sorted(d.glob("*.bin"))
    if not bins:
        raise CheckpointError(f"{d} holds no .bin weights to convert")
    state: dict[str, torch.Tensor] = {}
    for path in bins:
        try:
            loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as exc:
            raise CheckpointError(f"{path}: not a plain PyTorch state dict that can be loaded safely "
                                  f"(weights_only=True refused it: {str(exc).splitlines()[0]})") from exc
        if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
            raise CheckpointError(f"{path}: expected a dict of tensor name -> tensor, got {type(loaded).__name__}; "
                                  "save the model's state_dict() instead")
        state.update(loaded)
    # Tensors sharing storage (tied weights) are written once, under the first name.
    seen: dict[tuple[int, int], str] = {}
    entries = []
    for name in sorted(state):
        t = state[name]
        key = (t.untyped_storage().data_ptr(), t.storage_offset())
        if t.numel() and key in seen:
            continue
        seen[key] = name
        entries.append((name, t.dtype, tuple(t.shape)))
    out = d / SINGLE_NAME
    write_checksums(d, write_safetensors(out, entries, state))
    return out
