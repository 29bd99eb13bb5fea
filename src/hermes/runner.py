"""One measured forward pass of a checkpoint with PipeLoad (what ``hermes run`` does)."""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import torch

from hermes.api import open_model
from hermes.engine import EngineConfig, PipeLoadEngine
from hermes.inputs import build_inputs, output_tensors
from hermes.memory import current_rss, parse_bytes, peak_rss, reset_peak_rss
from hermes.store import atomic_path, evict_page_cache


def run_forward(model_dir: str | os.PathLike[str], *, budget: str | int, loaders: int = 2,
                prefetch: int | None = None, io: str = "buffered", resident: tuple[str, ...] = (), cold: bool = False,
                save_output: str | os.PathLike[str] | None = None, timeline: bool = False,
                **input_args: Any) -> dict[str, Any]:
    """Open ``model_dir``, run one forward pass under ``budget`` and return its measurements.

    ``input_args`` go to :func:`hermes.inputs.build_inputs` (text, input_ids, image, random_seq_len, batch).
    With ``cold`` the checkpoint files are evicted from the page cache first.
    """
    budget_bytes = parse_bytes(budget)
    t_open = time.perf_counter()
    layout = open_model(model_dir)
    inputs = build_inputs(model_dir, layout.config, **input_args)
    if cold:
        evict_page_cache(layout.store.files)
    baseline = current_rss()  # before the engine claims its weight memory
    reset_peak_rss()
    engine = PipeLoadEngine(layout.model, layout.units, EngineConfig(budget_bytes, loaders=loaders, prefetch=prefetch,
                                                                     io=io, resident=tuple(resident)))
    engine.install()
    open_s = time.perf_counter() - t_open
    try:
        with torch.no_grad():
            output = layout.model(**inputs)
        peak = peak_rss()
        stats = engine.last
        assert stats is not None
        result: dict[str, Any] = {
            "model_dir": str(Path(model_dir)),
            "model_bytes": layout.nbytes,
            "units": len(layout.units),
            "input_shape": {k: list(v.shape) for k, v in inputs.items()},
            "open_s": open_s,
            "io": io,
            "prefetch": prefetch,
            "cold": cold,
            **stats.to_dict(timeline=timeline),
            "min_budget_bytes": engine.min_budget,
            "baseline_rss_bytes": baseline,
            "peak_rss_bytes": peak,
            "peak_rss_above_baseline_bytes": peak - baseline,
            "output_path": None,
        }
        if save_output is not None:
            result["output_path"] = str(save_outputs(output_tensors(output), save_output))
        return result
    finally:
        engine.remove()


def save_outputs(tensors: dict[str, torch.Tensor], path: str | os.PathLike[str]) -> Path:
    """Write output tensors to a safetensors file atomically."""
    from safetensors.torch import save_file

    path = Path(path)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp))
    return path
