"""Produce docs/MODELS.md (and docs/results/models.json): the architecture matrix of tests/test_models.py, run
and written as a support table, and every model type of the architecture sweep (scripts/sweep_models.py).

    .venv/bin/python scripts/models_table.py [--out docs] [--sweep docs/results/sweep/sweep.json] [--reuse-matrix]

Each architecture of the matrix is a tiny model with random weights built from its transformers config and written
by transformers' own ``save_pretrained``; Hermes streams it at 1.5x its minimum weight budget and is compared with
the same class loaded by ``from_pretrained`` (forward twice; greedy ``generate`` where the model generates). The
sweep section is written from the sweep's JSON as it is (the sweep is not re-run here); ``--reuse-matrix`` takes the
matrix from docs/results/models.json instead of running it.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any

import transformers
from tqdm import tqdm

from hermes import zoo
from hermes.atomic import atomic_write_text

SWEEP = Path(__file__).resolve().parents[1] / "docs" / "results" / "sweep" / "sweep.json"
STATUS_ORDER = ("exact", "differs", "over-budget", "hermes-error", "transformers-limitation", "setup-error",
                "timeout", "crash")
TITLE = "# Supported models\n\n"
INTRO = """Two checks, both comparing Hermes with transformers bit for bit on tiny models written by transformers' own
`save_pretrained`:

