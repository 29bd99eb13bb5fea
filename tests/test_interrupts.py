"""Ctrl-C ends a streamed call every time, wherever it lands, and the next call works (bit-exact, nothing held,
no agent left running)."""
from __future__ import annotations

import _thread
import os
import signal
import sys
import threading
import time

import pytest
import torch

import hermes
from hermes.engine import minimum_budget

from .conftest import loader_threads, reference_model, sample_inputs

EXACT = {"rtol": 0.0, "atol": 0.0}
ENGINE = "/hermes/engine/"


@pytest.fixture(autouse=True)
def ctrl_c_raises():
    """SIGINT as a terminal's Ctrl-C reaches Python: a suite started in the background of a shell (``pytest &``)
    inherits it ignored, and Python then installs no handler — no Ctrl-C could end anything there."""
    saved = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, saved)


def _engine_lines(model, inputs, *, fire_at: int | None = None, call=None) -> tuple[int, bool]:
    """Run one call while counting the lines the main thread executes in the engine's modules; with ``fire_at``,
    send SIGINT (a real signal, as a terminal's Ctrl-C) at that line. Returns (lines counted, interrupted); the
    count varies a little from call to call (how often the inference agent waits)."""
    count = 0

    def tracer(frame, event, arg):
        nonlocal count
        if ENGINE not in frame.f_code.co_filename:
            return None  # do not trace inside torch / transformers
        if event == "line":
            count += 1
            if count == fire_at:
                signal.raise_signal(signal.SIGINT)
        return tracer

    interrupted = False
    sys.settrace(tracer)
    try:
        with torch.no_grad():
            call() if call is not None else model(**inputs)
        for _ in range(100):  # a signal raised by the call's very last line is handled here at the latest
            pass
    except KeyboardInterrupt:
        interrupted = True
    finally:
        sys.settrace(None)
    return count, interrupted


