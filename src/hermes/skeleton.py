"""Model skeleton: the transformers class of a checkpoint, its config, and the model built on the meta device
(no weights), with the small persistent buffers the checkpoint holds copied in."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from hermes.checkpoint import expected_tensors
from hermes.errors import CheckpointError
from hermes.store import Store


def resolve_model_class(config: Any) -> type:
    """The transformers class named by ``config.architectures`` (else the AutoModel for the config)."""
    import transformers

    for name in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, name, None)
        if isinstance(cls, type):
            return cls
    try:
        return transformers.MODEL_MAPPING[type(config)]  # AutoModel's table: config class -> model class
    except KeyError:
        raise CheckpointError(f"transformers {transformers.__version__} has no model class for architectures "
                              f"{getattr(config, 'architectures', None)} / model_type {config.model_type!r}; "
                              "set 'architectures' in config.json to a transformers class name") from None


def model_class_for(config: Any, model_class: type | str | None) -> type:
    """The class to build: ``config.architectures`` by default, or what the user asked for — a transformers
    class or its name (``"BertForMaskedLM"``), or an auto class (``"AutoModelForSequenceClassification"``)."""
    import transformers

    if model_class is None:
        return resolve_model_class(config)
    cls = getattr(transformers, model_class, None) if isinstance(model_class, str) else model_class
    if not isinstance(cls, type):
        raise CheckpointError(f"model_class {model_class!r} is not a transformers class; pass e.g. "
                              "'AutoModelForCausalLM' or 'BertForMaskedLM'")
    # An auto class: the concrete class for this config. transformers has no public accessor for an auto class's
    # table (the MODEL_FOR_*_MAPPING constants are public, but not which class uses which; its pipelines read
    # this attribute too).
    mapping = getattr(cls, "_model_mapping", None)
    if mapping is not None:
        try:
            return mapping[type(config)]
        except KeyError:
            raise CheckpointError(f"{cls.__name__} has no class for model_type {config.model_type!r}; pick "
                                  "another task head") from None
    return cls


def build_skeleton(config: Any, *, model_class: type | None = None) -> torch.nn.Module:
    """The model with parameters on the meta device and real buffers (rotary tables, position ids)."""
    from accelerate import init_empty_weights

    cls = model_class or resolve_model_class(config)
    dtype = getattr(config, "dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    if not isinstance(dtype, torch.dtype):
        dtype = torch.float32
    with init_empty_weights(include_buffers=False), _no_weight_init():
        model = cls._from_config(config, dtype=dtype)
        _quantized_layers(model, config)
    model.eval()
    return model


def _quantized_layers(model: torch.nn.Module, config: Any) -> None:
    """A checkpoint written by ``hermes quantize``: its quantized layers, as transformers' loader builds them."""
    from hermes.quant import is_hermes_quantized, quant_config, replace_linears

    if getattr(config, "quantization_config", None) is None:
        return
    if not is_hermes_quantized(config):
        q = config.quantization_config
        method = q.get("quant_method") if isinstance(q, dict) else getattr(q, "quant_method", "?")
        raise CheckpointError(f"this checkpoint is quantized with {method!r}, which Hermes cannot stream; stream "
                              "the original checkpoint, or quantize it with `hermes quantize`")
    try:
        replace_linears(model, quant_config(config))
    except ValueError as exc:
        raise CheckpointError(str(exc)) from None


def _no_weight_init() -> Any:
    """transformers' own ``no_init_weights`` (what ``from_pretrained`` builds under): random initialization of
    parameters that live on the meta device is wasted work (a tenth of a second for GPT-2, most of opening it)."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # an older transformers
        import contextlib

        return contextlib.nullcontext()
    return no_init_weights()


def load_config(model_dir: str | os.PathLike[str]) -> Any:
    """The transformers config of a checkpoint directory, with clear errors."""
    from transformers import AutoConfig

    d = Path(model_dir)
    if not d.exists():
        raise CheckpointError(f"model directory {d} does not exist; create one with `hermes synth ARCH {d}`")
    if not d.is_dir():
        raise CheckpointError(f"{d} is not a directory; pass a Hugging Face checkpoint directory")
    cfg = d / "config.json"
    if not cfg.is_file():
        raise CheckpointError(f"{d} has no config.json; a Hugging Face checkpoint directory needs one "
                              "(save_pretrained writes it)")
    try:
        raw = json.loads(cfg.read_text())
    except ValueError as exc:
        raise CheckpointError(f"{cfg} is not valid JSON: {exc}") from exc
    if not isinstance(raw, dict) or "model_type" not in raw:
        raise CheckpointError(f"{cfg} has no 'model_type'; it must name a transformers architecture, e.g. 'bert'")
    try:
        return AutoConfig.from_pretrained(str(d), local_files_only=True)
    except (ValueError, KeyError) as exc:
        raise CheckpointError(f"{cfg}: unknown or unsupported architecture model_type={raw['model_type']!r} "
                              f"({str(exc).splitlines()[0]})") from exc


def load_buffers(model: torch.nn.Module, store: Store, mapping: dict[str, str]) -> None:
    """Copy persistent buffers present in the checkpoint into the skeleton (they are small)."""
    for name, (mname, attr, t) in expected_tensors(model).items():
        if isinstance(t, torch.nn.Parameter) or name not in mapping:
            continue
        module = model.get_submodule(mname)
        module._buffers[attr] = store.load_tensor(mapping[name]).to(t.dtype)
