"""Quantized checkpoints (``hermes quantize``): tiny models of several architectures written by transformers'
``save_pretrained``, quantized to 8 and 4 bits, streamed under the budget and compared bit for bit with the same
quantized checkpoint loaded whole by transformers' ``from_pretrained``; their quality against the float model;
and the bad inputs of the command."""
from __future__ import annotations

import dataclasses
import json
import struct
from pathlib import Path

import pytest
import torch
import transformers

import hermes
from hermes import shrink, zoo
from hermes.cli import main
from hermes.engine import minimum_budget
from hermes.errors import InputError
from hermes.quant import QuantLinear, dequantize, quantize_weight
from hermes.quant.convert import quantize_checkpoint

# Sizes the 4-bit kernel takes (inputs a multiple of the group, outputs of 16); vocabularies of 1000 rows are not
# a multiple of 16: the 4-bit heads store padding rows.
_WIDE = {"hidden_size": 64, "intermediate_size": 128}
QUANT_ZOO = {
    "llama": {**_WIDE},
    "gpt2": {"n_embd": 64, "n_inner": 128},
    "bert": {**_WIDE},
    "qwen2-moe": {**_WIDE, "moe_intermediate_size": 32, "shared_expert_intermediate_size": 64},
}


def _zoo_model(name: str) -> zoo.ZooModel:
    z = zoo.BY_NAME[name]
    return dataclasses.replace(z, config={**z.config, **QUANT_ZOO[name]})


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("quant-src")
    return {name: zoo.save(_zoo_model(name), root / name) for name in QUANT_ZOO}


