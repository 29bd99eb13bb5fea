"""Model skeleton (no weights) and its execution units: what is loaded and freed as one piece.

A unit is either a repeated block (a module whose class is named in the model's ``_no_split_modules``) or a
leftover top-level module holding parameters (embeddings, final norm, head). Each unit knows which
checkpoint tensors fill which parameter slots, and the byte layout of its load buffer.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hermes.errors import CheckpointError
from hermes.store import PAGE, Store, TensorInfo

log = logging.getLogger(__name__)

# Names older checkpoints use for LayerNorm parameters (transformers renames them the same way).
_LEGACY_SUFFIXES = {".gamma": ".weight", ".beta": ".bias"}


@dataclass(frozen=True)
class Slot:
    """One parameter (or buffer) of a unit, and where its bytes lie in the unit's load buffer."""

    module: str  # dotted name of the module owning the tensor
    attr: str  # attribute name on that module ("weight", "bias", ...)
    key: str  # checkpoint tensor name
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # byte offset inside the unit's buffer
    nbytes: int


@dataclass(frozen=True)
class Segment:
    """A contiguous byte range of one file, read with one call into the unit's buffer."""

    path: Path
    start: int  # absolute file offset of the first wanted byte
    end: int  # exclusive
    buf_offset: int  # where ``start`` lands in the buffer (page aligned + lead)

    @property
    def read_start(self) -> int:  # page-aligned file offset (O_DIRECT reads start here)
        return self.start - self.start % PAGE

    @property
    def read_buf_offset(self) -> int:
        return self.buf_offset - self.start % PAGE


@dataclass(frozen=True)
class Unit:
    """An execution unit."""

    index: int  # position in execution order
    name: str  # dotted module name, e.g. "encoder.layer.3"
    kind: str  # "block" or "leftover"
    slots: tuple[Slot, ...]
    segments: tuple[Segment, ...]
    nbytes: int  # bytes of tensor data
    buffer_bytes: int  # size of the load buffer (page multiples, O_DIRECT slack included)
    shares: tuple[str, ...] = field(default=())  # units whose tensors this one reads again (tied weights)


def resolve_model_class(config: Any) -> type:
    """The transformers class named by ``config.architectures`` (else the AutoModel for the config)."""
    import transformers

    for name in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, name, None)
        if isinstance(cls, type):
            return cls
    try:
        return transformers.AutoModel._model_mapping[type(config)]
    except KeyError:
        raise CheckpointError(f"transformers {transformers.__version__} has no model class for architectures "
                              f"{getattr(config, 'architectures', None)} / model_type {config.model_type!r}; "
                              "set 'architectures' in config.json to a transformers class name") from None