@pytest.mark.parametrize("arch, budget", [("tiny-bert", "10MiB"), ("tiny-gpt2", "min")])
def test_ctrl_c_at_many_points_always_ends_the_call(tiny_models, arch, budget):
    path = tiny_models[arch]
    if budget == "min":  # gathered embedding and streamed head chunks: every kind of wait
        budget = minimum_budget(hermes.open_model(path).units)
    model = hermes.load(path, budget=budget, loaders=2)
    inputs = sample_inputs(arch)
    with torch.no_grad():
        want = reference_model(path)(**inputs)
    total, interrupted = _engine_lines(model, inputs)
    assert not interrupted and total > 50
    points = sorted({1 + k * (total - 1) // 39 for k in range(40)})  # from the first line of the call to its last
    fired = 0
    for at in points:
        count, interrupted = _engine_lines(model, inputs, fire_at=at)
        if count < at:  # this call ran fewer engine lines (fewer waits): the signal was never sent
            assert not interrupted
            continue
        fired += 1
        assert interrupted, f"Ctrl-C at engine line {at} of {count} did not end the call"
        with torch.no_grad():
            got = model(**inputs)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler, "the SIGINT handler was not restored"
        for k, v in want.items():
            if isinstance(v, torch.Tensor):
                torch.testing.assert_close(got[k], v, **EXACT, msg=f"after Ctrl-C at line {at}: {k!r} differs")
        assert model.hermes.daemon.held == 0, f"after Ctrl-C at line {at}: a buffer was never freed"
        assert not loader_threads(), f"after Ctrl-C at line {at}: a loading agent is still running"
    assert fired >= 30


class _Finalizer:
    """An object whose finalizer receives the Ctrl-C: Python prints 'Exception ignored in ...' and goes on."""

    def __del__(self) -> None:
        signal.raise_signal(signal.SIGINT)
        for _ in range(100):  # the KeyboardInterrupt is raised here, inside the finalizer, and lost
            pass


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_ctrl_c_lost_inside_a_finalizer_still_ends_the_call(tiny_models):
    path = tiny_models["tiny-bert"]
    model = hermes.load(path, budget="10MiB", loaders=2)
    inputs = sample_inputs("tiny-bert")
    layer = model.get_submodule(next(u.name for u in model.hermes.units if u.kind == "block"))
    fired = []

    def drop_an_object(module, args):
        if not fired:
            fired.append(True)
            _Finalizer()  # created and finalized at once, inside the forward

    handle = layer.register_forward_pre_hook(drop_an_object)
    with pytest.raises(KeyboardInterrupt), torch.no_grad():
        model(**inputs)
    handle.remove()
    assert fired
    with torch.no_grad():
        got = model(**inputs).last_hidden_state
        torch.testing.assert_close(got, reference_model(path)(**inputs).last_hidden_state, **EXACT)
    assert model.hermes.daemon.held == 0 and not loader_threads()


@pytest.mark.parametrize("how", ["sigint", "interrupt_main"])
def test_ctrl_c_while_a_read_is_stuck_cancels_agents_and_next_pass_works(tiny_models, how):
    """Ctrl-C while the inference agent waits for a unit whose read hangs. A real SIGINT (a terminal's Ctrl-C)
    interrupts the wait at once, not after the read; ``_thread.interrupt_main`` (which sets the interrupt without
    a signal) ends the call once the wait wakes. Either way the next call is exact and nothing is left."""
    path = tiny_models["tiny-bert"]
    model = hermes.load(path, budget="10MiB", loaders=2)
    stuck, release = threading.Event(), threading.Event()

    def hang(unit):
        if unit.index == 2:
            stuck.set()
            release.wait(timeout=20 if how == "sigint" else 3)  # interrupt_main is seen once the read ends

    def ctrl_c():
        stuck.wait(timeout=20)
        if how == "sigint":
            os.kill(os.getpid(), signal.SIGINT)
        else:
            _thread.interrupt_main()

    model.hermes.before_read = hang
    threading.Thread(target=ctrl_c, daemon=True).start()
    inputs = sample_inputs("tiny-bert")
    t0 = time.perf_counter()
    with pytest.raises(KeyboardInterrupt), torch.no_grad():
        model(**inputs)
    if how == "sigint":
        assert time.perf_counter() - t0 < 15, "the wait was not interrupted: it ended with the read"
    release.set()
    model.hermes.before_read = None
    with torch.no_grad():
        got = model(**inputs).last_hidden_state
        torch.testing.assert_close(got, reference_model(path)(**inputs).last_hidden_state, **EXACT)
    assert not loader_threads()
    assert model.hermes.daemon.held == 0

def test_ctrl_c_during_generate_at_many_points_and_generate_again(tiny_models):
    """generate runs a session of passes with the next token's pass prefetched: Ctrl-C anywhere in it ends the call,
    and the next generate (which reconfigures the engine first) gives the same tokens."""
    path = tiny_models["tiny-gpt2"]
    model = hermes.load(path, budget=minimum_budget(hermes.open_model(path).units) + 200_000, loaders=2)
    ids = sample_inputs("tiny-gpt2")["input_ids"][:1]

    def generate():
        return model.generate(ids, max_new_tokens=4, do_sample=False)

    with torch.no_grad():
        want = generate()
    count = 0

    def counter(frame, event, arg):
        nonlocal count
        if ENGINE not in frame.f_code.co_filename:
            return None
        count += event == "line"
        return counter

    sys.settrace(counter)
    try:
        with torch.no_grad():
            generate()
    finally:
        sys.settrace(None)
    fired = 0
    for at in sorted({1 + k * (count - 1) // 14 for k in range(15)}):
        n, interrupted = _engine_lines(model, {}, fire_at=at, call=generate)
        if n < at:
            continue
        fired += 1
        assert interrupted, f"Ctrl-C at engine line {at} of {n} of generate did not end the call"
        with torch.no_grad():
            assert torch.equal(generate(), want), f"after Ctrl-C at line {at}: other tokens"
        resident = sum(loaded.buffer.size for loaded in model.hermes.residency.loaded.values())
        assert model.hermes.daemon.held == resident, f"after Ctrl-C at line {at}: a buffer was never freed"
        assert not loader_threads()
    assert fired >= 10
