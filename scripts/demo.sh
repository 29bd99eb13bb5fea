#!/usr/bin/env bash
# Install (first run), then synthesize BERT-Large once and run it with PipeLoad under a 25% memory budget.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh 2> >(grep -v "is neither a file nor a directory" >&2)
.venv/bin/hermes demo --cache ckpt "$@"   # ckpt/bert-large: where README's "Use it" looks
