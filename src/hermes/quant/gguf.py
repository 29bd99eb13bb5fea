"""``hermes convert model.gguf OUT_DIR``: a GGUF file (llama.cpp's format) as a Hermes quantized checkpoint,
tensor by tensor, with its config and tokenizer as transformers reads them from the file.

What each GGUF type becomes (the layers' kernels are torch's; see :mod:`hermes.quant.linear`):

- ``Q4_0`` / ``Q4_1`` / ``Q4_K`` linear layers: 4 bits, group 32, the same integers (exact but for each block's
  scale (and min) rounded to bfloat16, the kernel's: at most 2^-9 of a block's scale; ``Q4_K``'s sub-block scale
  and min are its super-block's fp16 ``d`` / ``dmin`` times its 6-bit factors). ``Q4_K_M`` files (``Q4_K`` and
  ``Q6_K``) convert;
- ``Q8_0`` / ``Q6_K`` linear layers: 8 bits, re-quantized per output channel (torch's int8 kernel has one scale per
  row) from the block values: a second rounding, measured by ``hermes``'s quality checks;
- ``F32`` / ``F16`` / ``BF16`` tensors, and quantized tensors that are not linear layers (the token embedding):
  stored as floating point in the model's dtype (an embedding is read by rows, so its size costs disk, not time).

Other types (``Q5_*``, ``Q2_K``/``Q3_K``/``Q5_K``, ``IQ*``, ...) are refused with this list: convert
the original model, or re-quantize the GGUF with llama.cpp to one of these. Architectures whose GGUF tensors need
more than a reordering of rows to become transformers' (MoE experts stacked by transformers' GGUF loader, Bloom's
fused attention, ...) are refused too: load them with transformers (``from_pretrained(dir, gguf_file=...)``),
``save_pretrained``, then ``hermes quantize``."""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hermes.atomic import atomic_dir
from hermes.checkpoint import expected_tensors
from hermes.errors import InputError
from hermes.quant.convert import layer_parts, quantized_layers, write_tensors
from hermes.quant.hf import FORMAT_VERSION, QUANT_METHOD, linear_dims
from hermes.quant.linear import COMPUTE_DTYPE, int4_tensors, quantize_weight, quantized_shapes
from hermes.skeleton import build_skeleton, model_class_for
from hermes.units import named_part
from hermes.writer import Parts

log = logging.getLogger(__name__)

_ROWS = 4096  # rows converted at a time (bounded memory for an 8B model's 128k-row head); a multiple of 16
_ROW_PROCESSORS = ("TensorProcessor", "LlamaTensorProcessor")  # transformers' GGUF processors that only reorder


def supported_types() -> dict[str, str]:
    return {"F32": "float", "F16": "float", "BF16": "float", "Q4_0": "4-bit", "Q4_1": "4-bit", "Q4_K": "4-bit",
            "Q8_0": "8-bit", "Q6_K": "8-bit"}


def convert_gguf(path: str | os.PathLike[str], out: str | os.PathLike[str], *, overwrite: bool = False,
                 progress: Callable[[int, int], None] | None = None) -> Path:
    """Write the GGUF file ``path`` as a Hermes checkpoint in ``out``; returns ``out``."""
    from gguf import GGMLQuantizationType as Q
    from transformers import AutoConfig
    from transformers.modeling_gguf_pytorch_utils import (
        TENSOR_PROCESSORS,
        TensorProcessor,
        get_gguf_hf_weights_map,
        load_gguf_checkpoint,
    )

    path, out = Path(path), Path(out)
    reader = _reader(path)
    kinds = supported_types()
    bad = sorted({t.tensor_type.name for t in reader.tensors} - set(kinds))
    if bad:
        raise InputError(f"{path.name} holds tensors of type {', '.join(bad)}, which Hermes cannot convert; it "
                         f"converts {', '.join(kinds)}: re-quantize with llama.cpp (e.g. llama-quantize ... Q4_0) "
                         "or convert the original model with `hermes quantize`")
    try:
        parsed = load_gguf_checkpoint(str(path), return_tensors=False)
        config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
    except (ValueError, KeyError, NotImplementedError) as exc:
        raise InputError(f"{path.name}: transformers cannot read this GGUF's architecture ({exc})") from None
    arch = parsed["config"].get("model_type")
    processor = TENSOR_PROCESSORS.get(_gguf_arch(reader), TensorProcessor)(config=parsed["config"])
    if type(processor).__name__ not in _ROW_PROCESSORS:
        raise InputError(f"{path.name}: Hermes does not convert {arch} GGUF files yet (their tensors are reshaped "
                         "on load); load it with transformers' from_pretrained(..., gguf_file=...), save_pretrained, "
                         "then `hermes quantize`")
    if not getattr(config, "architectures", None):  # GGUF files hold language models: the causal LM class
        config.architectures = [model_class_for(config, "AutoModelForCausalLM").__name__]
    floats = {t.tensor_type for t in reader.tensors if t.tensor_type in (Q.F32, Q.F16, Q.BF16)}
    config.dtype = torch.float32 if floats == {Q.F32} and len(floats) == len({t.tensor_type for t in
                                                                                reader.tensors}) else torch.bfloat16
    model = build_skeleton(config)
    names = get_gguf_hf_weights_map(model, processor)
    plan, module_bits = _plan(model, reader, names, processor, parsed, config)
    bits = max(set(module_bits.values()), key=list(module_bits.values()).count) if module_bits else 8
    with atomic_dir(out, overwrite=overwrite) as tmp:
        write_tensors(tmp, plan, progress)
        raw = config.to_dict()
        raw["quantization_config"] = {"quant_method": QUANT_METHOD, "bits": bits, "group_size": 32,
                                      "version": FORMAT_VERSION, "source_dtype": f"gguf:{path.name}",
                                      "modules": sorted(module_bits),
                                      "module_bits": {m: b for m, b in sorted(module_bits.items()) if b != bits}}
        (tmp / "config.json").write_text(json.dumps(raw, indent=2, sort_keys=True))
        _tokenizer(path, tmp)
    return out


