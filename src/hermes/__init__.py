"""Hermes: run large Transformer models under a hard memory budget by streaming them layer by layer."""
from __future__ import annotations

import hermes.omp

hermes.omp.ring_spin()  # a ring device: GOMP_SPINCOUNT, before torch loads its OpenMP runtime (it reads it once)

import hermes.lean  # noqa: E402

hermes.lean.install()  # before transformers is imported: keeps torch's compiler and DTensor out (71 MiB)

import hermes.quant.hf  # noqa: E402, F401 - registers quant_method "hermes" with transformers (from_pretrained loads it)
from hermes.api import load, open_model  # noqa: E402
from hermes.errors import BudgetError, CheckpointError, EngineError, HermesError, InputError, LoadError  # noqa: E402

__all__ = [
           "BudgetError",
           "CheckpointError",
           "EngineError",
           "HermesError",
           "InputError",
           "LoadError",
           "load",
           "open_model",
]
__version__ = "0.1.0"
