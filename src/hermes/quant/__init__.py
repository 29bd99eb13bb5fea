"""Weight-only 8- and 4-bit quantized checkpoints: written by ``hermes quantize`` (or converted from GGUF), loaded
by transformers (``quant_method: "hermes"``) and streamed by Hermes as stored."""
from __future__ import annotations

from hermes.quant.hf import HermesQuantConfig, is_hermes_quantized, quant_config, replace_linears
from hermes.quant.linear import QuantLinear, dequantize, quantize_weight

__all__ = ["HermesQuantConfig", "QuantLinear", "dequantize", "is_hermes_quantized", "quant_config",
           "quantize_weight", "replace_linears"]
