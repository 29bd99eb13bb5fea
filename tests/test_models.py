"""The architecture matrix: tiny models of many transformers architectures, written by transformers'
``save_pretrained``, streamed under a budget and compared with the same class loaded by ``from_pretrained``."""
from __future__ import annotations

import signal
from pathlib import Path

import pytest

from hermes import zoo

TIMEOUT_S = 120  # a case that hangs fails instead of hanging the suite
STREAMS_PER_LAYER_EXCEPT = {"albert": "one layer shared by every position: the whole encoder is that layer"}


@pytest.fixture(scope="module")
def zoo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("zoo")


class _Timeout(Exception):
    pass


def _alarm(signum, frame):  # noqa: ANN001, ARG001
    raise _Timeout(f"did not finish within {TIMEOUT_S} s")


@pytest.mark.parametrize("name", [z.name for z in zoo.ZOO])
def test_architecture_streams_exactly_under_the_budget(zoo_root, name):
    z = zoo.BY_NAME[name]
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(TIMEOUT_S)
    try:
        path = zoo.save(z, zoo_root / name)
        r = zoo.check(z, path)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    assert r.forward_exact, f"{name}: streamed forward differs by {r.max_abs_diff}"
    assert r.surprises_after == 0, f"{name}: the traced order did not hold on the second pass"
    limit = r.generate_budget_bytes if r.generate_exact is not None else r.budget_bytes
    assert r.weights_peak_bytes <= limit, f"{name}: weights peak {r.weights_peak_bytes} > budget {limit}"
    if z.generates:
        assert r.generate_exact, f"{name}: greedy tokens differ from transformers' generate"
    if z.family == "moe":  # batch 2, top-2 of 8 experts: a decode step reads at most half of them
        assert r.experts_read_share is not None and 0 < r.experts_read_share <= 0.5
    if name not in STREAMS_PER_LAYER_EXCEPT:
        assert r.largest_unit_share < 0.5, f"{name}: largest unit is {r.largest_unit_share:.0%} of the model"
        assert r.min_budget_share < 0.6, f"{name}: minimum budget is {r.min_budget_share:.0%} of the model"


def test_the_matrix_covers_every_family():
    families = {z.family for z in zoo.ZOO}
    assert {"encoder", "decoder", "encoder-decoder", "vision", "speech", "multimodal", "moe"} <= families
    assert len(zoo.ZOO) >= 25


def test_generation_config_json_is_applied(zoo_root):
    import torch
    import transformers

    import hermes

    model = zoo.build(zoo.BY_NAME["llama"])
    model.generation_config.repetition_penalty = 1.5
    model.generation_config.suppress_tokens = list(range(3, 500))  # greedy tokens differ without the config
    path = zoo_root / "llama-genconfig"
    model.save_pretrained(path)
    ref = transformers.LlamaForCausalLM.from_pretrained(path).eval()
    streamed = hermes.load(path, budget=2**30)
    assert streamed.generation_config.repetition_penalty == 1.5
    x = torch.tensor([[5, 6, 7, 5, 6, 7]])
    with torch.no_grad():
        want = ref.generate(x, max_new_tokens=12, do_sample=False)
        assert torch.equal(streamed.generate(x, max_new_tokens=12, do_sample=False), want)
        plain = transformers.LlamaForCausalLM(ref.config).eval()
        plain.load_state_dict(ref.state_dict())
        plain.generation_config = transformers.GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=0)
        assert not torch.equal(plain.generate(x, max_new_tokens=12, do_sample=False), want)  # it matters


def test_model_class_and_dtype_options(zoo_root):
    import torch
    import transformers

    import hermes
    from hermes.errors import CheckpointError

    z = zoo.ZooModel("bert-cls", "BertForSequenceClassification", "BertConfig", zoo.BY_NAME["bert"].config)
    path = zoo.save(z, zoo_root / "bert-options")  # a checkpoint with a classification head
    base = hermes.load(path, budget=2**30, model_class="AutoModel")  # its base model, head left unread
    assert type(base).__name__ == "BertModel"
    ref = transformers.BertModel.from_pretrained(path).eval()
    x = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        torch.testing.assert_close(base(input_ids=x).last_hidden_state, ref(input_ids=x).last_hidden_state,
                                   rtol=0, atol=0)
    assert type(hermes.load(path, budget=2**30, model_class=transformers.BertForSequenceClassification)).__name__ \
        == "BertForSequenceClassification"
    assert hermes.load(path, budget=2**30, dtype="float32") is not None
    with pytest.raises(CheckpointError, match="stores float32 weights and hermes streams them as stored"):
        hermes.load(path, budget=2**30, dtype="bfloat16")
    with pytest.raises(CheckpointError, match="is not a transformers class"):
        hermes.load(path, budget=2**30, model_class="NoSuchModel")
    with pytest.raises(CheckpointError, match="has no class for model_type 'bert'"):
        hermes.load(path, budget=2**30, model_class="AutoModelForSpeechSeq2Seq")


@pytest.mark.parametrize("name", ["t5", "whisper"])
def test_encoder_streams_once_per_generate_and_the_decoder_per_token(zoo_root, name):
    import torch
    import transformers

    import hermes

    z = zoo.BY_NAME[name]
    path = zoo.save(z, zoo_root / f"{name}-passes")
    ref = getattr(transformers, z.model_class).from_pretrained(path).eval()
    kw = {k: v for k, v in zoo.inputs(z, ref.config).items() if not k.startswith("decoder")}
    from hermes.engine import minimum_budget
    from hermes.generation import budget_for

    probe = hermes.load(path, budget=2**30)
    low = minimum_budget(probe.hermes.units)
    probe.hermes.remove()
    # the minimum for weights: they stream for every token
    model = hermes.load(path, budget=budget_for(ref, low, {**kw, "max_new_tokens": 5}))
    encoder = [u for u in model.hermes.units if u.name.startswith(("encoder.", "model.encoder."))]
    assert encoder
    for _ in range(2):  # the first call learns the orders (encoder, then decoder steps); the second follows them
        with torch.no_grad():
            out = model.generate(**kw, max_new_tokens=5, do_sample=False)
    passes = model.hermes.last_generation.passes
    assert [p.entry for p in passes].count("") == model.hermes.last_generation.new_tokens
    encoder_passes = [p for p in passes if p.entry != ""]
    assert len(encoder_passes) == 1 and encoder_passes[0].entry.endswith("encoder")  # one encoder pass per call
    enc_names = {u.index for u in encoder}
    for p in passes[1:]:  # decoder steps never read the encoder's units, and do read the decoder's
        assert not any(e.load_end is not None for e in p.events if e.unit in enc_names)
        assert p.units_loaded > 0
    with torch.no_grad():
        assert torch.equal(out, ref.generate(**kw, max_new_tokens=5, do_sample=False))
    assert sum(p.surprises for p in passes) == 0
