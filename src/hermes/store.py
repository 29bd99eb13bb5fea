"""Checkpoint storage: a read-only mapping from tensor name to where its bytes lie in safetensors files.

Safetensors headers are parsed here (not through the safetensors library) so that a unit can be read as
one byte range straight into a preallocated buffer, and so that every malformed file gets an error that
names the file and the key.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import struct
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from hermes.errors import CheckpointError, InputError

log = logging.getLogger(__name__)

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in SAFETENSORS_DTYPES.items()}
INDEX_NAME = "model.safetensors.index.json"
CHECKSUMS_NAME = "hermes_checksums.json"
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

    @property
    def nbytes(self) -> int:
        return self.end - self.start


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

    def load_tensor(self, name: str) -> torch.Tensor:
        """Read one tensor into fresh memory (used for small tensors such as persistent buffers)."""
        info = self[name]
        buf = bytearray(info.nbytes)
        with open(info.path, "rb", buffering=0) as f:
            read_exact(f.fileno(), info.start, memoryview(buf), info.path)
        if info.nbytes == 0:
            return torch.empty(info.shape, dtype=info.dtype)
        return torch.frombuffer(buf, dtype=info.dtype).reshape(info.shape).clone()


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


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it replaces ``path`` atomically, else it is removed."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise InputError(f"cannot write {path}: {exc.strerror or exc}; pick a place you can write to") from exc
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; a written file gets the usual mode
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(exc, OSError):  # e.g. the disk filled up: nothing was written at ``path``
            raise InputError(f"cannot write {path}: {exc.strerror or exc}; {path} was left as it was") from exc
        raise


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


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


def write_checksums(model_dir: str | os.PathLike[str], checksums: dict[str, str]) -> Path:
    """Record per-tensor sha256 checksums next to the weights (read by ``hermes verify``)."""
    path = Path(model_dir) / CHECKSUMS_NAME
    atomic_write_text(path, json.dumps({"format_version": 1, "algorithm": "sha256", "tensors": checksums,
                                        "files": _file_stamps(Path(model_dir))}, indent=1, sort_keys=True))
    return path


def _file_stamps(model_dir: Path) -> dict[str, list[int]]:
    """{safetensors file name: [size, mtime in ns]}: a cheap sign that a file changed since checksums were taken."""
    return {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in sorted(model_dir.glob("*.safetensors"))}


def changed_since_checksums(model_dir: str | os.PathLike[str]) -> list[str]:
    """Weight files whose size or modification time differ from when their checksums were recorded (none when no
    checksums, or checksums without file stamps, were recorded). Costs a stat per file, not a read."""
    path = Path(model_dir) / CHECKSUMS_NAME
    try:
        recorded = json.loads(path.read_text()).get("files")
    except (OSError, ValueError, AttributeError):
        return []
    if not isinstance(recorded, dict):
        return []
    now = _file_stamps(Path(model_dir))
    return sorted(n for n in set(recorded) | set(now) if recorded.get(n) != now.get(n))


def read_checksums(model_dir: str | os.PathLike[str]) -> dict[str, str] | None:
    path = Path(model_dir) / CHECKSUMS_NAME
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        if data.get("format_version") != 1 or data.get("algorithm") != "sha256":
            raise ValueError(f"unsupported format_version/algorithm {data.get('format_version')}/"
                             f"{data.get('algorithm')}")
        tensors = data["tensors"]
        if not isinstance(tensors, dict):
            raise ValueError("'tensors' is not an object")
        return {str(k): str(v) for k, v in tensors.items()}
    except (ValueError, KeyError, AttributeError) as exc:
        raise CheckpointError(f"{path} is malformed ({exc}); re-record it with `hermes verify --record`") from exc


def tensor_checksum(info: TensorInfo) -> str:
    h = hashlib.sha256()
    with open(info.path, "rb", buffering=0) as f:
        f.seek(info.start)
        left = info.nbytes
        while left:
            chunk = f.read(min(left, 16 * 2**20))
            if not chunk:
                raise CheckpointError(f"{info.path}: unexpected end of file inside tensor {info.name!r}")
            h.update(chunk)
            left -= len(chunk)
    return h.hexdigest()
