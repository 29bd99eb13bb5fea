"""PipeLoad engine: streamed outputs equal the in-memory transformers model; the budget holds; agents overlap."""
from __future__ import annotations

import itertools
import threading

import pytest
import torch

import hermes
from hermes.engine import minimum_budget
from hermes.errors import BudgetError, EngineError, LoadError

from .conftest import TINY, loader_threads, reference_model, sample_inputs

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
    model = hermes.load(path, budget="10MiB", loaders=2)
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
