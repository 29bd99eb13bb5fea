"""Profiler and planner: plans respect the budget, more budget never predicts slower, files round-trip."""
from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import hermes
from hermes.cli import main
from hermes.engine.budget import gather_room
from hermes.errors import BudgetError
from hermes.planner import Plan, candidates, plan, simulate
from hermes.profile import FORMAT_VERSION, IO_MODES, Profile, UnitProfile, cached_profile
from hermes.profiler import profile_model

from .conftest import reference_model, sample_inputs


def make_profile(sizes, loads, computes, *, cslow=1.3, lslow=1.2, bw=(1.0, 1.6, 1.8), activation=1000):
    units = tuple(UnitProfile(f"u{i}", s, {"buffered": ld * 1.2, "direct": ld}, c)
                  for i, (s, ld, c) in enumerate(zip(sizes, loads, computes, strict=True)))
    bandwidth = {io: {str(k): b * 1e9 for k, b in zip((1, 2, 4), bw, strict=True)} for io in IO_MODES}
    keys = [f"{io}:{k}" for io in IO_MODES for k in (1, 2, 4)]
    return Profile(FORMAT_VERSION, "k", "m", {"input_ids": [1, 8]}, {"cpus": 2}, units, bandwidth,
                   dict.fromkeys(keys, cslow), dict.fromkeys(keys, lslow), activation, 0.001, {})


profiles = st.integers(2, 8).flatmap(lambda n: st.builds(
    make_profile,
    st.lists(st.integers(10_000, 1_000_000), min_size=n, max_size=n),
    st.lists(st.floats(0.0001, 0.05), min_size=n, max_size=n),
    st.lists(st.floats(0.0001, 0.05), min_size=n, max_size=n),
    cslow=st.floats(1.0, 2.5), lslow=st.floats(1.0, 2.5),
    bw=st.tuples(st.floats(0.2, 3), st.floats(0.2, 3), st.floats(0.2, 3)),
    activation=st.integers(0, 100_000)))


@settings(max_examples=60, deadline=None)
@given(profile=profiles, frac=st.floats(0, 1.2), passes=st.sampled_from([1, 3]))
def test_plans_respect_the_budget(profile, frac, passes):
    minimum = profile.min_weight_budget + profile.activation_bytes
    budget = int(minimum + frac * profile.model_bytes)
    p = plan(profile, budget, passes=passes)
    assert p.predicted_peak_bytes <= budget
    assert p.weight_budget_bytes + profile.activation_bytes <= budget
    assert sum(u.bytes for u in profile.units if u.name in p.resident) + max(
        (u.bytes for u in profile.units if u.name not in p.resident), default=0) <= p.weight_budget_bytes
    with pytest.raises(BudgetError, match=f"at least {minimum} bytes"):
        plan(profile, minimum - 1)


@settings(max_examples=40, deadline=None)
@given(profile=profiles, a=st.floats(0, 1.2), b=st.floats(0, 1.2))
def test_more_budget_never_predicts_slower(profile, a, b):
    lo, hi = sorted((a, b))
    minimum = profile.min_weight_budget + profile.activation_bytes
    small = plan(profile, int(minimum + lo * profile.model_bytes))
    large = plan(profile, int(minimum + hi * profile.model_bytes))
    assert large.predicted_latency_s <= small.predicted_latency_s


def test_simulation_basics():
    p = make_profile([100] * 4, [0.01] * 4, [0.02] * 4, cslow=1.0, lslow=1.0, bw=(1, 1, 1))
    seq = simulate(p, weight_budget=100, loaders=1, prefetch=1, io="direct")
    assert seq.latency_s == pytest.approx(4 * 0.03 + 0.001)  # no overlap: sum of loads + computes
    piped = simulate(p, weight_budget=400, loaders=1, prefetch=None, io="direct")
    assert piped.latency_s == pytest.approx(0.01 + 4 * 0.02 + 0.001)  # first load, then compute-bound
    assert piped.weights_peak_bytes <= 400 and seq.weights_peak_bytes == 100


