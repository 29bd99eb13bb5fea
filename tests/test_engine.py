"""PipeLoad engine: streamed outputs equal the in-memory transformers model; the budget holds; agents overlap."""
from __future__ import annotations

import itertools
import threading
import time

import pytest
import torch

import hermes
from hermes.engine import minimum_budget
from hermes.errors import BudgetError, EngineError, LoadError

from .conftest import TINY, loader_threads, overlapping_reads, reference_model, sample_inputs

EXACT = {"rtol": 0.0, "atol": 0.0}  # the same kernels on the same bytes: bit-exact


def _outputs(out) -> dict[str, torch.Tensor]:
    return {k: v for k, v in out.items() if isinstance(v, torch.Tensor)}


@pytest.mark.parametrize("arch", TINY)
@pytest.mark.parametrize("loaders", [1, 2, 4])
@pytest.mark.parametrize("budget_factor", ["min", 2, "all"])
def test_streamed_equals_transformers(tiny_models, arch, loaders, budget_factor):
    path = tiny_models[arch]
    units = hermes.open_model(path).units
    mb = minimum_budget(units)
    budget = {"min": mb, 2: 2 * mb, "all": sum(u.buffer_bytes for u in units)}[budget_factor]
    model = hermes.load(path, budget=budget, loaders=loaders)
    inputs = sample_inputs(arch)
    with torch.no_grad():
        want = _outputs(reference_model(path)(**inputs))
        got = _outputs(model(**inputs))
    assert want.keys() == got.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], **EXACT, msg=f"{arch} output {k!r} differs")
    stats = model.hermes.last
    assert stats.weights_peak_bytes <= budget
    assert stats.units_loaded == sum(u.called for u in units)  # a gathered embedding reads rows, not a unit
    assert max(a for _, a, _ in stats.memory) <= budget
    assert not loader_threads()


def test_real_minilm_checkpoint_with_tokenizer(minilm):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(minilm)
    inputs = tok(["Hermes streams a model layer by layer.", "short"], return_tensors="pt", padding=True)
    ref = reference_model(minilm)
    mb = minimum_budget(hermes.open_model(minilm).units)
    for loaders, budget in [(1, mb), (2, mb), (3, 3 * mb)]:
        model = hermes.load(minilm, budget=budget, loaders=loaders)
        with torch.no_grad():
            want, got = ref(**inputs), model(**inputs)
        torch.testing.assert_close(got.last_hidden_state, want.last_hidden_state, **EXACT)
        torch.testing.assert_close(got.pooler_output, want.pooler_output, **EXACT)
        assert model.hermes.last.weights_peak_bytes <= budget


def test_repeated_passes_reuse_buffers_and_stay_exact(tiny_models):
    path = tiny_models["tiny-gpt2"]
    model = hermes.load(path, budget="1MiB", loaders=2)
    ref = reference_model(path)
    for seed in range(3):
        inputs = sample_inputs("tiny-gpt2", seed=seed)
        with torch.no_grad():
            torch.testing.assert_close(model(**inputs).logits, ref(**inputs).logits, **EXACT)
    assert model.hermes.passes == 3
    assert model.hermes.daemon.allocated <= 2**20


def test_budget_below_minimum_names_the_minimum(tiny_models):
    path = tiny_models["tiny-bert"]
    mb = minimum_budget(hermes.open_model(path).units)
    with pytest.raises(BudgetError, match=rf"below the minimum .* at least {mb} bytes"):
        hermes.load(path, budget=mb - 1)
    hermes.load(path, budget=mb)  # exactly the minimum works


def test_tied_lm_head_reads_the_embedding_bytes(tiny_models):
    units = {u.name: u for u in hermes.open_model(tiny_models["tiny-gpt2"]).units}
    chunks = [u for u in units.values() if u.kind == "chunk"]
    assert units["transformer.wte"].kind == "gather" and len(chunks) >= 2
    assert [u.name for u in chunks] == [f"lm_head#{k}" for k in range(len(chunks))]
    assert all(u.shares == ("transformer.wte",) for u in chunks)
    assert chunks[0].rows[0] == 0 and chunks[-1].rows[1] == 1000  # every vocabulary row, in order
    assert all(a.rows[1] == b.rows[0] for a, b in itertools.pairwise(chunks))
    assert all(u.slots[0].key.startswith("transformer.wte.weight[") for u in chunks)


