"""The benchmark harness end to end on tiny models: every strategy, the results schema, the plots, device
emulation with cgroup v1 (used when writable, skipped cleanly when not)."""
from __future__ import annotations

import json

import pytest

from hermes import device as device_mod
from hermes.bench import find_min_ram, run_benchmark, to_markdown, write_results
from hermes.cli import main
from hermes.device import DeviceSpec, available
from hermes.plots import plot_file, plot_results

ALL = ["full", "pipeswitch", "sequential", "double-buffer", "pipeload:loaders=2,io=direct", "accelerate", "airllm"]
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def llama_result(tiny_models, tmp_path_factory):
    return run_benchmark(tiny_models["tiny-llama"], strategies=ALL, budget="700KB", seq_len=16, repeat=1,
                         work_dir=tmp_path_factory.mktemp("work"))


def test_every_strategy_runs_end_to_end(llama_result):
    summary = llama_result["summary"]
    assert list(summary) == ALL
    for spec, s in summary.items():
        assert "error" not in s, f"{spec}: {s.get('error')}"
        assert s["latency_s"] > 0 and s["peak_rss_above_baseline_bytes"] >= 0
    assert summary["pipeload:loaders=2,io=direct"]["weights_peak_bytes"] <= 400_000
    assert summary["accelerate"]["n"] == 1
    run = next(r for r in llama_result["runs"] if r["spec"].startswith("pipeload"))
    assert run["events"] and run["memory"]  # the timeline the plots draw
    runs = {r["spec"]: r for r in llama_result["runs"]}
    assert (runs["sequential"]["prefetch"], runs["double-buffer"]["prefetch"]) == (0, 1)  # issue #25
    assert runs["sequential"]["loaders"] == runs["double-buffer"]["loaders"] == 1
    # every strategy computed what transformers' model held whole computes, bit for bit (its output's sha256)
    same = {spec: s.get("same_output") for spec, s in summary.items()}
    assert same == {spec: True for spec in ALL}, same


def test_results_schema_and_ratios(llama_result, tmp_path):
    json_path, md_path = write_results(llama_result, tmp_path)
    data = json.loads(json_path.read_text())
    for key in ("format_version", "model_dir", "budget", "seq_len", "repeat", "machine", "device", "runs",
                "summary", "bounds"):
        assert key in data
    for key in ("cpu", "cpus", "torch", "transformers", "python"):
        assert key in data["machine"]
    assert {r["spec"] for r in data["runs"]} == set(ALL)
    pl = data["summary"]["pipeload:loaders=2,io=direct"]
    ps = data["summary"]["pipeswitch"]
    assert pl["speedup_vs_pipeswitch"] == pytest.approx(ps["latency_s"] / pl["latency_s"])
    assert ps["speedup_vs_pipeswitch"] == pytest.approx(1.0)
    assert "forward_vs_lower_bound" in pl
    b = data["bounds"]
    assert data["lower_bound"]["seconds"] == pytest.approx(max(b["sum_load_s"], b["sum_compute_s"]) + b["first_load_s"])
    assert pl["forward_vs_lower_bound"] == pytest.approx(pl["forward_s"] / data["lower_bound"]["seconds"])
    head = [t for n, t in zip(b["unit_names"], b["unit_compute_s"], strict=True) if n.startswith("lm_head")]
    assert head and sum(head) > 0  # the head's matmul is timed (a tied head is one matmul on its first chunk)
    md = md_path.read_text()
    assert "speedup vs pipeswitch" in md and "airllm" in md and "same output" in md


def test_plots_are_written_and_redrawn(llama_result, tmp_path):
    paths = plot_results(llama_result, tmp_path)
    assert sorted(p.name for p in paths) == ["bars.png", "memory.png", "timeline.png", "tradeoff.png"]
    for p in paths:
        assert p.read_bytes()[:8] == PNG and p.stat().st_size > 5000
        p.unlink()
    write_results(llama_result, tmp_path)
    assert main(["plot", str(tmp_path / "results.json")]) == 0
    assert all((tmp_path / n).read_bytes()[:8] == PNG
               for n in ("bars.png", "memory.png", "timeline.png", "tradeoff.png"))


