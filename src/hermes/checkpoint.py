"""Checkpoints as transformers reads them: which file tensor fills which model tensor.

transformers does not load a checkpoint's tensors under their file names: it renames keys (GPT-NeoX
``embed_out`` -> ``lm_head``, ViT's on-disk names -> its internal ones, legacy ``gamma``/``beta``), fuses some
(per-expert MoE weights into one 3-D tensor), ignores tensors it does not need (GPT-2 ``attn.bias``, old
rotary ``inv_freq``), rebuilds tensors it never saves (sinusoidal positions) and fills tied weights from their
source. This module follows the installed transformers' own conversion mapping
(``get_model_conversion_mapping`` and ``rename_source_key``) rather than a table of our own:

- a tensor that is only renamed is streamed straight from its file (its bytes are the model's bytes);
- a tensor that a converter builds from several (fused experts) is built once, with transformers' own
  operations, one target tensor at a time, and written to a cache file next to the checkpoint
  (``.hermes/converted-*.safetensors``), from which it streams like any other;
- a tensor transformers computes on load (sinusoidal positions) is computed the same way and kept in the
  skeleton, when its value does not depend on the random seed; otherwise the checkpoint really lacks it.
"""
from __future__ import annotations

import copy
import hashlib
import logging
import os
import re
from pathlib import Path
from typing import Any

import torch

from hermes.errors import CheckpointError
from hermes.store import Store, read_safetensors_header
from hermes.writer import write_safetensors

log = logging.getLogger(__name__)

# Names older checkpoints use for LayerNorm parameters (transformers renames them the same way).
_LEGACY_SUFFIXES = {".gamma": ".weight", ".beta": ".bias"}
CACHE_DIR = ".hermes"
_ALIGN = 64  # bytes: alignment of converted tensors in their cache file
_PAD = ".~hermes-pad"  # name suffix of the padding entries between them


def expected_tensors(model: torch.nn.Module) -> dict[str, tuple[str, str, torch.Tensor]]:
    """name -> (module name, attribute, meta/real tensor) for every parameter and persistent buffer.

    A module registered under several names (T5's ``shared`` = ``encoder.embed_tokens``) is listed once."""
    out: dict[str, tuple[str, str, torch.Tensor]] = {}
    for mname, module in model.named_modules():
        for pname, p in module._parameters.items():
            if p is not None:
                out[f"{mname}.{pname}" if mname else pname] = (mname, pname, p)
        for bname, b in module._buffers.items():
            if b is not None and bname not in module._non_persistent_buffers_set:
                out[f"{mname}.{bname}" if mname else bname] = (mname, bname, b)
    return out


def _all_names(model: torch.nn.Module) -> set[str]:
    """Every name a tensor of the model is reachable under, shared modules and buffers included."""
    names = set()
    for mname, module in model.named_modules(remove_duplicate=False):
        for n in (*module._parameters, *module._buffers):
            names.add(f"{mname}.{n}" if mname else n)
    return names


def _modern_name(key: str) -> str:
    for old, new in _LEGACY_SUFFIXES.items():
        if key.endswith(old):
            return key[: -len(old)] + new
    return key


def weight_transforms(model: torch.nn.Module, *, save: bool = False) -> tuple[list[Any], list[Any], Any]:
    """(renamings, converters, ``rename_source_key``) of the installed transformers for ``model``, as it applies
    them on load — or with ``save`` as its ``revert_weight_conversion`` applies them on save (no legacy renames,
    no prefix changes, each transform reversed, in reverse order). (``[], [], None`` on an older transformers,
    whose checkpoints use the model's names.)"""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
    except ImportError:
        return [], [], None
    if save:
        forward = [t for t in get_model_conversion_mapping(model, add_legacy=False)
                   if type(t).__name__ != "PrefixChange"]
        transforms = [t.reverse_transform() for t in forward[::-1]]
    else:
        transforms = get_model_conversion_mapping(model)
    return ([t for t in transforms if isinstance(t, WeightRenaming)],
            [t for t in transforms if isinstance(t, WeightConverter)], rename_source_key)


def _ignored(model: torch.nn.Module, attr: str) -> list[re.Pattern[str]]:
    pats: set[str] = set()
    for m in model.modules():
        pats |= set(getattr(m, attr, None) or ())
    return [re.compile(p) for p in pats]


