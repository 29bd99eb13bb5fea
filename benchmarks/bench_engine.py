"""Reproduce docs/BENCHMARKS.md, section "Engine": BERT-Large, 128 tokens, cold cache, 25 % budget.

    .venv/bin/python benchmarks/bench_engine.py [--repeat 5] [--out docs/results/bert-large]

Synthesizes BERT-Large into ~/.cache/hermes/bert-large once (1.34 GB), then runs `hermes bench`.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from hermes.cli import main
from hermes.synth import DEFAULT_CACHE

STRATEGIES = ("full,pipeswitch,sequential:io=direct,double-buffer:io=direct,pipeload:loaders=1;io=direct,"
              "pipeload:loaders=2;io=direct,pipeload:loaders=2;io=buffered")


def run() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--out", type=Path, default=Path("docs/results/bert-large"))
    p.add_argument("--model", type=Path, default=DEFAULT_CACHE / "bert-large")
    a = p.parse_args()
    if not (a.model / "config.json").is_file() and (code := main(["synth", "bert-large", str(a.model)])):
        return code
    return main(["bench", str(a.model), "--budget", "335MB", "--repeat", str(a.repeat), "--seq-len", "128",
                 "--strategies", STRATEGIES, "-o", str(a.out)])


if __name__ == "__main__":
    sys.exit(run())