def test_plot_refuses_a_file_that_is_not_results(tmp_path, capsys):
    bad = tmp_path / "results.json"
    bad.write_text('{"hello": 1}')
    assert main(["plot", str(bad)]) == 2
    assert "not a hermes bench results.json" in capsys.readouterr().err
    with pytest.raises(Exception, match="not a hermes bench"):
        plot_file(tmp_path / "missing.json")


def test_a_strategy_that_cannot_run_says_so(tiny_models, tmp_path):
    res = run_benchmark(tiny_models["tiny-gpt2"], strategies=["airllm"], budget="600KB", seq_len=8,
                        repeat=1, bounds=False, work_dir=tmp_path)
    assert "Llama-family" in res["summary"]["airllm"]["error"]
    assert "cannot run: airllm runs Llama-family" in to_markdown(res)


def test_plain_pipeload_runs_the_plan_of_a_profile_made_first(tiny_models, tmp_path):
    specs = ["pipeload", "pipeload:budget=2MB", "pipeload:loaders=1,io=direct"]
    res = run_benchmark(tiny_models["tiny-bert"], strategies=specs, budget="1MB", seq_len=8, repeat=1,
                        bounds=False, work_dir=tmp_path)
    assert res["profile"]["key"] and (res["profile"]["cached"] or res["profile"]["seconds"] > 0)
    for spec, budget in (("pipeload", 1_000_000), ("pipeload:budget=2MB", 2_000_000)):
        s = res["summary"][spec]
        plan = s["plan"]
        assert plan["loaders"] in (1, 2, 4) and plan["io"] in ("buffered", "direct") and plan["budget"] <= budget
        run = next(r for r in res["runs"] if r["spec"] == spec)
        assert (run["loaders"], run["io"], run["budget_bytes"]) == (plan["loaders"], plan["io"], plan["budget"])
        assert s["weights_peak_bytes"] <= plan["budget"]
    fixed = next(r for r in res["runs"] if r["spec"] == "pipeload:loaders=1,io=direct")
    assert "plan" not in fixed and (fixed["loaders"], fixed["io"]) == (1, "direct")
    assert "pipeload (plan: " in to_markdown(res)
    # a budget no plan fits: the report says why instead of failing the benchmark
    res = run_benchmark(tiny_models["tiny-bert"], strategies=["pipeload:budget=10KB"], budget="1MB", seq_len=8,
                        repeat=1, bounds=False, work_dir=tmp_path)
    assert "below the minimum" in res["summary"]["pipeload:budget=10KB"]["error"]


def test_a_run_over_the_time_limit_is_killed_and_reported(tiny_models, tmp_path):
    res = run_benchmark(tiny_models["tiny-bert"], strategies=["full"], budget="1MB", seq_len=8, repeat=1,
                        bounds=False, work_dir=tmp_path, timeout=0.05)
    assert res["runs"][0]["timed_out"] is True
    assert "did not finish within 0 s" in res["summary"]["full"]["error"]


def test_emulation_is_skipped_cleanly_where_cgroups_are_not_writable(tiny_models, tmp_path, monkeypatch):
    monkeypatch.setattr(device_mod, "ROOT", tmp_path / "no-cgroups")
    res = run_benchmark(tiny_models["tiny-bert"], strategies=["pipeload"], budget="1MB", seq_len=8, repeat=1,
                        bounds=False, device=DeviceSpec(ram_bytes=2**31, read_bps=200 * 10**6, cpus=1))
    assert res["device"]["emulated"] is False and "not mounted" in res["device"]["skipped_because"]
    assert "error" not in res["summary"]["pipeload"]
    assert "device emulation skipped" in to_markdown(res)


needs_cgroups = pytest.mark.skipif(available(DeviceSpec(ram_bytes=1, read_bps=1, cpus=1)) is not None,
                                   reason=f"cgroup v1 not writable here: "
                                          f"{available(DeviceSpec(ram_bytes=1, read_bps=1, cpus=1))}")


def _our_groups() -> list[str]:
    return [p.name for c in ("memory", "blkio", "cpuset") for p in (device_mod.ROOT / c).glob("hermes-*")]


