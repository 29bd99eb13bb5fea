"""Text generation under a memory budget.

A model loaded by ``hermes.load`` generates through :func:`budgeted_generate` (its class's ``generate``,
``hermes.streamed``), which, around the unmodified transformers ``generate``:

1. reserves the KV cache of this call (batch x (prompt + new tokens), every layer) out of the budget;
2. lets the planner pick which units stay resident across tokens with what is left (decode passes are
   I/O-bound: every byte kept resident is a byte not read again per token), unless the user fixed them;
3. runs the whole call as one continuous pipeline, so loading agents prefetch the next token's first units
   while the current token's last units compute.

It records time to first token, tokens/s, bytes read per token and the peak memory in
``model.hermes.last_generation`` (a :class:`GenerationStats`).
"""
from __future__ import annotations

import itertools
import logging
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from hermes import kvcache
from hermes.engine import EngineConfig, PassStats, PipeLoadEngine, minimum_budget, side_room, tied_aliases
from hermes.errors import InputError
from hermes.kvcache import CacheSize, Call, cache_size, measured_cache_bytes
from hermes.preflight import check_generation_length
from hermes.share import RUNTIME_SLACK_BYTES, share

log = logging.getLogger(__name__)


@dataclass
class GenerationStats:
    """Measurements of one ``generate`` call."""

    batch: int
    prompt_tokens: int
    new_tokens: int  # tokens generated per sequence
    forward_passes: int  # forwards of the model (one per token; fewer with prompt lookup or a draft model)
    ttft_s: float  # call start -> end of the prompt's forward (first token's logits)
    total_s: float
    tokens_per_s: float  # new tokens per sequence / total time
    decode_tokens_per_s: float  # tokens after the first / their time (the steady rate)
    budget_bytes: int  # the user's budget: weights + KV cache + activations + runtime slack (hermes.share)
    weight_budget_bytes: int  # the engine's weight budget in this call (what the rest leaves)
    weights_max_bytes: int  # the weights held at most: the weight budget, or less when the whole model fits in it
    kv_reserved_bytes: int  # set aside for the KV cache (and an assistant model: its weights and cache)
    activation_reserved_bytes: int  # set aside for activations (estimated for this call, or a plan's profiled figure)
    slack_bytes: int  # the runtime slack the budget holds (hermes.share)
    kv_cache_bytes: int  # the KV cache's size at the end (measured)
    weights_peak_bytes: int
    resident: tuple[str, ...]  # units kept in memory across tokens (incl. ones served by tied weights)
    resident_bytes: int
    first_pass_bytes_read: int
    bytes_read_per_token: float  # median over the passes after the first
    stall_s: float  # total time the inference agent waited for weights
    passes: list[PassStats] = field(default_factory=list)

    def to_dict(self, *, timeline: bool = False) -> dict[str, Any]:
        d = asdict(self)
        d["passes"] = [p.to_dict(timeline=timeline) for p in self.passes] if timeline else len(self.passes)
        return d


def kv_cache_bytes(config: Any, batch: int, tokens: int, dtype: torch.dtype = torch.float32, *,
                   encoder_tokens: int = 0, model_class: type | None = None) -> int:
    """Bytes a generate call ending at ``tokens`` positions for ``batch`` sequences sets aside for its cache
    (:class:`hermes.kvcache.CacheSize` ``peak``: what transformers' cache holds, plus one layer while it grows), its
    prompt taken as long as it can be; an encoder-decoder's also holds the cross-attention keys and values of
    ``encoder_tokens`` positions. ``model_class``: the checkpoint's class (default: the config's)."""
    from hermes.skeleton import resolve_model_class

    cls = model_class or resolve_model_class(config)
    call = Call(batch, prompt=max(tokens - 1, 1), total=tokens, encoder=encoder_tokens, dtype=dtype)
    return cache_size(config, cls, call).peak


def kv_geometry(config: Any) -> tuple[int, int, int, int]:
    """(layers, attention heads, key/value heads, head dimension) of a (decoder's) text config, decoder-specific
    fields first (``hermes.kvcache``)."""
    kv_heads, key, value = kvcache.kv_shape(config)
    return kvcache.decoder_layers(config), kvcache.attention_heads(config), kv_heads, max(key, value)


