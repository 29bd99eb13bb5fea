"""Alike remote blocks answered by one another's records (hermes.engine.kinds.kin): after the prompt, one block of
each kind runs on meta per new signature and the others replay its record on their own cache layers — the same
tokens and caches as running every block on meta every step; never across blocks that recorded otherwise, or from a
record made on a cache layer of another length."""
from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from hermes import zoo
from hermes.engine.kinds.kin import Forwards, Kin, likeness
from hermes.engine.kinds.remote import _MetaRuns
from hermes.engine.kinds.replay import Replays
from tests.test_replay import DECODERS, GROWING_OUTPUTS, blocks_of, cache_shapes


def remote_with_kin(model: torch.nn.Module, replay: bool = True) -> list[Replays]:
    """Every block a remote unit before this rank's own (as ``Remote.install`` makes them): grouped by likeness,
    the model's forwards counted; replayed or not."""
    meta, forwards, groups, out = _MetaRuns(), Forwards(), {}, []
    model.register_forward_pre_hook(forwards)
    for block in blocks_of(model):
        r = Replays(groups.setdefault(likeness(block), Kin(forwards)))
        out.append(r)
        original = block.forward
        block.forward = lambda *a, _o=original, _r=r, **kw: meta.run(_o, a, kw, True, _r if replay else None)
        block.to("meta")
    return out


def generated(model: torch.nn.Module, prompt: int) -> tuple[list[list[int]], list[dict[str, object]]]:
    ids = torch.tensor([list(range(5, 5 + prompt)), [0, 0, *range(5, 3 + prompt)]])  # left-padded: masks grow
    mask = torch.tensor([[1] * prompt, [0, 0] + [1] * (prompt - 2)])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0,
                             return_dict_in_generate=True)
    return out.sequences.tolist(), cache_shapes(out.past_key_values)


@pytest.mark.parametrize("name", DECODERS)
@pytest.mark.parametrize("prompt", [10, 5])
def test_alike_blocks_replay_the_first_one_s_record(name, prompt):
    model = zoo.build(zoo.BY_NAME[name])
    replays = remote_with_kin(model)
    got = generated(model, prompt)
    plain = zoo.build(zoo.BY_NAME[name])
    remote_with_kin(plain, replay=False)
    assert got == generated(plain, prompt)
    first, *others = [(r.calls, r.replayed, r.borrowed) for r in replays]
    # the first block as on its own (test_replay): its signatures trusted at once, or once seen twice alike, or
    # never (its outputs grow with the cache); every other block runs the prompt only, then replays the first
    # one's record — trusted, or made in the same forward — for the 4 decode steps
    by_chance = prompt == 5 and name in ("gpt2", "opt", "gpt-neox")
    assert first == (5, 0 if name in GROWING_OUTPUTS else 2 if by_chance else 3, 0), first
    assert others == [(5, 4, 4)] * len(others), others


