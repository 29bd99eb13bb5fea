"""``hermes quantize``: write a weight-only quantized copy of a checkpoint, tensor by tensor (a layer is read,
quantized and written in slices of its rows, so a model larger than RAM can be quantized on the device).

Every linear layer of the model is quantized (the blocks' and the LM head), and every expert's projections
(``hermes.quant.experts``), except the mixture-of-experts routers and single-output gates (kept as stored, as
llama.cpp does: a rounded router picks other experts). Embeddings,
norms and biases are stored as they were. A head tied to the input embedding is untied (the embedding stays as
stored, the head is quantized and stored on its own; ``tie_word_embeddings`` is left as it is, as some models read
it, e.g. T5 scales its decoder's output by it)."""
from __future__ import annotations

import functools
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from hermes.atomic import atomic_dir
from hermes.checkpoint import expected_tensors, map_checkpoint_keys
from hermes.errors import InputError
from hermes.quant.experts import check_experts, projections
from hermes.quant.hf import FORMAT_VERSION, QUANT_METHOD, linear_dims
from hermes.quant.linear import (
    COMPUTE_DTYPE,
    DEFAULT_GROUP_SIZE,
    INT4_ROWS,
    check_shape,
    quantize_weight,
    quantized_shapes,
)
from hermes.skeleton import build_skeleton, load_config
from hermes.store import Store
from hermes.units import find_experts
from hermes.writer import Parts, write_shards

log = logging.getLogger(__name__)

SHARD_BYTES = 2 * 1024**3
TENSOR_ALIGN = 64  # bytes: every tensor starts aligned in the file (torch's int8 kernel needs 16)
_SLICE_BYTES = 64 * 1024**2  # float32 bytes of one slice of rows quantized at a time
_COPIED = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "vocab.json",
           "merges.txt", "tokenizer.model", "generation_config.json", "chat_template.jinja", "added_tokens.json")


def quantized_layers(model: torch.nn.Module) -> list[str]:
    """The layers ``hermes quantize`` stores quantized: every ``nn.Linear`` / GPT-2 ``Conv1D`` but routers
    (a ``gate``/``router`` beside an ``experts`` module) and single-output gates."""
    out = []
    for name, module in model.named_modules():
        dims = linear_dims(module)
        if dims is None or dims[1] == 1:
            continue
        parent, _, attr = name.rpartition(".")
        siblings = dict(model.get_submodule(parent).named_children()) if parent else {}
        if attr in ("gate", "router") and "experts" in siblings:
            continue
        out.append(name)
    return out


def quantize_checkpoint(src: str | os.PathLike[str], out: str | os.PathLike[str], *, bits: int,
                        group_size: int = DEFAULT_GROUP_SIZE, overwrite: bool = False,
                        progress: Callable[[int, int], None] | None = None) -> Path:
    """Write ``src`` quantized to ``bits`` into ``out``; returns ``out``.

    Raises:
        InputError: ``src`` already quantized, settings that cannot quantize one of its layers, ``out`` unusable.
        CheckpointError: ``src`` is not a readable checkpoint.
    """
    config = load_config(src)
    if getattr(config, "quantization_config", None) is not None:
        method = _method(config.quantization_config)
        raise InputError(f"{src} is already quantized ({method}); quantize the original 16/32-bit checkpoint")
    model = build_skeleton(config)
    store = Store(src)
    mapping = map_checkpoint_keys(model, store)
    layers = quantized_layers(model)
    experts = [m for m in find_experts(model) if projections(model.get_submodule(m))]
    dtype = _model_dtype(model)
    for name in layers:
        try:
            check_shape(linear_dims(model.get_submodule(name))[0], bits, group_size)  # type: ignore[index]
        except ValueError as exc:
            raise InputError(f"cannot quantize layer {name}: {exc}") from None
    for name in experts:
        try:
            check_experts(name, model.get_submodule(name), bits, group_size)
        except ValueError as exc:
            raise InputError(f"cannot quantize the experts of {exc}") from None
    if Path(out).resolve() == Path(src).resolve():
        raise InputError(f"the output directory {out} is the checkpoint itself; pick a new directory")
    out_dir = Path(out)
    plan = _plan(model, mapping, store, set(layers), bits, group_size)
    for name in experts:
        plan.update(_experts_plan(model, name, mapping, store, bits, group_size))
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        write_tensors(tmp, plan, progress)
        for extra in _COPIED:
            if (Path(src) / extra).is_file():
                shutil.copyfile(Path(src) / extra, tmp / extra)
        (tmp / "config.json").write_text(_quantized_config(config, layers, experts, bits, group_size, dtype))
    log.info("wrote %d-bit %s (%d layers, %d experts modules quantized) to %s", bits, src, len(layers), len(experts),
             out_dir)
    return out_dir