def activation_bytes(config: Any, batch: int, tokens: int, dtype: torch.dtype = torch.float32, *,
                     logits_rows: int = 1) -> int:
    """An upper estimate of the activation memory of one forward over ``batch`` x ``tokens`` positions: the
    hidden states a layer keeps alive at once (residual, normed input, q/k/v, attention output, two MLP
    intermediates), the float32 attention scores and their softmax, and float32 logits for ``logits_rows``
    positions (``generate`` computes the last position's), kept twice (the logits and the processed scores) and
    once more while a chunked head concatenates its pieces. ``budget="auto"`` sets it aside. A config without
    attention heads (a state-space model) has no scores; one without a text width (CTC's), no hidden states."""
    c = kvcache.decoder_config(config)
    hidden = _known(kvcache.hidden_size, config)
    heads = _known(kvcache.attention_heads, config)
    inter = next((v for n in ("intermediate_size", "ffn_dim", "d_ff", "n_inner", "hidden_dim", "decoder_ffn_dim")
                  if isinstance(v := getattr(c, n, None), int) and v > 0), 4 * hidden)
    vocab = getattr(c, "vocab_size", 0) or 0
    per_token = (6 * hidden + 2 * inter) * dtype.itemsize
    scores = 2 * batch * heads * tokens * tokens * 4
    logits = 3 * batch * logits_rows * vocab * 4
    return batch * tokens * per_token + scores + logits


def _known(field_of: Any, config: Any) -> int:
    """A config's field (``hermes.kvcache.hidden_size``, ...), 0 where it has none."""
    try:
        return field_of(config)
    except InputError:
        return 0


@dataclass(frozen=True)
class GenerationPolicy:
    """How ``generate`` shares the budget, fixed at ``hermes.load`` time."""

    budget_bytes: int  # the user's budget
    activation_bytes: int  # set aside for activations (a plan's profiled figure; 0 with explicit settings)
    resident: tuple[str, ...] | None  # fixed by the user; None: the planner chooses per call
    estimate_activations: bool = False  # budget="auto": set aside activation_bytes() of each call instead


_ENCODER_INPUTS = ("input_features", "input_values", "pixel_values", "inputs_embeds")


def _count(kwargs: dict[str, Any], args: tuple[Any, ...], model: Any) -> tuple[int, int, int, int]:
    """(batch incl. beams / returned sequences, prompt length, total length, encoder length) of a generate
    call; for an encoder-decoder model the prompt is the decoder's and the input is the encoder's; a model whose
    input is not token ids (CTC: ``input_features``) has no prompt."""
    ids = kwargs.get("input_ids", kwargs.get("inputs", args[0] if args else None))
    if ids is None:
        ids = next((kwargs[k] for k in _ENCODER_INPUTS if kwargs.get(k) is not None), None)
    is_enc_dec = bool(getattr(model.config, "is_encoder_decoder", False))
    features = getattr(model, "main_input_name", "input_ids") != "input_ids"  # audio / image in, tokens out
    if not isinstance(ids, torch.Tensor) or (ids.dim() != 2 and not is_enc_dec and not features):
        raise InputError("generate needs input_ids as a 2-D tensor (batch, tokens)"
                         + (" or the encoder's input (input_features, pixel_values, ...)" if is_enc_dec else ""))
    gc = kwargs.get("generation_config") or model.generation_config
    get = lambda k: kwargs.get(k, getattr(gc, k, None))  # noqa: E731
    batch = ids.shape[0]
    encoder = 0
    if is_enc_dec:
        dec = kwargs.get("decoder_input_ids")
        prompt = dec.shape[-1] if isinstance(dec, torch.Tensor) else 1
        encoder = ids.shape[1] if ids.dtype in (torch.int64, torch.int32) else _encoder_positions(model, ids)
    else:
        prompt = 0 if ids.is_floating_point() else ids.shape[1] + _image_prefix(model, kwargs)
    copies = max(get("num_beams") or 1, get("num_return_sequences") or 1)
    new = get("max_new_tokens")
    total = prompt + new if new is not None else max(get("max_length") or 20, prompt)
    # assisted generation appends candidate tokens to the cache before checking them (the rejected are cropped)
    total += max(get("prompt_lookup_num_tokens") or 0,
                 (get("num_assistant_tokens") or 20) if kwargs.get("assistant_model") is not None else 0)
    check_generation_length(model.config, prompt, new or 0)
    return batch * copies, prompt, total, encoder