def test_simulation_of_sequential_and_double_buffered_passes():
    """prefetch=0 predicts no overlap at any budget (Σ loads + Σ computes), read by one reader whatever the number
    of loaders; prefetch=1 reads unit k+1 while unit k computes; a plan may choose prefetch 0."""
    p = make_profile([100] * 4, [0.01] * 4, [0.02] * 4, cslow=1.0, lslow=1.0, bw=(1, 0.5, 0.25))
    for loaders in (1, 2, 4):
        seq = simulate(p, weight_budget=400, loaders=loaders, prefetch=0, io="direct")
        assert seq.latency_s == pytest.approx(4 * (0.01 + 0.02) + 0.001)
        assert all(b <= a for (_, b), (a, _) in zip(seq.load_intervals, seq.load_intervals[1:], strict=False))
    double = simulate(p, weight_budget=400, loaders=1, prefetch=1, io="direct")
    assert double.latency_s == pytest.approx(0.01 + 4 * 0.02 + 0.001)  # the first load, then compute-bound
    steady = simulate(p, weight_budget=400, loaders=1, prefetch=0, io="direct", resident=2, steady=True)
    assert steady.latency_s == pytest.approx(4 * 0.02 + 2 * 0.01 + 0.001)  # resident units are not read again
    # loads and computes that slow each other down a lot when they overlap: sequential is predicted fastest
    slow = make_profile([100, 50, 50, 100], [0.01] * 4, [0.01] * 4, cslow=2.5, lslow=2.5, bw=(1, 1, 1), activation=0)
    assert {c.prefetch for c in candidates(slow, 400)} == {None, 0, 1, 2, 4}
    assert plan(slow, 100).prefetch == 0


def test_simulation_follows_the_engines_ring_and_the_reads_in_flight():
    """Admission needs contiguous room in the ring the engine carves streamed units from, not just enough bytes:
    after a 3-byte unit at 0..3, a 27-byte unit at 3..30 and the next 27-byte one need 30..57 (or 0..27 once the
    first is freed), so at 56 bytes they cannot overlap although 27 + 27 < 56; at 57 they can. And a load shares
    the bandwidth only with the reads actually in flight: with room for one unit at a time, 4 loaders read as
    fast as one."""
    p = make_profile([3, 27, 27], [0.01] * 3, [0.02] * 3, cslow=1.0, lslow=1.0, bw=(1, 0.5, 0.25))
    tight = simulate(p, weight_budget=56, loaders=1, prefetch=1, io="direct").latency_s
    room = simulate(p, weight_budget=57, loaders=1, prefetch=1, io="direct").latency_s
    assert tight == pytest.approx(room + 0.01)  # the third unit's read no longer hides behind a compute
    one = simulate(p, weight_budget=28, loaders=1, prefetch=None, io="direct").latency_s
    assert simulate(p, weight_budget=28, loaders=4, prefetch=None, io="direct").latency_s == pytest.approx(one)


def test_calibration_by_budget():
    """The profiled measured/simulated ratio of a setting is applied at its budget, interpolated in log budget
    between profiled budgets, clamped outside them; calibrate() reproduces the measured latencies exactly."""
    from dataclasses import replace

    from hermes.profiler import calibrate

    p = make_profile([100] * 8, [0.01] * 8, [0.02] * 8)
    kw = {"loaders": 2, "prefetch": None, "io": "direct"}
    raw = {b: simulate(p, weight_budget=b, **kw).latency_s for b in (100, 200, 400, 800)}
    cal = calibrate(p, {("direct:2", 200): raw[200] * 1.5, ("direct:2", 800): raw[800] * 0.8})
    assert cal.calibration["direct:2"] == [[200, pytest.approx(1.5)], [800, pytest.approx(0.8)]]
    assert simulate(cal, weight_budget=200, **kw).latency_s == pytest.approx(raw[200] * 1.5)
    assert simulate(cal, weight_budget=800, **kw).latency_s == pytest.approx(raw[800] * 0.8)
    assert simulate(cal, weight_budget=400, **kw).latency_s == pytest.approx(raw[400] * 1.15)  # halfway in log
    assert simulate(cal, weight_budget=100, **kw).latency_s == pytest.approx(raw[100] * 1.5)  # clamped
    assert cal.calibration_factor("buffered:4", 400) == 1.0  # not profiled: the simulation as is
    assert Profile.from_json(cal.to_json()) == cal
    assert replace(cal, calibration={}).calibration_factor("direct:2", 400) == 1.0