def _reader(path: Path) -> Any:
    from gguf import GGUFReader

    if not path.is_file():
        raise InputError(f"{path} does not exist; pass a .gguf file")
    try:
        return GGUFReader(path)
    except (ValueError, OSError, KeyError, IndexError) as exc:
        raise InputError(f"{path} is not a readable GGUF file ({exc})") from None


def _gguf_arch(reader: Any) -> str:
    field = reader.fields["general.architecture"]
    return bytes(field.parts[field.data[0]]).decode()


def _plan(model: torch.nn.Module, reader: Any, names: dict[str, str], processor: Any, parsed: dict[str, Any],
          config: Any) -> tuple[dict[str, tuple[torch.dtype, tuple[int, ...], Parts]], dict[str, int]]:
    from gguf import GGMLQuantizationType as Q

    expected = expected_tensors(model)
    layers = set(quantized_layers(model))
    by_hf = {names[t.name]: t for t in reader.tensors if t.name in names}
    _, head_name = named_part(model, "get_output_embeddings")
    _, emb_name = named_part(model, "get_input_embeddings")
    if head_name and emb_name and f"{head_name}.weight" not in by_hf and f"{emb_name}.weight" in by_hf:
        by_hf[f"{head_name}.weight"] = by_hf[f"{emb_name}.weight"]  # tied: the head is made from the embedding
    plan: dict[str, tuple[torch.dtype, tuple[int, ...], Parts]] = {}
    module_bits: dict[str, int] = {}
    missing = [n for n in expected if n not in by_hf and not n.endswith("inv_freq")]
    if missing:
        raise InputError(f"the GGUF file lacks {len(missing)} tensor(s) the {type(model).__name__} needs, e.g. "
                         f"{missing[:3]}")
    for name, (mname, attr, t) in expected.items():
        if name not in by_hf:
            continue
        g = by_hf[name]
        rows = _row_order(g, processor, names, parsed)
        if mname in layers and attr == "weight" and g.tensor_type in (Q.Q4_0, Q.Q4_1, Q.Q4_K, Q.Q8_0, Q.Q6_K):
            bits = 4 if g.tensor_type in (Q.Q4_0, Q.Q4_1, Q.Q4_K) else 8
            module_bits[mname] = bits
            k, n, _, _ = linear_dims(model.get_submodule(mname))  # type: ignore[misc]
            shapes = quantized_shapes(n, k, bits, 32)
            parts = layer_parts(n, _ROWS, _converter(g, rows, bits), list(shapes))
            for qname, (shape, dt) in shapes.items():
                plan[f"{mname}.{qname}"] = (dt or COMPUTE_DTYPE, shape, parts[qname])
            continue
        plan[name] = (t.dtype, tuple(t.shape), _floats(g, rows, processor, names, parsed, t.dtype, tuple(t.shape)))
    return plan, module_bits


def _row_order(g: Any, processor: Any, names: dict[str, str], parsed: dict[str, Any]) -> np.ndarray | None:
    """How transformers' GGUF processor reorders this tensor's rows (Llama's q/k rotary permutation), found by
    running it on the row numbers; ``None`` when it leaves them in place."""
    if len(g.shape) < 2:
        return None
    n = int(g.shape[-1])
    idx = np.arange(n, dtype=np.float64)[:, None]
    res = processor.process(weights=idx, name=g.name, tensor_key_mapping=names, parsed_parameters=parsed)
    order = np.asarray(res.weights)
    if order.shape != (n, 1) or sorted(order[:, 0].astype(np.int64).tolist()) != list(range(n)):
        raise InputError(f"GGUF tensor {g.name}: transformers reshapes it on load; Hermes cannot convert it")
    order = order[:, 0].astype(np.int64)
    return None if np.array_equal(order, np.arange(n)) else order