- [the CI matrix](#the-ci-matrix-hand-written-architectures): {n} hand-written architectures, checked in CI by
  `tests/test_models.py`;
- [the sweep](#every-model-type-of-the-installed-transformers): every model type of the installed transformers
  that has a model class, made small by a generic config shrinker (`src/hermes/shrink.py`), {exact} of {tried}
  exact; a spread of them runs in CI as `tests/test_sweep.py`.

"""
HEADER = """## The CI matrix: hand-written architectures

Produced by `python scripts/models_table.py` (transformers {tv}, run {date}); the same checks run in CI as
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
### What does not work yet, and why
- **ALBERT** streams its single shared layer as one unit (75 % of this tiny model; much less of a real one,
  whose embeddings are bigger): the layer runs once per position of the stack, and is re-read each time it is
  not resident. Keep it resident (`resident=[...]`) when the budget allows.
- **Mixture of experts** (Mixtral, Qwen2-MoE): each expert is a unit read only when routed, one at a time,
  into one expert-sized buffer inside the budget (transformers fuses the per-expert files into one 3-D tensor per
  layer; Hermes builds it once with transformers' own conversion, caches it in `.hermes/` next to the
  checkpoint, and reads one expert's slice of it). The routed experts run through an experts implementation
  Hermes registers in transformers' experts interface, which computes as the implementation `from_pretrained`
  chose — by default `grouped_mm`: one grouped matmul per routed expert (torch's grouped kernel computes each
  group as its own matmul) and the gate, the norm after the experts, the weighting and the sum over the top-k on
  the whole batch as transformers does them; `eager` where the model uses it. So outputs equal what
  `from_pretrained` gives by default, bit for bit (tests/test_experts.py: four layouts, float32 and bfloat16,
  top-3 routing, where the eager and grouped kernels differ by ~5e-7). Under `grouped_mm` an expert is read in two
  parts (its up projection, then its down projection: the same bytes, one more read). Experts are read in the
  inference thread (not prefetched: routing is known only inside the layer).
- **Other dtypes than the checkpoint's**: weights stream as stored; `dtype=` other than the stored one is
  refused with a message (a converted copy would need memory outside the budget).
- A module whose parameters are read by attribute from **outside its parent's class** (not seen in these
  architectures) would run on meta tensors; such a model fails with torch's meta-device error. Units read by
  attribute by their parent (DeBERTa) are found from the source and pinned.
"""

SWEEP_HEADER = """
## Every model type of the installed transformers

The architecture sweep of issue #23 (transformers {tv}, torch {torch}, swept {date}): for every
`model_type` of the installed transformers that has a model class, the class users load (the generating head
where there is one), with its default config made small by `hermes.shrink.shrink_config` (2 layers, widths 64,
4 experts, vocabulary 1000: nothing per architecture), random weights, written by `save_pretrained` and loaded
back by `from_pretrained`; each case in its own process under a timeout. Hermes streams it at the minimum weight
budget and at 2.5x it.

- **exact**: every output tensor of both streamed forwards at both budgets equals transformers' bit for bit,
  greedy `generate` ({new} new tokens) gives transformers' tokens where the class generates, and the weights
  peak stays within the budget;
- **differs** / **over-budget**: an output or a token differs / the weights peak exceeded the budget;
- **hermes-error**: Hermes raised (a Hermes bug, to be fixed);
- **transformers-limitation**: transformers itself cannot run the case here: a library it needs is not
  installed, or its own forward is not deterministic (so nothing can equal it bit for bit);
- **setup-error**: transformers raised on the shrunk model or its inputs, before Hermes ran: a config the
  shrinker's generic rules do not fit, or inputs the model needs that `hermes.shrink.make_inputs` does not make
  (grids, boxes, prompts, audio codes...); not a verdict on Hermes;
- **timeout** / **crash**: the case did not finish, or its process died.

Reproduce (about 15 minutes on one core; `--only a,b` re-runs some types and merges them):

```bash
nice .venv/bin/python scripts/sweep_models.py   # docs/results/sweep/sweep.json and sweep.md
.venv/bin/python scripts/models_table.py        # this file (--reuse-matrix: keep the matrix above as it is)
```

docs/results/sweep/sweep.md groups the cases that are not exact by mechanism.

| status | model types |
|---|---|
"""
STAGES = {"config": "shrunk config rejected", "build": "small model does not build", "save": "not saved",
          "reference": "does not load back", "inputs": "transformers' forward fails on the small model",
          "sweep": "sweep error"}  # where a setup error was raised


def run_matrix(out: Path, *, reuse: bool) -> tuple[list[zoo.Check], str, str]:
    """The matrix's rows, the transformers version and the date they ran: run now (and written to
    out/results/models.json), or read back from that file."""
    path = out / "results" / "models.json"
    if reuse:
        doc = json.loads(path.read_text())
        return [zoo.Check(**m) for m in doc["models"]], doc["transformers"], doc.get("date", "date not recorded")
    rows, date = [], time.strftime("%Y-%m-%d")
    with tempfile.TemporaryDirectory() as tmp:
        for z in tqdm(zoo.ZOO, desc="architectures", unit="model"):
            try:
                rows.append(zoo.check(z, zoo.save(z, Path(tmp) / z.name)))
            except Exception as exc:  # noqa: BLE001 - a failing architecture is a row of the table
                rows.append(zoo.Check(z.name, z.family, z.model_class, error=f"{type(exc).__name__}: {exc}"))
    atomic_write_text(path, json.dumps({"transformers": transformers.__version__, "date": date,
                                        "models": [asdict(r) for r in rows]}, indent=1))
    return rows, transformers.__version__, date


def matrix_section(rows: list[zoo.Check], version: str, date: str) -> str:
    text = HEADER.format(tv=version, date=date)
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
    return text + f"\n{matrix_ok(rows)} of {len(rows)} architectures stream exactly.\n" + NOTES


def matrix_ok(rows: list[zoo.Check]) -> int:
    return sum(1 for r in rows if r.forward_exact and r.generate_exact is not False)


def _cell(text: str, n: int = 140) -> str:
    """One line of ``text`` for a table cell: /tmp paths blanked, pipes escaped, at most ``n`` characters."""
    line = re.sub(r"/tmp/\S+", "PATH", " ".join(text.split()))
    line = line if len(line) <= n else line[: n - 1] + "…"
    if line.count("`") % 2:  # cut inside a code span
        line = line.replace("`", "'")
    return line.replace("|", "\\|")


def _limitation(error: str) -> str:
    """A transformers limitation in a few words: the missing library, or the nondeterminism."""
    lib = re.search(r"(\w+) requires the (\w+) library", error)
    if lib:
        return f"needs `{lib.group(2)}` (not installed), for {lib.group(1)}"
    mod = re.search(r"No module named '([\w.]+)'", error)
    if mod:
        return f"needs `{mod.group(1)}` (not installed)"
    nondet = re.search(r"not deterministic \((\S+) at (\S+)\)", error)
    if nondet:
        return f"transformers' own forward is not deterministic (two calls differ by {nondet[1]} at {nondet[2]})"
    return error.splitlines()[0] if error else ""


def why_not_exact(r: dict[str, Any]) -> str:
    """The reason a case is not exact, in a few words."""
    status, error = r["status"], r.get("error", "")
    if status == "transformers-limitation":
        return _cell(_limitation(error))
    if status == "setup-error":
        m = re.match(r"shrunk model still has (\d+) bytes", error)
        if m:
            return f"the shrinker left {int(m.group(1)) / 2**20:.0f} MiB of parameters (a size it does not know)"
        return f"{STAGES.get(r.get('stage', ''), r.get('stage', ''))}: {_cell(error)}"
    if status == "hermes-error":
        return f"at {r.get('stage', '?')}: {_cell(error.splitlines()[0] if error else '')}"
    if status == "differs":
        worst = max((f for f in r.get("forward", []) if f["max_abs_diff"]), key=lambda f: f["max_abs_diff"],
                    default=None)
        text = f"forward differs by {worst['max_abs_diff']:.1g} at `{worst['where']}`" if worst else "forward exact"
        return text + ("; greedy tokens differ" if any(not g["exact"] for g in r.get("generate", [])) else "")
    if status == "over-budget":
        return "weights peak above the budget"
    return _cell(error)


def checked(r: dict[str, Any]) -> str:
    """What an exact case checked: forward, generate; and how its inputs were made where not as usual."""
    text = "forward, generate" if r.get("generate") else "forward"
    if r.get("generate_note"):
        text += " (transformers' own generate fails)"
    note = r.get("inputs_note", "")
    return text + (f"; inputs: {_cell(note.split(' (', 1)[0], 60)}" if note else "")


def sweep_section(doc: dict[str, Any], date: str) -> str:
    cases = doc["cases"]
    tally = Counter(r["status"] for r in cases.values())
    counts = {s: tally[s] for s in (*STATUS_ORDER, *sorted(set(tally) - set(STATUS_ORDER)))}
    text = SWEEP_HEADER.format(tv=doc["transformers"], torch=doc["torch"], date=date, new=doc.get("new_tokens", 4))
    text += "".join(f"| {s} | {n} |\n" for s, n in counts.items())
    text += f"| **tried** | {len(cases)} |\n\n{tally['exact']} of {len(cases)} model types stream exactly.\n\n"
    text += "| model type | class | status | checked (exact) / why not exact |\n|---|---|---|---|\n"
    for t, r in sorted(cases.items()):
        what = checked(r) if r["status"] == "exact" else why_not_exact(r)
        status = r["status"] if r["status"] == "exact" else f"**{r['status']}**"
        text += f"| {t} | {r['model_class']} | {status} | {what} |\n"
    return text


def load_sweep(path: Path) -> tuple[dict[str, Any], str] | None:
    """The sweep's JSON and the date it ran (its ``date``, else the file's), or None where there is none."""
    if not path.exists():
        return None
    doc = json.loads(path.read_text())
    return doc, doc.get("date") or time.strftime("%Y-%m-%d", time.localtime(path.stat().st_mtime))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("docs"))
    p.add_argument("--sweep", type=Path, default=SWEEP, help="the sweep's JSON (no sweep section if absent)")
    p.add_argument("--reuse-matrix", action="store_true",
                   help="take the matrix from OUT/results/models.json instead of running it")
    args = p.parse_args(argv)
    transformers.logging.set_verbosity_error()
    rows, version, date = run_matrix(args.out, reuse=args.reuse_matrix)
    sweep = load_sweep(args.sweep)
    text, swept = TITLE, ""
    if sweep:
        cases = sweep[0]["cases"]
        exact = sum(1 for r in cases.values() if r["status"] == "exact")
        text += INTRO.format(n=len(rows), exact=exact, tried=len(cases))
        swept = f"; sweep: {exact}/{len(cases)} exact"
    text += matrix_section(rows, version, date) + (sweep_section(*sweep) if sweep else "")
    atomic_write_text(args.out / "MODELS.md", text)
    ok = matrix_ok(rows)
    print(f"matrix: {ok}/{len(rows)} exact{swept}; wrote {args.out / 'MODELS.md'}")
    return 0 if ok == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
