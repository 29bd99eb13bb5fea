"""The traced schedule: units may run in any order, be skipped, repeat, nest or be called on their own — outputs
stay exact, the budget holds, and no wait outlives its bound."""
from __future__ import annotations

import threading
import time

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import hermes
from hermes.engine import Schedule, minimum_budget
from hermes.errors import EngineError

from .conftest import loader_threads, reference_model

EXACT = {"rtol": 0.0, "atol": 0.0}
LAYERS = 3  # tiny-bert


def _run(model: torch.nn.Module, ids: torch.Tensor, order: list[int]) -> torch.Tensor:
    """A forward that runs the layers in ``order`` (any order, repeats, skips)."""
    h = model.embeddings(input_ids=ids)
    for i in order:
        out = model.encoder.layer[i](h)
        h = out[0] if isinstance(out, tuple) else out
    return h


def _drive(model: torch.nn.Module) -> None:
    """Make ``model(ids, order=...)`` run ``_run`` as its forward (the entry hooks still see one call)."""
    model.forward = lambda input_ids, order: _run(model, input_ids, order)


@pytest.fixture(scope="module")
def bert(tiny_models):
    path = tiny_models["tiny-bert"]
    ref = reference_model(path)
    _drive(ref)
    return path, ref


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(orders=st.lists(st.lists(st.integers(0, LAYERS - 1), max_size=7), min_size=1, max_size=4),
       loaders=st.integers(1, 3), prefetch=st.sampled_from([None, 0, 1, 2]), frac=st.floats(0.0, 1.0),
       direct=st.integers(-1, LAYERS - 1))
def test_random_schedules_stay_exact_and_within_budget(bert, orders, loaders, prefetch, frac, direct):
    path, ref = bert
    probe = hermes.load(path, budget=2**40)
    units = probe.hermes.units
    probe.hermes.remove()
    low, total = minimum_budget(units), sum(u.buffer_bytes for u in units)
    budget = int(low + frac * (total - low))
    model = hermes.load(path, budget=budget, loaders=loaders, prefetch=prefetch)
    _drive(model)
    model.hermes.history = history = []
    ids = torch.tensor([[5, 9, 11, 3, 7]])
    with torch.no_grad():
        for order in orders:
            torch.testing.assert_close(model(ids, order=order), ref(ids, order=order), **EXACT)
            assert not loader_threads()
        if direct >= 0:  # a unit called on its own: a pass of its own
            h = ref.embeddings(input_ids=ids)
            want = ref.encoder.layer[direct](h)
            got = model.encoder.layer[direct](h)
            torch.testing.assert_close(got[0] if isinstance(got, tuple) else got,
                                       want[0] if isinstance(want, tuple) else want, **EXACT)
    for p in history:
        assert p.weights_peak_bytes <= budget
        assert all(a <= budget and h <= budget for _, a, h in p.memory)
    # the same order twice: the second call follows the traced order, no surprise
    with torch.no_grad():
        model(ids, order=orders[-1])
        model(ids, order=orders[-1])
    assert model.hermes.last.surprises == 0
    assert model.hermes.daemon.held == 0
    model.hermes.remove()


@pytest.mark.parametrize("prefetch", [None, 0])
def test_a_unit_called_inside_another_with_too_small_a_budget_is_a_clear_error(bert, prefetch):
    path, _ = bert
    probe = hermes.load(path, budget=2**40)
    low = minimum_budget(probe.hermes.units)
    probe.hermes.remove()
    model = hermes.load(path, budget=low, prefetch=prefetch)
    _drive(model)
    outer, inner = model.encoder.layer[0], model.embeddings  # the embeddings are the largest unit
    outer_forward = outer.forward

    def nested(h, *args, **kwargs):
        inner(input_ids=torch.tensor([[1, 2]]))
        return outer_forward(h, *args, **kwargs)

    outer.forward = nested
    t0 = time.perf_counter()
    with pytest.raises(EngineError, match=r"'embeddings' was called while unit\(s\) \['encoder.layer.0'\] are "
                                          r"computing.*use a budget of at least"), torch.no_grad():
        model(torch.tensor([[5, 9, 11]]), order=[0])
    assert time.perf_counter() - t0 < 10
    assert not loader_threads()
    assert model.hermes.daemon.held == 0


def test_prefetch_0_reads_a_unit_called_inside_another_while_its_caller_computes(bert):
    """Sequential mode never admits a unit while another computes — except one its caller needs now (nested):
    that one is read at once, never a deadlock; outputs exact."""
    path, ref = bert
    model = hermes.load(path, budget="60MiB", loaders=2, prefetch=0)
    _drive(model)
    outer, inner = model.encoder.layer[1], model.embeddings
    outer_forward = outer.forward

    def nested(h, *args, **kwargs):
        inner(input_ids=torch.tensor([[1, 2]]))
        return outer_forward(h, *args, **kwargs)

    outer.forward = nested
    ids = torch.tensor([[5, 9, 11]])
    t0 = time.perf_counter()
    with torch.no_grad():
        for _ in range(2):  # the second pass follows the traced order, the nested unit included
            torch.testing.assert_close(model(ids, order=[0, 1, 2]), ref(ids, order=[0, 1, 2]), **EXACT)
    assert time.perf_counter() - t0 < 10
    ev = {e.name: e for e in model.hermes.last.events}
    assert ev["encoder.layer.1"].compute_start < ev["embeddings"].reserve < ev["encoder.layer.1"].compute_end
    assert not loader_threads() and model.hermes.daemon.held == 0


def test_a_stalled_read_ends_in_an_error_within_the_wait_timeout(bert):
    path, _ = bert
    model = hermes.load(path, budget="10MiB", loaders=1)
    model.hermes.wait_timeout = 0.5
    release = threading.Event()
    stalled = []

    def stall(unit):  # the first read of encoder.layer.1 stalls until released
        if unit.name == "encoder.layer.1" and not stalled:
            stalled.append(unit)
            release.wait(10)

    model.hermes.before_read = stall
    t0 = time.perf_counter()
    with pytest.raises(EngineError, match=r"waited \d+ s for unit 'encoder.layer.1' with no read finishing "
                                          r"\(loading \['encoder.layer.1'\]"), \
            torch.no_grad():
        model(input_ids=torch.tensor([[5, 9, 11]]))
    assert time.perf_counter() - t0 < 5  # the stuck agent is left behind, not joined forever
    # the next call starts while that agent still holds its buffer: it waits for it (no false "stuck" error)
    threading.Timer(0.2, release.set).start()
    with torch.no_grad():
        model(input_ids=torch.tensor([[5, 9, 11]]))  # the engine still works
    assert not loader_threads()


def test_schedule_predicts_the_traced_order_and_resumes_after_a_surprise():
    s = Schedule(lambda entry: [0, 1, 2, 3])
    assert s.predict("k", "") == [0, 1, 2, 3]  # registration order first
    s.record("k", [0, 2, 1, 2, 3])
    assert s.predict("k", "") == [0, 2, 1, 2, 3]
    assert s.continuation("k", "", 2, 3) == [2, 3]  # the occurrence nearest after the 3rd unit
    assert s.continuation("k", "", 1, 4) == [1, 2, 3]  # else the last one before
    assert s.continuation("k", "", 9, 0) == [9]  # not expected at all: on demand
    s.record("enc", [0, 1], previous="k")
    assert s.next_key("k")[0] == "enc"
    assert s.next_key("other")[0] == "other"
