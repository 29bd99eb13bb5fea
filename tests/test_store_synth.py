"""Checkpoint files: synthesized checkpoints are standard HF checkpoints; bad files give clear errors."""
from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

import hermes
from hermes.errors import CheckpointError
from hermes.store import INDEX_NAME, Store, read_safetensors_header
from hermes.synth import ARCHS, ArchSpec, build_config, synthesize
from hermes.writer import convert_bin_checkpoint

from .conftest import reference_model, sample_inputs


def test_synth_is_deterministic_and_loads_in_transformers(tmp_path):
    a = synthesize("tiny-bert", tmp_path / "a", seed=3)
    b = synthesize("tiny-bert", tmp_path / "b", seed=3)
    c = synthesize("tiny-bert", tmp_path / "c", seed=4)
    ta, tb, tc = (load_file(p / "model.safetensors") for p in (a, b, c))
    assert ta.keys() == tb.keys()
    assert all(torch.equal(ta[k], tb[k]) for k in ta)
    assert not torch.equal(ta["encoder.layer.0.attention.self.query.weight"],
                           tc["encoder.layer.0.attention.self.query.weight"])
    assert torch.equal(ta["encoder.layer.0.output.LayerNorm.weight"], torch.ones(64))
    ref = reference_model(a)  # transformers loads it without missing/unexpected keys
    assert type(ref).__name__ == "BertModel"
    assert json.loads((a / "config.json").read_text())["architectures"] == ["BertModel"]


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_synth_dtypes_stream_exactly(tmp_path, dtype):
    path = synthesize("tiny-llama", tmp_path / dtype, dtype=dtype)
    header, _ = read_safetensors_header(path / "model.safetensors")
    assert {str(t.dtype) for t in header.values()} == {f"torch.{dtype}"}
    model = hermes.load(path, budget="4MiB")
    inputs = sample_inputs("tiny-llama")
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, reference_model(path)(**inputs).logits, rtol=0, atol=0)


def test_sharded_checkpoint_with_index(tmp_path):
    path = synthesize("tiny-gpt2", tmp_path / "sharded", shard_bytes=150_000)
    index = json.loads((path / INDEX_NAME).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and not (path / "model.safetensors").exists()
    assert len(Store(path)) == len(index["weight_map"])
    model = hermes.load(path, budget="1MiB", loaders=3)
    inputs = sample_inputs("tiny-gpt2")
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, reference_model(path)(**inputs).logits, rtol=0, atol=0)


def test_real_architectures_have_the_published_sizes():
    from hermes.synth import checkpoint_entries

    def params(arch: str) -> float:
        entries = checkpoint_entries(build_config(ArchSpec.from_name(arch)))
        return sum(torch.Size(s).numel() for _, _, s in entries) / 1e6

    assert 334 < params("bert-large") < 336
    assert 124 < params("gpt2") < 125
    assert 303 < params("vit-large") < 305
    assert 6040 < params("gpt-j-6b") < 6060
    assert 1230 < params("llama-3.2-1b") < 1240
    assert 8025 < params("llama-3.1-8b") < 8035
    assert set(ARCHS) >= {"bert-large", "gpt2", "vit-large", "gpt-j-6b", "llama-3.2-1b", "tiny-bert", "tiny-gpt2",
                          "tiny-vit", "tiny-gptj", "tiny-llama"}


def copy_checkpoint(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        if f.is_file():
            (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_truncated_file_is_a_clear_error(tiny_models, tmp_path):
    d = copy_checkpoint(tiny_models["tiny-bert"], tmp_path / "trunc")
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match=r"model.safetensors: tensor .* past the end of the file"):
        hermes.load(d, budget="10MiB")


def test_corrupted_header_is_a_clear_error(tiny_models, tmp_path):
    d = copy_checkpoint(tiny_models["tiny-bert"], tmp_path / "bad")
    f = d / "model.safetensors"
    raw = bytearray(f.read_bytes())
    raw[8:20] = b"not json!!!!"
    f.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="corrupted safetensors header"):
        hermes.load(d, budget="10MiB")
    f.write_bytes(struct.pack("<Q", 10**12) + b"{}")
    with pytest.raises(CheckpointError, match="declared length"):
        hermes.load(d, budget="10MiB")


