"""Reliability: bad files and inputs give clear errors; faults neither hang nor leak; the budget always holds."""
from __future__ import annotations

import json
import random
import threading
import time

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import hermes
from hermes.cli import main
from hermes.engine import minimum_budget
from hermes.errors import CheckpointError, LoadError
from hermes.verify import verify

from .conftest import loader_threads, overlapping_reads, reference_model, sample_inputs
from .test_store_synth import copy_checkpoint


def test_verify_finds_the_first_bad_unit(tiny_models, tmp_path, capsys):
    d = copy_checkpoint(tiny_models["tiny-gpt2"], tmp_path / "v")
    assert verify(d).ok
    info = hermes.open_model(d).store["transformer.h.1.mlp.c_fc.weight"]
    with open(info.path, "r+b") as f:
        f.seek(info.start + 10)
        f.write(b"\x13\x37")
    report = verify(d)
    assert not report.ok and report.bad_unit == "transformer.h.1"
    assert report.bad_tensor == "transformer.h.1.mlp.c_fc.weight"
    assert main(["verify", str(d)]) == 1
    assert "transformer.h.1" in capsys.readouterr().err


def test_verify_without_checksums_says_how_to_record(minilm, tmp_path, capsys):
    d = copy_checkpoint(minilm, tmp_path / "m")
    with pytest.raises(CheckpointError, match="verify --record"):
        verify(d)
    assert main(["verify", "--record", str(d)]) == 0
    assert main(["verify", str(d)]) == 0
    assert "tensors match" in capsys.readouterr().out


def test_unknown_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "no-such-model"}))
    with pytest.raises(CheckpointError, match="unknown or unsupported architecture model_type='no-such-model'"):
        hermes.load(tmp_path, budget="1MiB")


def test_config_without_weights(tiny_models, tmp_path):
    (tmp_path / "config.json").write_text((tiny_models["tiny-bert"] / "config.json").read_text())
    with pytest.raises(CheckpointError, match="holds no weights"):
        hermes.load(tmp_path, budget="1MiB")


def test_extra_tensors_are_a_mismatch(tiny_models, tmp_path):
    d = copy_checkpoint(tiny_models["tiny-bert"], tmp_path / "extra")
    state = load_file(d / "model.safetensors")
    state["cls.predictions.bias"] = torch.zeros(1000)
    save_file(state, d / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"1 tensor\(s\) that BertModel does not use.*cls.predictions.bias"):
        hermes.load(d, budget="2MiB")


def test_wrong_image_size_is_a_clear_error_and_the_model_still_works(tiny_models):
    path = tiny_models["tiny-vit"]
    model = hermes.load(path, budget="1MiB")
    with pytest.raises(ValueError, match="doesn't match model"), torch.no_grad():
        model(pixel_values=torch.randn(1, 3, 48, 48))
    assert not loader_threads()
    inputs = sample_inputs("tiny-vit")
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).last_hidden_state,
                                   reference_model(path)(**inputs).last_hidden_state, rtol=0, atol=0)


def test_slow_disk_with_a_failing_agent_returns_in_bounded_time(tiny_models):
    path = tiny_models["tiny-llama"]
    model = hermes.load(path, budget="4MiB", loaders=2)

    def faulty(unit):
        if unit.index == 1:
            raise OSError(5, "injected read error")
        time.sleep(0.3)  # a very slow disk

    model.hermes.before_read = faulty
    t0 = time.perf_counter()
    with pytest.raises(LoadError, match="injected read error"), torch.no_grad():
        model(**sample_inputs("tiny-llama"))
    assert time.perf_counter() - t0 < 3.0  # bounded by one slow read, not by the whole model
    assert not loader_threads() and model.hermes.daemon.held == 0


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(loaders=st.integers(1, 4), prefetch=st.one_of(st.none(), st.integers(0, 3)),
       budget_frac=st.floats(0.0, 1.0), seed=st.integers(0, 2**16), arch=st.sampled_from(["tiny-gpt2", "tiny-bert"]))
def test_budget_holds_under_random_delays(tiny_models, loaders, prefetch, budget_frac, seed, arch):
    path = tiny_models[arch]
    units = hermes.open_model(path).units
    lo, hi = minimum_budget(units), sum(u.buffer_bytes for u in units)
    budget = int(lo + budget_frac * (hi - lo))
    model = hermes.load(path, budget=budget, loaders=loaders, prefetch=prefetch)
    rng = random.Random(seed)
    delays = {u.index: (rng.uniform(0, 0.004), rng.uniform(0, 0.004)) for u in units}
    model.hermes.before_read = lambda unit: time.sleep(delays[unit.index][0])
    for u in units:
        model.get_submodule(u.module).register_forward_pre_hook(lambda m, a, i=u.index: time.sleep(delays[i][1]))
    inputs = sample_inputs(arch, seed=seed)
    result: dict = {}

    def run():
        with torch.no_grad():
            result["out"] = model(**inputs)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout=60)
    assert not t.is_alive(), "deadlock: the pass did not complete"
    stats = model.hermes.last
    assert stats.weights_peak_bytes <= budget
    assert all(allocated <= budget and held <= allocated for _, allocated, held in stats.memory)
    events = [e for e, u in zip(stats.events, units, strict=True) if u.called]  # not the gathered embedding
    for e in events:  # every unit loaded before computed, freed after
        assert e.load_end <= e.compute_start <= e.compute_end <= e.free
    if prefetch == 0:  # sequential: nothing admitted or read while a unit computes
        assert overlapping_reads(stats) == []
    elif prefetch is not None:  # never more than `prefetch` units loaded ahead of the one computing
        for e in events:
            ahead = [o for o in events if o.unit > e.unit and o.reserve < e.compute_start]
            assert len(ahead) <= prefetch - 1 or e.unit == events[0].unit
    key = "logits" if "logits" in result["out"] else "last_hidden_state"
    with torch.no_grad():
        torch.testing.assert_close(result["out"][key], reference_model(path)(**inputs)[key], rtol=0, atol=0)
    assert not loader_threads()


def test_run_warns_when_weight_files_changed_since_their_checksums(tiny_models, tmp_path, caplog):
    import shutil

    from hermes.cli import main

    path = tmp_path / "m"
    shutil.copytree(tiny_models["tiny-bert"], path)  # copy2 keeps sizes and times: no warning
    assert main(["run", str(path), "--budget", "1MiB", "--random-input", "4"]) == 0
    assert "changed since its checksums were recorded" not in caplog.text
    f = path / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[-100] ^= 0xFF  # one flipped byte in the last tensor
    f.write_bytes(bytes(data))
    assert main(["run", str(path), "--budget", "1MiB", "--random-input", "4"]) == 0
    assert "model.safetensors changed since its checksums were recorded" in caplog.text
    assert main(["verify", str(path)]) == 1  # verify finds the flipped tensor
    data[-100] ^= 0xFF
    f.write_bytes(bytes(data))  # restored bytes, new modification time
    assert main(["verify", str(path)]) == 0  # verified: the stamps are refreshed
    caplog.clear()
    assert main(["run", str(path), "--budget", "1MiB", "--random-input", "4"]) == 0
    assert "changed since" not in caplog.text
