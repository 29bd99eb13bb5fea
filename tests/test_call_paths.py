"""Units reached through any call path are loaded: a layer called by its ``forward`` method (SqueezeBERT), a
submodule used through another method (ProphetNet's ``position_embeddings._forward``), layers inside lists of
lists (GLPN, PVT, Funnel), norms in a dict (Swin inside Mask2Former), and the cases below — each streamed at
its minimum budget and at 2.5x, bit-exact against ``from_pretrained`` (the sweep's case runner, a process a type)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

TYPES = ["squeezebert", "prophetnet", "glpn", "pvt", "funnel", "mask2former", "bridgetower", "florence2",
         "t5gemma2",  # an embedding subclass holding more than its weight: a whole unit, not row gathers
         "idefics3",  # an inner transformers model's ``device`` (CPU, not its parameters' meta device)
         "gemma4_text",  # a tied head whose source is neither streamed nor resident: generate at the minimum
         "mamba"]  # a pinned head tied to an embedding made resident for generate: attached in the first pass
SWEEP = Path(__file__).parents[1] / "scripts" / "sweep_models.py"


def test_every_call_path_loads_its_unit(tmp_path):
    out = tmp_path / "sweep.json"
    proc = subprocess.run([sys.executable, str(SWEEP), "--only", ",".join(TYPES), "--out", str(out),
                           "--timeout", "120", "--jobs", "2"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    cases = json.loads(out.read_text())["cases"]
    bad = {t: (c["status"], c.get("error")) for t, c in cases.items() if c["status"] != "exact"}
    assert set(cases) == set(TYPES) and bad == {}
