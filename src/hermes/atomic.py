"""Atomic file writes: a temporary file next to the target, moved over it with ``os.replace`` on success."""
from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from hermes.errors import InputError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it replaces ``path`` atomically, else it is removed.
    Temporary files left by a killed process (``.NAME.hermes-tmp-*-PID.tmp``) are removed first."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale(path, suffix=".tmp")
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.hermes-tmp-", suffix=f"-{os.getpid()}.tmp", dir=path.parent)
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


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike[str], *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a new temporary directory next to ``path``; on success it becomes ``path`` (a directory already
    there is replaced only with ``overwrite``, or when empty), else it is removed: ``path`` is never
    half-written. Temporary directories left by a killed process (``.NAME.hermes-tmp-PID``) are removed first."""
    import shutil

    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InputError(f"{path} is a file; pick a new directory")
    if not overwrite and _not_empty(path):  # before any work; checked again when it is replaced
        raise InputError(f"{path} is not empty; pick another directory, or pass --force to replace it")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale(path)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.hermes-tmp-", suffix=f"-{os.getpid()}", dir=path.parent))
    except OSError as exc:
        raise InputError(f"cannot write {path}: {exc.strerror or exc}; pick a place you can write to") from exc
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())
        if path.exists():
            if not overwrite and _not_empty(path):
                raise InputError(f"{path} is not empty; pick another directory, or pass --force to replace it")
            old = path.parent / f".{path.name}.hermes-old-{os.getpid()}"
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError):
            raise InputError(f"cannot write {path}: {exc.strerror or exc}; {path} was left as it was") from exc
        raise


def _remove_stale(path: Path, suffix: str = "") -> None:
    """Remove the temporary files or directories of ``path`` whose writer (the PID in their name) is dead."""
    import shutil

    for stale in path.parent.glob(f".{path.name}.hermes-tmp-*{suffix}"):
        pid = stale.name.removesuffix(suffix).rpartition("-")[2]
        if pid.isdigit() and not _alive(int(pid)):
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    stale.unlink()


def _not_empty(path: Path) -> bool:
    return path.is_dir() and any(path.iterdir())


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
