"""What ``hermes demo`` shows: a model streamed under a quarter of its size gives the same outputs as the full
transformers model. Each step returns data; the CLI prints."""
from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

DEMO_SEQ_LEN = 128  # random tokens of the demo's input


@dataclass(frozen=True)
class OutputComparison:
    """Streamed outputs against those of the full model."""

    outputs: tuple[str, ...]  # names of the full model's outputs, sorted
    same: bool  # the same outputs, bit for bit
    max_diff: float  # largest absolute difference over the outputs both have (inf: none in common)


def demo_budget(model_dir: str | os.PathLike[str]) -> tuple[int, int]:
    """(budget, model bytes): a quarter of the model, or, where a tiny model's largest unit is more than a quarter,
    its minimum with the demo input's activations and the runtime slack (:mod:`hermes.share`)."""
    from hermes.api import forward_activation_bytes, open_model
    from hermes.engine import minimum_budget
    from hermes.share import RUNTIME_SLACK_BYTES

    layout = open_model(model_dir)
    least = minimum_budget(layout.units) + forward_activation_bytes(layout, 1, DEMO_SEQ_LEN) + RUNTIME_SLACK_BYTES
    return max(layout.nbytes // 4, least), layout.nbytes


def streamed_forward(model_dir: str | os.PathLike[str], *, budget: int) -> tuple[dict[str, Any],
                                                                                  dict[str, torch.Tensor]]:
    """One cold forward pass of :data:`DEMO_SEQ_LEN` random tokens streamed under ``budget``: its measurements
    (:func:`hermes.runner.run_forward`) and its output tensors."""
    from safetensors.torch import load_file

    from hermes.runner import run_forward

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "streamed.safetensors"
        # 1 loader with O_DIRECT measured fastest on a 2-core machine (docs/BENCHMARKS.md).
        res = run_forward(model_dir, budget=budget, loaders=1, io="direct", cold=True, random_seq_len=DEMO_SEQ_LEN,
                          save_output=out)
        streamed = load_file(out)
    res["output_path"] = None  # a temporary file, gone now
    return res, streamed


def compare_outputs(streamed: dict[str, torch.Tensor], full: dict[str, torch.Tensor]) -> OutputComparison:
    """Compare output tensors by name (in float64)."""
    diff = max(((streamed[k].double() - full[k].double()).abs().max().item() for k in full if k in streamed),
               default=math.inf)
    return OutputComparison(tuple(sorted(full)), set(streamed) == set(full) and diff == 0.0, diff)


def check_against_full_model(model_dir: str | os.PathLike[str],
                             streamed: dict[str, torch.Tensor]) -> OutputComparison:
    """Compare ``streamed`` (from :func:`streamed_forward`) with the outputs of the full model, loaded whole with
    ``from_pretrained``, on the same input."""
    from hermes.runner import reference_outputs

    return compare_outputs(streamed, reference_outputs(model_dir, random_seq_len=DEMO_SEQ_LEN))
