"""Execution units of a model skeleton (``hermes.skeleton``): what is loaded and freed as one piece.

A unit is either a repeated block (a module whose class is named in the model's ``_no_split_modules``) or a
leftover top-level module holding parameters (embeddings, final norm, head). Each unit knows which
checkpoint tensors fill which parameter slots, and the byte layout of its load buffer.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hermes.checkpoint import expected_tensors
from hermes.sources import read_by_attribute
from hermes.store import PAGE, Store, TensorInfo

log = logging.getLogger(__name__)


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
    direct: bool = True  # False: a piece of a strided slice, read (buffered) to exactly ``buf_offset``

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
    kind: str  # "block", "leftover", "pinned" (no forward of its own: always held), "expert" (read when routed),
    # "gather" (a token embedding: only the rows of the tokens embedded are read, unless resident) or "chunk"
    # (a slice of an LM head's vocabulary rows, streamed like a block)
    slots: tuple[Slot, ...]
    segments: tuple[Segment, ...]
    nbytes: int  # bytes of tensor data
    buffer_bytes: int  # size of the load buffer (page multiples, O_DIRECT slack included)
    shares: tuple[str, ...] = field(default=())  # units whose tensors this one reads again (tied weights)
    rows: tuple[int, int] | None = None  # a chunk: the rows [start, end) of its module's weight (and bias)

    @property
    def called(self) -> bool:
        """Loaded when its forward is called (blocks, leftovers and head chunks; not pinned units, experts or
        gathered embeddings, which are read another way)."""
        return self.kind in ("block", "leftover", "chunk")

    @property
    def module(self) -> str:
        """Dotted name of the module this unit is (or is a part of, for experts and chunks)."""
        return self.name.partition("#")[0]



def find_blocks(model: torch.nn.Module) -> list[str]:
    """Dotted names of the blocks: the outermost modules whose class is in ``_no_split_modules``, and the
    entries of repeated-layer lists (``nn.ModuleList`` of modules holding parameters) outside those, so that
    every encoder streams per layer even where a model declares no block class (DistilBERT, DeBERTa, ...)."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    declared: list[str] = []
    for mname, module in model.named_modules():
        if mname and type(module).__name__ in names and not _inside_any(mname, declared):
            declared.append(mname)
    blocks = list(declared)
    for mname, module in model.named_modules():
        if not isinstance(module, torch.nn.ModuleList) or len(module) < 2 or _inside_any(mname, declared) \
                or any(d.startswith(mname + ".") for d in declared):
            continue
        for cname, child in _called_entries(mname, module):
            if any(True for _ in child.parameters()) and not _inside_any(cname, blocks):
                blocks.append(cname)
    order = {n: i for i, (n, _) in enumerate(model.named_modules())}
    return sorted(blocks, key=lambda n: order.get(n, 0))


#: Containers: modules without a forward of their own, never called (a unit rooted at one would never load).
CONTAINERS = (torch.nn.ModuleList, torch.nn.ModuleDict)