def _source_rows(g: Any, rows: np.ndarray | None, a: int, b: int) -> np.ndarray:
    data = np.asarray(g.data)
    return data[a:b] if rows is None else data[rows[a:b]]


def _floats(g: Any, rows: np.ndarray | None, processor: Any, names: dict[str, str], parsed: dict[str, Any],
            dtype: torch.dtype, shape: tuple[int, ...]) -> Parts:
    from gguf.quants import dequantize

    def parts() -> Iterator[torch.Tensor]:
        if len(shape) < 2:
            w = dequantize(np.asarray(g.data), g.tensor_type)
            res = processor.process(weights=w, name=g.name, tensor_key_mapping=names, parsed_parameters=parsed)
            yield torch.from_numpy(np.array(res.weights)).reshape(shape).to(dtype)
            return
        for a in range(0, shape[0], _ROWS):
            b = min(a + _ROWS, shape[0])
            yield torch.from_numpy(dequantize(_source_rows(g, rows, a, b), g.tensor_type).copy()).to(dtype)

    return parts


def _converter(g: Any, rows: np.ndarray | None, bits: int) -> Callable[[int, int], dict[str, torch.Tensor]]:
    """Rows ``[a, b)`` of a quantized GGUF tensor -> their tensors in Hermes's layout (slices of ``_ROWS`` rows,
    a multiple of the 4-bit kernel's block: only the last one is padded)."""
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import dequantize

    def convert(a: int, b: int) -> dict[str, torch.Tensor]:
        raw = _source_rows(g, rows, a, b)
        if bits == 8:
            return quantize_weight(torch.from_numpy(dequantize(raw, g.tensor_type).copy()), 8, 32)
        if g.tensor_type == Q.Q4_K:
            return _q4k_blocks(raw)
        return _int4_blocks(raw, g.tensor_type == Q.Q4_1)

    return convert


def _int4_blocks(raw: np.ndarray, with_min: bool) -> dict[str, torch.Tensor]:
    """Q4_0 (fp16 d, 16 bytes: value i low nibble, value i+16 high) or Q4_1 (fp16 d, fp16 m, 16 bytes) blocks of
    32 -> the integers, scales and zeros of :func:`int4_tensors` (Q4_0: w = (q - 8) d; Q4_1: w = q d + m)."""
    size = 20 if with_min else 18
    blocks = raw.reshape(raw.shape[0], -1, size)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    qs = blocks[..., size - 16:]
    q = np.concatenate([qs & 0xF, qs >> 4], axis=-1).reshape(raw.shape[0], -1)
    scale = torch.from_numpy(d)
    if with_min:
        m = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
        zero = torch.from_numpy(m) + 8 * scale
    else:
        zero = torch.zeros_like(scale)
    return int4_tensors(torch.from_numpy(q.astype(np.int32)), scale, zero)


def _q4k_blocks(raw: np.ndarray) -> dict[str, torch.Tensor]:
    """Q4_K super-blocks of 256 (fp16 d, fp16 dmin, 12 bytes of 6-bit scale and min factors for 8 sub-blocks of 32,
    128 bytes of nibbles: sub-block 2c the low nibbles of bytes 32c..32c+31, 2c+1 their high nibbles) -> the
    integers, scales and zeros of :func:`int4_tensors` (sub-block j: w = q d sc_j - dmin m_j)."""
    from gguf.quants import Q4_K

    rows = raw.shape[0]
    blocks = raw.reshape(rows, -1, 144)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    dmin = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
    sc, mn = Q4_K.get_scale_min(blocks[..., 4:16].reshape(-1, 12))
    qs = blocks[..., 16:].reshape(rows, -1, 4, 1, 32) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 1, 2, 1)
    q = (qs & 0x0F).reshape(rows, -1)
    scale = torch.from_numpy(d[..., None] * sc.reshape(rows, -1, 8).astype(np.float32)).reshape(rows, -1)
    low = torch.from_numpy(dmin[..., None] * mn.reshape(rows, -1, 8).astype(np.float32)).reshape(rows, -1)
    return int4_tensors(torch.from_numpy(q.astype(np.int32)), scale, 8 * scale - low)


def _tokenizer(path: Path, out: Path) -> None:
    """The GGUF's tokenizer, as transformers converts it (text in, text out); a warning when it cannot."""
    from transformers import AutoTokenizer

    try:
        AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True).save_pretrained(
            out)
    except (ValueError, KeyError, OSError, TypeError, NotImplementedError) as exc:
        log.warning("%s: no tokenizer converted (%s); pass token ids, or add a tokenizer to the checkpoint",
                    path.name, str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