@needs_cgroups
def test_runs_inside_the_emulated_device_and_cleans_up(tiny_models, tmp_path):
    before = _our_groups()
    res = run_benchmark(tiny_models["tiny-bert"], strategies=["pipeload", "full"], budget="1MB", seq_len=8,
                        repeat=1, bounds=False, device=DeviceSpec(ram_bytes=3 * 2**30, read_bps=200 * 10**6, cpus=1))
    assert res["device"]["emulated"] is True
    assert all("error" not in s for s in res["summary"].values())
    assert _our_groups() == before  # every group removed


@needs_cgroups
def test_the_ram_cap_kills_a_run_that_exceeds_it(tiny_models):
    res = run_benchmark(tiny_models["tiny-bert"], strategies=["full"], budget="1MB", seq_len=8, repeat=1,
                        bounds=False, device=DeviceSpec(ram_bytes=64 * 2**20))  # below the Python runtime
    assert "emulated RAM cap" in res["summary"]["full"]["error"]


@needs_cgroups
def test_find_min_ram_brackets_the_smallest_cap(tiny_models):
    res = find_min_ram(tiny_models["tiny-bert"], "pipeload", budget="1MB", seq_len=8, low=128 * 2**20,
                       high=768 * 2**20, tolerance=0.25)
    assert res["min_ram_bytes"] is not None
    oks = [p["ram_bytes"] for p in res["probes"] if p["ok"]]
    fails = [p["ram_bytes"] for p in res["probes"] if not p["ok"]]
    assert res["min_ram_bytes"] == min(oks) and res["time_limit_s"] >= 60
    assert not fails or max(fails) < res["min_ram_bytes"]


def test_a_cached_profile_is_reused_on_the_machine_as_it_is(tiny_models, tmp_path):
    from hermes.inputs import build_inputs
    from hermes.profile import cached_profile, default_profile_path
    from hermes.profiler import profile_model
    from hermes.skeleton import load_config

    path = tiny_models["tiny-gpt2"]
    inputs = build_inputs(path, load_config(path), random_seq_len=8)
    if cached_profile(path, {k: list(v.shape) for k, v in inputs.items()}) is None:
        prof = profile_model(path, inputs, repeat=1)
        prof.save(default_profile_path(path, prof.key))
    messages: list[str] = []
    res = run_benchmark(path, strategies=["pipeload"], budget="1MB", seq_len=8, repeat=1, bounds=False,
                        work_dir=tmp_path, progress=messages.append)
    assert res["profile"]["cached"] is True and res["profile"]["seconds"] == 0.0
    assert any("using the cached profile" in m for m in messages)
    assert "plan" in res["summary"]["pipeload"]


def test_plots_name_model_and_strategy_and_pick_a_readable_unit():
    from hermes.plots import byte_unit, run_label

    assert run_label({"model_dir": "/x/gpt2", "spec": "pipeload:loaders=1,io=direct"}) == \
        "gpt2 · pipeload:loaders=1,io=direct"
    assert byte_unit(300_000) == ("KiB", 1024)  # a tiny model: 292.97 KiB, not 0.29 MiB
    assert byte_unit(3 * 2**20)[0] == "MiB" and byte_unit(5 * 2**30)[0] == "GiB" and byte_unit(10)[0] == "bytes"


def test_a_strategy_that_computed_something_else_is_marked():
    from hermes.baselines import same_outputs

    runs = [{"spec": "full", "output_sha256": "a"}, {"spec": "pipeload", "output_sha256": "a"},
            {"spec": "airllm", "output_sha256": "b"}, {"spec": "sequential"},
            {"spec": "accelerate", "output_sha256": "a"}, {"spec": "accelerate", "output_sha256": "c"},
            {"spec": "double-buffer", "error": "killed"}]
    assert same_outputs(runs) == {"full": (True, "full"), "pipeload": (True, "full"), "airllm": (False, "full"),
                                  "sequential": (None, "full"), "accelerate": (False, "full")}
    assert same_outputs(runs[1:3]) == {"pipeload": (True, "pipeload"), "airllm": (False, "pipeload")}  # no full
