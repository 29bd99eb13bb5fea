"""The generic config shrinker of the architecture sweep: varied transformers configs at their default (full)
sizes become models that build, are small, and survive ``save_pretrained`` / ``from_pretrained``."""
from __future__ import annotations

import pytest
import torch

from hermes import shrink

MAX_PARAM_BYTES = 2 << 20
CASES = [  # (config class, model class): a decoder, an encoder-decoder, a vision model, an MoE, a multimodal
    ("LlamaConfig", "LlamaForCausalLM"),
    ("T5Config", "T5ForConditionalGeneration"),
    ("ViTConfig", "ViTForImageClassification"),
    ("MixtralConfig", "MixtralForCausalLM"),
    ("LlavaConfig", "LlavaForConditionalGeneration"),
]


@pytest.mark.parametrize(("config_class", "model_class"), CASES, ids=[c for c, _ in CASES])
def test_shrunk_models_build_small_and_round_trip(tmp_path, config_class, model_class):
    import transformers

    config = shrink.shrink_config(getattr(transformers, config_class)())
    cls = getattr(transformers, model_class)
    torch.manual_seed(0)
    model = cls(config).eval()
    assert sum(p.numel() * p.element_size() for p in model.parameters()) < MAX_PARAM_BYTES
    model.save_pretrained(tmp_path)
    loaded = cls.from_pretrained(tmp_path).eval()
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    x = shrink.make_inputs(loaded, loaded.config)
    with torch.no_grad():
        assert loaded(**x) is not None


def test_the_shrinker_keeps_the_config_consistent():
    import transformers

    tiny = shrink.shrink_config(transformers.Gemma3Config())
    text, vision = tiny.text_config, tiny.vision_config
    assert text.num_hidden_layers == shrink.LAYERS and len(text.layer_types) == shrink.LAYERS
    assert set(text.layer_types) == {"sliding_attention", "full_attention"}  # one layer of each kind kept
    assert text.num_attention_heads % text.num_key_value_heads == 0
    assert text.vocab_size == shrink.VOCAB and tiny.image_token_id < shrink.VOCAB
    assert vision.image_size == shrink.IMAGE and vision.image_size % vision.patch_size == 0
    moe = shrink.shrink_config(transformers.DeepseekV3Config())
    assert moe.n_routed_experts == shrink.EXPERTS and moe.num_experts_per_tok == shrink.TOP_K
    assert moe.n_routed_experts % moe.n_group == 0


def test_candidates_prefer_the_generating_head():
    by_type = {c.model_type: c.model_class for c in shrink.candidates()}
    assert by_type["llama"] == "LlamaForCausalLM"
    assert by_type["t5"] == "T5ForConditionalGeneration"
    assert by_type["llava"] == "LlavaForConditionalGeneration"
    assert by_type["vit"] == "ViTModel"
    assert len(by_type) > 400
