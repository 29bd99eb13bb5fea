"""Mixtures of experts: each routed expert read on its own, computed as transformers' default experts kernel
(``grouped_mm``, what ``from_pretrained`` picks) computes — bit-exact, in every experts layout."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import transformers

import hermes
from hermes import shrink
from hermes.engine import minimum_budget

# gate and up concatenated (Mixtral), transposed with biases (GPT-OSS), no gate (Nemotron-H), a norm after each
# expert (MuseSpark: read with its layer, the experts one by one)
CASES = ("mixtral", "gpt_oss", "nemotron_h", "muse_spark_text")


def _small(model_type: str, path: Path, dtype: torch.dtype) -> Any:
    config = shrink.shrink_config(transformers.CONFIG_MAPPING[model_type]())
    text = config.get_text_config()
    experts = getattr(text, "num_local_experts", None) or getattr(text, "n_routed_experts", None) or 0
    if experts >= 4 and getattr(text, "num_experts_per_tok", 0):  # top-3: three terms summed in another order round
        text.num_experts_per_tok = 3  # otherwise (the two kernels then differ); one token leaves experts unread
    cls = getattr(transformers, next(c.model_class for c in shrink.candidates() if c.model_type == model_type))
    torch.manual_seed(0)
    model = cls(config).eval()
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    model.to(dtype).save_pretrained(path)
    return cls


def _main(out: Any) -> torch.Tensor:
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


@pytest.mark.parametrize(("model_type", "dtype"), [(t, torch.float32) for t in CASES] + [("mixtral", torch.bfloat16)])
def test_streamed_experts_equal_transformers_default_kernel(model_type, dtype, tmp_path):
    cls = _small(model_type, tmp_path, dtype)
    ref = cls.from_pretrained(tmp_path).eval()
    assert ref.dtype == dtype
    assert ref.config._experts_implementation == "grouped_mm"  # transformers' default here
    eager = cls.from_pretrained(tmp_path, experts_implementation="eager").eval()
    ids = torch.randint(3, ref.config.get_text_config().vocab_size, (3, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, other = _main(ref(input_ids=ids)), _main(eager(input_ids=ids))
    probe = hermes.load(tmp_path, budget=2**40)
    units = probe.hermes.units
    n_experts = sum(u.kind == "expert" for u in units)
    budget = int(2.5 * minimum_budget(units, [units[i].name for i in probe.hermes.pinned]))
    probe.hermes.remove()
    assert n_experts > 0  # read one by one
    model = hermes.load(tmp_path, budget=budget)
    try:
        with torch.no_grad():
            got = _main(model(input_ids=ids))
            one = _main(model(input_ids=ids[:1, :1]))
        read_one = model.hermes.last.experts_read
    finally:
        model.hermes.remove()
    assert torch.equal(got, want), (got - want).abs().max()
    assert 0 < read_one < n_experts  # one token reads only its routed experts
    if model_type == "mixtral":  # the two kernels round differently: equal to eager would not be equal to this
        assert not torch.equal(want, other)
    del one
