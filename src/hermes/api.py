"""The public entry point: ``hermes.load``."""
from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from hermes.checkpoint import map_checkpoint_keys
from hermes.checksums import changed_since_checksums
from hermes.engine import EngineConfig, PipeLoadEngine, minimum_budget
from hermes.errors import BudgetError, CheckpointError, HermesError
from hermes.generation import GenerationPolicy, activation_bytes
from hermes.inputs import max_positions
from hermes.memory import auto_budget, format_bytes, parse_bytes
from hermes.share import share
from hermes.skeleton import build_skeleton, load_buffers, load_config, model_class_for
from hermes.store import Store
from hermes.streamed import StreamedGenerator, stream_inner_models, streamed_class
from hermes.units import Unit, build_units

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelLayout:
    """A checkpoint opened for streaming: config, skeleton model, store and units."""

    path: Path
    config: Any
    model: torch.nn.Module
    store: Store
    units: list[Unit]

    @property
    def nbytes(self) -> int:
        """Bytes of the model's tensor data, each tensor once (a head tied to the embedding is not counted again)."""
        from hermes.engine import tied_aliases

        alias = tied_aliases(self.units, [u.name for u in self.units])
        return sum(u.nbytes for u in self.units if u.index not in alias)


def open_model(path: str | os.PathLike[str], *, model_class: type | str | None = None,
               dtype: str | torch.dtype | None = None) -> ModelLayout:
    """Open a Hugging Face checkpoint directory for streaming (no weights are read yet).

    ``model_class`` picks the class or task head as in ``from_pretrained`` (default: ``config.architectures``);
    ``dtype`` must be the checkpoint's own ("auto" or None: whatever it stores) — weights stream as stored."""
    path = Path(path)
    config = load_config(path)
    store = Store(path)
    changed = changed_since_checksums(path)
    if changed:
        log.warning("%s: %s changed since its checksums were recorded (size or sampled bytes differ); "
                    "`hermes verify %s` checks every tensor", path, ", ".join(changed), path)
    _check_dtype(store, dtype)
    model = build_skeleton(config, model_class=streamed_class(model_class_for(config, model_class)))
    stream_inner_models(model)
    _apply_generation_config(model, path)
    mapping = map_checkpoint_keys(model, store, strict=model_class is None)
    load_buffers(model, store, mapping)
    units = build_units(model, store, mapping)
    return ModelLayout(path, config, model, store, units)


def _check_dtype(store: Store, dtype: str | torch.dtype | None) -> None:
    if dtype is None or dtype == "auto":
        return
    want = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
    if not isinstance(want, torch.dtype):
        raise CheckpointError(f"dtype {dtype!r} is not a torch dtype; use e.g. 'bfloat16' or 'auto'")
    stored = {i.dtype for i in store.values() if i.dtype.is_floating_point}
    if stored and stored != {want}:
        names = ", ".join(sorted(str(d).removeprefix("torch.") for d in stored))
        raise CheckpointError(f"{store.model_dir} stores {names} weights and hermes streams them as stored "
                              f"(no conversion copy inside the budget); use dtype='auto', or write a "
                              f"{str(want).removeprefix('torch.')} checkpoint once with transformers' "
                              "save_pretrained")


def _apply_generation_config(model: torch.nn.Module, path: Path) -> None:
    """``generation_config.json`` of the checkpoint, as ``from_pretrained`` applies it."""
    if not (path / "generation_config.json").is_file() or not hasattr(model, "generation_config"):
        return
    from transformers import GenerationConfig

    try:
        model.generation_config = GenerationConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path / 'generation_config.json'} cannot be read: {exc}") from exc


