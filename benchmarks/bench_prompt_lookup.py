"""Assisted generation under a budget (issue 12): tokens/s of greedy ``generate`` with and without transformers'
prompt lookup (``prompt_lookup_num_tokens``), same model, same budget, same prompt (text that repeats itself),
same tokens required.

Each run is a fresh process (``python -m hermes.baselines gen-hermes``-like, see ``_one``) with the page cache of
the checkpoint evicted; with and without lookup alternate (A B A B ...); medians.

    python benchmarks/bench_prompt_lookup.py ckpt/gpt2 --budget 120MiB --repeat 3 -o docs/results/prompt_lookup
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

from hermes.atomic import atomic_write_text
from hermes.memory import format_bytes, parse_bytes


def _one(model_dir: str, budget: str, lookup: int, prompt_len: int, new_tokens: int) -> dict[str, Any]:
    """One generate call in this process (the worker side)."""
    import time

    import torch

    import hermes
    from hermes.skeleton import load_config, resolve_model_class
    from hermes.store import Store, evict_page_cache

    config = load_config(model_dir)
    resolve_model_class(config)
    g = torch.Generator().manual_seed(0)
    piece = torch.randint(3, config.vocab_size, (1, prompt_len // 4), generator=g)
    ids = piece.repeat(1, 4)  # text that repeats itself: what prompt lookup exploits
    evict_page_cache(Store(model_dir).files)
    t0 = time.perf_counter()
    model = hermes.load(model_dir, budget=budget, loaders=1, io="direct")
    kw: dict[str, Any] = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False}
    if lookup:
        kw["prompt_lookup_num_tokens"] = lookup
    with torch.no_grad():
        out = model.generate(ids, **kw)
    total = time.perf_counter() - t0
    s = model.hermes.last_generation
    return {"lookup": lookup, "total_s": total, "tokens_per_s": s.new_tokens / total, "new_tokens": s.new_tokens,
            "forward_passes": s.forward_passes, "bytes_read_per_token": s.bytes_read_per_token,
            "budget_bytes": s.budget_bytes, "tokens": out[0, ids.shape[1]:].tolist()}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("model", type=Path)
    p.add_argument("--budget", default="120MiB")
    p.add_argument("--lookup", type=int, default=10, help="prompt_lookup_num_tokens")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("-o", "--out", type=Path, default=Path("docs/results/prompt_lookup"))
    a = p.parse_args()
    if a.worker:
        print(json.dumps(_one(str(a.model), a.budget, a.lookup, a.prompt_len, a.new_tokens)))
        return 0
    parse_bytes(a.budget)
    runs: list[dict[str, Any]] = []
    for r in range(a.repeat):
        for lookup in (0, a.lookup):
            proc = subprocess.run([sys.executable, __file__, str(a.model), "--budget", a.budget, "--lookup",
                                   str(lookup), "--prompt-len", str(a.prompt_len), "--new-tokens",
                                   str(a.new_tokens), "--worker"], capture_output=True, text=True, check=True)
            res = json.loads(proc.stdout.strip().splitlines()[-1])
            runs.append({"round": r, **res})
            print(f"round {r + 1}: lookup {lookup}: {res['tokens_per_s']:.2f} tokens/s, "
                  f"{res['forward_passes']} forwards", file=sys.stderr, flush=True)
    med = {lk: {k: statistics.median(x[k] for x in runs if x["lookup"] == lk)
                for k in ("tokens_per_s", "total_s", "forward_passes", "bytes_read_per_token")}
           for lk in (0, a.lookup)}
    same = len({tuple(x["tokens"]) for x in runs}) == 1
    result = {"model": str(a.model), "budget": a.budget, "lookup": a.lookup, "prompt_len": a.prompt_len,
              "new_tokens": a.new_tokens, "repeat": a.repeat, "runs": runs, "median": med,
              "speedup": med[a.lookup]["tokens_per_s"] / med[0]["tokens_per_s"], "same_tokens": same}
    a.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(a.out / "results.json", json.dumps(result, indent=1))
    text = (f"{a.model.name}, budget {a.budget}, a {a.prompt_len}-token prompt repeating a "
            f"{a.prompt_len // 4}-token piece, {a.new_tokens} new tokens, median of {a.repeat}: without lookup "
            f"{med[0]['tokens_per_s']:.2f} tokens/s ({med[0]['forward_passes']:.0f} forwards, "
            f"{format_bytes(med[0]['bytes_read_per_token'])} read per forward); prompt_lookup_num_tokens="
            f"{a.lookup}: {med[a.lookup]['tokens_per_s']:.2f} tokens/s ({med[a.lookup]['forward_passes']:.0f} "
            f"forwards) = {result['speedup']:.2f}x; same tokens in every run: {'yes' if same else 'NO'}")
    atomic_write_text(a.out / "results.md", text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
