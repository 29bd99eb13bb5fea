"""Issue 24, a newcomer's second hour: what a budget really holds, errors before any weight is read, profiling that
says what it does and how far it is, and figures that agree (one minimum, one peak, one prediction)."""
from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import hermes
from hermes.cli import main
from hermes.engine import EngineConfig, minimum_budget
from hermes.errors import HermesError
from hermes.memory import format_bytes

BIG = "100MiB"  # far more than any tiny model


def _code(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exc:  # refused by the argument parser
        return int(exc.code or 0)


def _without_tokenizer(src: Path, dst: Path) -> Path:
    """A copy of a checkpoint with no tokenizer files (one that has only token ids)."""
    ignore = shutil.ignore_patterns("tokenizer*", "vocab*", "merges*", "special_tokens_map.json", "chat_template*")
    return Path(shutil.copytree(src, dst, ignore=ignore, copy_function=shutil.copy2))


@pytest.fixture()
def nothing_loads(monkeypatch):
    """Every way to read a weight or build the engine fails the test."""
    def loaded(*args, **kwargs):
        raise AssertionError("the model was opened before the error")

    import hermes.bench
    import hermes.profiler
    import hermes.runner

    for target, name in ((hermes, "load"), (hermes.api, "load"), (hermes.runner, "open_model"),
                         (hermes.runner, "PipeLoadEngine"), (hermes.profiler, "profile_model"),
                         (hermes.bench, "_run_once"), (hermes.bench, "_profile")):
        monkeypatch.setattr(target, name, loaded)


# ---- 4. what a budget really holds ------------------------------------------------------------------------------

def test_a_budget_beyond_the_model_reports_the_whole_model_it_holds(tiny_models, tmp_path, capsys):
    import shutil

    # a copy without the profiles other tests cached (a cached profile plans the run, maybe below the budget)
    path = str(shutil.copytree(tiny_models["tiny-gpt2"], tmp_path / "m", ignore=shutil.ignore_patterns(".hermes")))
    assert main(["run", path, "--budget", BIG, "--random-input", "8", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["weights_peak_bytes"] <= res["weights_max_bytes"] == res["whole_model_bytes"] < res["budget_bytes"]
    assert main(["run", path, "--budget", BIG, "--random-input", "8"]) == 0
    whole = format_bytes(res["whole_model_bytes"])
    weights = format_bytes(res["budget_bytes"])  # what the input's activations and the runtime slack leave
    assert f"= the whole model ({whole}) of weight budget {weights} available" in capsys.readouterr().out
    assert main(["generate", path, "--budget", BIG, "--random-prompt", "4", "--max-new-tokens", "2", "--json"]) == 0
    gen = json.loads(capsys.readouterr().out)
    assert gen["weights_peak_bytes"] <= gen["weights_max_bytes"] < gen["weight_budget_bytes"]
    assert main(["generate", path, "--budget", "auto", "--random-prompt", "4", "--max-new-tokens", "2"]) == 0
    err = capsys.readouterr().err
    budget_line = next(line for line in err.splitlines() if line.strip().startswith("budget"))
    assert re.search(r"weights the whole model resident \(\d+\.\d KiB\) of \d+\.\d [GM]iB available", budget_line)


def test_the_python_api_and_serve_report_what_the_engine_holds(tiny_models):
    from hermes.serve.layout import plan_layout

    model = hermes.load(tiny_models["tiny-gpt2"], budget=BIG)
    try:
        with torch.no_grad():
            model(input_ids=torch.tensor([[1, 2, 3]]))
        last = model.hermes.last
        assert last.weights_peak_bytes <= last.weights_max_bytes < last.budget_bytes < 100 * 2**20
        assert model.hermes.generation_policy.budget_bytes == 100 * 2**20
        model.generate(input_ids=torch.tensor([[1, 2, 3]]), max_new_tokens=2)
        g = model.hermes.last_generation
        assert g.weights_peak_bytes <= g.weights_max_bytes < g.weight_budget_bytes
        layout = plan_layout(model.hermes, model.config, model.dtype, kv_cache=None, max_batch=2)
        assert layout.weights_max < layout.weights
        assert f"weights the whole model resident ({format_bytes(layout.weights_max)}) of " in layout.describe()
    finally:
        model.hermes.remove()


# ---- 5. errors before any weight is read --------------------------------------------------------------------------

@pytest.mark.parametrize(("model", "args", "message"), [
    ("tiny-bert", ["generate", "--budget", "1MiB", "--prompt-ids", "1,2"], "BertModel (%s) does not generate text"),
    ("tiny-gpt2", ["generate", "--budget", "1MiB", "--prompt", "hi"], "this checkpoint has no tokenizer"),
    ("tiny-gpt2", ["generate", "--budget", "1MiB", "--prompt-ids", "5,99999"], "token ids must lie in [0, 999]"),
    ("tiny-gpt2", ["generate", "--budget", "1MiB", "--prompt-ids=5,-1"], "got values in [-1, 5]"),
    ("tiny-gpt2", ["generate", "--budget", "1MiB", "--random-prompt", "100", "--max-new-tokens", "40"],
     "= 140 exceeds the model's 128 positions"),
    ("tiny-gpt2", ["run", "--budget", "1MiB", "--text", "hi"], "this checkpoint has no tokenizer"),
    ("tiny-gpt2", ["run", "--budget", "1MiB", "--input-ids=-3,4"], "token ids must lie in [0, 999]"),
    ("tiny-gpt2", ["run", "--budget", "auto", "--random-input", "500"], "takes at most 128"),
    ("tiny-bert", ["serve", "--budget", "1MiB", "--port", "0"], "BertModel (%s) does not generate text"),
    ("tiny-gpt2", ["bench", "--budget", "1MiB", "--seq-len", "500"], "takes at most 128"),
    ("tiny-gpt2", ["profile", "--seq-len", "500"], "takes at most 128"),
    ("tiny-gpt2", ["plan", "--budget", "1MiB", "--seq-len", "500"], "takes at most 128"),
])
def test_what_the_config_refuses_fails_fast_before_loading(tiny_models, tmp_path, capsys, nothing_loads, model,
                                                            args, message):
    path = _without_tokenizer(tiny_models[model], tmp_path / model)
    cmd, *rest = args
    t0 = time.perf_counter()
    assert _code([cmd, str(path), *rest] + (["-o", str(tmp_path / "out")] if cmd == "bench" else [])) == 2
    assert time.perf_counter() - t0 < 5
    err = capsys.readouterr().err
    assert (message % path if "%s" in message else message) in err, err
    assert "Traceback" not in err and "loading" not in err


def test_no_tokenizer_says_how_to_give_the_prompt(tiny_models, tmp_path, capsys):
    path = _without_tokenizer(tiny_models["tiny-llama"], tmp_path / "m")
    assert _code(["generate", str(path), "--budget", "1MiB", "--prompt", "Once upon a time"]) == 2
    err = capsys.readouterr().err
    assert "this checkpoint has no tokenizer (tokenizer.json / tokenizer_config.json)" in err
    assert "--prompt-ids" in err and "add the tokenizer files of the model to the directory" in err


# ---- 6. profiling says what it does, and how far it is ------------------------------------------------------------

def test_profiling_progress_has_a_total(tiny_models, capsys):
    from hermes.profiler import profile_inputs, profile_model

    path = tiny_models["tiny-bert"]
    calls: list[tuple[int, int, str]] = []
    profile_model(path, profile_inputs(path, 8, 1), repeat=1, progress=lambda *a: calls.append(a))
    totals = {total for _, total, _ in calls}
    assert len(totals) == 1 and calls[-1][0] == calls[-1][1]  # one total, reached at the end
    assert [done for done, _, _ in calls] == list(range(len(calls)))  # one step at a time
    assert any("cold read bandwidth" in what for _, _, what in calls)


def test_plan_uses_the_cached_profile_of_another_length_or_says_why_it_profiles(tiny_models, tmp_path, capsys,
                                                                               monkeypatch):
    import hermes.profiler

    path = Path(shutil.copytree(tiny_models["tiny-bert"], tmp_path / "bert", copy_function=shutil.copy2,
                                ignore=shutil.ignore_patterns(".hermes")))  # no profiles other tests cached
    assert main(["profile", str(path), "--seq-len", "16", "--repeat", "1"]) == 0
    bar = capsys.readouterr().err
    assert re.search(r"profiling: 100%.* (\d+)/\1 ", bar)  # the bar had a total, and reached it

    def no_profiling(*args, **kwargs):
        raise HermesError("profiling started")

    monkeypatch.setattr(hermes.profiler, "profile_model", no_profiling)
    assert main(["plan", str(path), "--budget", "1MiB"]) == 0  # no --seq-len: the cached profile's
    assert "planning for the cached profile's input, seq-len 16, batch 1" in capsys.readouterr().err
    assert main(["plan", str(path), "--budget", "1MiB", "--seq-len", "32"]) == 2
    err = capsys.readouterr().err
    note = err.index(f"profiling {path} for seq-len 32, batch 1 first")
    assert "the cached profile is for seq-len 16, batch 1; pass --seq-len 16 --batch 1 to use it" in err
    assert note < err.index("profiling started")  # said before it started


def test_bench_progress_counts_runs_of_the_whole_benchmark(tiny_models, tmp_path, monkeypatch):
    import hermes.bench

    monkeypatch.setattr(hermes.bench, "_run_once", lambda *a, **k: {"latency_s": 1.0,
                                                                     "peak_rss_above_baseline_bytes": 1})
    messages: list[str] = []
    hermes.bench.run_benchmark(tiny_models["tiny-gpt2"], strategies=["full", "sequential"], budget="1MiB", seq_len=8,
                               repeat=2, bounds=False, work_dir=tmp_path, progress=messages.append)
    assert [m.split(":")[0] for m in messages] == ["run 1/4", "run 2/4", "run 3/4", "run 4/4"]


# ---- 7. one minimum, one peak, one prediction ---------------------------------------------------------------------

def _profile_of(units):
    """A profile of ``units`` as the profiler records them (bytes only)."""
    from hermes.engine.budget import gather_room
    from hermes.profile import FORMAT_VERSION, Profile, UnitProfile

    return Profile(FORMAT_VERSION, "", "", {}, {}, tuple(
        UnitProfile(u.name, gather_room(u) if u.kind == "gather" else u.buffer_bytes, {}, 0.0, u.kind) for u in units),
        {}, {}, {}, 0, 0.0, {})


@pytest.mark.parametrize("name", ["tiny-bert", "tiny-gpt2", "tiny-llama", "tiny-vit", "mixtral"])
def test_the_profile_counts_the_minimum_and_the_weights_peak_as_the_engine_does(tiny_models, tmp_path, name):
    from hermes import zoo
    from hermes.engine.residency import Residency

    path = tiny_models[name] if name in tiny_models else zoo.save(zoo.BY_NAME[name], tmp_path / name)
    layout = hermes.open_model(path)
    prof = _profile_of(layout.units)
    assert prof.min_weight_budget == minimum_budget(layout.units)
    residency = Residency(layout.model, layout.units)
    for budget in (prof.min_weight_budget, prof.model_bytes // 2, 2 * prof.model_bytes):
        residency.configure(EngineConfig(budget))
        assert prof.weights_peak(budget) == residency.held_at_most(budget)


def test_every_command_names_the_minimum_the_same_way(tiny_models, tmp_path, capsys):
    # without the profiles other tests cached (one for --random-input 4 would plan the run: another minimum)
    path = Path(shutil.copytree(tiny_models["tiny-gpt2"], tmp_path / "gpt2", copy_function=shutil.copy2,
                                ignore=shutil.ignore_patterns(".hermes")))
    least = format_bytes(minimum_budget(hermes.open_model(path).units))
    weights = f"minimum weight budget {least}"
    assert main(["profile", str(path), "--seq-len", "8", "--repeat", "1"]) == 0
    out = capsys.readouterr().out
    assert f"{weights} (largest unit + side buffer): what `run --budget` needs" in out
    with_act = re.search(rf"minimum budget with activations (\S+ \S+) = {weights} \+ activations", out)
    assert with_act
    assert _code(["run", str(path), "--budget", "10KiB", "--random-input", "4"]) == 2
    assert f"is below the {weights} of this model" in capsys.readouterr().err
    assert _code(["plan", str(path), "--budget", "10KiB", "--seq-len", "8"]) == 2
    assert f"is below the minimum budget with activations {with_act.group(1)} = {weights}" in \
        capsys.readouterr().err
    assert _code(["generate", str(path), "--budget", least.replace(" ", ""), "--random-prompt", "8"]) == 2
    assert re.search(rf"minimum budget for this generation \S+ \S+ = {weights} \+ KV cache",
                     capsys.readouterr().err)
    assert _code(["serve", str(path), "--budget", "300KB", "--port", "0"]) == 2
    assert re.search(rf"minimum budget to serve \S+ \S+ = {weights} \+ KV cache", capsys.readouterr().err)


def _tied_bin_checkpoint(src: Path, dst: Path) -> Path:
    """``src`` as a ``pytorch_model.bin`` of ``state_dict()``: the tied head and embedding share one storage."""
    from transformers import AutoModelForCausalLM

    dst.mkdir()
    shutil.copy2(src / "config.json", dst / "config.json")
    torch.save(AutoModelForCausalLM.from_pretrained(src).state_dict(), dst / "pytorch_model.bin")
    return dst


def test_a_weights_peak_never_exceeds_the_whole_model_even_after_convert(tiny_models, tmp_path, capsys):
    """The side buffer (embedding rows) and the head's page-aligned chunks made GPT-2's peak '108.5 % of the model';
    a state dict converted from .bin kept its tied weight under the head's name, which no longer loaded."""
    src = tiny_models["tiny-gpt2"]
    converted = _tied_bin_checkpoint(src, tmp_path / "bin")
    assert main(["convert", str(converted)]) == 0
    capsys.readouterr()
    for path in (src, converted):
        for budget in ("400KiB", BIG):
            out = tmp_path / f"{path.name}-{budget}.safetensors"
            assert main(["run", str(path), "--budget", budget, "--input-ids", "1,2,3", "--json",
                         "--save-output", str(out)]) == 0
            res = json.loads(capsys.readouterr().out)
            assert res["weights_peak_bytes"] <= res["whole_model_bytes"]
            assert torch.equal(load_file(out)["logits"], load_file(tmp_path / f"{src.name}-{budget}.safetensors")
                               ["logits"])
        assert main(["run", str(path), "--budget", "400KiB", "--random-input", "4"]) == 0
        share = re.search(r"\((\d+\.\d)% of the whole model \(\S+ \S+ in the engine\)\)", capsys.readouterr().out)
        assert share and float(share.group(1)) <= 100


def test_a_planned_run_prints_each_prediction_beside_its_measurement(tiny_models, tmp_path, capsys):
    path = Path(shutil.copytree(tiny_models["tiny-bert"], tmp_path / "bert", copy_function=shutil.copy2,
                                ignore=shutil.ignore_patterns(".hermes")))  # no profiles other tests cached
    assert main(["profile", str(path), "--seq-len", "8", "--repeat", "1"]) == 0
    assert main(["plan", str(path), "--budget", "1MiB", "-o", str(tmp_path / "plan.json")]) == 0
    plan = json.loads((tmp_path / "plan.json").read_text())
    capsys.readouterr()
    assert main(["run", str(path), "--plan", str(tmp_path / "plan.json"), "--random-input", "8", "--cold",
                 "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    lat, peak = res["predictions"]["latency_s"], res["predictions"]["weights_peak_bytes"]
    assert lat["source"] == "plan" and lat["predicted"] == plan["predicted_first_pass_s"]
    assert lat["measured"] == res["latency_s"] and lat["ratio"] == pytest.approx(res["latency_s"] / lat["predicted"])
    assert peak["predicted"] == plan["predicted_weights_peak_bytes"] and peak["ratio"] == 1.0  # the same figure
    assert main(["run", str(path), "--budget", "1MiB", "--random-input", "8"]) == 0  # planned from the cache
    latency = next(line for line in capsys.readouterr().out.splitlines() if "latency" in line)
    assert re.search(r"\d ms \(plan of the cached profile, made for a cold cache, predicted \d+\.\d ms, x\d+\.\d\d\)",
                     latency)


def test_bench_puts_the_plan_prediction_beside_the_forward_time():
    from hermes.bench import summarize, to_markdown

    run = {"spec": "pipeload", "latency_s": 1.0, "forward_s": 0.6, "peak_rss_above_baseline_bytes": 2**20,
           "weights_peak_bytes": 2**19, "plan": {"loaders": 1, "io": "direct", "prefetch": 1, "budget": 2**19,
                                                  "predicted_latency_s": 0.5}}
    result = {"model_dir": "m", "budget": "2MiB", "model_bytes": 2**20, "seq_len": 8, "repeat": 1, "runs": [run],
              "machine": {"cpu": "x", "cpus": 2, "torch": "2", "torch_threads": 2, "transformers": "5"}}
    result["summary"] = summarize(result)
    assert result["summary"]["pipeload"]["forward_prediction"]["ratio"] == pytest.approx(1.2)
    text = to_markdown(result)
    assert "forward 0.600 s (plan predicted 0.500 s, x1.20)" in text
    assert "budget 2MiB (more than the model's 1.0 MiB; the weights get what activations and slack leave)" in text