def test_loading_and_computing_overlap(tiny_models):
    """Unit k+1 is loaded while unit k computes: the agent reading k+1 waits for a signal that only the
    compute of unit k gives. Without overlap this would deadlock (bounded by a timeout and then fail)."""
    path = tiny_models["tiny-bert"]
    model = hermes.load(path, budget="60MiB", loaders=2)  # the model, its activations and the runtime slack
    engine = model.hermes
    computing = {u.index: threading.Event() for u in engine.units}
    for u in engine.units:
        model.get_submodule(u.name).register_forward_pre_hook(lambda m, a, i=u.index: computing[i].set())
    failures = []

    called = [u.index for u in engine.units if u.called]

    def before_read(unit):
        k = called.index(unit.index)
        if k >= 1 and not computing[called[k - 1]].wait(timeout=20):
            failures.append(unit.name)

    engine.before_read = before_read
    with torch.no_grad():
        model(**sample_inputs("tiny-bert"))
    assert not failures
    events = [e for e, u in zip(engine.last.events, engine.units, strict=True) if u.called]  # not gathered rows
    overlapping = [e for prev, e in itertools.pairwise(events)
                   if e.load_start < prev.compute_end and e.load_end > prev.compute_start]
    assert len(overlapping) >= len(events) - 2


def test_loader_error_surfaces_and_next_pass_works(tiny_models):
    path = tiny_models["tiny-llama"]
    model = hermes.load(path, budget="2MiB", loaders=3)
    engine = model.hermes

    def fail(unit):
        if unit.index == 2:
            raise OSError(5, "Input/output error (injected)")

    engine.before_read = fail
    inputs = sample_inputs("tiny-llama")
    with pytest.raises(LoadError, match="Input/output error"), torch.no_grad():
        model(**inputs)
    assert not loader_threads()
    assert engine.daemon.held == 0
    engine.before_read = None
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, reference_model(path)(**inputs).logits, **EXACT)


def test_concurrent_calls_give_a_clear_error(tiny_models):
    path = tiny_models["tiny-bert"]
    model = hermes.load(path, budget="10MiB", loaders=1)
    inside, release = threading.Event(), threading.Event()
    model.hermes.before_read = lambda unit: (inside.set(), release.wait(timeout=20))
    errors = []
    inputs = sample_inputs("tiny-bert")

    def first():
        with torch.no_grad():
            model(**inputs)

    t = threading.Thread(target=first, daemon=True)
    t.start()
    assert inside.wait(timeout=20)
    try:
        with pytest.raises(EngineError, match="one call at a time"), torch.no_grad():
            model(**inputs)
    except BaseException as exc:  # noqa: BLE001
        errors.append(exc)
    finally:
        release.set()
        model.hermes.before_read = None
        t.join(timeout=30)
    assert not errors and not t.is_alive()


def test_resident_units_stay_loaded_across_passes(tiny_models):
    path = tiny_models["tiny-gpt2"]
    model = hermes.load(path, budget="2MiB", loaders=2, resident=["transformer.wte"])
    inputs = sample_inputs("tiny-gpt2")
    ref = reference_model(path)
    with torch.no_grad():
        model(**inputs)
        first = model.hermes.last.units_loaded
        torch.testing.assert_close(model(**inputs).logits, ref(**inputs).logits, **EXACT)
    # the head's chunks are tied to wte: served from wte's resident bytes, never read; wte (loaded whole, not
    # gathered, as it is resident) is read by the first pass only
    units = model.hermes.units
    assert first == sum(u.called for u in units) - sum(u.kind == "chunk" for u in units) + 1
    assert model.hermes.last.units_loaded == first - 1
    assert all(e.load_start is None for e, u in zip(model.hermes.last.events, units, strict=True) if u.kind == "chunk")
    assert model.hermes.daemon.resident_bytes == model.hermes.units[0].buffer_bytes
    model.hermes.close()
    assert model.hermes.daemon.allocated == 0


