"""Tiny models of any installed transformers architecture, for the architecture sweep (scripts/sweep_models.py):
``shrink_config`` makes any config small by the names of its fields, recursively over its sub-configs;
``candidates`` lists the class users load for each ``model_type``; ``make_inputs`` gives a forward's inputs.
Unlike ``hermes.zoo`` (hand-written entries), nothing here is per architecture."""
from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import inspect
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

LAYERS, WIDTH = 2, 64  # blocks per stack; every width in every sub-config (so widths shared between them agree)
HEADS, HEAD_DIM = 4, 16  # attention heads (per stage: powers of two up to this) and their size
INTERMEDIATE, EXPERT_INTERMEDIATE = 128, 32  # feed-forward widths: dense, per expert
EXPERTS, TOP_K, VOCAB, BATCH, SEQ = 4, 2, 1000, 2, 10  # experts, routed per token; vocabulary; input ids' shape
SPECIAL_IDS = range(VOCAB - 64, VOCAB)  # token ids >= VOCAB are moved here (distinct, above the input ids)
POSITIONS, SOURCE_POSITIONS = 512, 32  # max positions (image tokens + prompt + new tokens); audio encoder's
IMAGE, PATCH, MEL_BINS, SLIDING_WINDOW = 32, 8, 32, 8  # pixels per side, per patch side; mel bins; a window


def _rx(*alternatives: str) -> re.Pattern[str]:
    return re.compile("|".join(alternatives))


# Field names by what they mean, matched against the whole key.
_LAYER = _rx(r"(num_)?(hidden_|encoder_|decoder_|text_|vision_|audio_|transformer_)?layers", r"n_layers?",
             r"(encoder|decoder)_num_layers", "depth", "num_blocks", r"(encoder|decoder)_depth", "num_hidden_blocks")
_HEAD = _rx(r"num_attention_heads", r"n_heads?", "num_heads", r"(encoder|decoder)_attention_heads",
            "attention_heads", r"(\w+_)?num_attention_heads", "num_attn_heads")
_KV_HEAD = _rx("num_key_value_heads", r"n_kv_heads?", "num_kv_heads", "multi_query_group_num",
               r"(\w+_)?num_key_value_heads")
_EXPERTS = _rx("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts", "num_routed_experts",
               "n_experts", "num_experts_total", "moe_num_routed_experts")
_TOP_K = _rx("num_experts_per_tok", "moe_topk", "top_k", "num_selected_experts", "moe_k", "n_activated_experts",
             "num_experts_per_token", "moe_top_k", "experts_per_token", "router_topk")
_TOKEN_ID = _rx(r"\w*token_(id|index|ids)", r"\w*_token")


def _cap(n: int) -> Callable[[int, dict[str, Any]], int]:
    return lambda v, d: min(v, n)


