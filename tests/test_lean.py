"""The smaller runtime (hermes.lean): torch's compiler, sympy and DTensor stay out of a process that imports Hermes
and streams a model, and come back, with their semantics, when something uses them."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")

STREAM = """
import json, sys
import hermes, hermes.lean, torch
from hermes.memory import _kib_field

model = hermes.load(sys.argv[1], budget="2MiB")
ids = torch.tensor([[5, 6, 7, 8]])
tokens = model.generate(ids, max_new_tokens=4, do_sample=False)[0].tolist()
print(json.dumps({"lazy": hermes.lean.is_lazy(), "anon": _kib_field("/proc/self/status", "RssAnon"), "tokens": tokens,
                  "loaded": [m for m in ("sympy", "torch._dynamo.utils", "torch.distributed.tensor")
                             if m in sys.modules]}))
"""


def _run(code: str, *args: str, lean: bool = True) -> dict:
    env = dict(os.environ, HERMES_LEAN_IMPORTS="1" if lean else "0")
    out = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_streaming_a_model_keeps_the_compiler_sympy_and_dtensor_out(tiny_models):
    lean = _run(STREAM, str(tiny_models["tiny-llama"]))
    full = _run(STREAM, str(tiny_models["tiny-llama"]), lean=False)
    assert lean["lazy"] and lean["loaded"] == []
    assert not full["lazy"] and "sympy" in full["loaded"]  # what HERMES_LEAN_IMPORTS=0 imports: the test sees it
    assert lean["tokens"] == full["tokens"]
    assert full["anon"] - lean["anon"] > 40 * 2**20, (full["anon"], lean["anon"])  # measured: 71 MiB


COMPILE = """
import json, sys
import hermes, hermes.lean, torch

@torch.compiler.disable
def kept_out(x):
    return x + 1

before = hermes.lean.is_lazy()
import torch._dynamo.utils as utils  # a submodule: runs the package first, once
same = torch._dynamo.utils is utils and sys.modules["torch._dynamo"] is torch._dynamo
compiled = torch.compile(lambda x: x * 2 + 1, backend="eager")(torch.ones(2)).tolist()
try:  # a function disabled while the compiler was out is still disabled: fullgraph cannot trace it
    torch.compile(lambda x: kept_out(x) * 2, backend="eager", fullgraph=True)(torch.ones(2))
    disabled = False
except Exception:
    disabled = True
print(json.dumps({"before": before, "after": hermes.lean.is_lazy(), "same": same, "compiled": compiled,
                  "disabled": disabled, "plain": kept_out(torch.ones(1)).tolist()}))
"""


def test_the_compiler_loads_on_first_use_with_its_decorators_applied():
    got = _run(COMPILE)
    assert got["before"] and not got["after"] and got["same"]
    assert got["compiled"] == [3.0, 3.0] and got["plain"] == [2.0]
    assert got["disabled"]


def test_off_when_asked_or_too_late():
    code = ("import json, torch._dynamo, hermes, hermes.lean; "
            "print(json.dumps({'lazy': hermes.lean.is_lazy(), 'again': hermes.lean.install()}))")
    assert _run(code) == {"lazy": False, "again": False}  # the compiler was imported before Hermes
    code = "import json, hermes, hermes.lean; print(json.dumps({'lazy': hermes.lean.is_lazy()}))"
    assert _run(code, lean=False) == {"lazy": False}


@pytest.mark.parametrize("shapes,dim,dtypes", [
    ([(2, 3, 4, 8), (2, 3, 1, 8)], -2, ("bfloat16", "bfloat16")),
    ([(0,), (2, 5)], 0, ("float32", "float32")),  # a 1-D empty tensor is skipped, as cat does
    ([(3, 2), (3, 4)], 1, ("float16", "float32")),  # promoted
    ([(3, 2), (4, 2)], 1, ("float32", "float32")),  # mismatched: torch's own error
    ([(2, 3), (2, 3), (2, 1)], -1, ("float32", "float32", "bfloat16")),  # three, a negative dim
    ([(0,), (0,)], 0, ("float32", "float32")),  # only empty 1-D tensors
    ([(2, 3), (2, 3)], 2, ("float32", "float32")),  # no such dim: torch's own error
    ([(2, 3), (2, 3, 1)], 1, ("float32", "float32")),  # ranks differ: torch's own error
])
def test_meta_cat_answers_as_torch_cat(shapes, dim, dtypes):
    import torch

    from hermes.lean import MetaCat

    real = [torch.zeros(s, dtype=getattr(torch, d)) for s, d in zip(shapes, dtypes, strict=True)]
    try:
        want = torch.cat(real, dim)
    except (RuntimeError, IndexError) as exc:  # torch's own error, the same on meta
        want = type(exc)
    with MetaCat():
        meta = [t.to("meta") for t in real]
        if isinstance(want, type):
            with pytest.raises(want):
                torch.cat(meta, dim)
            return
        got = torch.cat(meta, dim=dim)
    assert got.device.type == "meta" and got.shape == want.shape and got.dtype == want.dtype


def test_a_transformers_it_cannot_quiet_leaves_the_runtime_as_it_was():
    """If importing transformers' masking utilities fails with the compiler kept out, Hermes imports as before."""
    code = """
import json, sys
import transformers.utils.import_utils as iu
real = iu.is_torch_distributed_available
class Once:  # the first import of masking_utils fails, as one this was not written for might
    def find_spec(self, name, path, target=None):
        if name == "transformers.masking_utils":
            sys.meta_path.remove(self)
            raise ImportError("a masking_utils this was not written for")
sys.meta_path.insert(0, Once())
import hermes, hermes.lean, torch
from transformers.masking_utils import TransformGetItemToIndex
print(json.dumps({"lazy": hermes.lean.is_lazy(), "dynamo": hasattr(torch._dynamo, "optimize"),
                  "dist": iu.is_torch_distributed_available is real, "masking": TransformGetItemToIndex.__module__}))
"""
    assert _run(code) == {"lazy": False, "dynamo": True, "dist": True,
                          "masking": "torch._dynamo._trace_wrapped_higher_order_op"}


def test_a_ring_device_joining_its_process_group_keeps_the_compiler_out():
    """init_process_group clears the compiler's trace cache when torch._dynamo is in sys.modules: nothing to clear."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = f"""
import json, hermes, hermes.lean, torch.distributed as dist
dist.init_process_group("gloo", init_method="tcp://127.0.0.1:{port}", rank=0, world_size=1)
lazy = hermes.lean.is_lazy()
dist.destroy_process_group()
print(json.dumps({{"lazy": lazy}}))
"""
    assert _run(code) == {"lazy": True}
