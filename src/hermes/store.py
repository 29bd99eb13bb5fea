"""Checkpoint storage: a read-only mapping from tensor name to where its bytes lie in safetensors files.

Safetensors headers are parsed here (not through the safetensors library) so that a unit can be read as
one byte range straight into a preallocated buffer, and so that every malformed file gets an error that
names the file and the key. Writing checkpoints is ``hermes.writer``; checksums are ``hermes.checksums``.
"""
from __future__ import annotations

import json
import logging
import math
import os
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from hermes.errors import CheckpointError

log = logging.getLogger(__name__)

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in SAFETENSORS_DTYPES.items()}
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
PAGE = 4096
_MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes lie."""

    name: str  # key in the checkpoint
    path: Path  # safetensors file holding it
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int  # absolute end offset (exclusive)
    # a slice that is not one byte range (rows of a 4-bit head's scales ``[groups, rows, 2]``): its file ranges, in
    # order, spanning start..end; empty for one range
    pieces: tuple[tuple[int, int], ...] = ()

    @property
    def nbytes(self) -> int:
        return sum(b - a for a, b in self.pieces) if self.pieces else self.end - self.start


def read_safetensors_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate a safetensors header. Returns (tensors by name, metadata)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw_len = f.read(8)
            if len(raw_len) < 8:
                raise CheckpointError(f"{path}: file is truncated ({size} bytes), not a safetensors file; "
                                      "re-download or re-create the checkpoint")
            (header_len,) = struct.unpack("<Q", raw_len)
            if header_len > min(_MAX_HEADER, size - 8):
                raise CheckpointError(f"{path}: corrupted safetensors header (declared length {header_len} "
                                      f"bytes, file has {size}); re-download or re-create the checkpoint")
            raw = f.read(header_len)
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc.strerror or exc}") from exc
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")  # noqa: TRY004
    except (ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: corrupted safetensors header ({exc}); "
                              "re-download or re-create the checkpoint") from exc
    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + header_len
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        tensors[name] = _tensor_info(path, name, entry, data_start, size)
    return tensors, metadata


def _tensor_info(path: Path, name: str, entry: object, data_start: int, size: int) -> TensorInfo:
    try:
        dtype = SAFETENSORS_DTYPES[entry["dtype"]]  # type: ignore[index]
        shape = tuple(int(d) for d in entry["shape"])  # type: ignore[index]
        begin, end = (int(x) for x in entry["data_offsets"])  # type: ignore[index]
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: tensor {name!r} has a malformed header entry {entry!r}; "
                              "re-download or re-create the checkpoint") from exc
    expected = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if begin < 0 or end - begin != expected:
        raise CheckpointError(f"{path}: tensor {name!r} declares {end - begin} bytes but shape {list(shape)} "
                              f"of {entry['dtype']} needs {expected}; the file is corrupted")  # type: ignore[index]
    if data_start + end > size:
        raise CheckpointError(f"{path}: tensor {name!r} ends at byte {data_start + end}, past the end of the "
                              f"file ({size} bytes): the file is truncated; re-download or re-create it")
    return TensorInfo(name, path, dtype, shape, data_start + begin, data_start + end)


def _inside(model_dir: Path, name: str, source: Path) -> Path:
    path = (model_dir / name).resolve()
    if model_dir.resolve() not in path.parents:
        raise CheckpointError(f"{source} names {name!r}, which lies outside the model directory {model_dir}; "
                              "refusing to read it")
    return path


class Store(Mapping[str, TensorInfo]):
    """Read-only mapping ``tensor name -> TensorInfo`` over the safetensors files of a checkpoint directory.

    Headers are parsed on first access. Accepts ``model.safetensors``, a sharded
    ``model.safetensors.index.json``, or any set of ``*.safetensors`` files.
    """

    def __init__(self, model_dir: str | os.PathLike[str]) -> None:
        self.model_dir = Path(model_dir)
        self._tensors: dict[str, TensorInfo] | None = None
        self._derived: dict[str, TensorInfo] = {}  # tensors built by conversion, in a cache file (not iterated)
        self.files = self._find_files()

    def _find_files(self) -> list[Path]:
        d = self.model_dir
        index = d / INDEX_NAME
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                names = sorted(set(weight_map.values()))
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                raise CheckpointError(f"{index}: malformed index ({exc}); it needs a 'weight_map' object") from exc
            files = [_inside(d, n, index) for n in names]
            for f in files:
                if not f.is_file():
                    raise CheckpointError(f"{index} names shard {f.name!r}, which is missing from {d}; "
                                          "copy the missing shard or re-create the checkpoint")
            return files
        files = sorted(d.glob("*.safetensors"))
        if files:
            return files
        bins = sorted(d.glob("*.bin"))
        if bins:
            raise CheckpointError(f"{d} holds only PyTorch .bin weights ({bins[0].name}); convert them once with "
                                  f"`hermes convert {d}` (safe: weights_only loading), then retry")
        raise CheckpointError(f"{d} holds no weights (*.safetensors); point to a Hugging Face checkpoint "
                              "directory or create one with `hermes synth ARCH DIR`")

    @property
    def tensors(self) -> dict[str, TensorInfo]:
        if self._tensors is None:
            tensors: dict[str, TensorInfo] = {}
            for path in self.files:
                found, _ = read_safetensors_header(path)
                for name, info in found.items():
                    if name in tensors:
                        raise CheckpointError(f"tensor {name!r} appears in both {tensors[name].path.name} and "
                                              f"{path.name}; remove the duplicate shard")
                    tensors[name] = info
            self._tensors = tensors
        return self._tensors

    def __getitem__(self, name: str) -> TensorInfo:
        info = self.tensors.get(name) or self._derived.get(name)
        if info is None:
            raise KeyError(name)
        return info

    def add_derived(self, infos: dict[str, TensorInfo]) -> dict[str, str]:
        """Serve tensors built from the checkpoint's (converted, in a cache file) under keys of their own.
        Returns {tensor name: key}."""
        keys = {}
        for name, info in infos.items():
            keys[name] = f"hermes-converted:{name}"
            self._derived[keys[name]] = info
        return keys

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def load_tensor(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """Read one tensor (or its rows ``[a, b)`` of the first dimension) into fresh memory."""
        info = self[name]
        shape, start, nbytes = info.shape, info.start, info.nbytes
        if rows is not None:
            per = info.nbytes // max(info.shape[0], 1)
            shape, start, nbytes = (rows[1] - rows[0], *info.shape[1:]), info.start + rows[0] * per, \
                (rows[1] - rows[0]) * per
        if nbytes == 0:
            return torch.empty(shape, dtype=info.dtype)
        buf = bytearray(nbytes)
        with open(info.path, "rb", buffering=0) as f:
            read_exact(f.fileno(), start, memoryview(buf), info.path)
        return torch.frombuffer(buf, dtype=info.dtype).reshape(shape)


def read_exact(fd: int, offset: int, dest: memoryview, path: Path | str, *, min_bytes: int | None = None) -> None:
    """Fill ``dest`` from ``fd`` at ``offset`` with ``os.preadv`` (the GIL is released while reading).

    With O_DIRECT, ``dest`` may run past the end of the file; ``min_bytes`` is then the part that must exist.
    """
    need = len(dest) if min_bytes is None else min_bytes
    done = 0
    while done < need:
        n = os.preadv(fd, [dest[done:]], offset + done)
        if n == 0:
            raise CheckpointError(f"{path}: unexpected end of file at byte {offset + done}; the file is "
                                  "truncated; re-download or re-create the checkpoint")
        done += n


def evict_page_cache(paths: list[Path] | tuple[Path, ...]) -> None:
    """Drop the given files from the OS page cache so that the next reads come from the disk."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
