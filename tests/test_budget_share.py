"""One budget for the process (issue #23): every budget holds the weights, the KV cache, the call's activations and
the runtime slack (``hermes.share``); freed activations leave the process; the peak RSS above the runtime stays
within the budget on a real checkpoint."""
from __future__ import annotations

import json
import platform

import pytest
import torch

import hermes
from hermes.cli import main
from hermes.engine import minimum_budget
from hermes.errors import BudgetError
from hermes.memory import current_rss, release_free_heap
from hermes.share import RUNTIME_SLACK_BYTES, bound_allocator, share

MiB = 2**20


def test_a_budget_is_shared_weights_last_and_the_slack_squeezed_only_where_tight():
    s = share(200 * MiB, 20 * MiB, kv_cache=10 * MiB, activations=30 * MiB)
    assert (s.weights, s.slack, s.slack_short) == (128 * MiB, RUNTIME_SLACK_BYTES, 0)
    assert s.weights + s.kv_cache + s.activations + s.slack == s.budget
    tight = share(70 * MiB, 20 * MiB, kv_cache=10 * MiB, activations=30 * MiB)  # 10 MiB left for the slack
    assert (tight.weights, tight.slack, tight.slack_short) == (20 * MiB, 10 * MiB, RUNTIME_SLACK_BYTES - 10 * MiB)
    assert "short of the 32.0 MiB runtime slack" in tight.describe()
    with pytest.raises(BudgetError, match=r"below the minimum budget with activations 60\.0 MiB = minimum weight "
                                          r"budget 20\.0 MiB \+ KV cache 10\.0 MiB \+ activations 30\.0 MiB"):
        share(59 * MiB, 20 * MiB, kv_cache=10 * MiB, activations=30 * MiB)
    # below the minimum weight budget itself: the weights get it all and the engine names what the minimum is
    assert share(5 * MiB, 20 * MiB, activations=30 * MiB).weights == 5 * MiB


def test_freed_activations_leave_the_process(tiny_models):
    hermes.load(tiny_models["tiny-bert"], budget="40MiB").hermes.remove()  # an engine bounds the allocator
    assert bound_allocator()
    before = current_rss()
    pieces = [torch.ones(40_000) for _ in range(800)]  # 160 KB each, 128 MB in all: between glibc's thresholds
    held = current_rss()
    del pieces
    assert held - before > 100 * MiB
    assert current_rss() - before < 16 * MiB  # given back, not kept in the heap


def test_run_holds_the_process_within_its_budget_on_real_weights(minilm, capsys):
    assert main(["run", str(minilm), "--budget", "60MiB", "--text", "edge devices on a budget", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["process_budget_bytes"] == 60 * MiB
    assert res["budget_bytes"] + res["activation_reserved_bytes"] + res["slack_bytes"] == 60 * MiB
    assert res["slack_bytes"] == RUNTIME_SLACK_BYTES and res["weights_peak_bytes"] <= res["budget_bytes"]
    assert 0 < res["peak_rss_above_baseline_bytes"] <= 60 * MiB


def test_a_budget_without_room_for_the_activations_is_refused_before_anything_runs(tiny_models, capsys):
    path = tiny_models["tiny-gpt2"]
    least = minimum_budget(hermes.open_model(path).units)
    assert main(["run", str(path), "--budget", f"{least + 1024}B", "--random-input", "64"]) == 2
    err = capsys.readouterr().err
    assert "is below the minimum budget with activations" in err and "+ activations" in err
    assert "or a shorter or smaller input" in err


def test_generate_shares_a_fixed_budget_as_auto_does(tiny_models):
    model = hermes.load(tiny_models["tiny-llama"], budget="40MiB")
    ids = torch.randint(3, 900, (2, 12), generator=torch.Generator().manual_seed(0))
    model.generate(ids, max_new_tokens=6, do_sample=False)
    g = model.hermes.last_generation
    assert g.activation_reserved_bytes > 0 and g.kv_reserved_bytes > 0 and g.slack_bytes == RUNTIME_SLACK_BYTES
    assert g.weight_budget_bytes + g.kv_reserved_bytes + g.activation_reserved_bytes + g.slack_bytes \
        == g.budget_bytes == 40 * MiB
    model.hermes.remove()


def test_a_plain_call_larger_than_one_128_position_sequence_sets_aside_its_own_activations(tiny_models, caplog):
    from hermes.api import forward_activation_bytes
    from tests.conftest import reference_model

    path = tiny_models["tiny-gpt2"]
    model = hermes.load(path, budget="80MiB")
    layout = model.hermes.layout
    before = model.hermes.config.budget_bytes
    assert before + forward_activation_bytes(layout, 1, 128) + RUNTIME_SLACK_BYTES == 80 * MiB
    ids = torch.randint(3, 900, (8, 100), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = model(input_ids=ids).logits
        want = reference_model(path)(input_ids=ids).logits
    act = forward_activation_bytes(layout, 8, 100)
    assert model.hermes.config.budget_bytes + act + RUNTIME_SLACK_BYTES == 80 * MiB < before + act + RUNTIME_SLACK_BYTES
    assert model.hermes.last.weights_peak_bytes <= model.hermes.config.budget_bytes
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    # a budget at the minimum still runs (the weights cannot shrink below it), and says the process may exceed it
    tight = hermes.load(path, budget=minimum_budget(layout.units) + forward_activation_bytes(layout, 1, 128))
    with caplog.at_level("WARNING", logger="hermes.api"), torch.no_grad():
        torch.testing.assert_close(tight(input_ids=ids).logits, want, rtol=0, atol=0)
    assert "the process may exceed the budget" in caplog.text
    assert tight.hermes.config.budget_bytes == minimum_budget(layout.units)
    model.hermes.remove()
    tight.hermes.remove()


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc_trim is glibc's")
def test_freed_heap_is_given_back_before_a_budget_is_measured():
    """What a tokenizer's load leaves behind: many small blocks freed around a few that live on. glibc keeps the
    free pages between them in RSS until they are trimmed (budget auto and load_tokenizer trim)."""
    before = current_rss()
    blocks = [bytearray(2000) for _ in range(60_000)]  # 114 MiB of 2 kB blocks, each from the C heap
    live = blocks[::64]
    del blocks
    held = current_rss() - before
    released = release_free_heap()
    assert held > 100 * 2**20
    assert released > held // 2, (held, released)
    assert current_rss() - before < held // 4
    assert len(live) == 938