def _check_inputs(model: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """Token ids outside the vocabulary are an InputError, not an IndexError from deep inside torch."""
    from hermes.inputs import check_token_ids

    for name in ("input_ids", "decoder_input_ids"):
        ids = kwargs.get(name, args[0] if name == "input_ids" and args else None)
        if isinstance(ids, torch.Tensor) and not ids.is_floating_point() and ids.numel():
            text = model.config.get_text_config(decoder=name != "input_ids") \
                if hasattr(model.config, "get_text_config") else model.config
            check_token_ids(ids, text)


def forward_activation_bytes(layout: ModelLayout, batch: int, positions: int) -> int:
    """Estimated activations of one forward of ``layout``'s model over ``batch`` x ``positions`` tokens, the
    logits of every position included where it has an LM head (``generation.activation_bytes``); 0 where the
    config has no text dimensions to estimate from (vision, speech). A model that returns a KV cache from a
    plain call (a decoder LM with ``use_cache``) holds that cache of the call's positions too."""
    head = getattr(layout.model, "get_output_embeddings", lambda: None)() is not None  # a base model has no logits
    try:
        act = activation_bytes(layout.config, batch, positions, layout.model.dtype,
                               logits_rows=positions if head else 0)
    except HermesError:
        return 0
    if isinstance(layout.model, StreamedGenerator) and getattr(layout.model.config, "use_cache", False):
        from hermes.generation import kv_cache_bytes

        try:
            act += kv_cache_bytes(layout.model.config, batch, positions, layout.model.dtype,
                                  model_class=type(layout.model).__bases__[-1])  # the transformers class
        except (HermesError, TypeError, ValueError):
            pass
    return act


def load(path: str | os.PathLike[str], budget: str | int | None = None, *, loaders: int = 2,
         prefetch: int | None = None, io: str = "buffered", resident: tuple[str, ...] | list[str] = (),
         plan: Any = None, model_class: type | str | None = None,
         dtype: str | torch.dtype | None = None, ring: Any = None) -> torch.nn.Module:
    """Open a checkpoint as a ``transformers`` model whose weights stream from disk under a memory budget.

    Args:
        path: a Hugging Face checkpoint directory (config.json + safetensors).
        budget: the memory the process may take above its runtime for this model, e.g. ``"300MiB"`` or a
            number of bytes; or ``"auto"``: what this process may still take (its cgroup's limit minus what it
            holds, or MemAvailable; ``model.hermes.auto_budget`` says what was chosen). The weights get what the
            rest leaves (``hermes.share``): each ``generate`` call's KV cache and activations, a bare forward's
            activations (a 128-token sequence's, or a larger call's own: the weights' share shrinks before it), and
            the runtime slack.
        loaders: number of loading agents (threads).
        prefetch: most units loaded or loading besides the computing one (1: double buffering; 0: sequential,
            each unit read only when the forward asks for it, no read overlapping a compute; None: as many as the
            budget allows).
        io: ``"buffered"`` or ``"direct"`` (O_DIRECT: no page cache, less CPU).
        resident: names of units to keep loaded across calls.
        plan: a :class:`hermes.planner.Plan` (or the path of a plan.json); it sets the budget and every option.
        model_class: the class or task head, as for ``from_pretrained``: a transformers class, its name, or an
            auto class (``"AutoModelForCausalLM"``); default: ``config.architectures``.
        dtype: ``"auto"`` (default) or the checkpoint's own dtype; weights stream as stored.
        ring: a joined :class:`hermes.ring.Ring`: this process is one device of several, computing a contiguous
            range of the model's blocks under ``budget`` (its own), in lockstep with the other ranks, which call
            the model (or ``generate``) with the same arguments (``hermes.ring``).

    Returns:
        The transformers model object (an instance of the checkpoint's class, through a subclass that says its
        device is the CPU and budgets ``generate``: ``hermes.streamed``). Call it (or ``generate``) as usual;
        ``model.hermes`` is the engine (``model.hermes.layout`` the opened checkpoint),
        with ``model.hermes.last`` holding the measurements of the last pass and
        ``model.hermes.last_generation`` those of the last ``generate`` call. In ``generate`` the units kept
        resident across tokens are chosen per call from what the KV cache, the activations and the slack leave
        (unless ``resident`` is given).

    Example:
        >>> model = hermes.load("ckpt/bert-large", budget="300MiB", loaders=2)
        >>> out = model(input_ids=torch.tensor([[101, 2023, 102]]))
    """
    layout, budget, stage = _open(path, budget, plan, model_class, dtype, ring)
    config, policy, auto = _settings(layout, budget, plan, loaders=loaders, prefetch=prefetch, io=io,
                                     resident=tuple(resident))
    model = layout.model
    generates = isinstance(model, StreamedGenerator)
    # a generating model's arena is sized per generate call (its KV cache): claiming one now would be paid twice
    engine = PipeLoadEngine(model, layout.units, config, eager_arena=not generates, layout=layout,
                            generation_policy=policy, auto_budget=auto)
    if stage is not None:
        stage.install(model, engine)
    engine.install()
    model.register_forward_pre_hook(_check_inputs, with_kwargs=True)
    if policy.estimate_activations and stage is None:  # a call larger than 128 positions: its own activations
        model.register_forward_pre_hook(ForwardShare(engine, policy.budget_bytes, tuple(resident)), with_kwargs=True,
                                        prepend=True)
    model.hermes = engine
    log.info("streaming %s: %d units, %d bytes, budget %d", path, len(layout.units), layout.nbytes,
             config.budget_bytes)
    return model


def _open(path: str | os.PathLike[str], budget: Any, plan: Any, model_class: type | str | None,
          dtype: str | torch.dtype | None, ring: Any) -> tuple[ModelLayout, Any, Any]:
    """(the checkpoint opened, the budget, None) — on a ring (the layout of this device's units, its budget
    resolved, its stage: :meth:`hermes.ring.Stage.join`)."""
    if ring is None:
        return open_model(path, model_class=model_class, dtype=dtype), budget, None
    from hermes.ring import Stage

    return Stage.join(ring, lambda: (open_model(path, model_class=model_class, dtype=dtype),
                                     functools.partial(_ring_budget, budget, plan)))


def _bare_forward(layout: ModelLayout) -> int:
    """The activations ``hermes.load`` sets aside before any call: one sequence of up to 128 positions."""
    return forward_activation_bytes(layout, 1, min(max_positions(layout.config) or 128, 128))


class ForwardShare:
    """A plain call's activations within the budget: ``hermes.load`` set aside those of a 128-position sequence;
    before a call with more rows or positions the weights' share shrinks to leave this call's (the larger
    reservation is kept: calls of every size then run without re-sizing), as far as the weights' minimum allows —
    a budget at the minimum still runs, with a warning that the process may exceed it. ``generate`` sets aside its
    own."""

    def __init__(self, engine: PipeLoadEngine, total: int, resident: tuple[str, ...]) -> None:
        self.engine, self.total, self.resident = engine, total, resident
        self.reserved = _bare_forward(engine.layout)

    def __call__(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if self.engine.generating or not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.is_floating_point():
            return
        act = forward_activation_bytes(self.engine.layout, *ids.shape)
        if act <= self.reserved:
            return
        c, minimum = self.engine.config, minimum_budget(self.engine.units, self.resident)
        if act > self.total - minimum:
            room = max(self.total - minimum, 0)
            log.warning("budget %s leaves this call's activations (%s) %s beyond the minimum weight budget: the "
                        "process may exceed the budget by up to %s", format_bytes(self.total), format_bytes(act),
                        format_bytes(room), format_bytes(act - room))
        weights = share(self.total, minimum, activations=max(min(act, self.total - minimum), 0)).weights
        if weights < c.budget_bytes:
            self.engine.reconfigure(EngineConfig(weights, loaders=c.loaders, prefetch=c.prefetch, io=c.io,
                                                 resident=c.resident))
        self.reserved = act


def _ring_budget(budget: str | int | None, plan: Any) -> Any:
    """A ring device's budget, resolved before the ring shares the blocks by it: bytes, or what ``auto`` chose
    (an :class:`hermes.memory.AutoBudget`)."""
    if plan is not None:
        raise BudgetError("a plan is made for one device; on a ring give each device its --budget (or auto)")
    if budget is None:
        raise BudgetError("give a budget (e.g. budget='300MiB' or 'auto')")
    if isinstance(budget, str) and budget.strip().lower() == "auto":
        return auto_budget()
    return parse_bytes(budget)


def _settings(layout: ModelLayout, budget: Any, plan: Any, *, loaders: int, prefetch: int | None,
              io: str, resident: tuple[str, ...]) -> tuple[EngineConfig, GenerationPolicy, Any]:
    """(engine settings, generation policy, what budget="auto" chose or None) of ``hermes.load``'s arguments."""
    if plan is not None:
        from hermes.planner import Plan

        if not isinstance(plan, Plan):
            plan = Plan.from_json(Path(plan).read_text())
        return plan.engine_config(), GenerationPolicy(plan.budget_bytes, plan.activation_bytes, resident or None), None
    if budget is None:
        raise BudgetError("give a budget (e.g. budget='300MiB' or 'auto') or a plan")
    auto = None
    if not isinstance(budget, (str, int)):  # what auto chose already (a ring device)
        auto, budget = budget, budget.budget_bytes
        total = budget
    elif isinstance(budget, str) and budget.strip().lower() == "auto":
        auto = auto_budget()  # after opening: the skeleton and its buffers are part of what the process holds
        log.info("%s", auto.describe())
        total = auto.budget_bytes
    else:
        total = parse_bytes(budget)
    # a forward's activations are not known before the call: set aside those of one sequence of up to 128
    # positions (logits included), as far as the weights' minimum allows; generate sets aside its own call's KV
    # cache and activations instead
    minimum = minimum_budget(layout.units, resident)
    forward = max(min(_bare_forward(layout), total - minimum), 0)
    weights = share(total, minimum, activations=forward).weights
    config = EngineConfig(budget_bytes=weights, loaders=loaders, prefetch=prefetch, io=io, resident=resident)
    return config, GenerationPolicy(total, 0, resident or None, estimate_activations=True), auto
