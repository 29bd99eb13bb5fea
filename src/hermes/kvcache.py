"""What the cache of a transformers ``generate`` call holds, sized before the call from the model's config and class
(issue #23), so that the budget can set it aside.

transformers' ``generate`` builds ``DynamicCache(config=config.get_text_config(decoder=True))`` (a ``StaticCache``
with ``cache_implementation="static"``; an encoder-decoder a second one for cross-attention): one cache layer per
decoder layer, of the kind its ``layer_types`` says. :func:`cache_size` builds that same object and feeds each
attention layer meta-device keys and values (no memory) through the layer's own ``update`` (the prompt, then the
tokens up to the last, then the last), so a full layer ends with every position, a sliding-window layer with what its
window keeps (and, after the prompt, the whole prompt until the next token), a static layer with its preallocated
length, a shared (dummy) layer with nothing. The key/value heads and sizes of a layer come from the decoder's config,
decoder-specific names first: a flat encoder-decoder config's decoder view (``get_text_config(decoder=True)``) keeps
the encoder's values in some fields (T5's ``num_layers``; BART's ``decoder_layers`` falls back to the class default).

Fixed-size states (a state-space or linear-attention layer's convolution and recurrent states) come from the table
:data:`STATES`, one row per kind of mixer; models whose ``generate`` keeps its own state instead of a transformers
cache (RWKV, XLNet's memory, a transducer's decoder, CTC's none) from :data:`OWN_CACHES`.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch

from hermes.errors import InputError
from hermes.lean import MetaCat

FLOAT32 = 4  # bytes per element of a recurrent state: transformers' torch paths keep them in float32


@dataclass(frozen=True)
class CacheSize:
    """Bytes of the cache of one ``generate`` call."""

    held: int  # at the end of the call: what transformers' cache object holds (measured_cache_bytes)
    prompt_pass: int  # after the prompt's forward (more than held where sliding layers keep a long prompt a while)
    growth: int  # on top of either while a layer grows: its old and new tensors coexist for a moment

    @property
    def peak(self) -> int:
        """The most the cache holds at once: what a budget sets aside."""
        return max(self.held, self.prompt_pass) + self.growth


@dataclass(frozen=True)
class Call:
    """What a ``generate`` call's cache depends on."""

    batch: int  # sequences, beams and returned sequences included
    prompt: int  # positions of the first forward (an encoder-decoder: the decoder's prompt)
    total: int  # positions at the end: prompt + new tokens (+ assisted generation's candidates)
    encoder: int = 0  # an encoder-decoder's encoder positions: its cross-attention keys and values
    dtype: torch.dtype = torch.float32  # the model's
    static: bool = False  # cache_implementation="static": every layer preallocated for total - 1 positions


def _get(c: Any, *names: str) -> int | None:
    """The first of ``names`` that ``c`` sets to a positive int (a non-positive one means unset: XLNet's -1)."""
    for n in names:
        try:
            v = getattr(c, n, None)
        except (AttributeError, ValueError):  # a per-layer field of a heterogeneous config
            continue
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return None


def _need(c: Any, what: str, *names: str) -> int:
    v = _get(c, *names)
    if v is None:
        raise InputError(f"cannot size the cache of {type(c).__name__}: it sets none of {names} ({what})")
    return v


def decoder_config(config: Any) -> Any:
    """The config transformers builds a generation cache from: the decoder's text config."""
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def _dec(config: Any, *names: str) -> int | None:
    """A decoder-specific field of a flat encoder-decoder config (read on the config itself, not its decoder view)."""
    return _get(config, *names) if getattr(config, "is_encoder_decoder", False) else None


LAYERS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
HEADS = ("num_attention_heads", "n_head", "num_heads", "n_heads")
KV_HEADS = ("num_key_value_heads", "num_kv_heads", "n_head_kv", "n_kv_heads", "multi_query_group_num")
HEAD_DIM = ("head_dim", "d_kv", "kv_channels", "attention_head_dim", "d_head", "attention_head_size")
HIDDEN = ("hidden_size", "d_model", "n_embd", "dim", "embed_dim")


def decoder_layers(config: Any) -> int:
    return _dec(config, "decoder_layers", "num_decoder_layers") or \
        _need(decoder_config(config), "decoder layers", *LAYERS)


