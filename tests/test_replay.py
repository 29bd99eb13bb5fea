"""Remote units' meta runs, learned and replayed (hermes.engine.kinds.replay): a ring device answers the blocks other
devices compute by replaying the cache calls and output shapes a meta run recorded — the same cache, the same
outputs, the same tokens as running them on the meta device every time; never replayed where the run depends on
more than its inputs' shapes."""
from __future__ import annotations

import pytest
import torch

from hermes import zoo
from hermes.engine.kinds.remote import _MetaRuns
from hermes.engine.kinds.replay import Replays, signature

DECODERS = ["llama", "mistral", "qwen3", "phi3", "gemma", "gpt2", "opt", "bloom", "falcon", "gpt-neox", "gptj"]
#: blocks that return their attention weights, whose last dimension is the cache's length: never replayed (their
#: second decode step records another output than the first), run on the meta device every time
GROWING_OUTPUTS = {"bloom", "gptj"}


def blocks_of(model: torch.nn.Module) -> list[torch.nn.Module]:
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)]
    return list(lists[0])


def remote_blocks(model: torch.nn.Module, replay: bool, keep: int = 0) -> list[Replays]:
    """Every block but the last ``keep`` run as a remote unit before this rank's own (on meta, real zeros out);
    replayed or not."""
    meta, out = _MetaRuns(), []
    blocks = blocks_of(model)
    for block in blocks[:len(blocks) - keep]:
        r = Replays()
        out.append(r)
        original = block.forward
        block.forward = lambda *a, _o=original, _r=r, **kw: meta.run(_o, a, kw, True, _r if replay else None)
        block.to("meta")  # a remote block's weights are never read: the skeleton's meta tensors
    return out


def cache_shapes(cache) -> list[dict[str, object]]:
    return [{k: (tuple(v.shape), v.dtype, v.device.type) if isinstance(v, torch.Tensor) else v
             for k, v in vars(layer).items()} for layer in cache.layers]


@pytest.mark.parametrize("name", DECODERS)
@pytest.mark.parametrize("prompt", [10, 5])
def test_replayed_blocks_leave_the_cache_and_tokens_a_meta_run_leaves(name, prompt):
    z = zoo.BY_NAME[name]
    runs = {}
    for replay in (False, True):
        model = zoo.build(z)
        replays = remote_blocks(model, replay)
        ids = torch.tensor([list(range(5, 5 + prompt)), [0, 0, *range(5, 3 + prompt)]])  # left-padded: masks grow
        mask = torch.tensor([[1] * prompt, [0, 0] + [1] * (prompt - 2)])
        with torch.no_grad():
            out = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0,
                                 return_dict_in_generate=True)
        runs[replay] = (out.sequences.tolist(), cache_shapes(out.past_key_values), out.past_key_values.get_seq_length(),
                        [(r.calls, r.replayed) for r in replays])
    assert runs[True][:3] == runs[False][:3]
    calls = runs[True][3]
    # the prompt, then 4 decode steps. A 10-token prompt: the first step's keys are 11 long, the next 12, and nothing
    # the blocks record is within one of that (their dimensions: batch 2, 1 new token, 4 heads, 8 per head, 32):
    # trusted at once, the last three steps replayed. A 5-token prompt: key lengths 6, 7, ... and 4 heads (GPT-2,
    # OPT, GPT-NeoX pass their head count): trusted once two steps recorded alike, the last two replayed
    by_chance = prompt == 5 and name in ("gpt2", "opt", "gpt-neox")
    want = 0 if name in GROWING_OUTPUTS else 2 if by_chance else 3
    assert all(n == 5 and replayed == want for n, replayed in calls), calls
    assert all(replayed == 0 for _, replayed in runs[False][3])


class GrowingKeys(torch.nn.Module):
    """A block whose cache call depends on the cache's length, not only on its inputs' shapes."""

    def forward(self, hidden_states, cache):
        n = cache.get_seq_length() + 1
        cache.update(torch.zeros(1, 1, n, 4, device=hidden_states.device),
                     torch.zeros(1, 1, n, 4, device=hidden_states.device), 0)
        return hidden_states * 2


def test_a_run_that_depends_on_more_than_its_inputs_shapes_is_never_replayed():
    from transformers import DynamicCache

    block, r = GrowingKeys(), Replays()
    replayed, ran = DynamicCache(), DynamicCache()
    x = torch.empty(1, 1, 4, device="meta")
    for _ in range(5):
        y = r.run(block.forward, (x, replayed), {})
        assert y.shape == block(x, ran).shape
        assert replayed.layers[0].keys.shape == ran.layers[0].keys.shape
    assert r.calls == 5 and r.replayed == 0