def test_blocks_of_other_kinds_never_answer_each_other():
    """Gemma 2's layers alternate sliding-window and full attention (a sliding layer's cache keeps the last 4 keys
    here, the prompt is 10): a sliding layer is answered by the other sliding layer only — the same tokens and
    caches as running each on meta."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    config = Gemma2Config(vocab_size=1000, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=4,
                          max_position_embeddings=64, pad_token_id=0)
    torch.manual_seed(0)
    model, plain = Gemma2ForCausalLM(config).eval(), Gemma2ForCausalLM(config).eval()
    plain.load_state_dict(model.state_dict())
    replays = remote_with_kin(model)
    remote_with_kin(plain, replay=False)
    assert generated(model, 10) == generated(plain, 10)
    assert model.config.layer_types == ["sliding_attention", "full_attention", "sliding_attention"]
    assert [r.borrowed for r in replays] == [0, 0, 4]


class Keys(torch.nn.Module):
    """A block that writes keys of ``width`` (a list: no plain attribute that likeness compares) to its cache layer,
    ``grows``: one more key than its layer holds (a run that depends on the cache's length)."""

    def __init__(self, layer_idx: int, width: int, grows: bool = False, by_name: bool = False) -> None:
        super().__init__()
        self.layer_idx, self.width, self.grows, self.by_name = layer_idx, [width], grows, by_name

    def forward(self, hidden_states, cache):
        n = cache.get_seq_length(self.layer_idx) + 1 if self.grows else hidden_states.shape[1]
        keys = torch.zeros(1, 1, n, self.width[0], device=hidden_states.device)
        if self.by_name:
            cache.update(keys, keys, layer_idx=self.layer_idx)
        else:
            cache.update(keys, keys, self.layer_idx)
        return hidden_states * 2


def steps(blocks: list[Keys], kin: bool, skew: bool = False, n: int = 5) -> tuple[list[Replays], DynamicCache]:
    """``n`` forwards of ``blocks`` as remote units (one token after a 3-token prompt); ``skew``: after the first,
    the last block's layer gets one key more than the others."""
    forwards, groups, out = Forwards(), {}, []
    for b in blocks:
        out.append(Replays(groups.setdefault(likeness(b), Kin(forwards)) if kin else None))
    cache = DynamicCache()
    for step in range(n):
        forwards()
        x = torch.empty(1, 3 if step == 0 else 1, 8, device="meta")
        for b, r in zip(blocks, out, strict=True):
            x = r.run(b.forward, (x, cache), {})
        if skew and step == 0:
            extra = torch.zeros(1, 1, 1, blocks[-1].width[0], device="meta")
            cache.update(extra, extra, blocks[-1].layer_idx)
    return out, cache


def layer_shapes(cache: DynamicCache) -> list[tuple[int, ...]]:
    return [tuple(layer.keys.shape) for layer in cache.layers]


@pytest.mark.parametrize("by_name", [False, True])
def test_a_borrowed_record_updates_the_block_s_own_cache_layer(by_name):
    """The layer's index a cache's ``update`` was given, by position or by name, is the borrowing block's own."""
    blocks = [Keys(i, 4, by_name=by_name) for i in range(3)]
    replays, cache = steps(blocks, kin=True)
    assert layer_shapes(cache) == [(1, 1, 7, 4)] * 3 == layer_shapes(steps(blocks, kin=False)[1])
    assert [r.borrowed for r in replays] == [0, 4, 4]


@pytest.mark.parametrize(("widths", "borrowed"), [((4, 4, 6), [0, 4, 0]), ((4, 6, 4), [0, 0, 4]),
                                                 ((6, 4, 4), [0, 0, 0])])
def test_a_block_that_recorded_otherwise_than_its_kind_neither_borrows_nor_lends(widths, borrowed):
    """Blocks alike to likeness, one writing wider keys: it never replays another's record, and none replays its
    own — where it is the first, the others, unlike it, run on their own."""
    blocks = [Keys(i, w) for i, w in enumerate(widths)]
    replays, cache = steps(blocks, kin=True)
    assert layer_shapes(cache) == layer_shapes(steps(blocks, kin=False)[1])
    assert [shape[-1] for shape in layer_shapes(cache)] == list(widths)
    assert [r.borrowed for r in replays] == borrowed


@pytest.mark.parametrize("skew", [False, True])
def test_a_record_made_on_a_layer_of_another_length_is_never_borrowed(skew):
    """Blocks whose keys grow with their cache layer: never trusted, each forward's first one runs on meta and the
    others replay its record — only while their layers hold as many keys as its did."""
    blocks = [Keys(i, 4, grows=True) for i in range(3)]
    replays, cache = steps(blocks, kin=True, skew=skew)
    assert layer_shapes(cache) == layer_shapes(steps(blocks, kin=False, skew=skew)[1])
    assert replays[0].borrowed == 0 and replays[0].replayed == 0
    assert replays[1].borrowed == 4
    assert replays[2].borrowed == (0 if skew else 4)
