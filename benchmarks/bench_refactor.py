"""Before/after figures of a refactor of the engine: the same CLI commands from two source trees, interleaved
(A B B A per round), each a fresh cold process; medians. Writes JSON.

    python benchmarks/bench_refactor.py --before /tmp/before/src --after src \\
        --bert ckpt/bert-large --gpt2 ckpt/gpt2 --rounds 3 -o results/refactor.json

``--before`` is the ``src`` folder of a checkout of the earlier commit (``git worktree add /tmp/before <commit>``).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path


def _run(src: str, args: list[str]) -> dict:
    env = {**os.environ, "PYTHONPATH": str(Path(src).resolve())}
    cli = "import sys; from hermes.cli import main; sys.exit(main(sys.argv[1:]))"
    out = subprocess.run([sys.executable, "-c", cli, *args], env=env, capture_output=True, text=True, check=True,
                         timeout=900)
    return json.loads(out.stdout)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", required=True)
    ap.add_argument("--after", required=True)
    ap.add_argument("--bert", required=True, help="a BERT-Large checkpoint (hermes synth bert-large)")
    ap.add_argument("--gpt2", required=True, help="a GPT-2 checkpoint (hermes synth gpt2)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("-o", "--output", type=Path, default=None)
    a = ap.parse_args()
    jobs = {
        "bert_forward": ["run", a.bert, "--budget", "300MiB", "--loaders", "2", "--random-input", "128", "--cold",
                         "--json"],
        "gpt2_generate": ["generate", a.gpt2, "--budget", "300MiB", "--random-prompt", "64", "--max-new-tokens",
                          "32", "--cold", "--json"],
    }
    got: dict[str, dict[str, list[dict]]] = {j: {"before": [], "after": []} for j in jobs}
    for r in range(a.rounds):
        order = ["before", "after"] if r % 2 == 0 else ["after", "before"]
        for job, args in jobs.items():
            for side in order:
                res = _run(a.before if side == "before" else a.after, args)
                got[job][side].append(res)
                print(f"round {r + 1} {job} {side}: {_figure(job, res)}", file=sys.stderr)
    summary = {}
    for job in jobs:
        summary[job] = {}
        for side in ("before", "after"):
            figs = [_figure(job, res) for res in got[job][side]]
            summary[job][side] = {k: statistics.median(f[k] for f in figs) for k in figs[0]}
    print(json.dumps(summary, indent=2))
    if a.output:
        a.output.parent.mkdir(parents=True, exist_ok=True)
        a.output.write_text(json.dumps({"summary": summary, "runs": got}, indent=1, default=str))
    return 0


def _figure(job: str, res: dict) -> dict[str, float]:
    if job == "bert_forward":
        return {"latency_s": res["latency_s"], "open_s": res["open_s"],
                "peak_rss_above_baseline_mib": res["peak_rss_above_baseline_bytes"] / 2**20}
    return {"ttft_s": res["ttft_s"], "decode_tokens_per_s": res["decode_tokens_per_s"],
            "weights_peak_mib": res["weights_peak_bytes"] / 2**20}


if __name__ == "__main__":
    raise SystemExit(main())
