"""Hermes: run large Transformer models under a hard memory budget by streaming them layer by layer."""
from __future__ import annotations

import hermes.quant.hf  # noqa: F401 - registers quant_method "hermes" with transformers (from_pretrained loads it)
from hermes.api import load, open_model
from hermes.errors import BudgetError, CheckpointError, EngineError, HermesError, InputError, LoadError

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
