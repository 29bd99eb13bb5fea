"""A zoo of tiny models of many transformers architectures, written by transformers' own ``save_pretrained``.

Used by the architecture test matrix (``tests/test_models.py``) and by ``scripts/models_table.py``, which
produces docs/MODELS.md. Each entry is a transformers class and the config overrides that make it tiny; the
checkpoint is exactly what a user gets from ``save_pretrained`` (on-disk key names, tied weights left out,
MoE experts per file as transformers writes them).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

_TXT = {"vocab_size": 1000, "hidden_size": 32, "num_hidden_layers": 3, "num_attention_heads": 4,
        "intermediate_size": 48, "max_position_embeddings": 64}
_DEC = {**_TXT, "num_key_value_heads": 2, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}


@dataclass(frozen=True)
class ZooModel:
    """One architecture of the matrix."""

    name: str  # short name used in test ids and docs/MODELS.md
    model_class: str  # transformers class
    config_class: str  # transformers config class
    config: dict[str, Any] = field(default_factory=dict)
    family: str = "decoder"  # encoder | decoder | encoder-decoder | vision | speech | multimodal | moe
    inputs: str = "text"  # text | image | audio | text+image
    generates: bool = False  # greedy generate is compared too


ZOO: list[ZooModel] = [
    # encoder-only
    ZooModel("bert", "BertForMaskedLM", "BertConfig", _TXT, "encoder"),
    ZooModel("roberta", "RobertaForSequenceClassification", "RobertaConfig",
             {**_TXT, "pad_token_id": 1, "max_position_embeddings": 70}, "encoder"),
    ZooModel("distilbert", "DistilBertModel", "DistilBertConfig",
             {"vocab_size": 1000, "dim": 32, "n_layers": 3, "n_heads": 4, "hidden_dim": 48,
              "max_position_embeddings": 64}, "encoder"),
    ZooModel("albert", "AlbertModel", "AlbertConfig", {**_TXT, "embedding_size": 16}, "encoder"),
    ZooModel("deberta-v2", "DebertaV2Model", "DebertaV2Config", {**_TXT, "relative_attention": True,
             "pos_att_type": ["p2c", "c2p"], "max_relative_positions": 16}, "encoder"),
    ZooModel("electra", "ElectraForTokenClassification", "ElectraConfig", {**_TXT, "embedding_size": 16},
             "encoder"),
    # decoder-only
    ZooModel("gpt2", "GPT2LMHeadModel", "GPT2Config",
             {"vocab_size": 1000, "n_embd": 32, "n_layer": 3, "n_head": 4, "n_positions": 64,
              "bos_token_id": 1, "eos_token_id": 2}, generates=True),
    ZooModel("opt", "OPTForCausalLM", "OPTConfig",
             {**_DEC, "ffn_dim": 48, "word_embed_proj_dim": 32}, generates=True),
    ZooModel("llama", "LlamaForCausalLM", "LlamaConfig", _DEC, generates=True),
    ZooModel("mistral", "MistralForCausalLM", "MistralConfig", _DEC, generates=True),
    ZooModel("qwen2", "Qwen2ForCausalLM", "Qwen2Config", _DEC, generates=True),
    ZooModel("qwen3", "Qwen3ForCausalLM", "Qwen3Config", {**_DEC, "head_dim": 8}, generates=True),
    ZooModel("phi3", "Phi3ForCausalLM", "Phi3Config", _DEC, generates=True),
    ZooModel("gemma", "GemmaForCausalLM", "GemmaConfig", {**_DEC, "head_dim": 8}, generates=True),
    ZooModel("bloom", "BloomForCausalLM", "BloomConfig",
             {"vocab_size": 1000, "hidden_size": 32, "n_layer": 3, "n_head": 4, "bos_token_id": 1,
              "eos_token_id": 2}, generates=True),
    ZooModel("falcon", "FalconForCausalLM", "FalconConfig",
             {"vocab_size": 1000, "hidden_size": 32, "num_hidden_layers": 3, "num_attention_heads": 4,
              "bos_token_id": 1, "eos_token_id": 2}, generates=True),
    ZooModel("gpt-neox", "GPTNeoXForCausalLM", "GPTNeoXConfig", _TXT, generates=True),
    ZooModel("gptj", "GPTJForCausalLM", "GPTJConfig",
             {"vocab_size": 1000, "n_embd": 32, "n_layer": 3, "n_head": 4, "rotary_dim": 4, "n_positions": 64,
              "bos_token_id": 1, "eos_token_id": 2}, generates=True),
    # encoder-decoder
    ZooModel("t5", "T5ForConditionalGeneration", "T5Config",
             {"vocab_size": 1000, "d_model": 32, "d_kv": 8, "d_ff": 48, "num_layers": 3, "num_heads": 4,
              "decoder_start_token_id": 0, "eos_token_id": 1, "pad_token_id": 0}, "encoder-decoder",
             generates=True),
    ZooModel("bart", "BartForConditionalGeneration", "BartConfig",
             {"vocab_size": 1000, "d_model": 32, "encoder_layers": 2, "decoder_layers": 2,
              "encoder_attention_heads": 4, "decoder_attention_heads": 4, "encoder_ffn_dim": 48,
              "decoder_ffn_dim": 48, "max_position_embeddings": 64}, "encoder-decoder", generates=True),
    ZooModel("marian", "MarianMTModel", "MarianConfig",
             {"vocab_size": 1000, "d_model": 32, "encoder_layers": 2, "decoder_layers": 2,
              "encoder_attention_heads": 4, "decoder_attention_heads": 4, "encoder_ffn_dim": 48,
              "decoder_ffn_dim": 48, "max_position_embeddings": 64, "pad_token_id": 127,
              "decoder_start_token_id": 127}, "encoder-decoder", generates=True),
    # vision
    ZooModel("vit", "ViTModel", "ViTConfig",
             {"hidden_size": 32, "num_hidden_layers": 3, "num_attention_heads": 4, "intermediate_size": 48,
              "image_size": 32, "patch_size": 8}, "vision", "image"),
    ZooModel("vit-classifier", "ViTForImageClassification", "ViTConfig",
             {"hidden_size": 32, "num_hidden_layers": 3, "num_attention_heads": 4, "intermediate_size": 48,
              "image_size": 32, "patch_size": 8, "num_labels": 5}, "vision", "image"),
    ZooModel("convnext", "ConvNextModel", "ConvNextConfig",
             {"hidden_sizes": [8, 16, 24, 32], "depths": [1, 1, 2, 1], "image_size": 32}, "vision", "image"),
    # speech
    ZooModel("whisper", "WhisperForConditionalGeneration", "WhisperConfig",
             {"vocab_size": 1000, "d_model": 32, "encoder_layers": 2, "decoder_layers": 2,
              "encoder_attention_heads": 4, "decoder_attention_heads": 4, "encoder_ffn_dim": 48,
              "decoder_ffn_dim": 48, "num_mel_bins": 16, "max_source_positions": 16,
              "max_target_positions": 32, "decoder_start_token_id": 3, "eos_token_id": 2, "pad_token_id": 2,
              "bos_token_id": 1, "begin_suppress_tokens": None, "suppress_tokens": None},
             "speech", "audio", generates=True),
    ZooModel("wav2vec2", "Wav2Vec2Model", "Wav2Vec2Config",
             {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 48,
              "conv_dim": (16, 16), "conv_stride": (5, 2), "conv_kernel": (10, 3), "num_conv_pos_embeddings": 8,
              "num_conv_pos_embedding_groups": 2, "vocab_size": 32}, "speech", "audio"),
    # multimodal
    ZooModel("clip", "CLIPModel", "CLIPConfig",
             {"text_config": {"vocab_size": 1000, "hidden_size": 32, "num_hidden_layers": 2,
                              "num_attention_heads": 4, "intermediate_size": 48, "max_position_embeddings": 32},
              "vision_config": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
                                "intermediate_size": 48, "image_size": 32, "patch_size": 8},
              "projection_dim": 16}, "multimodal", "text+image"),
    # mixture of experts
    ZooModel("mixtral", "MixtralForCausalLM", "MixtralConfig",
             {**_DEC, "num_local_experts": 8, "num_experts_per_tok": 2}, "moe", generates=True),
    ZooModel("qwen2-moe", "Qwen2MoeForCausalLM", "Qwen2MoeConfig",
             {**_DEC, "num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 24,
              "shared_expert_intermediate_size": 48}, "moe", generates=True),
]
BY_NAME = {z.name: z for z in ZOO}


def build(z: ZooModel, *, seed: int = 0) -> torch.nn.Module:
    """The tiny model, random weights (seeded), in eval mode."""
    import transformers

    cfg_cls = getattr(transformers, z.config_class)
    config = cfg_cls(**z.config)
    torch.manual_seed(seed)
    model = getattr(transformers, z.model_class)(config).eval()
    with torch.no_grad():  # some inits are zeros or ones; make every tensor matter
        g = torch.Generator().manual_seed(seed)
        for p in model.parameters():
            if p.is_floating_point():
                p.add_(torch.randn(p.shape, generator=g) * 0.02)
    return model


def save(z: ZooModel, out_dir: str | os.PathLike[str], *, seed: int = 0) -> Path:
    """Write the tiny model with ``save_pretrained`` (safetensors) and return the directory."""
    out = Path(out_dir)
    build(z, seed=seed).save_pretrained(out)
    return out


def inputs(z: ZooModel, model_config: Any, *, batch: int = 2, seq: int = 10, seed: int = 0) -> dict[str, Any]:
    """Inputs for one forward of ``z``."""
    g = torch.Generator().manual_seed(seed)
    out: dict[str, Any] = {}
    if "text" in z.inputs:
        text_cfg = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
        ids = torch.randint(3, text_cfg.vocab_size, (batch, seq), generator=g)
        out["input_ids"] = ids
        out["attention_mask"] = torch.ones_like(ids)
    if "image" in z.inputs:
        vc = getattr(model_config, "vision_config", model_config)
        size = vc.image_size if isinstance(vc.image_size, int) else vc.image_size[0]
        out["pixel_values"] = torch.randn(batch, getattr(vc, "num_channels", 3), size, size, generator=g)
    if z.inputs == "audio":
        if hasattr(model_config, "num_mel_bins"):
            out["input_features"] = torch.randn(batch, model_config.num_mel_bins,
                                                2 * model_config.max_source_positions, generator=g)
        else:
            out["input_values"] = torch.randn(batch, 400, generator=g)
    if z.family == "encoder-decoder" or (z.family == "speech" and z.generates):
        out["decoder_input_ids"] = torch.randint(3, 100, (batch, 4), generator=g)
    return out


@dataclass
class Check:
    """What streaming one zoo model gave, against the same class loaded by transformers."""

    name: str
    family: str
    model_class: str
    units: int = 0
    pinned: list[str] = field(default_factory=list)  # units always held (read by attribute, top-level params)
    model_bytes: int = 0
    largest_unit_share: float = 0.0  # largest streamed unit / model bytes (head chunks, not gathered embeddings)
    min_budget_share: float = 0.0  # minimum weight budget / model bytes
    budget_bytes: int = 0
    forward_exact: bool = False
    max_abs_diff: float = 0.0
    weights_peak_bytes: int = 0  # highest weight memory held, over every pass and memory sample
    surprises_first: int = 0  # units loaded on demand in the first pass (order not predicted yet)
    surprises_after: int = 0  # in the passes after (the traced order): 0 when the schedule holds
    experts_read_share: float | None = None  # mixture of experts: experts read / experts in the model, last token
    generate_exact: bool | None = None  # None: the model does not generate
    generate_budget_bytes: int = 0
    error: str = ""


def check(z: ZooModel, path: str | os.PathLike[str], *, budget_factor: float = 1.5, new_tokens: int = 6) -> Check:
    """Stream the checkpoint at ``path`` at ``budget_factor`` x its minimum budget: forward twice and, where
    the model generates, greedy ``generate``, each compared with transformers' own ``from_pretrained`` model."""
    import transformers

    import hermes
    from hermes.engine import minimum_budget

    r = Check(z.name, z.family, z.model_class)
    ref = getattr(transformers, z.model_class).from_pretrained(path).eval()  # its defaults (experts: grouped_mm)
    x = inputs(z, ref.config)
    probe = hermes.load(path, budget=2**40)
    units = probe.hermes.units
    pinned = [units[i].name for i in probe.hermes.pinned]
    probe.hermes.remove()
    r.units, r.pinned = len(units), pinned
    r.model_bytes = sum(u.nbytes for u in units)
    minimum = minimum_budget(units, pinned)
    streamed = [u.buffer_bytes for u in units if u.called]  # a gathered embedding reads rows, not a unit
    r.largest_unit_share = max(streamed, default=0) / r.model_bytes
    r.min_budget_share = minimum / r.model_bytes
    r.budget_bytes = int(minimum * budget_factor)
    model = hermes.load(path, budget=r.budget_bytes)
    model.hermes.history = history = []
    with torch.no_grad():
        want = ref(**x)
        got = [model(**x) for _ in range(2)]
    keys = [k for k, v in want.items() if isinstance(v, torch.Tensor)]
    diffs = [(g[k].double() - want[k].double()).abs().max().item() for g in got for k in keys]
    r.max_abs_diff = max(diffs, default=0.0)
    r.forward_exact = bool(keys) and r.max_abs_diff == 0.0
    r.surprises_first, r.surprises_after = history[0].surprises, sum(p.surprises for p in history[1:])
    r.weights_peak_bytes = max(max(p.weights_peak_bytes, *(a for _, a, _ in p.memory)) for p in history)
    model.hermes.remove()
    if z.generates:
        from hermes.generation import budget_for

        gx = {k: v for k, v in x.items() if not k.startswith("decoder")}
        kw = {**gx, "max_new_tokens": new_tokens, "do_sample": False}
        r.generate_budget_bytes = budget_for(ref, r.budget_bytes, kw)
        model = hermes.load(path, budget=r.generate_budget_bytes)
        with torch.no_grad():
            want_ids = ref.generate(**kw)
            got_ids = model.generate(**kw)
        g = model.hermes.last_generation
        r.generate_exact = torch.equal(want_ids, got_ids)
        n_experts = sum(1 for u in units if u.kind == "expert")
        if n_experts:
            r.experts_read_share = g.passes[-1].experts_read / n_experts
        r.weights_peak_bytes = max(r.weights_peak_bytes, g.weights_peak_bytes)
        model.hermes.remove()
    return r