@pytest.fixture(scope="module")
def quantized(saved: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, int], Path]:
    root = tmp_path_factory.mktemp("quant")
    return {(name, bits): quantize_checkpoint(path, root / f"{name}-{bits}", bits=bits, group_size=32)
            for name, path in saved.items() for bits in (8, 4)}


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("name", list(QUANT_ZOO))
def test_quantized_model_streams_exactly_as_transformers_loads_it(quantized, name, bits):
    z, path = _zoo_model(name), quantized[(name, bits)]
    r = zoo.check(z, path)  # forward twice + greedy generate at 1.5x the minimum budget vs from_pretrained
    assert r.forward_exact, f"{name} {bits}-bit: streamed forward differs by {r.max_abs_diff}"
    assert r.surprises_after == 0
    limit = r.generate_budget_bytes if r.generate_exact is not None else r.budget_bytes
    assert r.weights_peak_bytes <= limit
    if z.generates:
        assert r.generate_exact, f"{name} {bits}-bit: greedy tokens differ from transformers' generate"
    ref = getattr(transformers, z.model_class).from_pretrained(path).eval()
    assert any(isinstance(m, QuantLinear) for m in ref.modules())
    x = zoo.inputs(z, ref.config)
    with torch.no_grad():
        want = ref(**x)
    probe = hermes.load(path, budget=2**40)
    minimum = minimum_budget(probe.hermes.units, [probe.hermes.units[i].name for i in probe.hermes.pinned])
    if name in ("llama", "gpt2"):  # the head streams in vocabulary chunks (4 bits: its scales' rows are strided)
        assert sum(u.kind == "chunk" for u in probe.hermes.units) > 1
    probe.hermes.remove()
    for budget in (minimum, 2**40):  # streamed at the minimum budget, and everything resident
        model = hermes.load(path, budget=budget)
        model.hermes.history = history = []
        with torch.no_grad():
            got = model(**x)
        for k, v in want.items():
            if isinstance(v, torch.Tensor):
                assert torch.equal(got[k], v), f"{name} {bits}-bit at budget {budget}: {k} differs"
        assert max(p.weights_peak_bytes for p in history) <= budget
        model.hermes.remove()


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_quantized_bytes_shrink_and_logits_stay_close_to_the_float_model(saved, quantized, name):
    z = _zoo_model(name)
    float_model = getattr(transformers, z.model_class).from_pretrained(saved[name]).eval()
    x = zoo.inputs(z, float_model.config)
    with torch.no_grad():
        want = float_model(**x).logits.float()
    float_bytes = _weights_bytes(saved[name])
    agreement = {}
    for bits in (8, 4):
        model = hermes.load(quantized[(name, bits)], budget=2**40)
        with torch.no_grad():
            got = model(**x).logits.float()
        model.hermes.remove()
        agreement[bits] = (got.argmax(-1) == want.argmax(-1)).float().mean().item()
        kl = torch.nn.functional.kl_div(got.log_softmax(-1), want.log_softmax(-1), log_target=True,
                                        reduction="batchmean").item()
        assert kl < (0.01 if bits == 8 else 0.1), f"{bits}-bit KL {kl}"
        assert _weights_bytes(quantized[(name, bits)]) < float_bytes
    assert agreement[8] >= 0.9 and agreement[4] >= 0.6, agreement


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("model_type", ["qwen2_moe", "gpt_oss"])
def test_experts_are_quantized_and_stream_one_by_one_exactly(tmp_path, model_type, bits):
    """Every expert's projections stored at ``bits`` (GPT-OSS: transposed, with biases), computed with the quantized
    kernels by the model transformers loads whole and by Hermes reading the routed experts one by one."""
    config = shrink.shrink_config(transformers.CONFIG_MAPPING[model_type]())
    cls = getattr(transformers, next(c.model_class for c in shrink.candidates() if c.model_type == model_type))
    torch.manual_seed(0)
    src = tmp_path / "src"
    cls(config).eval().save_pretrained(src)
    path = quantize_checkpoint(src, tmp_path / "q", bits=bits, group_size=32)
    ref = cls.from_pretrained(path).eval()
    experts = [m for m in ref.modules() if hasattr(m, "hermes_quant")]
    assert experts and all(m.gate_up_proj.dtype == (torch.int8 if bits == 8 else torch.uint8) for m in experts)
    assert ref.config.get_text_config()._experts_implementation == "hermes_quant"
    assert _weights_bytes(path) < 0.6 * _weights_bytes(src)
    ids = torch.randint(3, config.get_text_config().vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ref(input_ids=ids).logits
    probe = hermes.load(path, budget=2**40)
    units = probe.hermes.units
    minimum = minimum_budget(units, [units[i].name for i in probe.hermes.pinned])
    probe.hermes.remove()
    model = hermes.load(path, budget=minimum)
    try:
        with torch.no_grad():
            assert torch.equal(model(input_ids=ids).logits, want)
            model(input_ids=ids[:1, :1])
        assert 0 < model.hermes.last.experts_read < sum(u.kind == "expert" for u in units)
    finally:
        model.hermes.remove()


def _weights_bytes(d: Path) -> int:
    return sum(f.stat().st_size for f in d.glob("*.safetensors"))


@pytest.mark.parametrize("bits,group", [(8, 128), (4, 32), (4, 128)])
def test_kernel_matches_the_dequantized_weight(bits, group):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(72, 256, generator=g)  # 72 outputs: 4 bits pad them to 80
    t = quantize_weight(w, bits, group)
    layer = QuantLinear(256, 72, bits=bits, group_size=group, bias=False)
    for k, v in t.items():
        getattr(layer, k).data = v
    deq = dequantize(t, bits, group)[:72]
    assert (deq - w).abs().max() < (0.02 if bits == 8 else 0.5) * w.abs().max()
    x = torch.randn(5, 256, generator=g)
    got = layer(x)
    want = x.to(torch.bfloat16).float() @ deq.t()
    assert got.shape == (5, 72) and got.dtype == torch.float32
    assert torch.allclose(got, want, rtol=0.02, atol=0.05 * want.abs().max().item())


def test_int8_weight_that_is_not_aligned_still_computes():
    g = torch.Generator().manual_seed(1)
    t = quantize_weight(torch.randn(64, 64, generator=g), 8, 128)
    layer = QuantLinear(64, 64, bits=8, group_size=128, bias=False)
    raw = torch.empty(64 * 64 + 8, dtype=torch.int8)
    raw[8:] = t["weight"].reshape(-1)
    layer.weight.data = raw[8:].view(64, 64)  # 8 bytes off: torch's kernel would crash on several rows
    layer.weight_scale.data = t["weight_scale"]
    x = torch.randn(6, 64, generator=g)
    want = torch.cat([layer(r) for r in x.split(1)])
    assert torch.equal(layer(x), want)


def test_every_tensor_of_a_quantized_file_is_aligned(quantized):
    path = quantized[("bert", 8)] / "model.safetensors"
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
    header.pop("__metadata__")
    assert all((8 + n + v["data_offsets"][0]) % 64 == 0 for k, v in header.items() if not k.endswith("hermes_pad"))
    assert any(k.endswith("hermes_pad") for k in header)  # the padding is there, and transformers ignores it


def test_quantize_cli_and_its_bad_inputs(saved, tmp_path, capsys):
    out = tmp_path / "q4"
    assert main(["quantize", str(saved["llama"]), str(out), "--bits", "4", "--group-size", "64"]) == 0
    assert "wrote 4-bit" in capsys.readouterr().out
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "hermes" and cfg["bits"] == 4 and cfg["group_size"] == 64
    assert main(["verify", str(out)]) == 0
    # out already holds a checkpoint
    assert main(["quantize", str(saved["llama"]), str(out), "--bits", "8"]) == 2
    assert "not empty" in capsys.readouterr().err
    # already quantized
    assert main(["quantize", str(out), str(tmp_path / "again"), "--bits", "4"]) == 2
    assert "already quantized" in capsys.readouterr().err
    # a group size that does not divide a layer (the 128 inputs of down_proj divide; 64 hidden do not divide 256)
    assert main(["quantize", str(saved["llama"]), str(tmp_path / "g256"), "--bits", "4", "--group-size", "256"]) == 2
    err = capsys.readouterr().err
    assert "does not divide" in err and "--group-size" in err
    # ... or an expert's projection (Qwen2-MoE's linears take 64; its experts' down_proj has 32 inputs)
    assert main(["quantize", str(saved["qwen2-moe"]), str(tmp_path / "moe"), "--bits", "4", "--group-size", "64"]) == 2
    err = capsys.readouterr().err
    assert "cannot quantize the experts of" in err and "down_proj" in err and "does not divide" in err, err
    assert not (tmp_path / "again").exists() and not (tmp_path / "g256").exists() and not (tmp_path / "moe").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q4"]  # no temporary directory left behind


def test_disk_full_midway_leaves_nothing(saved, tmp_path):
    calls = []

    def progress(done: int, total: int) -> None:
        calls.append(done)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")

    with pytest.raises(InputError, match="No space left"):
        quantize_checkpoint(saved["gpt2"], tmp_path / "q", bits=8, progress=progress)
    assert list(tmp_path.iterdir()) == []


def _tiny_llama(hidden: int = 64) -> transformers.LlamaForCausalLM:
    cfg = transformers.LlamaConfig(vocab_size=1008, hidden_size=hidden, intermediate_size=2 * hidden,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("qtype,head", [("Q4_0", "Q8_0"), ("Q8_0", None), ("Q4_1", "Q4_1"), ("Q4_K", "Q8_0")])
def test_gguf_file_converts_and_streams_exactly(tmp_path, qtype, head):
    from gguf import GGMLQuantizationType as Q

    from tests.gguf_files import write_llama_gguf

    model = _tiny_llama(256 if qtype == "Q4_K" else 64)  # K-quants' super-blocks are 256 values of a row
    src = write_llama_gguf(model, tmp_path / "tiny.gguf", Q[qtype], Q[head] if head else None)
    out = tmp_path / "converted"
    assert main(["convert", str(src), str(out)]) == 0
    q = json.loads((out / "config.json").read_text())["quantization_config"]
    assert q["bits"] == (4 if qtype.startswith("Q4") else 8)
    assert q["module_bits"] == ({"lm_head": 8} if head == "Q8_0" else {})
    ref = transformers.AutoModelForCausalLM.from_pretrained(out).eval()  # the converted checkpoint, held whole
    gguf_ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="tiny.gguf").eval()
    x = torch.randint(3, 1000, (2, 9), generator=torch.Generator().manual_seed(0))
    probe = hermes.load(out, budget=2**40)
    minimum = minimum_budget(probe.hermes.units, [])
    probe.hermes.remove()
    streamed = hermes.load(out, budget=minimum + (65536 if qtype != "Q4_K" else 262144))  # + KV and activations
    with torch.no_grad():
        want, deq = ref(x).logits, gguf_ref(x).logits
        assert torch.equal(streamed(x).logits, want)
        kw = {"max_new_tokens": 5, "do_sample": False}
        assert torch.equal(streamed.generate(x, **kw), ref.generate(x, **kw))
    # the same model as transformers' own GGUF loader (which dequantizes to float): bf16 scales and activations
    assert ((want.float() - deq).norm() / deq.norm()).item() < 0.03
    assert (out / "tokenizer.json").exists()


def test_gguf_of_a_type_hermes_cannot_convert_is_refused(tmp_path, capsys):
    from gguf import GGMLQuantizationType as Q

    from tests.gguf_files import write_llama_gguf

    src = write_llama_gguf(_tiny_llama(), tmp_path / "q5.gguf", Q.Q5_0)
    assert main(["convert", str(src), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "Q5_0" in err and "Q4_0" in err and "Q8_0" in err
    assert main(["convert", str(src)]) == 2
    assert "OUT_DIR" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q5.gguf"]
