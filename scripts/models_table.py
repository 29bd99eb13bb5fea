"""Produce docs/MODELS.md (and docs/results/models.json): the architecture matrix of tests/test_models.py, run
and written as a support table.

    .venv/bin/python scripts/models_table.py [--out docs]

Each architecture is a tiny model with random weights built from its transformers config and written by
transformers' own ``save_pretrained``; Hermes streams it at 1.5x its minimum weight budget and is compared with
the same class loaded by ``from_pretrained`` (forward twice; greedy ``generate`` where the model generates).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import transformers
from tqdm import tqdm

from hermes import zoo
from hermes.atomic import atomic_write_text

HEADER = """# Supported models

Produced by `python scripts/models_table.py` (transformers {tv}, {date}); the same checks run in CI as
`tests/test_models.py`. Each row is a tiny model of that architecture with random weights, built from its
transformers config and written by transformers' own `save_pretrained` (so the file names are the ones real
checkpoints have), streamed by `hermes.load(path, budget=1.5 x minimum)` and compared with the same class
loaded by `from_pretrained`:

- **per layer**: the largest streamed unit, as a share of the model (the weights held at once at the minimum);
- **min budget**: the smallest weight budget that runs it, as a share of the model;
- **forward**: both streamed forwards equal transformers' outputs bit for bit (every output tensor);
- **2nd pass**: units loaded out of the traced order in the second forward (0: the schedule learned in the
  first pass held);
- **generate**: greedy `generate` (6 new tokens, KV cache inside the budget) gives transformers' tokens;
- **experts read**: mixture of experts: share of the experts read for the last generated token (batch 2);
  unrouted experts are never read;
- **pinned**: units held for every call because they have no forward of their own to load them at
  (parameters of the model itself, such as CLIP's `logit_scale`, or read by attribute, such as DeBERTa's
  relative position table).

Vocabularies are 1000 tokens, so every text model's input embedding is read as row gathers and every LM head
larger than a block streams in vocabulary chunks (docs/GENERATION.md, "Small devices"): those paths run in every
row below.

| model | class | family | units | per layer | min budget | forward | 2nd pass | generate | experts read | pinned |
|---|---|---|---|---|---|---|---|---|---|---|
"""

NOTES = """
## What does not work yet, and why
- **ALBERT** streams its single shared layer as one unit (75 % of this tiny model; much less of a real one,
  whose embeddings are bigger): the layer runs once per position of the stack, and is re-read each time it is
  not resident. Keep it resident (`resident=[...]`) when the budget allows.
- **Mixture of experts** (Mixtral, Qwen2-MoE): each expert is a unit read only when routed, one at a time,
  into one expert-sized buffer inside the budget (transformers fuses the per-expert files into one 3-D tensor per
  layer; Hermes builds it once with transformers' own conversion, caches it in `.hermes/` next to the
  checkpoint, and reads one expert's slice of it). The routed experts run through an experts implementation
  Hermes registers in transformers' experts interface: transformers' **eager** loop with the expert read on
  demand. So outputs equal transformers with `experts_implementation="eager"` bit for bit; transformers'
  default `grouped_mm` kernel differs from its own eager kernel by float rounding (1.2e-7 on these logits).
  Experts are read in the inference thread (not prefetched: routing is known only inside the layer).
- **Other dtypes than the checkpoint's**: weights stream as stored; `dtype=` other than the stored one is
  refused with a message (a converted copy would need memory outside the budget).
- A module whose parameters are read by attribute from **outside its parent's class** (not seen in these
  architectures) would run on meta tensors; such a model fails with torch's meta-device error. Units read by
  attribute by their parent (DeBERTa) are found from the source and pinned.
"""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("docs"))
    args = p.parse_args(argv)
    transformers.logging.set_verbosity_error()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for z in tqdm(zoo.ZOO, desc="architectures", unit="model"):
            try:
                rows.append(zoo.check(z, zoo.save(z, Path(tmp) / z.name)))
            except Exception as exc:  # noqa: BLE001 - a failing architecture is a row of the table
                r = zoo.Check(z.name, z.family, z.model_class, error=f"{type(exc).__name__}: {exc}")
                rows.append(r)
    atomic_write_text(args.out / "results" / "models.json",
                      json.dumps({"transformers": transformers.__version__, "models": [asdict(r) for r in rows]},
                                 indent=1))
    text = HEADER.format(tv=transformers.__version__, date=time.strftime("%Y-%m-%d"))
    yes = lambda b: "yes" if b else ("–" if b is None else "**no**")  # noqa: E731
    for r in rows:
        if r.error:
            text += f"| {r.name} | {r.model_class} | {r.family} | – | – | – | **fails**: {r.error[:120]} | | | | |\n"
            continue
        text += (f"| {r.name} | {r.model_class} | {r.family} | {r.units} | {r.largest_unit_share:.0%} | "
                 f"{r.min_budget_share:.0%} | {yes(r.forward_exact)} | {r.surprises_after} | "
                 f"{yes(r.generate_exact)} | "
                 f"{'–' if r.experts_read_share is None else format(r.experts_read_share, '.0%')} | "
                 f"{', '.join(r.pinned) or '–'} |\n")
    ok = sum(1 for r in rows if r.forward_exact and r.generate_exact is not False)
    text += f"\n{ok} of {len(rows)} architectures stream exactly.\n" + NOTES
    atomic_write_text(args.out / "MODELS.md", text)
    print(f"{ok}/{len(rows)} exact; wrote {args.out / 'MODELS.md'}")
    return 0 if ok == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