# (field names, new value from the old one and the config level): the first that matches a positive int applies.
_INT_RULES: tuple[tuple[re.Pattern[str], Callable[[int, dict[str, Any]], int]], ...] = tuple(
    (re.compile(p) if isinstance(p, str) else p, f) for p, f in (
        (r"(moe|expert|shared_expert|routed_expert|moe_shared_expert)_intermediate_size|moe_ffn_(hidden_size|dim)"
         r"|expert_(hidden|ffn)_(size|dim)|moe_hidden_size", _cap(EXPERT_INTERMEDIATE)),
        (r"(\w+_)?intermediate_size|(\w+_)?ffn_dim|d_ff|n_inner|mlp_dim|ffn_hidden_size|(\w+_)?ff_dim"
         r"|dim_feedforward|feed_forward_size|d_inner|filter_size|(\w+_)?mlp_hidden_(size|dim)", _cap(INTERMEDIATE)),
        (_KV_HEAD, lambda v, d: v),  # after the heads (_fix_heads)
        (_HEAD, _cap(HEADS)),
        (r"head_dim|d_kv|kv_channels|attention_head_dim|dim_head|attention_head_size|d_head|(\w+_)?head_dim",
         _cap(HEAD_DIM)),
        (r"hidden_size|d_model|n_embd|dim|embed_dim|emb_dim|embedding_dim|hidden_dim|width|(\w+_)?hidden_size"
         r"|(text|vision|audio|encoder|decoder|projector|out|output|word_embed_proj|fusion)_(hidden_)?(size|dim)"
         r"|(text|vision|audio)_embed_dim|n_embed|embedding_size|d_embed|model_dim|intra_bottleneck_size"
         r"|true_hidden_size|condition_dim|cond_dim|d_latents|d_inner_hidden|projection_size", _cap(WIDTH)),
        (_EXPERTS, _cap(EXPERTS)), (_TOP_K, _cap(TOP_K)),
        (r"max_position_embeddings|n_positions|max_target_positions|n_ctx|max_seq_len|max_sequence_length"
         r"|seq_length|max_length_positions|text_max_position_embeddings", _cap(POSITIONS)),
        ("max_source_positions", _cap(SOURCE_POSITIONS)), (r"(?!type_vocab_size)\w*vocab\w*", _cap(VOCAB)),
        ("sliding_window|attention_chunk_size|local_attention|sliding_window_size", _cap(SLIDING_WINDOW)),
        ("num_mel_bins", _cap(MEL_BINS)), ("image_size", _cap(IMAGE)), ("patch_size", _cap(PATCH)),
        ("n_shared_experts|num_shared_experts|moe_num_shared_experts|first_k_dense_replace|num_dense_layers"
         "|first_dense_layers|attn_layer_offset|expert_layer_offset", _cap(1)),
        ("n_group|topk_group|num_expert_group", lambda v, d: 1), ("rotary_dim|rotary_emb_dim", _cap(HEAD_DIM)),
        ("index_n_heads|linear_num_key_heads|attn_layer_period|expert_layer_period", _cap(2)),
        ("linear_num_value_heads|num_groups|norm_num_groups", _cap(4)),
        ("index_topk|index_kpool|num_latents|base_channels|num_filters|ch|base_dim", _cap(16)),
        ("mm_tokens_per_image", lambda v, d: (IMAGE // PATCH) ** 2 // 4),  # pooled 2x2
        ("image_seq_length|num_image_tokens", lambda v, d: (IMAGE // PATCH) ** 2 if "vision_config" in d else v),
        (r"(?!\w*(image|patch|max|length|window|vocab|position|pos|rate|fft|hop|chunk|batch|kernel|stride|frames"
         r"|bucket|cache|token|seq|num|pool|grid))\w*(_dim|_size|_channels?|_hidden|_width|_features)",
         lambda v, d: WIDTH if v >= 256 else v),  # any other width
        ("projection_dim|proj_dim|q_lora_rank|kv_lora_rank", _cap(32)),
    ))
# Lists of ints: per stage depths, widths, heads; layer indices.
_LIST_RULES: tuple[tuple[re.Pattern[str], Callable[[list[int], int], list[int]]], ...] = (  # (list, width factor)
    (_rx("depths", "blocks_per_stage", "stage_num_blocks", "num_layers_per_stage", "layers_per_stage"),
     lambda v, f: [min(x, 1) for x in v]),
    (_rx("hidden_sizes", r"\w*channels\w*", "embed_dims?", "embed_dim_per_stage", "conv_dim", "neck_hidden_sizes",
         r"\w*hidden_sizes", "dims", "widths", "tdnn_dim"),
     lambda v, f: [max(4, x // f) if x > 4 else x for x in v]),  # one factor for every width list of a level
    (_rx("num_heads", r"num_attention_heads(_per_stage)?", "heads", "attention_heads"),
     lambda v, f: [min(1 << (max(1, x).bit_length() - 1), HEADS) for x in v]),
)
_INDEX_LIST = _rx(r"\w*(layer|block)_(indexes|indices|ids)", r"\w*_layers_to_\w+", "mlp_only_layers",
                  "global_attn_indexes", "fullatt_block_indexes", "deepstack_visual_indexes", "vision_feature_layers?",
                  "cross_attention_layers")
_PATTERNS = ("block_types", "layers_block_type", "layer_pattern", "hybrid_override_pattern")  # repeating lists


def _is(pattern: re.Pattern[str], key: Any) -> bool:
    return isinstance(key, str) and pattern.fullmatch(key) is not None


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _layer_choice(d: dict[str, Any], old: int, new: int) -> list[int]:
    """The ``new`` of ``old`` layers kept: first of each kind in a per-layer list (sliding, full, dense, MoE...)."""
    keep: list[int] = []
    for k, v in d.items():
        if isinstance(v, list) and len(v) == old and k not in ("out_features", "stage_names"):
            keep += [i for i in sorted({repr(x): i for i, x in reversed(list(enumerate(v)))}.values()) if i not in keep]
    return sorted((keep[:new] + [i for i in range(old) if i not in keep])[:new])


def _shrink_layers(d: dict[str, Any], out: dict[str, Any]) -> dict[str, int]:
    """Layer counts and the per-layer lists that follow them; the old layer counts."""
    stages = len(d["depths"]) if isinstance(d.get("depths"), list) else None  # a stage count is no layer count
    old_layers = {k: v for k, v in d.items() if _int(v) and _is(_LAYER, k) and v > 0 and v != stages}
    for k, v in old_layers.items():
        out[k] = min(v, LAYERS)
    for old in sorted(set(old_layers.values())):
        if old > LAYERS:
            keep = _layer_choice(d, old, LAYERS)
            for k, v in d.items():
                if isinstance(v, list) and len(v) == old and k not in ("out_features", "stage_names", "out_indices"):
                    out[k] = [v[i] for i in keep]
    n = max((out[k] for k in old_layers), default=LAYERS)
    f = max(1, max((x for k, v in out.items() if _is(_LIST_RULES[1][0], k) and isinstance(v, list) for x in v
                    if _int(x)), default=0) // WIDTH)
    for k, v in list(out.items()):
        if isinstance(v, list) and v and all(_int(x) for x in v):
            rule = next((f for p, f in _LIST_RULES if _is(p, k)), None)
            if rule is not None:
                out[k] = rule(v, f)
            elif _is(_INDEX_LIST, k) and old_layers:
                old = max(old_layers.values())
                out[k] = sorted({min(n - 1, x * n // old) if x >= 0 else x for x in v})
    for k in ("max_window_layers", "num_kv_shared_layers"):
        if _int(d.get(k)):
            out[k] = min(d[k], n if k == "max_window_layers" else n - 1)
    for k in _PATTERNS:
        v = d.get(k)
        if isinstance(v, list) and old_layers and len(v) < max(old_layers.values()):  # each kind in the first
            kinds = list(dict.fromkeys(v))
            out[k] = kinds + [x for x in v if x not in kinds or v.count(x) > 1][: max(0, len(v) - len(kinds))]
    if "attn_layer_indices" in d and d["attn_layer_indices"] is None and old_layers:  # one attention layer
        out["attn_layer_indices"] = [n - 1]
    return old_layers


def _shrink_level(d: dict[str, Any]) -> dict[str, Any]:
    """One config level (its sub-configs already shrunk)."""
    out = dict(d)
    old_layers = _shrink_layers(d, out)
    for k, v in d.items():
        if _int(v) and v > 0 and isinstance(k, str) and not _is(_LAYER, k):
            rule = next((f for p, f in _INT_RULES if p.fullmatch(k)), None)
            if rule is not None:
                out[k] = rule(v, d)
    for k, size in (("image_size", IMAGE), ("patch_size", PATCH)):
        v = d.get(k)
        if isinstance(v, list) and v and all(_int(x) for x in v) and max(v) > size:
            out[k] = [size] * len(v)
    if isinstance(d.get("depths"), list) and _int(d.get("window_size")):  # 4 stages of windows of 2 from 16x16
        out["window_size"], out["image_size"] = min(d["window_size"], 2), IMAGE * 2 if _int(d.get("image_size")) \
            else d.get("image_size")
    for fix in (_fix_heads, _fix_none, _fix_rope, _fix_mamba):
        fix(d, out)
    _fix_stages(d, out, old_layers)
    if old_layers:  # dicts keyed by layer index (per-layer overrides): those of the layers that remain
        n = max(out[k] for k in old_layers)
        for k, v in d.items():
            if isinstance(v, dict) and v and all(str(i).lstrip("-").isdigit() for i in v):
                out[k] = {i: x for i, x in v.items() if 0 <= int(i) < n}
    return out


def _fix_heads(d: dict[str, Any], out: dict[str, Any]) -> None:
    """Key/value heads divide the heads, keeping multi-query (1) and full (== heads) attention as they were."""
    old_heads = next((d[h] for h in d if _is(_HEAD, h) and _int(d[h])), None)
    new_heads = next((out[h] for h in out if _is(_HEAD, h) and _int(out[h])), HEADS)
    for k, v in d.items():
        if _int(v) and v > 0 and _is(_KV_HEAD, k):
            out[k] = 1 if v == 1 else new_heads if v == old_heads else max(1, min(2, new_heads))


def _fix_none(d: dict[str, Any], out: dict[str, Any]) -> None:
    """None where the model reads a number: head size (where there are heads), experts per token (experts)."""
    if "head_dim" in d and d["head_dim"] is None and any(_is(_HEAD, k) for k in d):
        out["head_dim"] = HEAD_DIM
    if any(_is(_EXPERTS, k) and _int(v) for k, v in out.items()):
        out.update({k: TOP_K for k, v in d.items() if _is(_TOP_K, k) and v is None})


def _fix_rope(d: dict[str, Any], out: dict[str, Any]) -> None:
    """Multimodal rotary sections sum to half the head size (explicit where the code has a default for them)."""
    rope = out.get("rope_parameters") or out.get("rope_scaling")
    if not isinstance(rope, dict):
        return
    half = (out.get("head_dim") or HEAD_DIM) // 2
    if _uses_mrope(str(out.get("model_type", ""))) and "mrope_section" not in rope:
        rope["mrope_section"] = [16, 24, 24]
    for key in ("mrope_section", "mrope_sections"):
        sec = rope.get(key)
        if isinstance(sec, list) and sec and all(_int(x) for x in sec) and sum(sec) > half:
            rope[key] = [max(1, half // len(sec))] * len(sec)
            rope[key][0] += half - sum(rope[key])


def _fix_mamba(d: dict[str, Any], out: dict[str, Any]) -> None:
    """State-space heads: heads x head size = expand x width, one group, a small state."""
    for heads, head, expand in (("mamba_n_heads", "mamba_d_head", "mamba_expand"), ("num_heads", "head_dim", "expand")):
        if _int(out.get(heads)) and _int(out.get(expand)) and (head in out):
            out[head] = HEAD_DIM
            out[heads] = out[expand] * (out.get("hidden_size") or WIDTH) // HEAD_DIM
    out.update({k: 1 for k in ("n_groups", "mamba_n_groups", "ngroups") if _int(out.get(k))})
    out.update({k: 16 for k in ("state_size", "mamba_d_state", "ssm_state_size", "d_state")
                if _int(out.get(k)) and out[k] > 16})


def _fix_stages(d: dict[str, Any], out: dict[str, Any], old_layers: dict[str, int]) -> None:
    """A backbone's outputs: as many stages as it had out_indices (up to 4), the last ones; the config recomputes
    the stage names."""
    if "stage_names" not in d or not isinstance(d.get("out_indices"), list):
        return
    layer_key = next((k for k, v in old_layers.items() if v == len(d["stage_names"]) - 1), None)
    out.pop("stage_names"), out.pop("out_features", None)
    k = max(1, min(len(d["out_indices"]), 4))
    if layer_key is not None:  # stages are layers (else a depths list)
        out[layer_key] = max(out[layer_key], k)
    n = out[layer_key] if layer_key is not None else len(out.get("depths") or d["stage_names"][1:])
    out["out_indices"] = list(range(max(1, n - k + 1), n + 1))


@functools.cache
def _uses_mrope(model_type: str) -> bool:
    """Whether the model's code falls back to a default multimodal rotary split (sized for the full head)."""
    from transformers import CONFIG_MAPPING

    try:
        spec = importlib.util.find_spec(CONFIG_MAPPING[model_type].__module__.replace(".configuration_", ".modeling_"))
        return re.search(r"get\(\s*[\"']mrope_section[\"']\s*,", Path(spec.origin).read_text()) is not None
    except (KeyError, ImportError, ValueError, AttributeError, TypeError, OSError):
        return False


def _shrink_tree(d: dict[str, Any]) -> dict[str, Any]:
    def sub(k: Any, v: Any) -> bool:
        return isinstance(v, dict) and bool(v) and ("model_type" in v or (isinstance(k, str) and k.endswith("_config")))
    return _shrink_level({k: _shrink_tree(v) if sub(k, v) else [_shrink_tree(x) for x in v]
                          if isinstance(v, list) and v and all(sub(None, x) for x in v) else v for k, v in d.items()})


def _token_ids(d: Any, move: Callable[[int], int] | None = None) -> Any:
    """Every token id field (``*_token_id``, ``*_token_index``, lists of them) anywhere in a config dict: their
    values (``move`` None) or the dict with each id mapped by ``move``."""
    found: set[int] = set()

    def ids(v: Any) -> Any:
        found.update(i for i in (v if isinstance(v, list) else [v]) if _int(i))
        return v if move is None else [move(i) if _int(i) else i for i in v] if isinstance(v, list) else move(v)

    def walk(x: Any) -> Any:
        if isinstance(x, list):
            return [walk(y) for y in x]
        return {k: ids(v) if _is(_TOKEN_ID, k) and (_int(v) or isinstance(v, list)) else walk(v)
                for k, v in x.items()} if isinstance(x, dict) else x
    done = walk(d)
    return found if move is None else done


def shrink_dict(d: dict[str, Any]) -> dict[str, Any]:
    """The shrunk form of a config's ``to_dict()`` (see :func:`shrink_config`)."""
    moved = dict(zip(sorted(i for i in _token_ids(d) if i >= VOCAB), reversed(SPECIAL_IDS), strict=False))
    return _shrink_tree(_token_ids(d, lambda i: moved.get(i, i)))


def shrink_config(config: Any) -> Any:
    """A small copy of a transformers config: 2 layers per stack, widths 64, 4 heads of 16, feed-forwards 128,
    4 experts (top 2), a 1000-token vocabulary (special token ids moved below it), 32x32 images in 8x8 patches,
    32 mel bins; per-layer lists cut to the layers kept (one layer of each kind first). Sub-configs (text,
    vision, audio, encoder, decoder, backbone, ...) are shrunk the same way, so widths shared between them agree.

    Args:
        config: any ``transformers.PretrainedConfig``.

    Returns:
        A new config of the same class, built by ``from_dict`` as ``from_pretrained`` builds it.

    Example: ``shrink_config(transformers.LlamaConfig()).hidden_size == 64``
    """
    d = shrink_dict(config.to_dict())
    d.pop("transformers_version", None)
    small = type(config).from_dict(d)
    if getattr(small, "quantization_config", None) is not None and getattr(config, "quantization_config", None) is None:
        # Inkling 2 adds its released checkpoints' fp8 format to a config without a version: not random weights'
        small = type(config).from_dict({**d, "transformers_version": importlib.metadata.version("transformers")})
    return small


# The auto mappings in the order a user picks the class of a checkpoint of that type: the generating heads first
# (a multimodal checkpoint is loaded for image-text-to-text, an encoder-decoder as seq2seq), then the base model.
_PREFERRED = ("MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES", "MODEL_FOR_MULTIMODAL_LM_MAPPING_NAMES",
              "MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES", "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES",
              "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "MODEL_MAPPING_NAMES")


@dataclass(frozen=True)
class Candidate:
    """One architecture of the sweep."""

    model_type: str  # the config's model_type
    model_class: str  # transformers class name
    mapping: str  # the auto mapping it was taken from, e.g. MODEL_FOR_CAUSAL_LM_MAPPING_NAMES


def candidates() -> list[Candidate]:
    """Every ``model_type`` of the installed transformers that has a model class, with the class a user loads
    by default (a generating head where there is one, else the base model, else the first other head)."""
    from transformers.models.auto import configuration_auto, modeling_auto

    maps = [m for m in dir(modeling_auto) if m.startswith("MODEL_") and m.endswith("_MAPPING_NAMES")]
    order = list(_PREFERRED) + sorted(m for m in maps if m not in _PREFERRED)
    out = []
    for t in configuration_auto.CONFIG_MAPPING_NAMES:
        m, name = next(((m, n) for m in order if (n := getattr(modeling_auto, m, {}).get(t))), (None, None))
        out += [Candidate(t, name[0] if isinstance(name, (list, tuple)) else name, m)] if name else []
    return out


def _ids(config: Any, shape: tuple[int, int], g: torch.Generator) -> torch.Tensor:
    """Random token ids below the vocabulary, none of them special (3 .. the lowest special id above 19)."""
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    vocab = getattr(text, "vocab_size", None) or getattr(config, "vocab_size", None) or VOCAB
    hi = min([vocab] + [i for i in _token_ids(config.to_dict()) if i > 3 + 16])
    return torch.randint(3, max(hi, 4), shape, generator=g)


def _zoo_inputs(config: Any, kind: str, seed: int) -> dict[str, Any]:
    """``hermes.zoo.inputs`` for one kind of input (a square image; Whisper-like mel features)."""
    from hermes import zoo

    return zoo.inputs(zoo.ZooModel("", "", "", inputs=kind, family=""), config, batch=BATCH, seed=seed)


def pixels(config: Any, seed: int = 0) -> torch.Tensor:
    """An image of the vision config's size (``IMAGE`` where it has none, as convolutional backbones)."""
    vc = getattr(config, "vision_config", None) or config
    if _int(getattr(vc, "image_size", None)):
        return _zoo_inputs(vc, "image", seed)["pixel_values"]
    size = getattr(vc, "image_size", None) or (IMAGE, IMAGE)  # (height, width)
    g = torch.Generator().manual_seed(seed)
    return torch.randn(BATCH, getattr(vc, "num_channels", 3) or 3, size[0], size[-1], generator=g)


def make_inputs(model: torch.nn.Module, config: Any, *, seed: int = 0) -> dict[str, Any]:
    """Inputs for one forward of ``model``: token ids (none special, with an attention mask), an image of the
    config's size (``pixels``), mel features (Whisper-like, 2x the encoder positions) or a raw waveform, and
    decoder ids for encoder-decoders, each as the forward's signature asks. A multimodal language model (one
    with an image token) gets text only: how many image tokens an image takes is the model's own business.

    Args:
        model: the transformers model (its ``forward`` signature decides which inputs).
        config: its config.
        seed: seed of the random ids and pixels.

    Returns:
        Keyword arguments of ``model(**inputs)``.
    """
    g, required = torch.Generator().manual_seed(seed), inspect.Parameter.empty
    params = inspect.signature(model.forward).parameters
    main = getattr(model, "main_input_name", "input_ids")
    out: dict[str, Any] = {}
    ids = params.get("input_ids")
    if main == "input_ids" or (ids is not None and (main not in params or ids.default is required)):
        out["input_ids"] = _ids(config, (BATCH, SEQ), g)
        out.update({"attention_mask": torch.ones_like(out["input_ids"])} if "attention_mask" in params else {})
    if main == "pixel_values":
        out["pixel_values"] = pixels(config, seed)
    elif main == "input_features":
        cfg = getattr(config, "audio_config", None) or getattr(config, "encoder", None) or config
        mel = next((v for k in ("input_feat_per_channel", "num_mel_bins", "feature_size")
                    if _int(v := getattr(cfg, k, None))), MEL_BINS)
        out["input_features"] = _zoo_inputs(cfg, "audio", seed)["input_features"] if _int(getattr(
            cfg, "max_source_positions", None)) and _int(getattr(cfg, "num_mel_bins", None)) \
            else torch.randn(BATCH, mel, 64, generator=g)
    elif main == "input_values":
        out["input_values"] = torch.randn(BATCH, 3200, generator=g)
    if getattr(config, "is_encoder_decoder", False) and "decoder_input_ids" in params:
        out["decoder_input_ids"] = _ids(config, (BATCH, 4), g)
    if "input_ids" in out and "pixel_values" in params and main != "pixel_values" and image_token(config) is None:
        out["pixel_values"] = pixels(config, seed)  # a dual encoder (CLIP-like): text and image side by side
    return out


def image_token(config: Any) -> int | None:
    """The id of the image placeholder token of a multimodal language model (None: the model has none)."""
    return next((v for k in ("image_token_id", "image_token_index") if _int(v := getattr(config, k, None))), None)
