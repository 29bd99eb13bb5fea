"""Real tokenizer vocabularies for synthesized models, from a package on PyPI.

llama.cpp's source tree carries vocab-only GGUF files of real tokenizers (with reference tokenizations,
``.inp``/``.out``) and the chat templates of real instruct models. Its PyPI source distribution,
``llama-cpp-python`` (pinned here by version and SHA-256), is where Hermes takes them from: the files below are
extracted once into :func:`vocab_dir` (``$HERMES_VOCAB``, default ``$HERMES_CACHE/vocab``); ``scripts/setup.sh``
does it at install time, :func:`ensure_vocab` on first need. Nothing else is read from the archive.
"""
from __future__ import annotations

import hashlib
import logging
import os
import tarfile
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from hermes.atomic import atomic_dir
from hermes.errors import HermesError

log = logging.getLogger(__name__)

#: The PyPI source distribution the vocabularies come from: url, SHA-256, size.
SDIST_URL = ("https://files.pythonhosted.org/packages/ec/e9/e7de2b0463ea3ffbf0ede6cb21b58c1258a8f6521aae45ca773a59fe7cf3/"
             "llama_cpp_python-0.3.36.tar.gz")
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
SDIST_BYTES = 76_589_250
SDIST_NAME = "llama-cpp-python 0.3.36 (PyPI source distribution)"
_PREFIX = "llama_cpp_python-0.3.36/vendor/llama.cpp/"


@dataclass(frozen=True)
class VocabSource:
    """One real tokenizer: the vocab-only GGUF that holds it and what the tokenizer built from it is."""

    name: str  # family name, e.g. "gpt-2"
    gguf: str  # file name under llama.cpp's models/
    kind: str  # "bpe" (byte-level BPE) or "wordpiece"
    tokenizer: str  # the real tokenizer it is, for messages and docs
    size: int  # its number of tokens
    chat_template: str = ""  # file under models/templates/ ("" = the plain template of hermes.tokenizer)


SOURCES: dict[str, VocabSource] = {s.name: s for s in [
    VocabSource("gpt-2", "ggml-vocab-gpt-2.gguf", "bpe", "GPT-2's byte-level BPE (50257 tokens)", 50257),
    VocabSource("llama-bpe", "ggml-vocab-llama-bpe.gguf", "bpe", "Llama 3's byte-level BPE (128256 tokens)", 128256,
                chat_template="meta-llama-Llama-3.2-3B-Instruct.jinja"),
    VocabSource("bert", "ggml-vocab-bert-bge.gguf", "wordpiece", "BERT's uncased WordPiece (30522 tokens)", 30522),
]}

#: Every file extracted from the archive (paths under llama.cpp's tree).
FILES: tuple[str, ...] = ("LICENSE",
                          *(f"models/{s.gguf}{ext}" for s in SOURCES.values() for ext in ("", ".inp", ".out")),
                          *(f"models/templates/{s.chat_template}" for s in SOURCES.values() if s.chat_template))


def vocab_dir() -> Path:
    """Where the extracted files live: ``$HERMES_VOCAB``, or ``vocab`` under the Hermes cache."""
    from hermes.synth import DEFAULT_CACHE

    return Path(os.environ.get("HERMES_VOCAB") or DEFAULT_CACHE / "vocab")


def have_vocab(directory: Path | None = None) -> bool:
    directory = directory or vocab_dir()
    return all((directory / Path(f).name).is_file() for f in FILES)


def ensure_vocab(*, progress: Callable[[int, int], None] | None = None) -> Path:
    """The vocabulary directory, fetched first if it is missing or incomplete."""
    directory = vocab_dir()
    if not have_vocab(directory):
        fetch_vocab(directory, progress=progress)
    return directory


def fetch_vocab(directory: Path, *, url: str | None = None, sha256: str | None = None,
                progress: Callable[[int, int], None] | None = None, timeout_s: float = 60.0) -> Path:
    """Download the source distribution, check its SHA-256 and extract :data:`FILES` (flat) into ``directory``.

    The archive is read as a stream (never stored whole); the files are written into a temporary directory that
    becomes ``directory`` only once the whole archive's hash matched. ``url``/``sha256`` default to
    :data:`SDIST_URL`/:data:`SDIST_SHA256`.
    """
    url, sha256 = url or SDIST_URL, sha256 or SDIST_SHA256
    log.info("fetching tokenizer vocabularies from %s (%d MB, once) into %s", SDIST_NAME, SDIST_BYTES >> 20,
             directory)
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response, \
                atomic_dir(directory, overwrite=True) as tmp:
            stream = _HashingReader(response, progress, SDIST_BYTES)
            found = _extract(stream, tmp)
            stream.drain()
            if stream.hexdigest() != sha256:
                raise HermesError(f"the download of {url} has SHA-256 {stream.hexdigest()}, not {sha256}; "
                                  "nothing was kept; try again (a proxy or mirror may have altered it)")
            missing = sorted(set(FILES) - found)
            if missing:
                raise HermesError(f"{SDIST_NAME} lacks {', '.join(missing)}; nothing was kept")
    except (OSError, tarfile.TarError, EOFError) as exc:
        raise HermesError(f"cannot fetch tokenizer vocabularies from {url}: {exc}; check the connection to PyPI "
                          f"and run `hermes synth` again, or extract {', '.join(Path(f).name for f in FILES)} "
                          f"from {SDIST_NAME} into {directory}") from exc
    return directory


def _extract(stream: IO[bytes], out: Path) -> set[str]:
    """Write the members named in :data:`FILES` (and nothing else) into ``out``; return those found."""
    wanted = {_PREFIX + f: f for f in FILES}
    found: set[str] = set()
    with tarfile.open(fileobj=stream, mode="r|gz") as tar:
        for member in tar:
            name = wanted.get(member.name)
            if name is None or not member.isfile():
                continue
            src = tar.extractfile(member)
            assert src is not None
            with open(out / Path(name).name, "wb") as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
            found.add(name)
    return found


class _HashingReader:
    """A read-only file over an HTTP response that hashes what passes through and reports progress."""

    def __init__(self, raw: IO[bytes], progress: Callable[[int, int], None] | None, total: int) -> None:
        self._raw = raw
        self._hash = hashlib.sha256()
        self._progress = progress
        self._total = total
        self._done = 0

    def read(self, n: int = -1) -> bytes:
        data = self._raw.read(n)
        self._hash.update(data)
        self._done += len(data)
        if self._progress is not None:
            self._progress(self._done, self._total)
        return data

    def drain(self) -> None:
        while self.read(1 << 20):
            pass

    def hexdigest(self) -> str:
        return self._hash.hexdigest()