def test_missing_directory_and_config(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        hermes.load(tmp_path / "nope", budget="1MiB")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        hermes.load(tmp_path / "empty", budget="1MiB")


def test_weights_not_matching_config(tiny_models, tmp_path):
    d = copy_checkpoint(tiny_models["tiny-bert"], tmp_path / "mismatch")
    cfg = json.loads((d / "config.json").read_text())
    cfg["num_hidden_layers"] = 4
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"lacks 16 tensor\(s\).*encoder.layer.3"):
        hermes.load(d, budget="10MiB")
    cfg["num_hidden_layers"], cfg["intermediate_size"] = 3, 96
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"has shape \[128, 64\] but .* expects \[96, 64\]"):
        hermes.load(d, budget="10MiB")


def test_prefixed_checkpoint_keys_and_legacy_names(tiny_models, tmp_path):
    """A BertForPreTraining-style 'bert.' prefix and old gamma/beta LayerNorm names map to BertModel."""
    src = tiny_models["tiny-bert"]
    d = copy_checkpoint(src, tmp_path / "prefixed")
    state = load_file(src / "model.safetensors")
    renamed = {("bert." + k).replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"):
               v for k, v in state.items()}
    save_file(renamed, d / "model.safetensors")
    model = hermes.load(d, budget="2MiB")
    inputs = sample_inputs("tiny-bert")
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).last_hidden_state,
                                   reference_model(src)(**inputs).last_hidden_state, rtol=0, atol=0)


def test_convert_bin_checkpoint_without_pickle_code(tiny_models, tmp_path):
    src = tiny_models["tiny-gpt2"]
    d = tmp_path / "bin"
    d.mkdir()
    (d / "config.json").write_text((src / "config.json").read_text())
    state = load_file(src / "model.safetensors")
    torch.save(state, d / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="hermes convert"):
        hermes.load(d, budget="2MiB")
    convert_bin_checkpoint(d)
    converted = load_file(d / "model.safetensors")
    assert converted.keys() == state.keys() and all(torch.equal(converted[k], state[k]) for k in state)
    hermes.load(d, budget="2MiB")


def test_convert_refuses_pickled_objects(tmp_path):
    d = tmp_path / "evil"
    d.mkdir()

    class Boom:
        def __reduce__(self):
            return (print, ("code ran",))

    torch.save({"w": torch.zeros(2), "x": Boom()}, d / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="not a plain PyTorch state dict"):
        convert_bin_checkpoint(d)
    assert not (d / "model.safetensors").exists()


def test_index_naming_a_file_outside_the_directory_is_refused(tiny_models, tmp_path):
    d = copy_checkpoint(tiny_models["tiny-bert"], tmp_path / "escape")
    keys = list(Store(d))
    (d / INDEX_NAME).write_text(json.dumps({"weight_map": {k: "../../etc/passwd" for k in keys}}))
    with pytest.raises(CheckpointError, match="outside the model directory"):
        hermes.load(d, budget="2MiB")
    (d / INDEX_NAME).write_text(json.dumps({"weight_map": {k: "model-00002.safetensors" for k in keys}}))
    with pytest.raises(CheckpointError, match="names shard 'model-00002.safetensors', which is missing"):
        hermes.load(d, budget="2MiB")


@pytest.mark.parametrize("arch", ["tiny-bert", "tiny-gpt2", "tiny-vit", "tiny-gptj", "tiny-llama"])
def test_synth_writes_the_names_save_pretrained_writes(tiny_models, tmp_path, arch):
    """ViT in particular: transformers' internal names differ from the names it writes to disk."""
    import transformers

    from hermes.skeleton import load_config, resolve_model_class

    path = tiny_models[arch]
    model = resolve_model_class(load_config(path))._from_config(load_config(path))
    model.save_pretrained(tmp_path / "saved")
    assert sorted(Store(path)) == sorted(Store(tmp_path / "saved"))
    assert transformers.AutoConfig.from_pretrained(path).architectures == [type(model).__name__]
