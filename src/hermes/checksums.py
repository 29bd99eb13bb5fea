"""Per-tensor sha256 checksums recorded next to the weights (``hermes_checksums.json``), read by ``hermes verify``,
with a fingerprint per weight file (its size and the sha256 of a few sampled blocks) that tells cheaply whether the
file's bytes changed since they were taken.

The fingerprint is keyed on content, not on modification times: a copy of the checkpoint (``cp -r``, new mtimes,
perhaps on read-only media) has the same fingerprints and needs no write to be trusted."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hermes.atomic import atomic_write_text
from hermes.errors import CheckpointError

if TYPE_CHECKING:
    from hermes.store import TensorInfo

CHECKSUMS_NAME = "hermes_checksums.json"
FORMAT_VERSION = 2  # 2: files fingerprinted by size + sampled blocks; 1: by size + mtime (still read)
SAMPLE_BLOCKS = 9  # blocks hashed per file: the first, the last, the middle one and six more evenly spaced
SAMPLE_BYTES = 64 * 2**10  # bytes per block: 576 KiB read per weight file, whatever its size


def write_checksums(model_dir: str | os.PathLike[str], checksums: dict[str, str]) -> Path:
    """Record per-tensor sha256 checksums next to the weights (read by ``hermes verify``), with the fingerprint of
    every weight file (read when the model is opened)."""
    path = Path(model_dir) / CHECKSUMS_NAME
    sample = {"blocks": SAMPLE_BLOCKS, "block_bytes": SAMPLE_BYTES}
    atomic_write_text(path, json.dumps({"format_version": FORMAT_VERSION, "algorithm": "sha256",
                                        "tensors": checksums, "sample": sample,
                                        "files": _fingerprints(Path(model_dir), sample)}, indent=1, sort_keys=True))
    return path


def sample_ranges(size: int, *, blocks: int = SAMPLE_BLOCKS, block_bytes: int = SAMPLE_BYTES) -> list[tuple[int, int]]:
    """``(offset, length)`` of the blocks a file of ``size`` bytes is fingerprinted by: the whole file when it is
    no larger than the blocks together, else ``blocks`` blocks evenly spaced from the first byte to the last."""
    if size <= blocks * block_bytes or blocks < 2:
        return [(0, size)]
    step = (size - block_bytes) / (blocks - 1)
    return [(round(i * step), block_bytes) for i in range(blocks)]


def file_fingerprint(path: str | os.PathLike[str], sample: dict[str, int]) -> dict[str, Any]:
    """``{"size": bytes, "sample_sha256": hex}`` of one file: its size and the sha256 of its sampled blocks."""
    size = os.stat(path).st_size
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for offset, length in sample_ranges(size, blocks=sample["blocks"], block_bytes=sample["block_bytes"]):
            f.seek(offset)
            h.update(f.read(length))
    return {"size": size, "sample_sha256": h.hexdigest()}


def _fingerprints(model_dir: Path, sample: dict[str, int]) -> dict[str, dict[str, Any]]:
    return {p.name: file_fingerprint(p, sample) for p in sorted(model_dir.glob("*.safetensors"))}


def _sample_spec(data: dict[str, Any]) -> dict[str, int]:
    """The sampling a record was made with (so that changing the defaults keeps old records valid)."""
    sample = data.get("sample")
    if isinstance(sample, dict) and all(isinstance(sample.get(k), int) and sample[k] > 0
                                        for k in ("blocks", "block_bytes")):
        return {"blocks": sample["blocks"], "block_bytes": sample["block_bytes"]}
    return {"blocks": SAMPLE_BLOCKS, "block_bytes": SAMPLE_BYTES}


def _differs(path: Path, recorded: Any, sample: dict[str, int] | None) -> bool:
    """Whether ``path`` no longer matches its recorded fingerprint; ``sample`` None: a format-1 record
    ``[size, mtime]``, of which only the size is compared (a copy's new mtime says nothing about its bytes)."""
    try:
        size = path.stat().st_size
        if sample is None:
            return not isinstance(recorded, list) or not recorded or recorded[0] != size
        if not isinstance(recorded, dict) or recorded.get("size") != size:
            return True
        return file_fingerprint(path, sample)["sample_sha256"] != recorded.get("sample_sha256")
    except OSError:  # vanished or unreadable since it was listed
        return True


def changed_since_checksums(model_dir: str | os.PathLike[str]) -> list[str]:
    """Weight files whose size or sampled bytes differ from when their checksums were recorded, or that appeared or
    disappeared since (none when no checksums were recorded). Reads ``SAMPLE_BLOCKS`` blocks per file whose size
    matches; writes nothing, so a read-only copy is checked like the original. A byte changed outside the sampled
    blocks is found by ``hermes verify`` only. Format-1 records compare sizes only."""
    model_dir = Path(model_dir)
    try:
        data = json.loads((model_dir / CHECKSUMS_NAME).read_text())
        recorded, version = data.get("files"), data.get("format_version")
    except (OSError, ValueError, AttributeError):
        return []
    if not isinstance(recorded, dict) or version not in (1, FORMAT_VERSION):
        return []
    sample = None if version == 1 else _sample_spec(data)
    now = {p.name: p for p in model_dir.glob("*.safetensors")}
    return sorted(n for n in set(recorded) | set(now)
                  if n not in recorded or n not in now or _differs(now[n], recorded[n], sample))


def records_are_current(model_dir: str | os.PathLike[str]) -> bool:
    """Whether the checksum file is of the current format and its file fingerprints match the files (else a
    successful ``hermes verify`` re-records them)."""
    try:
        version = json.loads((Path(model_dir) / CHECKSUMS_NAME).read_text()).get("format_version")
    except (OSError, ValueError, AttributeError):
        return False
    return version == FORMAT_VERSION and not changed_since_checksums(model_dir)


def read_checksums(model_dir: str | os.PathLike[str]) -> dict[str, str] | None:
    path = Path(model_dir) / CHECKSUMS_NAME
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        if data.get("format_version") not in (1, FORMAT_VERSION) or data.get("algorithm") != "sha256":
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
