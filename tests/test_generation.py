"""Generation under a budget: token-exact against transformers, the KV cache inside the budget, resident units
chosen by the planner, cross-token prefetch, failures during generation, and the ``hermes generate`` CLI."""
from __future__ import annotations

import json
import threading

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import hermes
from hermes.cli import main
from hermes.engine import minimum_budget, side_room
from hermes.errors import BudgetError, InputError, LoadError
from hermes.generation import budget_for, kv_cache_bytes, resident_for_tokens
from tests.conftest import loader_threads, overlapping_reads, reference_model

CAUSAL = ["tiny-gpt2", "tiny-gptj", "tiny-llama"]
NEW = 10


def prompts(batch: int = 2, seq: int = 9, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 1000, (batch, seq), generator=g)
    mask = torch.ones_like(ids)
    if batch > 1:
        mask[0, :3] = 0  # left padding
        ids[0, :3] = 0
    return {"input_ids": ids, "attention_mask": mask}


def gen_budgets(model: torch.nn.Module, kwargs: dict) -> dict[str, int]:
    """Budgets from the smallest that can generate to more than the whole model, for the call ``generate(**kwargs)``
    (each budget: weights + that call's KV cache and activations)."""
    units = model.hermes.units
    least = minimum_budget(units)  # the largest block (or head chunk) + the side buffer for embedding rows
    size = sum(u.buffer_bytes for u in units) + side_room(units)
    return {name: budget_for(model, w, kwargs) for name, w in
            (("minimum", least), ("half", max(least, size // 2)), ("all", size))}


@pytest.fixture(scope="module")
def references(tiny_models):
    return {arch: reference_model(tiny_models[arch]) for arch in CAUSAL}


@pytest.mark.parametrize("arch", CAUSAL)
@pytest.mark.parametrize("loaders", [1, 2])
def test_greedy_tokens_equal_transformers_at_every_budget(tiny_models, references, arch, loaders):
    inputs = prompts()
    kw = {"max_new_tokens": NEW, "do_sample": False, "pad_token_id": 0}
    expected = references[arch].generate(**inputs, **kw)
    probe = hermes.load(tiny_models[arch], budget=10**9)
    budgets = gen_budgets(probe, {**inputs, **kw})
    probe.hermes.remove()
    for name, budget in budgets.items():
        model = hermes.load(tiny_models[arch], budget=budget, loaders=loaders)
        for _ in range(2):  # the second call reuses the resident units
            out = model.generate(**inputs, **kw)
            torch.testing.assert_close(out, expected, rtol=0, atol=0, msg=f"{arch} budget {name}")
            g = model.hermes.last_generation
            assert 0 < g.kv_cache_bytes <= g.kv_reserved_bytes
            assert g.weights_peak_bytes + g.kv_reserved_bytes + g.activation_reserved_bytes <= budget
            for p in g.passes:  # every sample of the engine's memory, plus the KV cache, within the budget
                assert all(alloc + g.kv_reserved_bytes + g.activation_reserved_bytes <= budget
                           for _, alloc, _ in p.memory)
            assert g.new_tokens == out.shape[1] - inputs["input_ids"].shape[1]
        if name == "all":
            assert g.bytes_read_per_token == 0 and len(g.resident) == len(model.hermes.units)
        else:
            assert g.bytes_read_per_token > 0
        model.hermes.remove()
    assert not loader_threads()


@pytest.mark.parametrize("arch", CAUSAL)
def test_sampling_equals_transformers_with_the_same_seed(tiny_models, references, arch):
    inputs = prompts(batch=1)
    kw = {"max_new_tokens": NEW, "do_sample": True, "top_k": 50, "temperature": 0.9, "pad_token_id": 0}
    torch.manual_seed(7)
    expected = references[arch].generate(**inputs, **kw)
    model = hermes.load(tiny_models[arch], budget=kv_cache_bytes(references[arch].config, 1, 9 + NEW) + 600_000)
    torch.manual_seed(7)
    torch.testing.assert_close(model.generate(**inputs, **kw), expected, rtol=0, atol=0)


def test_more_budget_streams_fewer_bytes_per_token(tiny_models):
    inputs = prompts(batch=1)
    read = []
    probe = hermes.load(tiny_models["tiny-llama"], budget=10**9)
    budgets = gen_budgets(probe, {**inputs, "max_new_tokens": NEW})
    for budget in sorted(budgets.values()):
        model = hermes.load(tiny_models["tiny-llama"], budget=budget)
        model.generate(**inputs, max_new_tokens=NEW, do_sample=False)
        read.append(model.hermes.last_generation.bytes_read_per_token)
    assert read == sorted(read, reverse=True) and read[0] > read[-1] == 0


def test_loading_agents_prefetch_across_the_token_boundary(tiny_models):
    """Barrier proof: the last unit of token k cannot compute until a loading agent has started reading token
    k+1's first unit, so generation completes only if the agents run ahead across the token boundary."""
    model = hermes.load(tiny_models["tiny-gpt2"], budget=10**9, loaders=2, resident=["lm_head#0", "lm_head#1"])
    engine = model.hermes
    first = next(u.index for u in engine.units if u.called)  # the embedding is gathered: wpe is the first read
    cond = threading.Condition()
    reads: list[int] = []  # one entry per read of the first unit (one per token)
    waits: list[bool] = []

    def before_read(unit):
        if unit.index == first:
            with cond:
                reads.append(1)
                cond.notify_all()

    def last_unit(module, args):
        k = len(waits)
        with cond:
            waits.append(cond.wait_for(lambda: len(reads) >= k + 2, timeout=10))

    engine.before_read = before_read
    model.get_submodule("lm_head").register_forward_pre_hook(last_unit)
    model.generate(**prompts(batch=1), max_new_tokens=4, do_sample=False)
    assert len(waits) == 4 and all(waits)
    later = engine.last_generation.passes[1:]
    assert all(p.events[first].load_start < 0 for p in later)  # read before that token's forward began
    assert not loader_threads()


@pytest.mark.parametrize("arch", ["tiny-gpt2", "tiny-llama"])
def test_prefetch_0_generates_exactly_and_never_reads_ahead(tiny_models, references, arch):
    """Sequential generation (prefetch=0): token-exact, no read while a unit computes, and no pass prefetched
    across the token boundary (every read of a token's pass starts after its call began)."""
    inputs = prompts(batch=1)
    kw = {"max_new_tokens": NEW, "do_sample": False, "pad_token_id": 0}
    expected = references[arch].generate(**inputs, **kw)
    probe = hermes.load(tiny_models[arch], budget=10**9)
    budget = gen_budgets(probe, {**inputs, **kw})["half"]
    probe.hermes.remove()
    model = hermes.load(tiny_models[arch], budget=budget, loaders=2, prefetch=0)
    for _ in range(2):  # the second call reuses the resident units
        torch.testing.assert_close(model.generate(**inputs, **kw), expected, rtol=0, atol=0)
        g = model.hermes.last_generation
        assert g.bytes_read_per_token > 0 and g.resident  # some units stream every token, some stay loaded
        for p in g.passes:
            assert overlapping_reads(p) == []
            assert all(e.reserve >= 0 for e in p.events if e.agent is not None)
    assert not loader_threads()


def test_a_failed_read_during_generation_raises_and_the_next_call_is_exact(tiny_models, references):
    inputs = prompts(batch=1)
    kw = {"max_new_tokens": NEW, "do_sample": False, "pad_token_id": 0}
    expected = references["tiny-gptj"].generate(**inputs, **kw)
    model = hermes.load(tiny_models["tiny-gptj"], budget=kv_cache_bytes(references["tiny-gptj"].config, 1, 9 + NEW)
                        + 400_000, loaders=2)
    reads = {"n": 0}

    def fail_later(unit):
        reads["n"] += 1
        if reads["n"] == 12:  # a few tokens in, inside a prefetched pass
            raise OSError("injected read error")

    model.hermes.before_read = fail_later
    with pytest.raises(LoadError, match="injected read error"):
        model.generate(**inputs, **kw)
    assert not loader_threads()
    model.hermes.before_read = None
    torch.testing.assert_close(model.generate(**inputs, **kw), expected, rtol=0, atol=0)


def test_early_stop_drops_the_prefetched_pass(tiny_models, references):
    """An end-of-sequence token ends generate early; the pass already loading for the next token is dropped."""
    inputs = prompts(batch=1)
    ref = references["tiny-llama"].generate(**inputs, max_new_tokens=NEW, do_sample=False)
    eos = int(ref[0, inputs["input_ids"].shape[1] + 2])  # pretend the third new token ends the sequence
    model = hermes.load(tiny_models["tiny-llama"], budget=10**6, loaders=2)
    out = model.generate(**inputs, max_new_tokens=NEW, do_sample=False, eos_token_id=eos)
    torch.testing.assert_close(out, ref[:, : out.shape[1]], rtol=0, atol=0)
    assert out.shape[1] <= inputs["input_ids"].shape[1] + 3
    assert not loader_threads()
    d = model.hermes.daemon
    assert d.arena is None or not d.arena.live  # nothing streamed is still held


def test_budget_too_small_for_the_kv_cache_names_the_minimum(tiny_models):
    path = tiny_models["tiny-gpt2"]
    model = hermes.load(path, budget=minimum_budget(hermes.open_model(path).units))
    with pytest.raises(BudgetError,
                       match=r"below the minimum budget for this generation .* KV cache .* use a budget of at least"):
        model.generate(**prompts(batch=8, seq=100), max_new_tokens=20)


def test_too_many_tokens_is_a_clear_error(tiny_models):
    model = hermes.load(tiny_models["tiny-gpt2"], budget=10**7)
    with pytest.raises(InputError, match="exceeds the model's 128 positions"):
        model.generate(**prompts(batch=1, seq=100), max_new_tokens=40)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 1000), min_size=1, max_size=12), st.integers(1, 13000))
def test_resident_choice_fits_and_keeps_the_most_bytes(sizes, budget):
    units = [(f"u{i}", b) for i, b in enumerate(sizes)]
    chosen = set(resident_for_tokens(units, budget))
    kept = sum(b for n, b in units if n in chosen)
    streamed = [b for n, b in units if n not in chosen]
    if max(sizes) > budget:  # no plan can stream the largest unit (callers reject such budgets first)
        assert not chosen
        return
    assert kept + max(streamed, default=0) <= budget
    if sum(sizes) <= budget:
        assert not streamed
    # not worse than keeping nothing, or than any single-unit choice that fits
    for i, b in enumerate(sizes):
        rest = [s for j, s in enumerate(sizes) if j != i]
        if rest and b + max(rest) <= budget:
            assert kept >= b


def test_cli_generate_streams_tokens_and_reports(untokenized, capsys):
    path = untokenized["tiny-llama"]  # no tokenizer: the ids themselves are streamed
    assert main(["generate", str(path), "--budget", "1MiB", "--prompt-ids", "5,6,7,8", "--max-new-tokens", "6",
                 "--loaders", "2", "--io", "buffered"]) == 0
    out, err = capsys.readouterr()
    tokens = [int(t) for t in out.split()]
    ref = reference_model(path).generate(torch.tensor([[5, 6, 7, 8]]), max_new_tokens=6, do_sample=False)
    assert tokens == ref[0, 4:].tolist()
    assert "first token" in err and "tokens/s" in err and "KV cache" in err


def test_cli_generate_batch_json(tiny_models, capsys):
    path = tiny_models["tiny-gpt2"]
    assert main(["generate", str(path), "--budget", "1MiB", "--random-prompt", "5", "--batch", "3",
                 "--max-new-tokens", "4", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["batch"] == 3 and len(res["tokens"]) == 3 and all(len(t) == 4 for t in res["tokens"])
    assert res["weights_peak_bytes"] + res["kv_reserved_bytes"] <= 2**20
    assert res["ttft_s"] > 0 and res["tokens_per_s"] > 0


@pytest.mark.parametrize(("args", "message"), [
    (["--max-new-tokens", "0"], "--max-new-tokens: must be >= 1"),
    (["--prompt", "hi"], "this checkpoint has no tokenizer"),
    (["--prompt-ids", "5,99999"], "vocabulary"),
    ([], "give --budget"),
])
def test_cli_generate_bad_input(untokenized, capsys, args, message):
    argv = ["generate", str(untokenized["tiny-gpt2"]), *args]
    if "--budget" not in args and args:
        argv += ["--budget", "1MiB"]
    try:
        code = main(argv)
    except SystemExit as exc:  # refused by the argument parser
        code = exc.code
    assert code == 2
    assert message in capsys.readouterr().err


def test_cli_generate_for_encoder_decoder_and_speech_models(tmp_path, capsys):
    from hermes import zoo

    t5 = zoo.save(zoo.BY_NAME["t5"], tmp_path / "t5")
    assert main(["generate", str(t5), "--budget", "1MiB", "--prompt-ids", "5,6,7", "--max-new-tokens", "4",
                 "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["new_tokens"] == 4 and len(res["tokens"][0]) == 4  # the decoder's tokens, not the prompt's length
    assert 0 < res["kv_cache_bytes"] <= res["kv_reserved_bytes"]  # self- and cross-attention caches measured
    whisper = zoo.save(zoo.BY_NAME["whisper"], tmp_path / "whisper")
    assert main(["generate", str(whisper), "--budget", "1MiB", "--max-new-tokens", "3", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["new_tokens"] == 3
    assert main(["generate", str(whisper), "--budget", "1MiB", "--prompt-ids", "5,6"]) == 2
    assert "generates from audio, not a text prompt" in capsys.readouterr().err


def test_a_long_session_keeps_no_finished_pass(tiny_models):
    """Each pass of a session is linked to the one it follows (cross-pass prefetch): finished passes are
    unlinked, so a long session (a server's, a long generate) does not keep every pass, its events and threads."""
    import gc

    from hermes.engine.passes import Pass

    model = hermes.load(tiny_models["tiny-gpt2"], budget="1MiB")
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad(), model.hermes.continuous():
        for _ in range(30):
            model(input_ids=ids)
        gc.collect()
        alive = [o for o in gc.get_objects() if type(o) is Pass]
    assert model.hermes.passes >= 30
    assert len(alive) <= 3
