"""Generation on a small device (issue 12): embedding rows gathered, the LM head in vocabulary chunks, the minimum
budget one block, ``budget="auto"``, assisted generation — each against transformers' own model."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch

import hermes
from hermes.engine import minimum_budget, side_room
from hermes.engine.budget import gather_room
from hermes.errors import InputError
from hermes.generation import budget_for, resident_for_tokens
from hermes.units import GATHER_ROWS
from tests.conftest import loader_threads, reference_model

CAUSAL = ["tiny-gpt2", "tiny-gptj", "tiny-llama"]
NEW = 10


@pytest.fixture(scope="module")
def references(tiny_models):
    return {arch: reference_model(tiny_models[arch]) for arch in CAUSAL}


def _prompt(seq: int = 9, batch: int = 1, seed: int = 0, repeat: bool = False) -> torch.Tensor:
    ids = torch.randint(3, 1000, (batch, seq), generator=torch.Generator().manual_seed(seed))
    return torch.cat([ids, ids, ids], dim=1) if repeat else ids


@pytest.mark.parametrize("arch", CAUSAL)
def test_minimum_budget_is_one_block_and_the_embedding_is_never_read_whole(tiny_models, references, arch):
    units = hermes.open_model(tiny_models[arch]).units
    blocks = [u for u in units if u.kind == "block"]
    gather = [u for u in units if u.kind == "gather"]
    chunks = [u for u in units if u.kind == "chunk"]
    assert len(gather) == 1 and len(chunks) >= 2
    # the largest streamed unit is a block (the head streams in chunks no larger): minimum = block + side buffer
    assert max(u.buffer_bytes for u in units if u.called) == max(u.buffer_bytes for u in blocks)
    assert minimum_budget(units) == max(u.buffer_bytes for u in blocks) + side_room(units)
    assert minimum_budget(units) < gather[0].buffer_bytes + max(u.buffer_bytes for u in blocks)
    ids = _prompt()
    kw = {"max_new_tokens": NEW, "do_sample": False, "pad_token_id": 0}
    budget = budget_for(references[arch], minimum_budget(units), {"input_ids": ids, **kw})
    model = hermes.load(tiny_models[arch], budget=budget, loaders=2)
    with torch.no_grad():
        want = references[arch].generate(ids, **kw)
        got = model.generate(ids, **kw)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    g = model.hermes.last_generation
    assert g.weights_peak_bytes + g.kv_reserved_bytes <= budget
    for p in g.passes:  # every memory sample within the budget
        assert all(alloc + g.kv_reserved_bytes <= budget for _, alloc, _ in p.memory)
        assert p.events[gather[0].index].load_start is None  # rows are gathered, the matrix is never loaded
    row = gather[0].slots[0].nbytes // gather[0].slots[0].shape[0]
    decode = g.passes[1:]
    # a decode pass reads one embedding row, every streamed block and head chunk; not the embedding matrix
    assert all(p.bytes_read < sum(u.nbytes for u in units if u.called) + 2 * row for p in decode)
    model.hermes.remove()
    assert not loader_threads()


def test_many_distinct_tokens_are_embedded_in_pieces_exactly(tiny_models, references):
    path = tiny_models["tiny-llama"]
    units = hermes.open_model(path).units
    model = hermes.load(path, budget=minimum_budget(units))
    perm = torch.randperm(1000, generator=torch.Generator().manual_seed(3))
    ids = perm[:384].view(3, 128)  # 384 distinct ids (within the model's 128 positions): two pieces of GATHER_ROWS
    ids[2, :64] = ids[0, :64]  # and repeated ones
    assert ids.unique().numel() > GATHER_ROWS
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, references["tiny-llama"](input_ids=ids).logits,
                                   rtol=0, atol=0)
        emb = model.get_input_embeddings()  # called on its own, outside a pass: rows read all the same
        torch.testing.assert_close(emb(ids[:1, :4]), references["tiny-llama"].get_input_embeddings()(ids[:1, :4]),
                                   rtol=0, atol=0)
        with pytest.raises(InputError, match="outside the vocabulary"):
            emb(torch.tensor([[1, 1000]]))
    assert gather_room(units[0]) < units[0].buffer_bytes


@pytest.mark.parametrize("io", ["buffered", "direct"])
def test_resident_tied_embedding_serves_the_head_in_one_matmul(tiny_models, references, io):
    path = tiny_models["tiny-gpt2"]
    model = hermes.load(path, budget=10**8, loaders=1, io=io)
    ids = _prompt(batch=2)
    with torch.no_grad():
        want = references["tiny-gpt2"].generate(ids, max_new_tokens=NEW, do_sample=False, pad_token_id=0)
        got = model.generate(ids, max_new_tokens=NEW, do_sample=False, pad_token_id=0)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    g = model.hermes.last_generation
    assert g.bytes_read_per_token == 0 and len(g.resident) == len(model.hermes.units)
    chunks = [u.index for u in model.hermes.units if u.kind == "chunk"]
    # served by the resident embedding: never read, never computed chunk by chunk (the one matmul is timed on the
    # first chunk, in the passes that still run hooked)
    assert all(p.events[i].load_start is None for p in g.passes for i in chunks)
    assert all(p.events[i].compute_start is None for p in g.passes for i in chunks[1:])
    assert g.passes[0].events[chunks[0]].compute_s > 0
    # everything resident after the first pass: the engine unhooked its units (a call costs the plain model's)
    engine = model.hermes
    assert engine.bypass.active and not any(model.get_submodule(u.name)._forward_pre_hooks
                                      for u in engine.units if u.kind == "block")
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, references["tiny-gpt2"](input_ids=ids).logits,
                                   rtol=0, atol=0)
    engine.reconfigure(dataclasses.replace(engine.config, resident=()))  # back to streaming: hooks again
    assert not engine.bypass.active and all(model.get_submodule(u.name)._forward_pre_hooks
                                      for u in engine.units if u.kind == "block")
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, references["tiny-gpt2"](input_ids=ids).logits,
                                   rtol=0, atol=0)
    assert engine.last.bytes_read > 0


@pytest.mark.parametrize("arch", CAUSAL)
def test_prompt_lookup_gives_the_same_tokens_in_fewer_passes(tiny_models, references, arch):
    path = tiny_models[arch]
    ids = _prompt(seq=8, repeat=True)
    kw = {"max_new_tokens": 20, "do_sample": False}
    units = hermes.open_model(path).units
    model = hermes.load(path, budget=minimum_budget(units) + 2**20)
    with torch.no_grad():
        want = references[arch].generate(ids, **kw)
        got = model.generate(ids, prompt_lookup_num_tokens=4, **kw)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    g = model.hermes.last_generation
    assert g.new_tokens == want.shape[1] - ids.shape[1]
    assert g.forward_passes == len([p for p in g.passes if p.entry == ""]) <= g.new_tokens
    assert 0 < g.kv_cache_bytes <= g.kv_reserved_bytes
    assert g.weights_peak_bytes + g.kv_reserved_bytes <= g.budget_bytes


@pytest.mark.parametrize("arch", CAUSAL)
def test_a_draft_model_counts_inside_the_budget_and_gives_the_same_tokens(tiny_models, references, arch):
    path = tiny_models[arch]
    ids = _prompt(seq=8, repeat=True)
    kw = {"max_new_tokens": 12, "do_sample": False}
    draft = reference_model(path)  # any small model with the same tokenizer; here the same weights
    draft_bytes = sum(p.numel() * p.element_size() for p in draft.parameters())
    budget = minimum_budget(hermes.open_model(path).units) + draft_bytes + 2**20
    model = hermes.load(path, budget=budget)
    with torch.no_grad():
        want = references[arch].generate(ids, **kw)
        got = model.generate(ids, assistant_model=draft, **kw)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    g = model.hermes.last_generation
    assert g.kv_reserved_bytes >= draft_bytes  # the draft's weights and cache are set aside
    assert g.weights_peak_bytes + g.kv_reserved_bytes <= budget
    assert g.forward_passes < g.new_tokens  # the draft's tokens were accepted several at a time


def test_resident_choice_keeps_a_tied_embedding_only_when_it_pays():
    # a tied embedding (gathered, so it needs no room in the stream) serving two head chunks
    units = [("emb", 400), ("b0", 300), ("b1", 300), ("b2", 300), ("head#0", 200), ("head#1", 200)]
    aliases = {"head#0": "emb", "head#1": "emb"}
    for budget in range(300, 2200, 50):
        chosen = set(resident_for_tokens(units, budget, aliases, frozenset({"emb"})))
        streamed = [b for n, b in units if n not in chosen and n != "emb"]
        kept = sum(b for n, b in units if n in chosen and n not in aliases)
        assert kept + max(streamed, default=0) <= budget, (budget, chosen)
        if "emb" in chosen:  # a resident tied embedding serves the whole head
            assert {"head#0", "head#1"} <= chosen
    # emb (400 B, serving 400 B of head) + one block beats two blocks
    assert set(resident_for_tokens(units, 1000, aliases, frozenset({"emb"}))) == {"emb", "head#0", "head#1", "b1"}
    assert len(resident_for_tokens(units, 1300, aliases, frozenset({"emb"}))) == len(units)


def _cgroup_writable() -> Path | None:
    root = Path("/sys/fs/cgroup/memory")
    if not (root / "memory.limit_in_bytes").exists() or not os.access(root, os.W_OK):
        return None
    return root


@pytest.mark.skipif(_cgroup_writable() is None, reason="needs a writable cgroup v1 memory controller (root)")
def test_budget_auto_inside_a_cgroup_picks_a_budget_below_the_cap_and_completes(tiny_models, tmp_path):
    path = tiny_models["tiny-llama"]
    script = tmp_path / "run.py"
    script.write_text(
        "import json, sys, torch, hermes\n"
        "m = hermes.load(sys.argv[1], budget='auto')\n"
        "ids = torch.randint(3, 1000, (1, 16), generator=torch.Generator().manual_seed(0))\n"
        "out = m.generate(ids, max_new_tokens=8, do_sample=False)\n"
        "g = m.hermes.last_generation\n"
        "print(json.dumps({'tokens': out[0].tolist(), 'budget': g.budget_bytes, 'peak': g.weights_peak_bytes"
        " + g.kv_reserved_bytes + g.activation_reserved_bytes + g.slack_bytes,"
        " 'describe': m.hermes.auto_budget.describe()}))\n")
    group = _cgroup_writable() / f"hermes-test-{uuid.uuid4().hex[:8]}"
    group.mkdir()
    try:
        cap = 600 * 2**20
        (group / "memory.limit_in_bytes").write_text(str(cap))
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
        proc = subprocess.run([sys.executable, str(script), str(path)], capture_output=True, text=True, timeout=300,
                              env=env, preexec_fn=lambda: (group / "cgroup.procs").write_text(str(os.getpid())))
    finally:
        group.rmdir()
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "cgroup limit 600.0 MiB" in res["describe"]
    assert 0 < res["budget"] < cap and res["peak"] <= res["budget"]
    want = reference_model(path).generate(torch.tensor([res["tokens"][:16]]), max_new_tokens=8, do_sample=False)
    assert want[0].tolist() == res["tokens"]
