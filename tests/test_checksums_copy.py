"""A copied checkpoint is trusted by its content, not its modification times: ``cp -r`` (new mtimes), even onto
read-only media, runs without the "changed since its checksums were recorded" warning and without writing; bytes
that really changed are still found (cheaply when they lie in a sampled block, always by ``hermes verify``)."""
from __future__ import annotations

import json
import logging
import os
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from hermes.checksums import (
    CHECKSUMS_NAME,
    FORMAT_VERSION,
    SAMPLE_BLOCKS,
    changed_since_checksums,
    read_checksums,
    sample_ranges,
)
from hermes.cli import main
from hermes.errors import InputError
from hermes.store import read_safetensors_header
from hermes.synth import synthesize
from hermes.verify import verify

WARNING = "changed since its checksums were recorded"
WEIGHTS = "model.safetensors"


@pytest.fixture(scope="module")
def original(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synthesize("tiny-bert", tmp_path_factory.mktemp("orig") / "tiny-bert", seed=1)


def _copy(src: Path, dst: Path) -> Path:
    """``cp -r``: same bytes, new modification times (an hour later, so that they surely differ)."""
    shutil.copytree(src, dst, copy_function=shutil.copyfile)
    for f in dst.iterdir():
        st = f.stat()
        os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 3600 * 10**9))
    return dst


def _snapshot(d: Path) -> dict[str, tuple[int, int, int]]:
    """Every entry under ``d`` with its size, mtime and inode: what a write would change."""
    return {str(p.relative_to(d)): (p.stat().st_size, p.stat().st_mtime_ns, p.stat().st_ino)
            for p in sorted([d, *d.rglob("*")])}


@pytest.fixture
def read_only_copy(original: Path, tmp_path: Path) -> Iterator[Path]:
    """A copy with ``chmod -R a-w`` (root can still write: tests compare snapshots), writable again afterwards."""
    path = _copy(original, tmp_path / "copy")
    for p in [*path.rglob("*"), path]:
        p.chmod(p.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    yield path
    for p in [path, *path.rglob("*")]:
        p.chmod(p.stat().st_mode | stat.S_IWUSR)


def _flip(path: Path, offset: int) -> None:
    """Flip one byte in place, keeping size and modification time (what an mtime check cannot see)."""
    st = path.stat()
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_mtime_ns == st.st_mtime_ns and path.stat().st_size == st.st_size


def _tensor_at(path: Path, offset: int) -> str:
    header, _ = read_safetensors_header(path)
    return next(name for name, info in header.items() if info.start <= offset < info.end)


def test_a_copy_on_read_only_media_runs_without_warning_or_writing(read_only_copy, caplog):
    caplog.set_level(logging.INFO)
    before = _snapshot(read_only_copy)
    assert changed_since_checksums(read_only_copy) == []
    assert main(["run", str(read_only_copy), "--budget", "1MiB", "--random-input", "4"]) == 0
    report = verify(read_only_copy)  # the full check agrees, and has nothing to re-record
    assert report.ok and report.detail == ""
    assert WARNING not in caplog.text
    assert _snapshot(read_only_copy) == before


def test_the_record_holds_content_fingerprints(original):
    data = json.loads((original / CHECKSUMS_NAME).read_text())
    assert data["format_version"] == FORMAT_VERSION == 2
    assert data["sample"] == {"blocks": SAMPLE_BLOCKS, "block_bytes": 64 * 2**10}
    entry = data["files"][WEIGHTS]
    assert set(entry) == {"size", "sample_sha256"}  # no modification time
    assert entry["size"] == (original / WEIGHTS).stat().st_size and len(entry["sample_sha256"]) == 64


def test_sampled_blocks_cover_start_middle_and_end():
    size = 10 * 2**20 + 7
    ranges = sample_ranges(size)
    assert len(ranges) == SAMPLE_BLOCKS and ranges[0][0] == 0 and sum(ranges[-1]) == size
    assert any(off <= size // 2 < off + n for off, n in ranges)
    assert sample_ranges(1000) == [(0, 1000)]  # a small file is hashed whole


def test_bytes_flipped_in_a_sampled_block_warn_with_mtime_restored(original, tmp_path, caplog):
    path = _copy(original, tmp_path / "copy")
    f = path / WEIGHTS
    offset, length = sample_ranges(f.stat().st_size)[SAMPLE_BLOCKS // 2]  # the middle block
    _flip(f, offset + length // 2)
    assert changed_since_checksums(path) == [WEIGHTS]
    assert main(["run", str(path), "--budget", "1MiB", "--random-input", "4"]) == 0
    assert f"{WEIGHTS} {WARNING}" in caplog.text
    report = verify(path)
    assert not report.ok and report.bad_tensor == _tensor_at(f, offset + length // 2)


def test_bytes_flipped_outside_the_samples_are_found_by_verify(original, tmp_path, caplog):
    path = _copy(original, tmp_path / "copy")
    f = path / WEIGHTS
    ranges = sample_ranges(f.stat().st_size)
    assert len(ranges) == SAMPLE_BLOCKS  # the file is larger than its samples: there are gaps
    offset = (sum(ranges[3]) + ranges[4][0]) // 2  # between two sampled blocks
    assert not any(off <= offset < off + n for off, n in ranges)
    _flip(f, offset)
    assert changed_since_checksums(path) == []  # the cheap check does not read there ...
    report = verify(path)  # ... the full one does
    assert not report.ok and report.bad_tensor == _tensor_at(f, offset)
    assert WEIGHTS in report.detail
    assert main(["verify", str(path)]) == 1


def _as_format_1(path: Path) -> None:
    """Rewrite the record as format 1 wrote it: files stamped with [size, mtime in ns]."""
    data = json.loads((path / CHECKSUMS_NAME).read_text())
    data["format_version"] = 1
    del data["sample"]
    data["files"] = {n: [e["size"], 1_700_000_000 * 10**9] for n, e in data["files"].items()}
    (path / CHECKSUMS_NAME).write_text(json.dumps(data))


def test_a_format_1_record_is_read_without_spurious_warning(original, tmp_path, monkeypatch, caplog):
    path = _copy(original, tmp_path / "copy")
    _as_format_1(path)  # its mtimes are not the files' (a copy): only sizes are compared
    assert changed_since_checksums(path) == [] and read_checksums(path)
    assert main(["run", str(path), "--budget", "1MiB", "--random-input", "4"]) == 0
    assert WARNING not in caplog.text

    def read_only(*args: object, **kwargs: object) -> None:
        raise InputError(f"cannot write {path / CHECKSUMS_NAME}: Read-only file system")

    monkeypatch.setattr("hermes.verify.write_checksums", read_only)
    report = verify(path)  # read-only media: the stale record stays, no error
    assert report.ok and "could not be re-recorded" in report.detail
    monkeypatch.undo()
    report = verify(path)  # writable: upgraded to the current format
    assert report.ok and "re-recorded" in report.detail
    assert json.loads((path / CHECKSUMS_NAME).read_text())["format_version"] == FORMAT_VERSION
    assert verify(path).detail == ""  # current now: nothing more to write


def test_a_format_1_record_still_flags_a_size_change(original, tmp_path):
    path = _copy(original, tmp_path / "copy")
    _as_format_1(path)
    with open(path / WEIGHTS, "ab") as f:
        f.write(b"\0" * 8)
    assert changed_since_checksums(path) == [WEIGHTS]
