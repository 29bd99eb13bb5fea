"""The cache a ``generate`` call sets aside is the cache transformers' own ``generate`` allocates (issue #23):
encoder-decoders whose decoder has another depth and head count than the encoder, grouped-query attention, sliding
windows, state-space and hybrid layers, RWKV's state and XLNet's memory; models without a cache (CTC) and inputs
without a position limit (XLNet) generate under a budget too."""
from __future__ import annotations

import pytest
import torch
import transformers

import hermes
from hermes import shrink
from hermes.engine import minimum_budget
from hermes.errors import InputError
from hermes.generation import budget_for, call_cache, kv_geometry, kv_reservation, measured_cache_bytes
from hermes.inputs import check_token_ids, max_positions
from hermes.kvcache import CacheSize
from hermes.preflight import check_cache, check_generation_length

NEW = 5
F32 = 4


def _tiny(cls_name: str, config: object) -> torch.nn.Module:
    torch.manual_seed(0)
    model = getattr(transformers, cls_name)(config).eval()
    gc = model.generation_config
    if model.config.is_encoder_decoder and gc.decoder_start_token_id is None:
        gc.decoder_start_token_id = 0
    if gc.pad_token_id is None:
        gc.pad_token_id = 0
    return model


def _ids(batch: int = 2, tokens: int = 7) -> dict[str, torch.Tensor]:
    ids = torch.randint(3, 100, (batch, tokens), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _sized(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> tuple[CacheSize, int]:
    """What Hermes sets aside for ``generate`` and what transformers' generate then holds; the reservation is the
    documented figure: the larger of the end and the prompt's pass, plus one layer while it grows."""
    kw = {**inputs, "max_new_tokens": NEW, "min_new_tokens": NEW, "do_sample": False}
    size = call_cache(model, kw)
    assert kv_reservation(model, kw)[2] == size.peak == max(size.held, size.prompt_pass) + size.growth
    with torch.no_grad():
        out = model.generate(**kw, return_dict_in_generate=True)
    assert out.sequences.shape[-1] == (1 if model.config.is_encoder_decoder else inputs["input_ids"].shape[1]) + NEW
    return size, measured_cache_bytes(out.past_key_values)


def _kv(batch: int, heads: int, positions: int, head_dim: int, layers: int) -> int:
    return 2 * batch * heads * positions * head_dim * F32 * layers  # keys and values


ENC_DEC = {  # encoder: 2 layers x 2 heads; decoder: 3 layers x 4 heads (d_model 32: head size 8)
    "bart": ("BartForConditionalGeneration", transformers.BartConfig),
    "marian": ("MarianMTModel", transformers.MarianConfig),
    "whisper": ("WhisperForConditionalGeneration", transformers.WhisperConfig),
}


@pytest.mark.parametrize("name", sorted(ENC_DEC))
def test_an_encoder_decoder_reserves_its_decoder_s_depth_and_heads(name):
    cls_name, config_cls = ENC_DEC[name]
    extra = {"num_mel_bins": 8, "max_source_positions": 16, "max_target_positions": 32, "suppress_tokens": None,
             "begin_suppress_tokens": None} if name == "whisper" else {"max_position_embeddings": 64}
    config = config_cls(vocab_size=128, d_model=32, encoder_layers=2, decoder_layers=3, encoder_attention_heads=2,
                        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, pad_token_id=0,
                        eos_token_id=2, decoder_start_token_id=1, forced_eos_token_id=None, **extra)
    assert kv_geometry(config) == (3, 4, 4, 8)  # the decoder's, not the encoder's (nor the class defaults)
    model = _tiny(cls_name, config)
    inputs = {"input_features": torch.randn(2, 8, 32)} if name == "whisper" else _ids()
    encoder = 16 if name == "whisper" else 7
    size, real = _sized(model, inputs)
    # self-attention: the start token and NEW - 1 fed tokens; cross-attention: the encoder's positions
    assert size.held == real == _kv(2, 4, NEW, 8, 3) + _kv(2, 4, encoder, 8, 3)
    assert size.growth == _kv(2, 4, NEW, 8, 1)  # one decoder layer's self-attention while it grows


def test_t5_s_decoder_depth_is_its_own():
    config = transformers.T5Config(vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_layers=3, num_decoder_layers=2,
                                   num_heads=4, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    assert config.get_text_config(decoder=True).num_hidden_layers == 3  # the view keeps the encoder's depth
    assert kv_geometry(config) == (2, 4, 4, 8)
    size, real = _sized(_tiny("T5ForConditionalGeneration", config), _ids())
    assert size.held == real == _kv(2, 4, NEW, 8, 2) + _kv(2, 4, 7, 8, 2)


def test_a_t5_decoder_deeper_than_its_encoder_is_refused_as_transformers_cannot_generate_it():
    config = transformers.T5Config(vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=4,
                                   num_heads=4, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    model = _tiny("T5ForConditionalGeneration", config)
    with pytest.raises(IndexError):  # transformers' cache has the encoder's 2 layers
        model.generate(**_ids(), max_new_tokens=2)
    with pytest.raises(InputError, match=r"cache of 2 layers .* the decoder has 4: .*\(a transformers limitation\)"):
        check_cache(config, type(model))
    with pytest.raises(InputError, match="transformers limitation"):
        kv_reservation(model, {**_ids(), "max_new_tokens": 2})


def test_grouped_query_attention_reserves_the_key_value_heads():
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    size, real = _sized(_tiny("LlamaForCausalLM", config), _ids())
    assert size.held == real == _kv(2, 2, 7 + NEW - 1, 8, 3)  # the last token is sampled, never cached
    assert size.prompt_pass == _kv(2, 2, 7, 8, 3) and size.growth == _kv(2, 2, 7 + NEW - 1, 8, 1)


def test_sliding_window_layers_keep_their_window_and_a_long_prompt_until_the_next_token():
    config = transformers.MistralConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                        sliding_window=4)
    model = _tiny("MistralForCausalLM", config)
    size, real = _sized(model, _ids())
    assert size.held == real == _kv(2, 2, 4, 8, 3)  # the window's storage (its last 3 positions are a view of it)
    with torch.no_grad():  # after the prompt's forward each layer holds the whole prompt
        first = model(**_ids(), use_cache=True, past_key_values=transformers.DynamicCache(config=config))
    assert size.prompt_pass == measured_cache_bytes(first.past_key_values) == _kv(2, 2, 7, 8, 3)
    assert size.prompt_pass > size.held


def _shrunk(model_type: str, cls_name: str) -> torch.nn.Module:
    """The model of ``model_type`` at the architecture sweep's size (``hermes.shrink``)."""
    return _tiny(cls_name, shrink.shrink_config(transformers.CONFIG_MAPPING[model_type]()))


STATEFUL = {  # fixed-size states (state-space, linear attention, RWKV), hybrids, and XLNet's memory
    "mamba": "MambaForCausalLM", "falcon_mamba": "FalconMambaForCausalLM", "mamba2": "Mamba2ForCausalLM",
    "bamba": "BambaForCausalLM", "jamba": "JambaForCausalLM", "qwen3_next": "Qwen3NextForCausalLM",
    "gemma2": "Gemma2ForCausalLM", "deepseek_v3": "DeepseekV3ForCausalLM", "rwkv": "RwkvForCausalLM",
    "xlnet": "XLNetLMHeadModel",
    "mimo_v2_flash": "MiMoV2FlashForCausalLM",  # its sliding layers have twice the config's key/value heads
    "inkling_text": "InklingForCausalLM", "inkling2_text": "Inkling2ForCausalLM",  # float32 short-convolution states
}


@pytest.mark.parametrize("model_type", sorted(STATEFUL))
def test_the_reservation_is_what_transformers_holds_for_every_kind_of_layer(model_type):
    model = _shrunk(model_type, STATEFUL[model_type])
    size, real = _sized(model, _ids(tokens=10))
    assert size.held == real > 0


def test_git_reserves_the_image_positions_before_the_text():
    model = _shrunk("git", "GitForCausalLM")
    v = model.config.vision_config
    pixels = torch.randn(2, 3, v.image_size, v.image_size, generator=torch.Generator().manual_seed(0))
    size, real = _sized(model, {**_ids(), "pixel_values": pixels})
    assert size.held == real > 0


def test_mamba_s_state_is_its_convolution_and_ssm_states_per_layer():
    model = _shrunk("mamba", "MambaForCausalLM")
    c = model.config  # per layer and sequence: (inner, kernel) and (inner, state) float32; no growth with tokens
    per_layer = c.intermediate_size * (c.conv_kernel + c.state_size) * F32
    for tokens in (3, 10):
        size, real = _sized(model, _ids(tokens=tokens))
        assert size == CacheSize(2 * per_layer * c.num_hidden_layers, 2 * per_layer * c.num_hidden_layers, 0)


def test_a_state_hermes_cannot_size_is_refused_before_loading():
    config = transformers.xLSTMConfig()
    with pytest.raises(InputError, match="xLSTMForCausalLM's generate keeps its own kind of cache .* cannot size"):
        check_cache(config, transformers.xLSTMForCausalLM)


def _streamed_generate(tmp_path, model: torch.nn.Module, kw: dict) -> tuple[object, object]:
    """transformers' tokens and Hermes' at the minimum budget plus the reservation."""
    path = tmp_path / "ckpt"
    model.save_pretrained(path)
    ref = type(model).from_pretrained(path).eval()
    probe = hermes.load(path, budget=2**40)
    minimum = minimum_budget(probe.hermes.units, [probe.hermes.units[i].name for i in probe.hermes.pinned])
    probe.hermes.remove()
    streamed = hermes.load(path, budget=budget_for(ref, minimum, kw))
    with torch.no_grad():
        want, got = ref.generate(**kw), streamed.generate(**kw)
    g = streamed.hermes.last_generation
    assert g.weights_peak_bytes <= g.weight_budget_bytes
    streamed.hermes.remove()
    return want, got


@pytest.mark.parametrize("model_type", ["mamba", "falcon_mamba", "rwkv", "xlnet"])
def test_models_without_attention_keys_generate_token_exact_under_the_budget(tmp_path, model_type):
    model = _shrunk(model_type, STATEFUL[model_type])
    want, got = _streamed_generate(tmp_path, model, {**_ids(tokens=10), "max_new_tokens": 4, "do_sample": False})
    assert torch.equal(want, got)


@pytest.mark.parametrize("model_type, cls_name", [("parakeet_ctc", "ParakeetForCTC"), ("lasr_ctc", "LasrForCTC")])
def test_ctc_generates_from_audio_features_with_no_cache(tmp_path, model_type, cls_name):
    model = _shrunk(model_type, cls_name)
    mel = model.config.encoder_config.num_mel_bins  # (batch, frames, mel bins)
    kw = {"input_features": torch.randn(2, 64, mel, generator=torch.Generator().manual_seed(0)), "max_new_tokens": 4,
          "do_sample": False}
    assert call_cache(model, kw) == CacheSize(0, 0, 0)
    want, got = _streamed_generate(tmp_path, model, kw)
    assert torch.equal(want, got)


def test_a_non_positive_position_limit_is_no_limit():
    config = transformers.XLNetConfig(vocab_size=128, d_model=32, n_layer=2, n_head=4, d_inner=64)
    assert config.max_position_embeddings == -1 and max_positions(config) is None
    check_token_ids(torch.zeros(1, 5000, dtype=torch.long), config)
    check_generation_length(config, 5000, 100)
    gpt2 = transformers.GPT2Config(n_positions=16)
    assert max_positions(gpt2) == 16
    with pytest.raises(InputError, match="takes at most 16"):
        check_token_ids(torch.zeros(1, 17, dtype=torch.long), gpt2)