def test_ring_arena_never_overlaps_and_reuses_space():
    import random

    from hermes.engine import Arena

    rng = random.Random(0)
    arena = Arena(40 * 4096)
    live: list[tuple[int, int]] = []  # (offset, size) in allocation order
    placed = 0
    for _ in range(2000):
        size = rng.randint(1, 20) * 4096
        offset = arena.take(size)
        if offset is None:
            assert live, "an empty ring must fit any unit up to its capacity"
            arena.give_back(live.pop(0)[0])  # FIFO release, as the engine does
            continue
        assert offset >= 0 and offset + size <= arena.capacity
        assert all(offset + size <= o or o + s <= offset for o, s in live), "overlapping units"
        live.append((offset, size))
        placed += 1
        assert arena.used == sum(s for _, s in live)
    while live:
        arena.give_back(live.pop(0)[0])
    assert arena.used == 0 and not arena.live and placed > 1000
    assert arena.take(arena.capacity) == 0


@pytest.mark.parametrize("huge", ["1", "0"])
def test_weight_buffers_with_and_without_huge_pages(tiny_models, monkeypatch, huge):
    """Buffers are private, page-aligned and writable either way; streamed outputs stay bit-exact."""
    import mmap

    from hermes.engine import new_buffer

    monkeypatch.setenv("HERMES_HUGE_PAGES", huge)
    buf = new_buffer(4 * 2**20)
    assert isinstance(buf, mmap.mmap) and len(buf) == 4 * 2**20  # mmap: page-aligned, as O_DIRECT needs
    buf[:3] = b"abc"
    assert buf[:3] == b"abc"
    buf.close()
    path = tiny_models["tiny-bert"]
    inputs = sample_inputs("tiny-bert")
    model = hermes.load(path, budget=minimum_budget(hermes.open_model(path).units) * 2, io="direct")
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).last_hidden_state,
                                   reference_model(path)(**inputs).last_hidden_state, rtol=0, atol=0)


# ---- prefetch 0: sequential (issue #25) ------------------------------------------------------------------------
def slow_and_watch(model, units, computing: list[str], delay: float = 0.002) -> None:
    """Every unit's module sleeps ``delay`` at the start of its compute (after the engine attached it) and is listed
    in ``computing`` until its forward ends."""
    def start(name: str) -> None:
        computing.append(name)
        time.sleep(delay)

    for name in dict.fromkeys(u.module for u in units):
        mod = model.get_submodule(name)
        mod.register_forward_pre_hook(lambda m, a, n=name: start(n))
        mod.register_forward_hook(lambda m, a, o, n=name: computing.remove(n), always_call=True)


def run_bounded(fn, timeout: float = 60):
    """``fn()`` in a thread: a deadlock fails the test instead of hanging it."""
    result: dict = {}

    def body():
        try:
            result["out"] = fn()
        except BaseException as exc:  # noqa: BLE001 - raised below
            result["error"] = exc

    t = threading.Thread(target=body, daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), "deadlock: the call did not complete"
    if "error" in result:
        raise result["error"]
    return result["out"]


@pytest.mark.parametrize("arch", TINY)
@pytest.mark.parametrize("loaders", [1, 2])
def test_prefetch_0_reads_nothing_while_a_unit_computes(tiny_models, arch, loaders):
    """prefetch=0 is sequential even with room for every unit and a spare agent: a unit is admitted and read only
    after the unit before it finished computing (load -> compute -> free, one at a time); outputs bit-exact."""
    path = tiny_models[arch]
    units = hermes.open_model(path).units
    model = hermes.load(path, budget=sum(u.buffer_bytes for u in units), loaders=loaders, prefetch=0)
    computing: list[str] = []
    slow_and_watch(model, units, computing)
    read_while: list[tuple[str, list[str]]] = []

    def before_read(unit):  # the modules computing now, but the LM head running chunk by chunk (unit.module)
        if others := [n for n in computing if n != unit.module]:
            read_while.append((unit.name, others))

    model.hermes.before_read = before_read
    inputs = sample_inputs(arch)
    with torch.no_grad():
        want = _outputs(reference_model(path)(**inputs))
        for _ in range(2):  # the first pass guesses the order, the second follows the traced one
            got = _outputs(run_bounded(lambda: model(**inputs)))
            for k in want:
                torch.testing.assert_close(got[k], want[k], **EXACT, msg=f"{arch} output {k!r} differs")
            stats = model.hermes.last
            assert not read_while and overlapping_reads(stats) == []
            assert stats.units_loaded == sum(u.called for u in units)
            # one unit in memory at a time
            assert max(held for _, _, held in stats.memory) <= max(u.buffer_bytes for u in units if u.called)
    assert not loader_threads()