_Produce = Callable[[Store], Iterator[torch.Tensor]]


def write_tensors(out: Path, plan: dict[str, tuple[torch.dtype, tuple[int, ...], Parts]],
                  progress: Callable[[int, int], None] | None) -> None:
    """A quantized checkpoint's shards, index and checksums into ``out`` (every tensor 64-byte aligned)."""
    write_shards(out, plan, shard_bytes=SHARD_BYTES, metadata={"format": "pt", "hermes": "quantized"},
                 tensor_align=TENSOR_ALIGN, progress=progress)


def layer_parts(n: int, step: int, convert: Callable[[int, int], dict[str, torch.Tensor]],
                names: list[str]) -> dict[str, Parts]:
    """Producers of a quantized layer's tensors ``names``, from ``convert(a, b)``: the tensors of its rows
    ``[a, b)``, made ``step`` rows at a time (a 4-bit layer's scales ``[K/group, N, 2]``: N is dim 1)."""
    return _kept_parts([(a, min(a + step, n)) for a in range(0, n, step)], lambda ab: convert(*ab), names,
                       lambda name: 1 if name == "weight_scale_zero" else 0)


def _kept_parts(slices: list[Any], convert: Callable[[Any], dict[str, torch.Tensor]], names: list[str],
                dim: Callable[[str], int]) -> dict[str, Parts]:
    """Producers of tensors ``names`` made slice by slice (``convert(slice)``: every tensor's piece of it), the
    pieces of tensor ``q`` joined along ``dim(q)``. Each slice is converted once: the weight's producer keeps the
    slices' scales (small) for the scales' producers, which run right after it (tensors are written in name
    order: ``NAME.weight``, then ``NAME.weight_scale[_zero]``); run on its own, one converts again."""
    kept: dict[str, list[torch.Tensor]] = {}

    def weight() -> Iterator[torch.Tensor]:
        kept.clear()
        scales: dict[str, list[torch.Tensor]] = {}
        for piece in slices:
            part = convert(piece)
            for k, v in part.items():
                if k != "weight":
                    scales.setdefault(k, []).append(v)
            yield part["weight"]
        kept.update(scales)  # only once every slice is made

    def scales(name: str) -> Iterator[torch.Tensor]:
        yield torch.cat(kept.pop(name, None) or [convert(piece)[name] for piece in slices], dim=dim(name))

    return {q: weight if q == "weight" else functools.partial(scales, q) for q in names}


def _plan(model: torch.nn.Module, mapping: dict[str, str], store: Store, layers: set[str], bits: int,
          group_size: int) -> dict[str, tuple[torch.dtype, tuple[int, ...], Parts]]:
    """name -> (dtype, shape, producer of its row slices) of every tensor written."""
    plan: dict[str, tuple[torch.dtype, tuple[int, ...], Parts]] = {}
    written: set[str] = set()
    for name, (mname, attr, t) in expected_tensors(model).items():
        if name not in mapping:
            continue
        key = mapping[name]
        if mname in layers and attr == "weight":
            k, n, _, _ = linear_dims(model.get_submodule(mname))  # type: ignore[misc]
            shapes = quantized_shapes(n, k, bits, group_size)
            parts = layer_parts(n, *_quantizer(store, key, n, k, model.get_submodule(mname), bits, group_size),
                                list(shapes))
            for qname, (shape, dt) in shapes.items():
                plan[f"{mname}.{qname}"] = (dt or COMPUTE_DTYPE, shape, parts[qname])
            continue
        if key in written and mname not in layers:
            continue  # a tied copy: transformers ties it again on load
        written.add(key)
        plan[name] = (t.dtype, tuple(t.shape), functools.partial(_as_stored, store, key, t.dtype))
    return plan