def attention_heads(config: Any, layer: Any = None) -> int:
    return _dec(config, "decoder_attention_heads", "num_decoder_attention_heads") or \
        _need(layer if layer is not None else decoder_config(config), "attention heads", *HEADS)


def hidden_size(config: Any, layer: Any = None) -> int:
    return _dec(config, "decoder_hidden_size", "decoder_d_model") or \
        _need(layer if layer is not None else decoder_config(config), "hidden size", *HIDDEN)


def kv_shape(config: Any, layer: Any = None) -> tuple[int, int, int]:
    """(key/value heads, key size, value size) of a decoder attention layer (``layer``: its per-layer config)."""
    c = layer if layer is not None else decoder_config(config)
    heads = attention_heads(config, c)
    if getattr(c, "multi_query", False) and not getattr(c, "new_decoder_architecture", False):
        kv_heads = 1  # GPT-BigCode, Falcon-7B: one key/value head
    else:
        kv_heads = _dec(config, "decoder_num_key_value_heads") or _get(c, *KV_HEADS) or heads
    if _get(c, "kv_lora_rank"):  # multi-head latent attention caches the compressed latent and the rotary key
        return 1, _need(c, "latent size", "kv_lora_rank"), _get(c, "qk_rope_head_dim") or 0
    head_dim = _get(c, *HEAD_DIM) or hidden_size(config, c) // heads
    return kv_heads, head_dim, _get(c, "v_head_dim") or head_dim


def _indexer_width(c: Any) -> int:
    """Width of a sparse-attention indexer's cached keys (DeepSeek-V3.2; GLM-5's k-pool indexer packs its keys, as
    many gate scores and a validity flag); 0 without an indexer."""
    width = _get(c, "index_head_dim") or 0
    return 2 * width + 1 if width and _get(c, "index_kpool") else width


# --- fixed-size states -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class StateRow:
    """One kind of fixed-size per-layer state, per sequence: recognized by a config field only it sets."""

    mixer: str  # what keeps the state
    marks: tuple[str, ...]  # config fields that say the layers are this kind (any)
    conv: Callable[[Any], int]  # convolution-state elements (in the model's dtype)
    recurrent: Callable[[Any], int]  # recurrent-state elements (float32)


def _mamba2_inner(c: Any) -> int:
    return _need(c, "SSM heads", "mamba_n_heads", "mamba_num_heads", "n_mamba_heads", "num_heads") * \
        _need(c, "SSM head size", "mamba_d_head", "mamba_head_dim", "mamba_headdim", "head_dim")


def _ssm_state(c: Any) -> int:
    return _need(c, "SSM state size", "mamba_d_state", "ssm_state_size", "state_size")


def _mamba_inner(c: Any) -> int:
    expand = _get(c, "mamba_expand")
    return expand * _need(c, "hidden size", *HIDDEN) if expand else _need(c, "Mamba width", "intermediate_size")


def _conv_kernel(c: Any) -> int:
    return _need(c, "convolution width", "mamba_d_conv", "conv_kernel", "linear_conv_kernel_dim")


def _linear_width(c: Any) -> int:
    return _need(c, "linear heads", "linear_num_heads") * _need(c, "head size", "linear_head_dim")


def _delta_conv(c: Any) -> int:
    keys = 2 * _need(c, "key heads", "linear_num_key_heads") * _need(c, "key size", "linear_key_head_dim")
    values = _need(c, "value heads", "linear_num_value_heads") * _need(c, "value size", "linear_value_head_dim")
    return (keys + values) * _conv_kernel(c)