def _called_entries(name: str, container: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The entries of a container, with those of containers inside it (GLPN's list of per-stage lists of
    layers): the modules that are called."""
    out: list[tuple[str, torch.nn.Module]] = []
    for key, child in container.named_children():
        cname = f"{name}.{key}"
        out.extend(_called_entries(cname, child) if isinstance(child, CONTAINERS) else [(cname, child)])
    return out


def _inside_any(name: str, outer: list[str]) -> bool:
    return any(name == o or name.startswith(o + ".") for o in outer)


def _unit_of(module_name: str, blocks: list[str], containers: frozenset[str] = frozenset()) -> tuple[str, str]:
    for b in blocks:
        if module_name == b or module_name.startswith(b + "."):
            return b, "block"
    if not module_name or any(b.startswith(module_name + ".") for b in blocks):
        # held directly by the model or by a container of blocks (CLIP's logit_scale): kept loaded, attached
        # for every call (it has no forward of its own to hook)
        return f"{module_name}#direct" if module_name else "#direct", "pinned"
    # Leftover: the outermost ancestor that contains no block and is called (not a container: Swin's
    # ``hidden_states_norms`` dict of norms gives one unit per norm).
    parts = module_name.split(".")
    for i in range(1, len(parts) + 1):
        anc = ".".join(parts[:i])
        if anc not in containers and not any(b == anc or b.startswith(anc + ".") for b in blocks):
            return anc, "leftover"
    raise AssertionError(module_name)  # the module itself contains no block: unreachable


def find_experts(model: torch.nn.Module) -> dict[str, int]:
    """Mixture-of-experts modules whose experts can be read one by one: {module name: number of experts}.

    transformers' fused experts modules (``MixtralExperts``, ``GptOssExperts``, ...: every weight and bias a tensor
    with one slice per expert — concatenated or interleaved gate and up, transposed or not, with biases or without)
    dispatch their forward through transformers' experts interface (``use_experts_implementation``), where Hermes
    registers a forward that computes as transformers' implementation reading only the routed experts
    (``hermes.engine.kinds.expert``). A submodule of it (MuseSpark's norm applied after each expert: one weight for
    all of them) is read with the layer around it."""
    out = {}
    for mname, m in model.named_modules():
        n = getattr(m, "num_experts", None)
        if not (isinstance(n, int) and n > 1 and hasattr(type(m).forward, "__wrapped__")
                and hasattr(m, "_is_expert_parallel")):  # marks of use_experts_implementation
            continue
        params = dict(m.named_parameters(recurse=False))
        if params and all(p.dim() >= 2 and p.shape[0] == n for p in params.values()):
            out[mname] = n
    return out


def _expert_slice(info: TensorInfo, e: int, n: int) -> TensorInfo:
    per = info.nbytes // n
    start = info.start + e * per
    return TensorInfo(f"{info.name}[{e}]", info.path, info.dtype, info.shape[1:], start, start + per)


def build_units(model: torch.nn.Module, store: Store, mapping: dict[str, str]) -> list[Unit]:
    """Execution units in registration order (the order in which Hugging Face forwards call them), then one
    unit per expert of each mixture-of-experts module (read when routed, see ``find_experts``)."""
    expected = expected_tensors(model)
    blocks = find_blocks(model)
    containers = frozenset(n for n, m in model.named_modules() if isinstance(m, CONTAINERS))
    experts = find_experts(model)
    gather = gathered_embedding(model)
    expert_items: dict[str, list[tuple[str, str, TensorInfo]]] = {}
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    order.update({f"{n}#direct" if n else "#direct": i for n, i in order.items()})
    grouped: dict[str, tuple[str, list[tuple[str, str, TensorInfo]]]] = {}
    for name, (mname, attr, t) in expected.items():
        if not isinstance(t, torch.nn.Parameter) or name not in mapping:
            continue  # buffers and tensors computed on load live in the skeleton (see load_buffers)
        if mname in experts:
            expert_items.setdefault(mname, []).append((mname, attr, store[mapping[name]]))
            continue
        unit_name, kind = (mname, "gather") if mname == gather else _unit_of(mname, blocks, containers)
        if kind == "leftover" and read_by_attribute(model, unit_name):
            kind = "pinned"
        grouped.setdefault(unit_name, (kind, []))[1].append((mname, attr, store[mapping[name]]))
    readers: dict[str, set[str]] = {}
    for u, (_, items) in grouped.items():
        for _, _, info in items:
            readers.setdefault(info.name, set()).add(u)
    head = chunked_head(model, grouped)
    units: list[Unit] = []
    for unit_name in sorted(grouped, key=lambda n: order[n]):
        kind, items = grouped[unit_name]
        if unit_name == head:
            rows = chunk_rows(items, max(_block_bytes(grouped), 1))
            units.extend(_chunks(len(units), unit_name, items, rows, readers))
        else:
            units.append(_layout(len(units), unit_name, kind, items, readers))
    for mname, items in expert_items.items():
        n = experts[mname]
        for e in range(n):
            sliced = [(m, a, _expert_slice(info, e, n)) for m, a, info in items]
            units.append(_layout(len(units), f"{mname}#{e}", "expert", sliced, {i.name: set() for _, _, i in sliced}))
    return units


#: A gathered embedding reads at most this many rows into its room at a time (more are embedded in pieces).
GATHER_ROWS = 256
#: Head chunks are multiples of this many rows, and at least HEAD_MIN_ROWS (keeps the chunked matmul on the
#: same kernel path as the whole one: smaller or ragged chunks changed float32 logits by 1e-5 on this CPU).
HEAD_ROW_MULTIPLE = 64
HEAD_MIN_ROWS = 256


def named_part(model: torch.nn.Module, getter: str) -> tuple[torch.nn.Module | None, str | None]:
    """The submodule a transformers accessor returns (``get_input_embeddings``, ``get_output_embeddings``,
    ``get_encoder``) and its dotted name; (None, None) where the model has none."""
    get = getattr(model, getter, None)
    try:
        part = get() if callable(get) else None
    except (AttributeError, NotImplementedError, TypeError, ValueError):
        part = None
    if not isinstance(part, torch.nn.Module):
        return None, None
    return part, next((n for n, m in model.named_modules() if m is part), None)


def gathered_embedding(model: torch.nn.Module) -> str | None:
    """Name of the token embedding read as row gathers: the model's input embedding when it is an ``nn.Embedding``
    (subclasses that only scale the result included) larger than its gather room and not read by attribute
    elsewhere (then it stays whole). Inside a block (RoBERTa's embeddings) it is a unit of its own: its rows are
    read into the side buffer, outside the stream, while the rest of the block streams."""
    emb, name = named_part(model, "get_input_embeddings")
    if not isinstance(emb, torch.nn.Embedding) or emb.max_norm is not None or emb.num_embeddings <= GATHER_ROWS \
            or len(list(emb.parameters())) != 1:  # a subclass holding more (Inkling's norm inside) stays whole
        return None
    if not name or read_by_attribute(model, name):
        return None
    return name


def chunked_head(model: torch.nn.Module, grouped: dict[str, tuple[str, list[Any]]]) -> str | None:
    """Name of the LM head streamed in vocabulary chunks: the output embedding when it is an ``nn.Linear`` (or a
    quantized one) that is a unit of its own and larger than the largest block (else it streams whole)."""
    from hermes.quant import QuantLinear

    head, name = named_part(model, "get_output_embeddings")
    if name is None or not (type(head) is torch.nn.Linear or isinstance(head, QuantLinear)):
        return None
    if name not in grouped or grouped[name][0] != "leftover" or \
            {a for m, a, _ in grouped[name][1]} - {"weight", "bias", "weight_scale", "weight_scale_zero"}:
        return None
    if isinstance(head, QuantLinear) and head.bias is not None and head.weight.shape[0] != head.out_features:
        return None  # a 4-bit head's rows padded to its kernel's block, its bias not
    size = sum(i.nbytes for _, _, i in grouped[name][1])
    return name if size > _block_bytes(grouped) and head.out_features > HEAD_MIN_ROWS else None


def _block_bytes(grouped: dict[str, tuple[str, list[Any]]]) -> int:
    return max((sum(i.nbytes for _, _, i in items) for kind, items in grouped.values() if kind == "block"), default=0)


def _row_dim(attr: str) -> int:
    """The dimension of a head's tensor that runs over its vocabulary rows (a 4-bit head's scales and zeros are
    ``[groups, rows, 2]``, as its kernel reads them)."""
    return 1 if attr == "weight_scale_zero" else 0


def chunk_rows(items: list[tuple[str, str, TensorInfo]], target: int) -> int:
    """Rows per head chunk: about ``target`` bytes (the largest block), a multiple of HEAD_ROW_MULTIPLE."""
    per_row = sum(i.nbytes // i.shape[_row_dim(attr)] for _, attr, i in items)
    rows = target // per_row // HEAD_ROW_MULTIPLE * HEAD_ROW_MULTIPLE
    return max(rows, HEAD_MIN_ROWS)


def _row_slice(info: TensorInfo, a: int, b: int, dim: int = 0) -> TensorInfo:
    """Rows [a, b) of a tensor whose rows run over dimension ``dim`` (0: one byte range; 1: one range per index
    of dimension 0, packed one after another in the unit's buffer)."""
    if dim == 0:
        per = info.nbytes // info.shape[0]
        return TensorInfo(f"{info.name}[{a}:{b}]", info.path, info.dtype, (b - a, *info.shape[1:]),
                          info.start + a * per, info.start + b * per)
    per = info.nbytes // (info.shape[0] * info.shape[1])
    pieces = tuple((info.start + (g * info.shape[1] + a) * per, info.start + (g * info.shape[1] + b) * per)
                   for g in range(info.shape[0]))
    return TensorInfo(f"{info.name}[:,{a}:{b}]", info.path, info.dtype, (info.shape[0], b - a, *info.shape[2:]),
                      pieces[0][0], pieces[-1][1], pieces)


def _chunks(first: int, name: str, items: list[tuple[str, str, TensorInfo]], rows: int,
            readers: dict[str, set[str]]) -> list[Unit]:
    """The head's units: rows [a, a + rows) of its weight (and bias, scales) each, in vocabulary order."""
    total = next(i.shape[0] for _, attr, i in items if attr == "weight")
    out = []
    for k, a in enumerate(range(0, total, rows)):
        b = min(a + rows, total)
        sliced = [(m, attr, _row_slice(info, a, b, _row_dim(attr))) for m, attr, info in items]
        shared = {s.name: readers[i.name] for (_, _, i), (_, _, s) in zip(items, sliced, strict=True)}
        unit = _layout(first + k, f"{name}#{k}", "chunk", sliced, shared)
        out.append(dataclasses.replace(unit, rows=(a, b)))
    return out


def base_key(key: str) -> str:
    """The checkpoint tensor a slot key names (``lm_head.weight[0:8192]`` -> ``lm_head.weight``)."""
    return key.partition("[")[0]


def _layout(index: int, name: str, kind: str, items: list[tuple[str, str, TensorInfo]],
            readers: dict[str, set[str]]) -> Unit:
    # Coalesce the unit's distinct tensors into contiguous file ranges; a strided slice's pieces are read one
    # after another into one place.
    infos = sorted({i.name: i for _, _, i in items}.values(), key=lambda i: (str(i.path), i.start))
    ranges: list[list[Any]] = []
    for info in (i for i in infos if not i.pieces):
        if ranges and ranges[-1][0] == info.path and info.start - ranges[-1][2] <= PAGE:
            ranges[-1][2] = max(ranges[-1][2], info.end)
        else:
            ranges.append([info.path, info.start, info.end])
    segments = []
    pos = 0
    for path, start, end in ranges:
        lead = start % PAGE
        segments.append(Segment(path, start, end, pos + lead))
        pos += round_up(lead + end - start, PAGE)
    placed = {}
    for info in (i for i in infos if i.pieces):
        placed[info.name] = pos
        for a, b in info.pieces:
            segments.append(Segment(info.path, a, b, pos, direct=False))
            pos += b - a
        pos = round_up(pos, PAGE)
    slots = []
    for mname, attr, info in items:
        if info.pieces:
            offset = placed[info.name]
        else:
            seg = next(s for s in segments if s.path == info.path and s.start <= info.start and info.end <= s.end)
            offset = seg.buf_offset + info.start - seg.start
        slots.append(Slot(mname, attr, info.name, info.dtype, info.shape, offset, info.nbytes))
    shares = tuple(sorted({u for _, _, i in items for u in readers[i.name] if u != name.partition("#")[0]}))
    return Unit(index, name, kind, tuple(slots), tuple(segments), sum(i.nbytes for i in infos), max(pos, PAGE),
                shares)


def round_up(n: int, m: int) -> int:
    return -(-n // m) * m