def build_skeleton(config: Any, *, model_class: type | None = None) -> torch.nn.Module:
    """The model with parameters on the meta device and real buffers (rotary tables, position ids)."""
    from accelerate import init_empty_weights

    cls = model_class or resolve_model_class(config)
    dtype = getattr(config, "dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    if not isinstance(dtype, torch.dtype):
        dtype = torch.float32
    with init_empty_weights(include_buffers=False):
        model = cls._from_config(config, dtype=dtype)
    model.eval()
    return model


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


def _expected_tensors(model: torch.nn.Module) -> dict[str, tuple[str, str, torch.Tensor]]:
    """name -> (module name, attribute, meta/real tensor) for every parameter and persistent buffer."""
    out: dict[str, tuple[str, str, torch.Tensor]] = {}
    for mname, module in model.named_modules(remove_duplicate=False):
        for pname, p in module._parameters.items():
            if p is not None:
                out[f"{mname}.{pname}" if mname else pname] = (mname, pname, p)
        for bname, b in module._buffers.items():
            if b is not None and bname not in module._non_persistent_buffers_set:
                out[f"{mname}.{bname}" if mname else bname] = (mname, bname, b)
    return out


def map_checkpoint_keys(model: torch.nn.Module, store: Store) -> dict[str, str]:
    """Map every model tensor name to the checkpoint key holding its bytes.

    Handles the base-model prefix (``bert.`` present or absent), legacy ``gamma``/``beta`` names and tied
    weights (``lm_head.weight`` read from ``transformer.wte.weight``).

    Raises:
        CheckpointError: tensors missing from the checkpoint, unexpected extra tensors, or wrong shapes.
    """
    expected = _expected_tensors(model)
    ckpt = {_modern_name(k): k for k in store}
    prefix = getattr(model, "base_model_prefix", "") or ""
    candidates = [lambda n: n]
    if prefix:
        candidates += [lambda n: f"{prefix}.{n}", lambda n: n[len(prefix) + 1:] if n.startswith(prefix + ".") else n]
    best = max(candidates, key=lambda f: sum(f(n) in ckpt for n in expected))
    tied = dict(getattr(model, "all_tied_weights_keys", None) or {})
    mapping: dict[str, str] = {}
    missing = []
    for name in expected:
        key = ckpt.get(best(name))
        if key is None and name in tied:
            key = ckpt.get(best(tied[name]))
        if key is None:
            missing.append(name)
        else:
            mapping[name] = key
    buffers_ok = {n for n, (m, a, t) in expected.items() if not isinstance(t, torch.nn.Parameter)}
    missing = [n for n in missing if n not in buffers_ok]  # buffers keep their computed values
    all_buffers = {best(f"{m}.{b}" if m else b) for m, mod in model.named_modules() for b in mod._buffers}
    used = set(mapping.values())
    extra = [k for k in store if k not in used and _modern_name(k) not in all_buffers]
    d = store.model_dir
    if missing:
        raise CheckpointError(f"{d}: checkpoint lacks {len(missing)} tensor(s) the model needs, e.g. "
                              f"{missing[:3]}; the weights do not match config.json "
                              f"({type(model).__name__}) — re-create the checkpoint or fix config.json")
    if extra:
        raise CheckpointError(f"{d}: checkpoint has {len(extra)} tensor(s) that {type(model).__name__} does not "
                              f"use, e.g. {extra[:3]}; the weights do not match config.json — set "
                              "'architectures' to the class these weights belong to")
    for name, key in mapping.items():
        info = store[key]
        want = tuple(expected[name][2].shape)
        if info.shape != want:
            raise CheckpointError(f"{info.path}: tensor {key!r} has shape {list(info.shape)} but the model "
                                  f"built from config.json expects {list(want)}; the weights do not match the "
                                  "config — re-create the checkpoint or fix config.json")
    return mapping


def _modern_name(key: str) -> str:
    for old, new in _LEGACY_SUFFIXES.items():
        if key.endswith(old):
            return key[: -len(old)] + new
    return key


def find_blocks(model: torch.nn.Module) -> list[str]:
    """Dotted names of the outermost modules whose class is in ``_no_split_modules``."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    blocks: list[str] = []
    for mname, module in model.named_modules():
        if mname and type(module).__name__ in names and not any(mname.startswith(b + ".") for b in blocks):
            blocks.append(mname)
    return blocks


def _unit_of(module_name: str, blocks: list[str], model: torch.nn.Module) -> tuple[str, str]:
    for b in blocks:
        if module_name == b or module_name.startswith(b + "."):
            return b, "block"
    # Leftover: the outermost ancestor that contains no block.
    parts = module_name.split(".")
    for i in range(1, len(parts) + 1):
        anc = ".".join(parts[:i])
        if not any(b == anc or b.startswith(anc + ".") for b in blocks):
            return anc, "leftover"
    raise CheckpointError(f"parameter owner {module_name or type(model).__name__!r} is a container of blocks; "
                          "hermes cannot stream parameters held directly by such a module")


def build_units(model: torch.nn.Module, store: Store, mapping: dict[str, str]) -> list[Unit]:
    """Execution units in registration order (the order in which Hugging Face forwards call them)."""
    expected = _expected_tensors(model)
    blocks = find_blocks(model)
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    grouped: dict[str, tuple[str, list[tuple[str, str, TensorInfo]]]] = {}
    for name, (mname, attr, t) in expected.items():
        if not isinstance(t, torch.nn.Parameter):
            continue  # buffers live in the skeleton (loaded once, see load_buffers)
        unit_name, kind = _unit_of(mname, blocks, model)
        grouped.setdefault(unit_name, (kind, []))[1].append((mname, attr, store[mapping[name]]))
    readers: dict[str, set[str]] = {}
    for u, (_, items) in grouped.items():
        for _, _, info in items:
            readers.setdefault(info.name, set()).add(u)
    units = []
    for index, unit_name in enumerate(sorted(grouped, key=lambda n: order[n])):
        kind, items = grouped[unit_name]
        units.append(_layout(index, unit_name, kind, items, readers))
    return units


def _layout(index: int, name: str, kind: str, items: list[tuple[str, str, TensorInfo]],
            readers: dict[str, set[str]]) -> Unit:
    # Coalesce the unit's distinct tensors into contiguous file ranges.
    infos = sorted({i.name: i for _, _, i in items}.values(), key=lambda i: (str(i.path), i.start))
    ranges: list[list[Any]] = []
    for info in infos:
        if ranges and ranges[-1][0] == info.path and info.start - ranges[-1][2] <= PAGE:
            ranges[-1][2] = max(ranges[-1][2], info.end)
        else:
            ranges.append([info.path, info.start, info.end])
    segments = []
    pos = 0
    for path, start, end in ranges:
        lead = start % PAGE
        segments.append(Segment(path, start, end, pos + lead))
        pos += _round_up(lead + end - start, PAGE)
    slots = []
    for mname, attr, info in items:
        seg = next(s for s in segments if s.path == info.path and s.start <= info.start and info.end <= s.end)
        slots.append(Slot(mname, attr, info.name, info.dtype, info.shape,
                          seg.buf_offset + info.start - seg.start, info.nbytes))
    shares = tuple(sorted({u for _, _, i in items for u in readers[i.name] if u != name}))
    return Unit(index, name, kind, tuple(slots), tuple(segments), sum(i.nbytes for i in infos), max(pos, PAGE),
                shares)


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def load_buffers(model: torch.nn.Module, store: Store, mapping: dict[str, str]) -> None:
    """Copy persistent buffers present in the checkpoint into the skeleton (they are small)."""
    for name, (mname, attr, t) in _expected_tensors(model).items():
        if isinstance(t, torch.nn.Parameter) or name not in mapping:
            continue
        module = model.get_submodule(mname)
        module._buffers[attr] = store.load_tensor(mapping[name]).to(t.dtype)