def test_prefetch_1_reads_the_next_unit_while_one_computes(tiny_models):
    """prefetch=1 is double buffering. Barrier proof: unit k's compute waits until the read of unit k+1 has begun,
    so the pass completes only if that read overlaps k's compute (prefetch=0 would wait forever here)."""
    path = tiny_models["tiny-bert"]
    model = hermes.load(path, budget="60MiB", loaders=1, prefetch=1)
    engine = model.hermes
    called = [u for u in engine.units if u.called]
    started: set[str] = set()
    cond = threading.Condition()
    waits: list[bool] = []

    def before_read(unit):
        with cond:
            started.add(unit.name)
            cond.notify_all()

    def wait_for_next(nxt):
        with cond:
            waits.append(cond.wait_for(lambda: nxt in started, timeout=10))

    for u, nxt in itertools.pairwise(called):
        model.get_submodule(u.name).register_forward_pre_hook(lambda m, a, n=nxt.name: wait_for_next(n))
    engine.before_read = before_read
    inputs = sample_inputs("tiny-bert")
    with torch.no_grad():
        torch.testing.assert_close(run_bounded(lambda: model(**inputs)).last_hidden_state,
                                   reference_model(path)(**inputs).last_hidden_state, **EXACT)
    assert len(waits) == len(called) - 1 and all(waits)
    ev = {e.name: e for e in engine.last.events}
    assert all(ev[b.name].load_start < ev[a.name].compute_end for a, b in itertools.pairwise(called))
    assert overlapping_reads(engine.last)
    # never two units loaded or loading beside the one computing
    for e in (ev[u.name] for u in called):
        assert len([o for o in called if ev[o.name].reserve < e.compute_start < ev[o.name].free
                    and o.name != e.name]) <= 1


@pytest.mark.parametrize(("arch", "resident"), [
    ("tiny-gpt2", "transformer.wte"),  # tied: the embedding and the LM head's chunks are served by it
    ("tiny-bert", "embeddings.word_embeddings"),  # called inside the embeddings' forward
])
def test_prefetch_0_with_a_resident_unit(tiny_models, arch, resident):
    """A resident unit is read once, on demand like any unit, and stays loaded; it never blocks the sequential
    reads of the others (one at a time, none while a unit computes). A resident unit called inside another
    unit's forward is read while its caller runs: no deadlock."""
    path = tiny_models[arch]
    units = hermes.open_model(path).units
    model = hermes.load(path, budget=sum(u.buffer_bytes for u in units), loaders=2, prefetch=0,
                        resident=[resident])
    engine = model.hermes
    res = next(u for u in engine.units if u.name == resident)
    inputs = sample_inputs(arch)
    loaded = []
    with torch.no_grad():
        want = _outputs(reference_model(path)(**inputs))
        for _ in range(3):
            got = _outputs(run_bounded(lambda: model(**inputs)))
            for k in want:
                torch.testing.assert_close(got[k], want[k], **EXACT)
            stats = engine.last
            assert overlapping_reads(stats) == []
            loaded.append([e.name for e in stats.events if e.agent is not None])
            streamed = max(u.buffer_bytes for u in engine.units if u.called and u.index not in engine.aliases)
            held = [h for _, _, h in stats.memory]
            assert max(held) <= res.buffer_bytes + streamed  # the resident unit + one streamed unit
    assert resident in loaded[0] and all(resident not in names for names in loaded[1:])  # read by the first pass
    assert loaded[1] == loaded[2] and engine.daemon.resident_bytes == res.buffer_bytes
    assert not loader_threads()