def map_checkpoint_keys(model: torch.nn.Module, store: Store, *, strict: bool = True) -> dict[str, str]:
    """Map every model tensor name to the store key holding its bytes, as transformers would load it.

    With ``strict`` a checkpoint tensor the model does not use is an error (the config names the wrong class);
    without (a class the user picked, e.g. the base model of a checkpoint with a head) it is left unread.

    Returns:
        {model tensor name: store key}; converted tensors are added to ``store`` under their model names.

    Raises:
        CheckpointError: tensors missing from the checkpoint, unexpected extra tensors, or wrong shapes.
    """
    expected = expected_tensors(model)
    renamings, converters, rename = weight_transforms(model)
    prefix = getattr(model, "base_model_prefix", "") or ""
    meta = {n: t for n, (_, _, t) in expected.items()}
    direct: dict[str, str] = {}
    groups: dict[str, tuple[Any, list[tuple[str, str]]]] = {}  # target -> (converter, [(pattern, key)])
    unmatched: list[str] = []
    for key in store:
        target, pattern = (rename(key, renamings, converters, prefix, meta) if rename else (key, None))
        if pattern is not None:
            conv = next(c for c in converters if pattern in c.source_patterns)
            groups.setdefault(target, (conv, []))[1].append((pattern, key))
            continue
        for cand in (target, _modern_name(target), _modern_name(key)):
            for name in (cand, f"{prefix}.{cand}" if prefix else cand,
                         cand[len(prefix) + 1:] if prefix and cand.startswith(prefix + ".") else cand):
                if name in expected and name not in direct:
                    direct[name] = key
                    break
            else:
                continue
            break
        else:
            unmatched.append(key)
    if groups:
        for name, key in _convert(model, store, groups).items():
            direct[name] = key
    mapping = {n: direct[n] for n in expected if n in direct}  # in model order
    _fill_tied(model, expected, mapping)
    _check(model, store, expected, mapping, unmatched, strict=strict)
    return mapping


def _fill_tied(model: torch.nn.Module, expected: dict[str, Any], mapping: dict[str, str]) -> None:
    """Tied weights left out of the file read the bytes of their twin: ``lm_head.weight`` its source's, and a source
    the file stores only under its tied name (a state dict saved with both names, written once under the first one
    in sorted order, ``lm_head.weight``) that name's."""
    tied = dict(getattr(model, "all_tied_weights_keys", None) or {})
    twins = {**{src: dst for dst, src in tied.items()}, **tied}
    for name in expected:
        if name not in mapping and twins.get(name) in mapping:
            mapping[name] = mapping[twins[name]]


def _check(model: torch.nn.Module, store: Store, expected: dict[str, Any], mapping: dict[str, str],
           unmatched: list[str], *, strict: bool) -> None:
    d = store.model_dir
    cls = type(model).__name__
    buffers = {n for n, (_, _, t) in expected.items() if not isinstance(t, torch.nn.Parameter)}
    missing = [n for n in expected if n not in mapping and n not in buffers]  # buffers keep computed values
    if missing:
        missing = [n for n in missing if not _computed_on_load(model, n, expected[n])]
    if missing:
        raise CheckpointError(f"{d}: checkpoint lacks {len(missing)} tensor(s) the model needs, e.g. "
                              f"{missing[:3]}; the weights do not match config.json "
                              f"({cls}) — re-create the checkpoint or fix config.json")
    ignore = _ignored(model, "_keys_to_ignore_on_load_unexpected")
    known = _all_names(model)
    prefix = getattr(model, "base_model_prefix", "") or ""
    extra = [k for k in unmatched
             if not any(p.search(k) for p in ignore)
             and not {k, _modern_name(k), f"{prefix}.{k}", k.removeprefix(prefix + ".")} & known]
    if extra and not strict:
        log.warning("%s: %d checkpoint tensor(s) not used by %s (e.g. %s); left unread", d, len(extra), cls,
                    extra[:3])
    elif extra:
        raise CheckpointError(f"{d}: checkpoint has {len(extra)} tensor(s) that {cls} does not "
                              f"use, e.g. {extra[:3]}; the weights do not match config.json — set "
                              "'architectures' to the class these weights belong to")
    for name, key in mapping.items():
        info = store[key]
        want = tuple(expected[name][2].shape)
        if info.shape != want:
            raise CheckpointError(f"{info.path}: tensor {key!r} has shape {list(info.shape)} but the model "
                                  f"built from config.json expects {list(want)}; the weights do not match the "
                                  "config — re-create the checkpoint or fix config.json")


