"""The memo of meta kernels (hermes.engine.kinds.memo): a model run on the meta device with it returns what it returns
with torch's own meta kernels (every output's and cache tensor's shape, stride, dtype), most calls answered from the
memo after the first step; views, in-place calls and real tensors are never answered from it."""
from __future__ import annotations

import pytest
import torch

from hermes import zoo
from hermes.engine.kinds.memo import MetaMemo
from hermes.engine.kinds.remote import _MetaRuns

ARCHS = ["llama", "qwen3", "gemma", "gpt2", "opt", "bloom", "falcon", "gptj", "phi3"]


def described(x):
    if isinstance(x, torch.Tensor):
        return (tuple(x.shape), x.stride(), x.dtype, x.device.type)
    if isinstance(x, (tuple, list)):
        return [described(v) for v in x]
    return type(x).__name__


def generate_with_remote_blocks(name: str, memo: bool) -> tuple[object, ...]:
    """A left-padded batch generated with every block run as a remote unit does (on meta, every step: no replay):
    each block call's meta output, the cache, the tokens."""
    z = zoo.BY_NAME[name]
    model = zoo.build(z)
    meta, outputs = _MetaRuns(), []
    if not memo:
        meta.memo = None
    for block in next(m for m in model.modules() if isinstance(m, torch.nn.ModuleList)):
        def spy(*a, _o=block.forward, **kw):
            out = _o(*a, **kw)
            outputs.append(described(out))
            return out

        block.forward = lambda *a, _s=spy, **kw: meta.run(_s, a, kw, True)
        block.to("meta")
    ids = torch.tensor([[5, 6, 7, 8, 9], [0, 0, 5, 6, 7]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0,
                             return_dict_in_generate=True)
    cache = [described([t for t in vars(layer).values() if isinstance(t, torch.Tensor)])
             for layer in out.past_key_values.layers]
    return outputs, cache, out.sequences.tolist(), meta.memo


@pytest.mark.parametrize("name", ARCHS)
def test_remote_blocks_return_the_same_shapes_and_tokens_with_the_memo(name):
    *with_memo, memo = generate_with_remote_blocks(name, True)
    *without, none = generate_with_remote_blocks(name, False)
    assert with_memo == without and none is None
    assert memo.hits > memo.misses  # the blocks repeat each other's calls, and the steps each other's


def test_views_in_place_calls_and_real_tensors_are_never_answered_from_the_memo():
    x = torch.empty(4, 6, device="meta")
    with MetaMemo() as memo:
        for _ in range(3):
            assert x.add_(1) is x  # in place: the tensor itself
            v = x.t()
            assert v.untyped_storage().data_ptr() == x.untyped_storage().data_ptr() and v.stride() == (1, 6)
            real = torch.arange(6.0).reshape(2, 3)
            assert torch.equal(real * 2, torch.tensor([[0.0, 2, 4], [6, 8, 10]]))  # computed, every time
        answered = memo.hits
        a, b = x + x, x + x
        assert a is not b and a.shape == (4, 6) and a.device.type == "meta"
        t = x.t() * 2  # a non-contiguous input: the stride torch gives, recorded and given again
        assert (x.t() * 2).stride() == t.stride()
    assert memo.hits == answered + 2
    assert torch.ones(2).device.type == "cpu"  # the memo's mode is gone with the context


def test_the_memo_can_be_turned_off(monkeypatch):
    assert _MetaRuns().memo is not None
    monkeypatch.setenv("HERMES_META_MEMO", "0")
    assert _MetaRuns().memo is None