def _image_prefix(model: Any, kwargs: dict[str, Any]) -> int:
    """Positions a GIT model puts before the text in its cache: each image's patches and class token."""
    c = model.config
    if getattr(c, "model_type", None) != "git" or kwargs.get("pixel_values") is None:
        return 0
    v = c.vision_config
    return ((v.image_size // v.patch_size) ** 2 + 1) * (getattr(c, "num_image_with_embedding", None) or 1)


def _encoder_positions(model: Any, features: torch.Tensor) -> int:
    """Positions of the encoder output for non-token inputs (Whisper: its fixed source length)."""
    n = getattr(model.config, "max_source_positions", None)
    return n if isinstance(n, int) and n > 0 else int(features.shape[-1])


def resident_for_tokens(units: list[tuple[str, int]], weight_budget: int,
                        aliases: dict[str, str] | None = None, unstreamed: frozenset[str] = frozenset()) \
        -> tuple[str, ...]:
    """Which units (name, bytes), in execution order, stay resident across the tokens of a generation: as many
    bytes as possible such that the rest still streams (resident bytes + the largest streamed unit <=
    ``weight_budget``); every unit when the model fits.

    A decode pass reads every streamed byte and computes little, so its time is about streamed bytes /
    bandwidth: maximizing resident bytes maximizes tokens/s (docs/BENCHMARKS.md "Generation" measures it).
    For each choice of the largest streamed unit's size, larger units must be resident; the room left is
    filled largest first. ``aliases`` maps a unit to the unit whose tied weights serve it when that one is
    resident (it then costs nothing and is added to the result). Units in ``unstreamed`` (a token embedding read
    as row gathers when not resident) need no room in the stream.
    """
    size = dict(units)
    # a tied unit whose source is not among these (Gemma 4's embedding, pinned or gathered) is a unit like others
    aliases = {a: src for a, src in (aliases or {}).items() if src in size}
    everything = tuple(n for n, _ in units)
    if sum(b for n, b in units if n not in aliases) <= weight_budget:
        return everything
    order = {n: i for i, n in enumerate(everything)}
    sources = sorted(set(aliases.values()))
    best: tuple[int, tuple[str, ...]] = (-1, ())
    # keeping a tied source pays off through the units it serves: try each choice of sources (one or two per model)
    for keep in itertools.product((False, True), repeat=len(sources)):
        kept_sources = {src for src, k in zip(sources, keep, strict=True) if k}
        for largest in sorted({b for n, b in units if n not in unstreamed}) or [0]:
            # must be resident (or served by a resident tied unit) for ``largest`` to be the largest streamed unit
            chosen = {n for n, b in units if b > largest and n not in unstreamed and n not in aliases} | kept_sources
            if any(b > largest and aliases[n] not in chosen for n, b in units if n in aliases):
                continue
            room = weight_budget - largest - sum(size[n] for n in chosen)
            if room < 0:
                continue
            streamed_one = False  # one unit of the largest streamed size streams
            for n, b in sorted(units, key=lambda u: (-u[1], order[u[0]])):
                if n in chosen or n in sources or aliases.get(n) in chosen or (b > largest and n not in unstreamed):
                    continue
                if b == largest and not streamed_one and n not in unstreamed:
                    streamed_one = True
                elif b <= room:
                    chosen.add(n)
                    room -= b
            served = {n for n in everything if n in chosen or aliases.get(n) in chosen}
            kept = sum(size[n] for n in served if n not in unstreamed)  # bytes no longer read per token
            if kept > best[0]:
                best = (kept, tuple(n for n in everything if n in served))
    return best[1]


def generation_config(engine: PipeLoadEngine, policy: GenerationPolicy, kv_reserved: int,
                      activations: int | None = None) -> EngineConfig:
    """Engine settings for a generate call that reserves ``kv_reserved`` bytes for the KV cache and
    ``activations`` (default: the policy's) for activations."""
    if activations is None:
        activations = policy.activation_bytes
    units = engine.units
    resident = policy.resident
    weight_budget = share(policy.budget_bytes, minimum_budget(units, resident or ()), kv_cache=kv_reserved,
                          activations=activations, what="for this generation",
                          fix=", or fewer new tokens, a shorter prompt or a smaller batch").weights
    if resident is None:
        # (a ring device's remote units are neither: a head another device computes serves no embedding here)
        tied = {units[a].name: units[r].name for a, r in tied_aliases(units, {u.name for u in units}).items()
                if "remote" not in (units[a].kind, units[r].kind)}
        # pinned units and the side buffer are held whatever is chosen
        fixed = side_room(units) + sum(u.buffer_bytes for u in units if u.kind == "pinned")
        # a gathered token embedding reads a few rows per token: worth keeping whole only to serve a tied head
        streamable = [u for u in units if u.called or (u.kind == "gather" and u.name in tied.values())]
        whole = [u for u in units if (u.called or u.kind == "gather")]
        if sum(u.buffer_bytes for u in whole if u.name not in tied) <= weight_budget - fixed:
            streamable = whole  # everything fits: nothing is read again
        resident = resident_for_tokens([(u.name, u.buffer_bytes) for u in streamable], weight_budget - fixed,
                                       {a: r for a, r in tied.items() if a in {u.name for u in streamable}},
                                       frozenset(u.name for u in streamable if u.kind == "gather"))
    c = engine.config
    return EngineConfig(weight_budget, loaders=c.loaders, prefetch=c.prefetch, io=c.io, resident=resident)


def kv_reservation(model: Any, kwargs: dict[str, Any], args: tuple[Any, ...] = ()) -> tuple[int, int, int]:
    """(batch, prompt length, KV cache bytes set aside) of ``model.generate(*args, **kwargs)``: the
    :func:`call_cache` ``peak``."""
    call, size = _cache_of(model, kwargs, args)
    return call.batch, call.prompt, size.peak


def budget_for(model: Any, weights: int, kwargs: dict[str, Any], args: tuple[Any, ...] = ()) -> int:
    """The budget that leaves the weights ``weights`` bytes in ``model.generate(*args, **kwargs)``: that call's KV
    cache reservation, its activations and the runtime slack on top (:mod:`hermes.share`)."""
    batch, prompt, kv = kv_reservation(model, kwargs, args)
    return weights + kv + activation_bytes(model.config, batch, prompt, model.dtype) + RUNTIME_SLACK_BYTES


def call_cache(model: Any, kwargs: dict[str, Any], args: tuple[Any, ...] = ()) -> CacheSize:
    """The cache transformers' ``generate`` allocates for ``model.generate(*args, **kwargs)``
    (:func:`hermes.kvcache.cache_size`), in the model's dtype; none with ``use_cache=False``."""
    return _cache_of(model, kwargs, args)[1]


def _cache_of(model: Any, kwargs: dict[str, Any], args: tuple[Any, ...]) -> tuple[Call, CacheSize]:
    from transformers.generation.configuration_utils import ALL_STATIC_CACHE_IMPLEMENTATIONS

    batch, prompt, total, encoder = _count(kwargs, args, model)
    gc = kwargs.get("generation_config") or model.generation_config
    get = lambda k: kwargs.get(k, getattr(gc, k, None))  # noqa: E731
    static = get("cache_implementation") in ALL_STATIC_CACHE_IMPLEMENTATIONS
    call = Call(batch, prompt, total, encoder, model.dtype, static)
    if get("use_cache") is False:
        return call, CacheSize(0, 0, 0)
    return call, cache_size(model.config, type(model), call)


def budgeted_generate(model: torch.nn.Module, engine: PipeLoadEngine, generate: Any, args: tuple[Any, ...],
                      kwargs: dict[str, Any]) -> Any:
    """transformers' ``generate`` (the bound method ``generate``) of a streamed model under its budget (see the
    module doc); the measurements go to ``engine.last_generation``."""
    policy = engine.generation_policy
    config, kv, activations = call_settings(model, engine, args, kwargs)
    batch, prompt = _count(kwargs, args, model)[:2]
    engine.reconfigure(config)
    caches: list[Any] = []
    grab = model.register_forward_pre_hook(
        lambda m, a, kw: caches.append(kw.get("past_key_values")) if not caches else None, with_kwargs=True)
    engine.history = history = []
    t0 = time.perf_counter()
    engine.generating = True
    try:
        with engine.continuous():
            out = generate(*args, **kwargs)
    finally:
        engine.generating = False
        grab.remove()
        engine.history = None
    end = time.perf_counter()
    new = None  # one token per forward, except in assisted generation (count the tokens returned)
    if kwargs.get("assistant_model") is not None or kwargs.get("prompt_lookup_num_tokens"):
        seq = getattr(out, "sequences", out)
        new = int(seq.shape[-1]) - prompt if isinstance(seq, torch.Tensor) else None
    engine.last_generation = _stats(engine, config, policy, kv, activations, caches, history, batch, prompt, t0, end,
                                    new)
    return out


def call_settings(model: torch.nn.Module, engine: PipeLoadEngine, args: tuple[Any, ...], kwargs: dict[str, Any]
                  ) -> tuple[EngineConfig, int, int]:
    """(engine settings, KV cache reserved, activations reserved) of ``model.generate(*args, **kwargs)`` under the
    engine's budget.

    Raises:
        BudgetError: the budget cannot hold the minimum weights with this call's KV cache and activations.
    """
    policy = engine.generation_policy
    batch, prompt, kv = kv_reservation(model, kwargs, args)
    if engine.stage is not None:  # a ring device holds the cache of its own blocks only
        kv = engine.stage.kv_share(kv)
    kv += assistant_bytes(kwargs.get("assistant_model"), kwargs, args)
    activations = activation_bytes(model.config, batch, prompt, model.dtype) \
        if policy.estimate_activations else policy.activation_bytes
    return generation_config(engine, policy, kv, activations), kv, activations


def assistant_bytes(assistant: Any, kwargs: dict[str, Any], args: tuple[Any, ...]) -> int:
    """Memory of an ``assistant_model`` (assisted generation's draft model) during a call: its weights (a plain
    model's parameters; a streamed model's budget) and its own KV cache. It is held beside the streamed model,
    so the budget holds it too."""
    if assistant is None:
        return 0
    engine = getattr(assistant, "hermes", None)
    if engine is not None:
        weights = engine.config.budget_bytes
    else:
        weights = sum(t.numel() * t.element_size() for t in (*assistant.parameters(), *assistant.buffers())
                      if t.device.type != "meta")
    return weights + kv_reservation(assistant, kwargs, args)[2]


def _stats(engine: PipeLoadEngine, config: EngineConfig, policy: GenerationPolicy, kv: int, activations: int,
           caches: list[Any],
           passes: list[PassStats], batch: int, prompt: int, t0: float, end: float,
           new: int | None = None) -> GenerationStats:
    history = [p for p in passes if p.entry == ""]  # one per forward of the model (not the encoder's own pass)
    # assisted generation accepts several tokens per forward: count the tokens, not the forwards
    n = new if new is not None and new > 0 else len(history)
    ttft = history[0].finished_at - t0 if history else end - t0
    decode = history[-1].finished_at - history[0].finished_at if len(history) > 1 else 0.0
    resident = tuple(u.name for u in engine.units if u.index in engine.resident or u.index in engine.aliases)
    return GenerationStats(
        batch=batch, prompt_tokens=prompt, new_tokens=n, forward_passes=len(history), ttft_s=ttft, total_s=end - t0,
        tokens_per_s=n / (end - t0) if end > t0 else 0.0,
        decode_tokens_per_s=(n - 1) / decode if decode > 0 else 0.0,
        budget_bytes=policy.budget_bytes, weight_budget_bytes=config.budget_bytes, weights_max_bytes=engine.weights_max,
        kv_reserved_bytes=kv,
        activation_reserved_bytes=activations, slack_bytes=policy.budget_bytes - config.budget_bytes - kv - activations,
        kv_cache_bytes=measured_cache_bytes(caches[0]) if caches and caches[0] is not None else 0,
        weights_peak_bytes=max((p.weights_peak_bytes for p in passes), default=0),
        resident=resident, resident_bytes=sum(u.buffer_bytes for u in engine.units if u.index in engine.resident),
        first_pass_bytes_read=history[0].bytes_read if history else 0,
        bytes_read_per_token=statistics.median(p.bytes_read for p in history[1:]) if n > 1 else 0.0,
        stall_s=sum(p.stall_s for p in passes), passes=passes)