def _computed_on_load(model: torch.nn.Module, name: str, entry: tuple[str, str, torch.Tensor]) -> bool:
    """Whether transformers computes the missing parameter ``name`` on load with a value that does not depend
    on the random seed and is not a constant (sinusoidal positions: yes; a LayerNorm's ones: no, a checkpoint
    lacking it is a mismatch); if so, compute it into the skeleton now."""
    mname, attr, t = entry
    module = model.get_submodule(mname)
    init = getattr(model, "_init_weights", None)
    if init is None or not t.is_floating_point():
        return False
    values = []
    for seed in (0, 1):
        module._parameters[attr] = torch.nn.Parameter(torch.zeros(t.shape, dtype=t.dtype), requires_grad=False)
        torch.manual_seed(seed)
        with torch.no_grad():
            try:
                init(module)
            except Exception:  # noqa: BLE001 - an init that cannot run here: not computed
                module._parameters[attr] = t
                return False
        values.append(module._parameters[attr].detach().clone())
    if torch.equal(values[0], values[1]) and values[0].unique().numel() > 2:  # not a constant such as ones
        module._parameters[attr] = torch.nn.Parameter(values[0], requires_grad=False)
        log.info("%s: not in the checkpoint; computed as transformers does on load", name)
        return True
    module._parameters[attr] = t
    return False


# ---- converted tensors (fused experts, ...) ------------------------------------------------------------------
def _cache_file(store: Store, targets: list[str]) -> Path:
    import transformers

    h = hashlib.sha256(f"hermes-converted-2:{transformers.__version__}".encode())  # 2: 64-byte aligned
    for f in store.files:
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    h.update("\n".join(sorted(targets)).encode())
    base = store.model_dir / CACHE_DIR
    if not os.access(store.model_dir, os.W_OK):
        base = Path(os.environ.get("HERMES_CACHE", Path.home() / ".cache" / "hermes")) / "converted" / \
            hashlib.sha256(str(store.model_dir.resolve()).encode()).hexdigest()[:16]
    return base / f"converted-{h.hexdigest()[:16]}.safetensors"


def _convert(model: torch.nn.Module, store: Store, groups: dict[str, tuple[Any, list[tuple[str, str]]]]
             ) -> dict[str, str]:
    """Build every converter target once with transformers' own operations and cache them in one file.
    Returns {model name: store key} for the targets (added to ``store``)."""
    from transformers.core_model_loading import dot_natural_key

    path = _cache_file(store, list(groups))
    if not path.is_file():
        log.info("converting %d tensor(s) as transformers does on load (once) -> %s", len(groups), path)
        built: dict[str, torch.Tensor] = {}
        for target, (conv, items) in groups.items():
            c = copy.deepcopy(conv)
            c.collected_tensors.clear()
            for pattern, key in sorted(items, key=lambda i: dot_natural_key(i[1])):
                c.add_tensor(target, key, pattern, lambda key=key: store.load_tensor(key))
            try:
                out = c.convert(target, model=model, config=getattr(model, "config", None))
            except Exception as exc:  # noqa: BLE001 - any failure of a conversion op: say which tensor
                raise CheckpointError(f"{store.model_dir}: cannot convert {target!r} the way transformers does "
                                      f"({type(exc).__name__}: {exc})") from exc
            for name, t in out.items():
                built[name] = t[0] if isinstance(t, list) else t
        path.parent.mkdir(parents=True, exist_ok=True)
        # Every tensor starts 64-byte aligned in the file, as a tensor transformers allocates does: matmul
        # kernels take other paths (and round differently) for other alignments, and streamed views keep the
        # file's alignment. Padding entries (sorted right after each tensor) keep the file valid safetensors.
        entries, offset = [], 0
        for name in sorted(built):
            t = built[name]
            entries.append((name, t.dtype, tuple(t.shape)))
            offset += t.numel() * t.element_size()
            if offset % _ALIGN:
                built[name + _PAD] = torch.zeros(_ALIGN - offset % _ALIGN, dtype=torch.uint8)
                entries.append((name + _PAD, torch.uint8, (_ALIGN - offset % _ALIGN,)))
                offset += _ALIGN - offset % _ALIGN
        write_safetensors(path, entries, built, align=_ALIGN)
    infos, _ = read_safetensors_header(path)
    return store.add_derived({n: i for n, i in infos.items() if not n.endswith(_PAD)})