def _experts_plan(model: torch.nn.Module, mname: str, mapping: dict[str, str], store: Store, bits: int,
                  group_size: int) -> dict[str, tuple[torch.dtype, tuple[int, ...], Parts]]:
    """The quantized tensors of an experts module's projections, made expert by expert."""
    module = model.get_submodule(mname)
    experts, transposed = int(module.num_experts), bool(getattr(module, "is_transposed", False))
    plan: dict[str, tuple[torch.dtype, tuple[int, ...], Parts]] = {}
    for attr, (n, k) in projections(module).items():
        key = mapping[f"{mname}.{attr}"]

        def convert(e: int, key: str = key) -> dict[str, torch.Tensor]:  # expert e's tensors, stacked
            w = store.load_tensor(key, (e, e + 1))[0]
            return {q: t[None] for q, t in quantize_weight(w.t() if transposed else w, bits, group_size).items()}

        shapes = quantized_shapes(n, k, bits, group_size)
        parts = _kept_parts(list(range(experts)), convert, list(shapes), lambda name: 0)
        for q, (shape, dt) in shapes.items():
            plan[attr if q == "weight" else attr + q.removeprefix("weight")] = (dt or COMPUTE_DTYPE,
                                                                                 (experts, *shape), parts[q])
    return {f"{mname}.{name}": v for name, v in plan.items()}


def _as_stored(store: Store, key: str, dtype: torch.dtype) -> Iterator[torch.Tensor]:
    info = store[key]
    if not info.shape or info.shape[0] == 0:
        yield store.load_tensor(key).to(dtype)
        return
    per = max(info.nbytes // info.shape[0], 1)
    step = max(_SLICE_BYTES // per, 1)
    for a in range(0, info.shape[0], step):
        yield store.load_tensor(key, (a, min(a + step, info.shape[0]))).to(dtype)


def _quantizer(store: Store, key: str, n: int, k: int, module: torch.nn.Module, bits: int,
               group_size: int) -> tuple[int, Callable[[int, int], dict[str, torch.Tensor]]]:
    """(rows per slice, rows [a, b) -> their quantized tensors) of one layer's stored weight."""
    if not isinstance(module, torch.nn.Linear):  # GPT-2's Conv1D stores [in, out]: read whole (GPT-2 sizes)
        return n, lambda a, b: quantize_weight(store.load_tensor(key).t(), bits, group_size)
    step = max(_SLICE_BYTES // (4 * k) // INT4_ROWS * INT4_ROWS, INT4_ROWS)  # 4 bits: pads the last slice only
    return step, lambda a, b: quantize_weight(store.load_tensor(key, (a, b)), bits, group_size)


def _quantized_config(config: Any, layers: list[str], experts: list[str], bits: int, group_size: int,
                      dtype: torch.dtype) -> str:
    raw = config.to_dict()
    raw["quantization_config"] = {"quant_method": QUANT_METHOD, "bits": bits, "group_size": group_size,
                                  "version": FORMAT_VERSION, "source_dtype": str(dtype).removeprefix("torch."),
                                  "modules": layers, "experts": experts}
    return json.dumps(raw, indent=2, sort_keys=True)


def _model_dtype(model: torch.nn.Module) -> torch.dtype:
    floats = [p.dtype for p in model.parameters() if p.dtype.is_floating_point]
    return max(set(floats), key=floats.count) if floats else torch.float32


def _method(q: Any) -> str:
    return str(q.get("quant_method") if isinstance(q, dict) else getattr(q, "quant_method", "unknown"))