STATES: tuple[StateRow, ...] = (
    # Mamba-2 (Mamba2, Bamba, Granite 4 hybrid, Falcon-H1, Nemotron-H, Zamba2): conv over x, B and C;
    # heads x head size x state
    StateRow("Mamba-2 mixer", ("mamba_n_groups", "n_groups", "mamba_ngroups"),
             conv=lambda c: (_mamba2_inner(c) + 2 * _need(c, "groups", "mamba_n_groups", "n_groups", "mamba_ngroups")
                             * _ssm_state(c)) * _conv_kernel(c),
             recurrent=lambda c: _mamba2_inner(c) * _ssm_state(c)),
    # Mamba (Mamba, Falcon-Mamba, Jamba, Zamba): conv over the inner width; inner width x state
    StateRow("Mamba mixer", ("state_size", "mamba_d_state", "ssm_state_size"),
             conv=lambda c: _mamba_inner(c) * _conv_kernel(c), recurrent=lambda c: _mamba_inner(c) * _ssm_state(c)),
    # Gated DeltaNet (Qwen3-Next, Qwen3.5, OLMo hybrid): conv over q, k and v; value heads x key size x value size
    StateRow("Gated DeltaNet", ("linear_num_value_heads",), conv=_delta_conv,
             recurrent=lambda c: _need(c, "value heads", "linear_num_value_heads")
             * _need(c, "key size", "linear_key_head_dim") * _need(c, "value size", "linear_value_head_dim")),
    # Kimi Delta Attention and its kin (Kimi Linear, Ling hybrid, GLM-5 next): conv over q, k and v; heads x size x size
    StateRow("Kimi Delta Attention", ("linear_num_heads",),
             conv=lambda c: 3 * _linear_width(c) * _conv_kernel(c),
             recurrent=lambda c: _linear_width(c) * _need(c, "head size", "linear_head_dim")),
    # Zaya's convolutional attention: conv over queries and keys (two kernels' history); half of each value head
    StateRow("compressed convolutional attention", ("cca_time0",),
             conv=lambda c: (_need(c, "heads", *HEADS) + _need(c, "key/value heads", *KV_HEADS)) * kv_shape(c)[1]
             * (_need(c, "kernel", "cca_time0") + _need(c, "kernel", "cca_time1") - 2),
             recurrent=lambda c: _need(c, "key/value heads", *KV_HEADS) * kv_shape(c)[1] // 2),
    # LFM2's short convolutions: the hidden width x the cached length
    StateRow("short convolution", ("conv_L_cache",), conv=lambda c: _need(c, "hidden size", *HIDDEN)
             * _need(c, "convolution cache", "conv_L_cache"), recurrent=lambda c: 0),
    # MiniMax's lightning attention: a heads x size x size state per layer (in its own MiniMaxCache)
    StateRow("lightning attention", ("linear_attn_alpha_factor",), conv=lambda c: 0,
             recurrent=lambda c: _need(c, "heads", *HEADS) * kv_shape(c)[1] ** 2),
    # Inkling / Inkling 2: four short convolutions per layer (keys, values, after attention, after the MLP), their
    # states kept in float32 (so counted as recurrent elements); keys and values of the widest attention kind
    StateRow("Inkling short convolutions", ("sconv_kernel_size",), conv=lambda c: 0,
             recurrent=lambda c: 2 * _need(c, "kernel", "conv_kernel_size") * (
                 max(_need(c, "key/value heads", *KV_HEADS) * _need(c, "head size", *HEAD_DIM),
                     (_get(c, "swa_num_key_value_heads") or 0) * (_get(c, "swa_head_dim") or 0))
                 + _need(c, "hidden size", *HIDDEN))),
    # RecurrentGemma's RG-LRU (held by its modules, not the cache object): conv over width - 1 steps; the LRU width
    StateRow("RG-LRU", ("lru_width",),
             conv=lambda c: _need(c, "LRU width", "lru_width") * (_need(c, "convolution width", "conv1d_width") - 1),
             recurrent=lambda c: _need(c, "LRU width", "lru_width")),
)


def state_bytes(config: Any, dtype: torch.dtype) -> int:
    """Bytes of one sequence's fixed-size state in one linear-attention / state-space layer (:data:`STATES`).

    Raises:
        InputError: no row of the table knows the config's kind of layer.
    """
    c = decoder_config(config)
    for row in STATES:
        if any(_get(c, m) is not None for m in row.marks):
            return row.conv(c) * dtype.itemsize + row.recurrent(c) * max(dtype.itemsize, FLOAT32)
    raise InputError(f"cannot size the state of {type(c).__name__}'s linear-attention / state-space layers: Hermes "
                     f"knows the states of {', '.join(r.mixer for r in STATES)} (hermes.kvcache.STATES); this model "
                     "cannot generate under a budget until its row is added")


# --- models that keep their own state --------------------------------------------------------------------------

@dataclass(frozen=True)
class OwnCache:
    """A model class whose ``generate`` keeps its own state instead of a transformers cache."""

    marks: tuple[str, ...]  # in the class name (transformers tells these apart by name too)
    what: str
    size: Callable[[Any, Call], CacheSize]


def _rwkv(c: Any, call: Call) -> CacheSize:
    # five (batch, hidden, layers) tensors: two in the model's dtype (token shifts), three float32 (num, den, max)
    cells = call.batch * _need(c, "hidden size", *HIDDEN) * _need(c, "layers", *LAYERS)
    held = cells * (2 * call.dtype.itemsize + 3 * FLOAT32)
    return CacheSize(held, held, 0)


def _xlnet(c: Any, call: Call) -> CacheSize:
    # each layer's memory: (positions, batch, d_model) hidden states (the prompt + a dummy token, then one more per
    # token); the previous memory stays alive through the forward that makes the next
    mem = _get(c, "mem_len")
    per = call.batch * _need(c, "hidden size", *HIDDEN) * _need(c, "layers", *LAYERS) * call.dtype.itemsize
    held, first = (per * min(n, mem + 1) if mem else per * n for n in (call.total, call.prompt + 1))
    return CacheSize(held, first, max(held, first))


def _transducer(c: Any, call: Call) -> CacheSize:
    # the prediction network's last output (batch, 1, hidden) and its LSTM's hidden and cell states
    # (layers, batch, hidden)
    width = _need(c, "decoder width", "decoder_hidden_size")
    held = call.batch * width * (1 + 2 * _need(c, "decoder layers", "num_decoder_layers")) * call.dtype.itemsize
    return CacheSize(held, held, held)  # a batch whose sequences end apart replaces the tensors (torch.where)


OWN_CACHES: tuple[OwnCache, ...] = (
    OwnCache(("ForCTC",), "no cache: CTC decodes the logits of one forward", lambda c, call: CacheSize(0, 0, 0)),
    OwnCache(("ForRNNT", "ForTDT"), "a transducer's decoder state", _transducer),
    OwnCache(("Rwkv",), "RWKV's recurrent state", _rwkv),
    OwnCache(("XLNet",), "XLNet's memory", _xlnet),
)


# --- transformers' cache, filled with meta tensors ----------------------------------------------------------------

def _held(layer: Any, *, meta: bool = True) -> int:
    """Bytes a cache layer's tensors hold (their storage: a sliding window's keys are a view of a longer tensor);
    ``meta`` False: meta tensors count nothing."""
    total = 0
    for name in ("keys", "values", "indexer_keys"):
        t = getattr(layer, name, None)
        if isinstance(t, torch.Tensor) and (meta or t.device.type != "meta"):
            total += t.untyped_storage().nbytes()
    return total


def _fill(layer: Any, shape: tuple[int, ...], call: Call, positions: tuple[int, ...]) -> tuple[int, int]:
    """(bytes after the first update, at the end) of an attention cache layer fed ``positions`` positions at a
    time; ``shape``: (key/value heads, key size, value size, indexer key size or 0)."""
    from transformers.cache_utils import CacheLayerMixin

    if not isinstance(layer, CacheLayerMixin):  # a dummy (shared) layer, or linear attention alone
        return 0, 0
    heads, key, value, index = shape
    first = 0
    with MetaCat():  # torch's meta cat would import sympy
        for i, n in enumerate(p for p in positions if p > 0):
            layer.update(torch.empty(call.batch, heads, n, key, dtype=call.dtype, device="meta"),
                         torch.empty(call.batch, heads, n, value, dtype=call.dtype, device="meta"))
            if index and hasattr(layer, "update_indexer"):  # DeepSeek-V3.2's sparse attention indexer: own keys
                layer.update_indexer(torch.empty(call.batch, n, index, dtype=call.dtype, device="meta"))
            first = _held(layer) if i == 0 else first
    return first, _held(layer)


def transformers_cache(config: Any, call: Call, length: int) -> Any:
    """The cache object transformers' ``generate`` builds for this config (``length``: a static cache's)."""
    from transformers.cache_utils import DynamicCache, StaticCache

    c = decoder_config(config)
    return StaticCache(config=c, max_cache_len=length) if call.static else DynamicCache(config=c)


def _attention(config: Any, call: Call) -> CacheSize:
    """Keys, values and fixed-size states of every decoder layer (and the cross-attention's) at the call's end."""
    from transformers.cache_utils import CacheLayerMixin, LinearAttentionCacheLayerMixin

    view = decoder_config(config)
    if _get(view, "prompt_types"):  # CPM-Ant prepends prompt_length learned positions to every input
        prefix = _get(view, "prompt_length") or 0
        call = replace(call, prompt=call.prompt + prefix, total=call.total + prefix)
    last = max(call.total - 1, call.prompt)  # the last token is sampled, never fed back
    layers = list(transformers_cache(config, call, last).layers)
    cross = transformers_cache(config, call, call.encoder).layers if call.encoder else []
    depth = _dec(config, "decoder_layers", "num_decoder_layers") or len(layers)
    if depth > len(layers):  # T5 with num_decoder_layers > num_layers: generate fails (IndexError in the cache)
        raise InputError(f"transformers builds a cache of {len(layers)} layers for {type(config).__name__} (its "
                         f"decoder view's num_hidden_layers) but the decoder has {depth}: its generate fails on this "
                         "config (a transformers limitation); use a decoder no deeper than the encoder")
    per_layer = getattr(view, "per_layer_config", None)
    held = first = growth = 0
    for i, layer in enumerate(layers[:depth]):
        attends = isinstance(layer, CacheLayerMixin)
        c = per_layer[i] if per_layer is not None else view
        shape = (*kv_shape(config, c), _indexer_width(c)) if attends else (0, 0, 0, 0)
        if attends and getattr(view, "model_type", None) == "mimo_v2_flash" \
                and view.layer_types[i] == "sliding_attention":  # twice the config's key/value heads, in its code
            shape = (2 * shape[0], *shape[1:])
        a, b = _fill(layer, shape, call, (call.prompt, last - 1 - call.prompt, 1 if last > call.prompt else 0))
        if isinstance(layer, LinearAttentionCacheLayerMixin):
            state = call.batch * state_bytes(view, call.dtype)
            a, b = a + state, b + state
        first, held = first + a, held + b
        if attends and not getattr(layer, "is_compileable", False):  # grows by concatenation (static: in place)
            growth = max(growth, b)
        if cross and attends:  # cross-attention: the encoder's keys and values, once
            n = _fill(cross[i], shape, call, (call.encoder,))[1]
            first, held = first + n, held + n
    return CacheSize(held, first, growth)


def cache_size(config: Any, model_class: type, call: Call) -> CacheSize:
    """The cache transformers' ``generate`` of ``model_class`` allocates for ``call``.

    Raises:
        InputError: the model keeps a state Hermes cannot size (named), or transformers cannot build its cache.
    """
    name = model_class.__name__
    own = next((o for o in OWN_CACHES if any(m in name for m in o.marks)), None)
    if own is not None:
        return own.size(config, call)
    supports = getattr(model_class, "_supports_default_dynamic_cache", None)
    if callable(supports) and not supports() and not any(
            _get(decoder_config(config), m) is not None for r in STATES for m in r.marks):
        raise InputError(f"{name}'s generate keeps its own kind of cache (not a transformers Cache), which Hermes "
                         f"cannot size; it sizes {', '.join(o.what for o in OWN_CACHES)} and transformers' caches")
    return _attention(config, call)


def measured_cache_bytes(cache: Any) -> int:
    """Bytes of the tensors a cache returned by transformers holds: a Cache's keys and values (their storage) and
    fixed-size states, an encoder-decoder's two caches, a MiniMax cache's linear states, RWKV's state list, XLNet's
    memory tuple. Meta tensors hold nothing (a ring device's cache layers of the blocks other devices compute)."""
    if isinstance(cache, torch.Tensor):
        return cache.untyped_storage().nbytes() if cache.device.type != "meta" else 0
    if isinstance(cache, (list, tuple)):
        return sum(measured_cache_bytes(t) for t in cache)
    parts = [getattr(cache, n, None) for n in ("self_attention_cache", "cross_attention_cache")]
    if any(p is not None for p in parts):
        return sum(measured_cache_bytes(p) for p in parts if p is not None)
    total = measured_cache_bytes(getattr(cache, "linear_cache", None) or [])
    for layer in getattr(cache, "layers", ()) or ():
        total += _held(layer, meta=False)
        for states in (getattr(layer, "conv_states", None), getattr(layer, "recurrent_states", None)):
            total += sum(t.untyped_storage().nbytes() for t in (states or {}).values()
                         if isinstance(t, torch.Tensor) and t.device.type != "meta")
    return total
