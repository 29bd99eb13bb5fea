"""Per-tensor sha256 checksums recorded next to the weights (``hermes_checksums.json``), read by ``hermes verify``,
with file stamps that tell cheaply whether a weight file changed since they were taken."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

from hermes.atomic import atomic_write_text
from hermes.errors import CheckpointError

if TYPE_CHECKING:
    from hermes.store import TensorInfo

CHECKSUMS_NAME = "hermes_checksums.json"


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
