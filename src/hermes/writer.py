"""Writing safetensors checkpoints: tensor by tensor (one tensor in memory at a time), atomically, with
checksums; and the one-time conversion of ``pytorch_model*.bin`` weights (no pickle code runs)."""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import struct
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch

from hermes.atomic import atomic_path, atomic_write_text
from hermes.checksums import write_checksums
from hermes.errors import CheckpointError
from hermes.store import DTYPE_NAMES, INDEX_NAME, SINGLE_NAME

PAD_SUFFIX = ".hermes_pad"  # alignment padding entries (see SafetensorsWriter)


class SafetensorsWriter:
    """Write a safetensors file tensor by tensor, so that only one tensor is in memory at a time.

    The header is computed up front from ``(name, dtype, shape)`` entries, sorted by name as Hugging Face
    writes them (hence each block's tensors are contiguous). Tensors must then be written in that order.
    The file appears atomically at ``path`` on :meth:`close`.

    With ``tensor_align`` each tensor starts at a multiple of that many bytes from the start of the file: a
    zero ``uint8`` entry named ``NAME.hermes_pad`` fills the gap before it (safetensors allows no holes). Some
    kernels need aligned weights (torch's int8 weight-only matmul crashes on an int8 weight that is not 16-byte
    aligned), and a tensor aligned in the file is aligned when memory-mapped and when streamed.
    """

    def __init__(self, path: str | os.PathLike[str], entries: list[tuple[str, torch.dtype, tuple[int, ...]]],
                 *, metadata: dict[str, str] | None = None, align: int = 8, tensor_align: int = 0) -> None:
        self.path = Path(path)
        self.order = sorted(entries, key=lambda e: e[0])
        header: dict[str, object] = {"__metadata__": metadata or {"format": "pt"}}
        self._pads: dict[str, int] = {}
        offset = 0
        if tensor_align:  # the data section then starts at a multiple of tensor_align too
            align = math.lcm(align, tensor_align)
        for name, dtype, shape in self.order:
            if tensor_align and offset % tensor_align:
                pad = self._pads[name] = tensor_align - offset % tensor_align
                header[name + PAD_SUFFIX] = {"dtype": "U8", "shape": [pad], "data_offsets": [offset, offset + pad]}
                offset += pad
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
        self.write_parts(name, [tensor])

    def _pad(self, name: str) -> None:
        if name in self._pads:
            zeros = bytes(self._pads[name])
            self._file.write(zeros)
            self.checksums[name + PAD_SUFFIX] = hashlib.sha256(zeros).hexdigest()

    def write_parts(self, name: str, parts: Iterable[torch.Tensor]) -> None:
        """Write one tensor as consecutive slices of its first dimension (a large tensor never whole in memory)."""
        exp_name, dtype, shape = self.order[self._next]
        if name != exp_name:
            raise ValueError(f"expected {exp_name}, got {name}")
        digest = hashlib.sha256()
        rows = 0
        self._pad(name)
        for part in parts:
            if part.dtype != dtype or tuple(part.shape[1:]) != tuple(shape[1:]) or (part.dim() == 0) != (not shape):
                raise ValueError(f"expected rows of {exp_name} {dtype} {shape}, got {part.dtype} "
                                 f"{tuple(part.shape)}")
            data = part.detach().contiguous().cpu()
            raw = memoryview(data.view(torch.uint8).reshape(-1).numpy()) if data.numel() else memoryview(b"")
            self._file.write(raw)
            digest.update(raw)
            rows += part.shape[0] if shape else 1
        if rows != (shape[0] if shape else 1):
            raise ValueError(f"{name}: {rows} rows written, {shape[0] if shape else 1} expected")
        self.checksums[name] = digest.hexdigest()
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


Entry = tuple[str, torch.dtype, tuple[int, ...]]


def entry_nbytes(entry: Entry) -> int:
    """Bytes of a ``(name, dtype, shape)`` entry."""
    return math.prod(entry[2]) * torch.empty((), dtype=entry[1]).element_size()


def split_shards(entries: list[Entry], shard_bytes: int) -> list[list[Entry]]:
    """Entries (in order) cut into shards of at most ``shard_bytes`` each (a larger tensor is a shard alone)."""
    shards: list[list[Entry]] = [[]]
    size = 0
    for e in entries:
        n = entry_nbytes(e)
        if shards[-1] and size + n > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += n
    return shards


def shard_names(count: int) -> list[str]:
    """File names of ``count`` shards, as Hugging Face names them."""
    return [SINGLE_NAME] if count == 1 else [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


Parts = Callable[[], Iterable[torch.Tensor]]  # a tensor's slices of rows, made when it is written


def write_shards(out: Path, plan: Mapping[str, tuple[torch.dtype, tuple[int, ...], Parts]], *, shard_bytes: int,
                 metadata: dict[str, str], tensor_align: int = 0,
                 progress: Callable[[int, int], None] | None = None) -> None:
    """A checkpoint's safetensors files into ``out``, tensor by tensor: ``plan`` maps each tensor's name to its
    dtype, shape and the producer of its row slices (called when it is written, so one tensor is in memory at a
    time). Shards of at most ``shard_bytes`` (an index when there are several; shards of an earlier write that
    are not in it are removed), then the checksums. ``progress(bytes_done, bytes_total)`` after each tensor."""
    entries = sorted(((n, dt, s) for n, (dt, s, _) in plan.items()), key=lambda e: e[0])
    shards = split_shards(entries, shard_bytes)
    names = shard_names(len(shards))
    total = sum(entry_nbytes(e) for e in entries)
    for stale in [*out.glob("*.safetensors"), out / INDEX_NAME]:
        if stale.name not in names:
            stale.unlink(missing_ok=True)
    checksums: dict[str, str] = {}
    done = 0
    if progress:
        progress(0, total)
    for shard_name, shard in zip(names, shards, strict=True):
        writer = SafetensorsWriter(out / shard_name, shard, metadata=metadata, tensor_align=tensor_align)
        try:
            for entry in writer.order:
                writer.write_parts(entry[0], plan[entry[0]][2]())
                done += entry_nbytes(entry)
                if progress:
                    progress(done, total)
        except BaseException:
            writer.abort()
            raise
        writer.close()
        checksums.update(writer.checksums)
    write_checksums(out, checksums)
    if len(shards) > 1:
        weight_map = {e[0]: n for n, shard in zip(names, shards, strict=True) for e in shard}
        atomic_write_text(out / INDEX_NAME, json.dumps({"metadata": {"total_size": total},
                                                        "weight_map": weight_map}, indent=2))


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
