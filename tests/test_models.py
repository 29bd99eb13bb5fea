"""The architecture matrix: tiny models of many transformers architectures, written by transformers'
``save_pretrained``, streamed under a budget and compared with the same class loaded by ``from_pretrained``."""
from __future__ import annotations

import signal
from pathlib import Path

import pytest

from hermes import zoo

TIMEOUT_S = 120  # a case that hangs fails instead of hanging the suite
STREAMS_PER_LAYER_EXCEPT = {"albert": "one layer shared by every position: the whole encoder is that layer"}


@pytest.fixture(scope="module")
def zoo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("zoo")


class _Timeout(Exception):
    pass


def _alarm(signum, frame):  # noqa: ANN001, ARG001
    raise _Timeout(f"did not finish within {TIMEOUT_S} s")


@pytest.mark.parametrize("name", [z.name for z in zoo.ZOO])
def test_architecture_streams_exactly_under_the_budget(zoo_root, name):
    z = zoo.BY_NAME[name]
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(TIMEOUT_S)
    try:
        path = zoo.save(z, zoo_root / name)
        r = zoo.check(z, path)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    assert r.forward_exact, f"{name}: streamed forward differs by {r.max_abs_diff}"
    assert r.surprises_after == 0, f"{name}: the traced order did not hold on the second pass"
    limit = r.generate_budget_bytes if r.generate_exact is not None else r.budget_bytes
    assert r.weights_peak_bytes <= limit, f"{name}: weights peak {r.weights_peak_bytes} > budget {limit}"
    if z.generates:
        assert r.generate_exact, f"{name}: greedy tokens differ from transformers' generate"
    if name not in STREAMS_PER_LAYER_EXCEPT:
        assert r.largest_unit_share < 0.5, f"{name}: largest unit is {r.largest_unit_share:.0%} of the model"
        assert r.min_budget_share < 0.6, f"{name}: minimum budget is {r.min_budget_share:.0%} of the model"


def test_the_matrix_covers_every_family():
    families = {z.family for z in zoo.ZOO}
    assert {"encoder", "decoder", "encoder-decoder", "vision", "speech", "multimodal", "moe"} <= families
    assert len(zoo.ZOO) >= 25