def test_inputs_that_are_not_shapes_and_plain_values_are_always_run():
    seen = []

    def forward(x, thing):
        seen.append(thing)
        return x + 1

    r = Replays()
    x = torch.empty(2, 3, device="meta")
    for _ in range(4):
        assert r.run(forward, (x, object()), {}).shape == (2, 3)
    assert len(seen) == 4 and r.replayed == 0
    for _ in range(4):  # plain values, no cache, no mask (no length left out of the signature): replayed at once
        r.run(forward, (x, 7), {})
    assert len(seen) == 5 and r.replayed == 3


def test_an_attention_mask_s_length_is_left_out_of_the_signature_by_name_or_position():
    def key(mask, by_name):
        x = torch.empty(2, 1, 8, device="meta")
        if by_name:
            return signature((x,), {"attention_mask": mask})[0]
        return signature((x, mask), {}, ("hidden_states", "attention_mask"))[0]

    for by_name in (True, False):
        assert key(torch.empty(2, 1, 1, 5, device="meta"), by_name) == key(torch.empty(2, 1, 1, 6, device="meta"),
                                                                           by_name)
        assert key(torch.empty(2, 1, 1, 5, device="meta"), by_name) != key(torch.empty(2, 1, 2, 5, device="meta"),
                                                                           by_name)
    x = torch.empty(2, 1, 8, device="meta")
    assert signature((x, torch.empty(5)), {})[0] != signature((x, torch.empty(6)), {})[0]  # other inputs: whole


def test_replaying_can_be_turned_off(monkeypatch):
    monkeypatch.setattr(Replays, "enabled", False)
    r = Replays()
    for _ in range(4):
        r.run(lambda x: x * 2, (torch.empty(3, device="meta"),), {})
    assert r.replayed == 0


def test_a_replayed_call_makes_no_meta_copies_of_its_inputs(monkeypatch):
    """A replay needs only its inputs' shapes: the real inputs before a rank's own blocks (hidden states, rotary
    tables, masks) are not copied to the meta device for it — each run that is not replayed copies its positional
    and keyword inputs (two calls), each replayed one none."""
    from hermes.engine.kinds import remote

    copies, depth = [], [0]
    original = remote._to_meta

    def to_meta(x):  # counts the outer calls (it calls itself for what a tuple or dict holds)
        copies.extend([1] if depth[0] == 0 else [])
        depth[0] += 1
        try:
            return original(x)
        finally:
            depth[0] -= 1

    monkeypatch.setattr(remote, "_to_meta", to_meta)
    model = zoo.build(zoo.BY_NAME["llama"])
    replays = remote_blocks(model, True)
    with torch.no_grad():
        model.generate(torch.tensor([[5, 6, 7, 8, 9]]), max_new_tokens=6, do_sample=False, pad_token_id=0)
    ran = sum(r.calls - r.replayed for r in replays)
    assert sum(r.replayed for r in replays) == 4 * len(replays)  # the prompt and the first step run, 4 replayed
    assert len(copies) == 2 * ran


def test_continuous_batching_steps_are_replayed_once_one_ran(monkeypatch):
    """hermes serve's steps on a ring: transformers' continuous batching over the ring's paged cache, every block but
    the last remote. Each decode step's read indices and key lengths grow (left out of the signature, as a mask's
    length) and the paged cache keeps nothing of a remote layer's update (not recorded): once one step of a batch
    shape ran with nothing of those lengths in its record, the later steps replay — the same tokens as running the
    blocks on meta every step."""
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig
    from transformers.generation.continuous_batching import continuous_api

    from hermes.ring.serving import RingPagedCache

    monkeypatch.setattr(continuous_api, "PagedAttentionCache", RingPagedCache)
    gc = GenerationConfig(max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=-1)
    cb = ContinuousBatchingConfig(page_size=16, num_blocks=16, max_batch_tokens=64, max_requests_per_batch=4,
                                  allow_block_sharing=False, use_async_batching=False, use_cuda_graph=False)
    got = {}
    for replay in (False, True):
        model = zoo.build(zoo.BY_NAME["llama"])
        replays = remote_blocks(model, replay, keep=1)
        with torch.no_grad():
            out = model.generate_batch([[5, 6, 7, 8, 9], [5, 6, 7]], generation_config=gc,
                                       continuous_batching_config=cb)
        got[replay] = [out[k].generated_tokens for k in sorted(out)], [(r.calls, r.replayed) for r in replays]
    assert got[True][0] == got[False][0] and all(len(t) == 8 for t in got[True][0])
    # one prefill step and 7 decode steps: the prefill and the first decode step run, the other 6 replay
    assert got[True][1] == [(8, 6)] * (len(blocks_of(model)) - 1), got[True][1]
    assert all(replayed == 0 for _, replayed in got[False][1])
