"""Hermes' quantized checkpoints as transformers loads them: a quantization config (``quant_method: "hermes"`` in
``config.json``) and a quantizer, both registered with transformers' public registry, so that after
``import hermes`` ``AutoModel*.from_pretrained(quantized_dir)`` builds the model with :class:`QuantLinear` layers
and loads the packed tensors into them as stored. That model, held whole, is what a streamed quantized model is
checked against, bit for bit."""
from __future__ import annotations

from typing import Any

import torch
from transformers.quantizers.auto import register_quantization_config, register_quantizer
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from hermes.quant.experts import register, replace_experts
from hermes.quant.linear import DEFAULT_GROUP_SIZE, QuantLinear, check_shape

QUANT_METHOD = "hermes"
register()  # the quantized experts' implementation, for models loaded by transformers
PAD_PATTERN = r"\.hermes_pad$"
FORMAT_VERSION = 1


@register_quantization_config(QUANT_METHOD)
class HermesQuantConfig(QuantizationConfigMixin):
    """``bits`` (4 or 8), ``group_size`` (4 bits), ``modules``: the dotted names of the layers stored
    quantized (every other tensor is stored as it was), ``module_bits``: layers stored at another width than
    ``bits`` (a GGUF file mixes them: llama.cpp's Q4_0 keeps its output layer at 6 bits, which becomes 8), and
    ``experts``: the mixture-of-experts modules whose experts are stored quantized (``hermes.quant.experts``)."""

    def __init__(self, bits: int = 4, group_size: int = DEFAULT_GROUP_SIZE, modules: list[str] | None = None,
                 version: int = FORMAT_VERSION, source_dtype: str | None = None,
                 module_bits: dict[str, int] | None = None, experts: list[str] | None = None,
                 **kwargs: Any) -> None:
        self.quant_method = QUANT_METHOD
        self.bits, self.group_size = int(bits), int(group_size)
        self.modules = list(modules or [])
        self.experts = list(experts or [])
        self.module_bits = {str(k): int(v) for k, v in (module_bits or {}).items()}
        self.version = int(version)
        self.source_dtype = source_dtype
        if self.version > FORMAT_VERSION:
            raise ValueError(f"this checkpoint's hermes quantization format is version {self.version}; this hermes "
                             f"reads up to version {FORMAT_VERSION}: upgrade hermes")
        for b in {self.bits, *self.module_bits.values()}:
            check_shape(self.group_size, b, self.group_size)

    def bits_of(self, name: str) -> int:
        return self.module_bits.get(name, self.bits)


def is_hermes_quantized(config: Any) -> bool:
    q = getattr(config, "quantization_config", None)
    method = q.get("quant_method") if isinstance(q, dict) else getattr(q, "quant_method", None)
    return method == QUANT_METHOD


def quant_config(config: Any) -> HermesQuantConfig:
    q = config.quantization_config
    return q if isinstance(q, HermesQuantConfig) else HermesQuantConfig(**q)


def replace_linears(model: torch.nn.Module, qc: HermesQuantConfig) -> None:
    """Swap each layer named in ``qc.modules`` for a :class:`QuantLinear` on the same device (meta, while a
    model is built empty), keeping its bias, and give the experts modules of ``qc.experts`` their quantized
    tensors; raises a ``ValueError`` naming a layer that is missing or not linear."""
    for name in qc.modules:
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"the quantization config names layer {name!r}, which this model does not have; "
                             "the checkpoint was quantized for another architecture or is damaged") from None
        dims = linear_dims(old)
        if dims is None:
            raise ValueError(f"layer {name!r} is a {type(old).__name__}, not a linear layer; cannot load it "
                             "quantized")
        k, n, bias, dtype = dims
        new = QuantLinear(k, n, bits=qc.bits_of(name), group_size=qc.group_size, bias=bias, dtype=dtype,
                          device=old.weight.device)
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, new)
    replace_experts(model, qc.experts, qc.bits, qc.group_size)
    _untie(model, set(qc.modules))
    ignored = set(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ())
    model._keys_to_ignore_on_load_unexpected = ignored | {PAD_PATTERN}  # the alignment padding between tensors


def _untie(model: torch.nn.Module, layers: set[str]) -> None:
    """A quantized head is no longer the input embedding's weight: drop it from transformers' tying tables (the
    checkpoint stores it on its own; ``tie_word_embeddings`` stays as it was, as some models read it)."""
    for prefix, module in model.named_modules():
        tied = getattr(module, "all_tied_weights_keys", None)
        if not isinstance(tied, dict):
            continue
        for target in list(tied):
            full = f"{prefix}.{target}" if prefix else target
            if full.rpartition(".")[0] in layers:
                del tied[target]


def linear_dims(module: torch.nn.Module) -> tuple[int, int, bool, torch.dtype] | None:
    """(inputs, outputs, has bias, dtype) of an ``nn.Linear`` or of transformers' GPT-2 style ``Conv1D``
    (its weight is stored ``[in, out]``); ``None`` for anything else."""
    from transformers.pytorch_utils import Conv1D

    if isinstance(module, torch.nn.Linear):
        return module.in_features, module.out_features, module.bias is not None, module.weight.dtype
    if isinstance(module, Conv1D):
        k, n = module.weight.shape
        return k, n, module.bias is not None, module.weight.dtype
    return None


@register_quantizer(QUANT_METHOD)
class HermesHfQuantizer(HfQuantizer):
    """Loads checkpoints written by ``hermes quantize`` (it does not quantize on load: run that command)."""

    requires_calibration = True  # pre-quantized checkpoints only

    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        device_map = kwargs.get("device_map")
        if isinstance(device_map, dict) and set(map(str, device_map.values())) - {"cpu"}:
            raise ValueError("hermes-quantized layers run on the CPU only; load them without a device_map")

    def param_needs_quantization(self, model: Any, param_name: str, **kwargs: Any) -> bool:
        return False

    def _process_model_before_weight_loading(self, model: Any, **kwargs: Any) -> None:
        qc = self.quantization_config
        replace_linears(model, qc if isinstance(qc, HermesQuantConfig) else HermesQuantConfig(**qc.to_dict()))

    def _process_model_after_weight_loading(self, model: Any, **kwargs: Any) -> Any:
        return model

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False