def test_plan_json_round_trip_and_explain(tmp_path):
    p = make_profile([1000, 500, 500, 800], [0.01, 0.005, 0.005, 0.008], [0.001, 0.02, 0.02, 0.002])
    assert Profile.from_json(p.to_json()) == p
    best = plan(p, 5000, passes=4)
    assert Plan.from_json(best.to_json()) == best
    ranked = [c for c in candidates(p, 5000, passes=4) if c.fits]
    assert ranked[0].latency_s == best.predicted_latency_s
    from hermes.planner import explain

    text = explain(p, 5000, passes=4)
    assert "CHOSEN" in text and "rejected" in text


def test_profile_of_a_real_model_contains_every_unit_and_plans_run_exactly(tiny_models, tmp_path, capsys):
    path = tiny_models["tiny-gpt2"]
    inputs = sample_inputs("tiny-gpt2", batch=1, seq=16)
    prof = profile_model(path, {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]},
                         repeat=1)
    units = hermes.open_model(path).units
    assert [u.name for u in prof.units] == [u.name for u in units]
    streamed = [p for p, u in zip(prof.units, units, strict=True) if u.called]
    assert all(u.compute_s > 0 and u.load_s["direct"] > 0 and u.bytes > 0 for u in streamed)
    # the token embedding reads only its rows (inside its compute, into the side buffer): that is what it holds
    assert [p.bytes for p, u in zip(prof.units, units, strict=True) if u.kind == "gather"] == [gather_room(units[0])]
    assert set(prof.bandwidth) == {"buffered", "direct"} and prof.activation_bytes >= 0
    double_buffered = {f"{io}:1:p1" for io in IO_MODES}  # calibrated apart (issue 25)
    assert set(prof.calibration) == {f"{io}:{k}" for io in IO_MODES for k in (1, 2, 4)} | double_buffered
    for points in prof.calibration.values():  # one factor per profiled budget, the smallest the model's minimum
        assert points[0][0] == prof.min_weight_budget and 0.5 <= min(f for _, f in points) <= max(
            f for _, f in points) <= 2.0
        assert all(b1 >= 1.25 * b0 for (b0, _), (b1, _) in zip(points, points[1:], strict=False))
    budget = prof.min_weight_budget + prof.activation_bytes + 200_000
    best = plan(prof, budget, passes=3)
    model = hermes.load(path, plan=best)
    with torch.no_grad():
        for _ in range(2):
            torch.testing.assert_close(model(**inputs).logits, reference_model(path)(**inputs).logits, rtol=0, atol=0)
    assert model.hermes.last.weights_peak_bytes <= best.weight_budget_bytes


def test_cli_profile_plan_run(tiny_models, tmp_path, capsys):
    path = tiny_models["tiny-bert"]
    assert main(["profile", str(path), "--seq-len", "8", "--repeat", "1", "-o", str(tmp_path / "p.json")]) == 0
    assert cached_profile(path, {"input_ids": [1, 8], "attention_mask": [1, 8]}) is not None
    assert json.loads((tmp_path / "p.json").read_text())["format_version"] == FORMAT_VERSION
    assert main(["plan", str(path), "--budget", "2MiB", "--seq-len", "8", "--explain",
                 "-o", str(tmp_path / "plan.json")]) == 0
    out = capsys.readouterr().out
    assert "CHOSEN" in out and "plan:" in out
    assert main(["run", str(path), "--plan", str(tmp_path / "plan.json"), "--random-input", "8", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    plan_json = json.loads((tmp_path / "plan.json").read_text())
    assert res["loaders"] == plan_json["loaders"] and res["io"] == plan_json["io"]
    # only --budget: a plan made on the fly from the cached profile
    assert main(["run", str(path), "--budget", "2MiB", "--random-input", "8", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["io"] == plan_json["io"]
    assert main(["plan", str(path), "--budget", "10KiB", "--seq-len", "8"]) == 2
    assert "below the minimum" in capsys.readouterr().err


def test_stale_or_broken_plan_files_give_clear_errors(tiny_models, tmp_path, capsys):
    bad = tmp_path / "plan.json"
    bad.write_text(json.dumps({"format_version": 0}))
    assert main(["run", str(tiny_models["tiny-bert"]), "--plan", str(bad), "--random-input", "4"]) == 2
    assert "plan format_version 0 is not 2; re-run `hermes plan`" in capsys.readouterr().err
    bad.write_text("{not json")
    assert main(["run", str(tiny_models["tiny-bert"]), "--plan", str(bad), "--random-input", "4"]) == 2
    assert "cannot read plan" in capsys.readouterr().err
