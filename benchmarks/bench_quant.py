"""Quantized generation against llama.cpp at equal device RAM (issue 20): hermes bf16 / int8 / int4 against
llama.cpp bf16 / Q8_0 / Q4_0 (memory-mapped GGUF, its default settings, 2 threads), greedy, 32 new tokens after a
64-token random prompt, on emulated devices whose RAM (page cache included) is 350 MiB + 10/25/50/100 % of the
16-bit checkpoint's tensor bytes; hermes finds its budget itself (``--budget auto``).

Each run is a fresh process in fresh cgroups, the files it reads evicted from the page cache first; cells are
interleaved in a shuffled order per round; medians over rounds. What each run produced is checked: every hermes
run's tokens against the same checkpoint held whole by transformers (``from_pretrained``, run once, uncapped): the
16-bit model for bf16, the same quantized model for int8/int4. llama.cpp's tokens cannot be compared with
transformers' (other kernels round differently); its runs are checked to have produced every token.

Set-up (llama.cpp from the llama-cpp-python 0.3.36 sdist; see benchmarks/llamacpp/README.md):

    hermes synth llama-3.2-1b ckpt/llama1b --dtype bfloat16
    # GGUF: llama.cpp's convert_hf_to_gguf.py --outtype bf16, then llamacpp_quantize ... Q8_0 / Q4_0
    hermes quantize ckpt/llama1b ckpt/llama1b-int8 --bits 8
    hermes convert llama1b-q4_0.gguf ckpt/llama1b-int4          # the same 4-bit integers llama.cpp reads
    sudo .venv/bin/python benchmarks/bench_quant.py --bf16 ckpt/llama1b --int8 ckpt/llama1b-int8 \\
        --int4 ckpt/llama1b-int4 --gguf-bf16 llama1b-bf16.gguf --gguf-q8 llama1b-q8_0.gguf \\
        --gguf-q4 llama1b-q4_0.gguf --llamacpp-gen bin/llamacpp_gen --repeat 3 -o docs/results/quant
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from hermes.atomic import atomic_write_text
from hermes.memory import format_bytes, parse_bytes
from hermes.store import Store, evict_page_cache

FRACTIONS = (1.0, 0.5, 0.25, 0.10)
WIDTHS = {"bf16": "bf16", "int8": "q8", "int4": "q4"}  # hermes width -> the llama.cpp file of that width


def hermes_run(model_dir: Path, ram: int | None, args: argparse.Namespace, strategy: str = "hermes",
               env: dict[str, str] | None = None) -> dict:
    from hermes.bench import run_worker
    from hermes.device import Device, DeviceSpec

    cmd = [f"gen-{strategy}", str(model_dir), "--budget", "auto" if strategy == "hermes" else str(2**40),
           "--prompt-len", str(args.prompt_len), "--new-tokens", str(args.new_tokens), "--loaders", "1",
           "--io", "direct"]
    if ram is None:
        return run_worker(cmd, timeout=args.timeout, env=env)
    with Device(DeviceSpec(ram_bytes=ram), model_dir) as dev:
        return run_worker(cmd, dev, args.timeout, env=env)


def llamacpp_run(gguf: Path, ram: int, args: argparse.Namespace) -> dict:
    """llama.cpp at its best setting for the device: its default first (weights repacked for the CPU's kernels
    where the type has such a layout, Q4_0 on AVX2: an anonymous copy of those weights); when the RAM cap kills
    that, again with the repacking off (the weights then stay memory-mapped)."""
    if args.llamacpp_no_repack:
        return {**_llamacpp_once(gguf, ram, args, repack=False), "setting": "no repacking"}
    res = _llamacpp_once(gguf, ram, args, repack=True)
    if res.get("oom"):
        res = {**_llamacpp_once(gguf, ram, args, repack=False), "setting": "no repacking (the default was "
               "killed by the RAM cap)"}
    return res


def _llamacpp_once(gguf: Path, ram: int, args: argparse.Namespace, *, repack: bool) -> dict:
    from hermes.device import Device, DeviceSpec

    evict_page_cache([gguf])
    cmd = [str(args.llamacpp_gen), str(gguf), str(args.prompt_len), str(args.new_tokens), str(args.threads), "0",
           "1" if repack else "0"]
    with Device(DeviceSpec(ram_bytes=ram), gguf) as dev:
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=dev.preexec)
        try:
            out, err = p.communicate(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.communicate()
            return {"error": f"did not finish within {args.timeout:.0f} s (killed)", "timed_out": True}
        if p.returncode != 0:
            oom = p.returncode == -9 or dev.oom_killed()
            return {"error": "killed by the RAM cap" if oom else (err.strip().splitlines() or ["failed"])[-1],
                    "oom": oom}
    res = json.loads([line for line in out.splitlines() if line.startswith("{")][-1])
    return {**res, "process_s": time.perf_counter() - t0, "peak_rss_bytes": res["maxrss_bytes"]}


def main() -> int:
    p = argparse.ArgumentParser()
    for w in WIDTHS:
        p.add_argument(f"--{w}", type=Path, help=f"hermes checkpoint ({w})")
    for f in ("bf16", "q8", "q4"):
        p.add_argument(f"--gguf-{f}", type=Path, help=f"llama.cpp GGUF ({f})")
    p.add_argument("--llamacpp-gen", type=Path, help="benchmarks/llamacpp/llamacpp_gen built against llama.cpp")
    p.add_argument("--hermes", action="append", default=[], metavar="NAME=DIR",
                   help="one more hermes checkpoint, reported as hermes-NAME (e.g. int4-head4=ckpt/llama1b-q4)")
    p.add_argument("--hermes-env", action="append", default=[], metavar="NAME=KEY=VALUE",
                   help="an environment variable of system hermes-NAME's runs (e.g. int4-full=HERMES_LEAN_IMPORTS=0 "
                        "with --hermes int4-full=DIR: the runtime before hermes.lean)")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runtime", default="350MiB")
    p.add_argument("--fractions", default=",".join(str(f) for f in FRACTIONS))
    p.add_argument("--only", default="", help="comma-separated systems (default: every one given)")
    p.add_argument("--timeout", type=float, default=300)
    p.add_argument("--llamacpp-no-repack", action="store_true", help="llama.cpp with its weight repacking off (its "
                   "best setting where the repacked copy does not fit: the default is then killed or thrashes)")
    p.add_argument("--append", action="store_true", help="add these runs to OUT/results.json")
    p.add_argument("-o", "--out", type=Path, default=Path("docs/results/quant"))
    args = p.parse_args()
    size = Store(args.bf16).nbytes  # the 16-bit checkpoint's tensor bytes: the device sizes' unit
    runtime = parse_bytes(args.runtime)
    systems: dict[str, tuple[str, Path]] = {}
    for w in WIDTHS:
        if getattr(args, w):
            systems[f"hermes-{w}"] = ("hermes", getattr(args, w))
    for extra in args.hermes:
        name, _, path = extra.partition("=")
        systems[f"hermes-{name}"] = ("hermes", Path(path))
    for f in ("bf16", "q8", "q4"):
        if getattr(args, f"gguf_{f}") and args.llamacpp_gen:
            systems[f"llama.cpp-{f}"] = ("llamacpp", getattr(args, f"gguf_{f}"))
    args.envs = {}
    for item in args.hermes_env:
        name, _, var = item.partition("=")
        key, _, value = var.partition("=")
        if f"hermes-{name}" not in systems or not key:
            p.error(f"--hermes-env {item}: expected NAME=KEY=VALUE for a system hermes-NAME given")
        args.envs.setdefault(f"hermes-{name}", {})[key] = value
    if args.only:
        systems = {k: v for k, v in systems.items() if k in args.only.split(",")}
    if args.append and (args.out / "results.json").exists():  # more cells into an earlier run's results
        results = json.loads((args.out / "results.json").read_text())
        return _measure(results, systems, args, runtime, size)
    results: dict[str, Any] = {"model_bytes": size, "runtime_bytes": runtime, "prompt_len": args.prompt_len,
                               "new_tokens": args.new_tokens, "threads": args.threads, "repeat": args.repeat,
                               "files_bytes": {s: _bytes(path) for s, (_, path) in systems.items()},
                               "reference": {}, "runs": []}
    return _measure(results, systems, args, runtime, size)


def _measure(results: dict[str, Any], systems: dict[str, tuple[str, Path]], args: argparse.Namespace, runtime: int,
             size: int) -> int:
    for s, (kind, path) in systems.items():
        results["files_bytes"][s] = _bytes(path)
        if kind == "hermes" and s not in results["reference"]:  # what it must produce: transformers, held whole
            ref = hermes_run(path, None, args, strategy="full", env=args.envs.get(s))
            results["reference"][s] = {k: ref.get(k) for k in ("tokens", "decode_tokens_per_s", "error")}
    cells = [(s, f) for f in (float(x) for x in args.fractions.split(",")) for s in systems]
    rng = random.Random(len(results["runs"]))
    first = max((r["round"] for r in results["runs"]), default=-1) + 1 if args.append else 0
    for r in range(first, first + args.repeat):
        order = cells[:]
        rng.shuffle(order)
        for s, f in order:
            kind, path = systems[s]
            ram = runtime + int(f * size)
            print(f"round {r + 1}/{first + args.repeat}: {s} at {f:.0%} (device {format_bytes(ram)})", file=sys.stderr,
                  flush=True)
            res = hermes_run(path, ram, args, env=args.envs.get(s)) if kind == "hermes" \
                else llamacpp_run(path, ram, args)
            res = {**res, "system": s, "fraction": f, "device_ram_bytes": ram, "round": r}
            res["checked"] = _check(res, results["reference"].get(s), args.new_tokens)
            results["runs"].append(res)
            print(f"  -> {res.get('decode_tokens_per_s', 0):.2f} tok/s after the first, {res['checked']}"
                  if "error" not in res else f"  -> {res['error']}", file=sys.stderr, flush=True)
            results["summary"] = summarize(results["runs"])
            write(results, args.out)
    return 0


def _bytes(path: Path) -> int:
    return path.stat().st_size if path.is_file() else Store(path).nbytes


def _check(res: dict, ref: dict | None, new_tokens: int) -> str:
    """'same tokens as transformers', 'N tokens' (llama.cpp), or what went wrong."""
    if "error" in res:
        return "failed"
    toks = res.get("tokens") or []
    if ref is None:
        return f"{len(toks)} tokens" if len(toks) == new_tokens else f"only {len(toks)} of {new_tokens} tokens"
    return "same tokens as transformers" if toks == ref.get("tokens") else "TOKENS DIFFER from transformers"


def summarize(runs: list[dict]) -> list[dict]:
    out = []
    for f in sorted({r["fraction"] for r in runs}, reverse=True):
        for s in dict.fromkeys(r["system"] for r in runs):
            mine = [r for r in runs if r["fraction"] == f and r["system"] == s]
            if not mine:
                continue
            ok = [r for r in mine if "error" not in r]

            def med(k: str, ok: list[dict] = ok) -> float | None:
                vals = [r[k] for r in ok if r.get(k) is not None]
                return statistics.median(vals) if vals else None

            out.append({"system": s, "fraction": f, "device_ram_bytes": mine[0]["device_ram_bytes"],
                        "ok": len(ok), "runs": len(mine), "decode_tokens_per_s": med("decode_tokens_per_s"),
                        "ttft_s": med("ttft_s"), "peak_rss_bytes": med("peak_rss_bytes"),
                        "bytes_read_per_token": med("bytes_read_per_token"),
                        "checked": sorted({r["checked"] for r in mine}),
                        "errors": sorted({r["error"].split(":")[0] for r in mine if "error" in r})})
    return out


def to_markdown(results: dict) -> str:
    summ = results["summary"]
    lines = ["| device RAM | system | ok/runs | decode tok/s (median) | first token s | peak RSS | read per token | "
             "checked |", "|---|---|---|---|---|---|---|---|"]
    def fmt(v: float | None, d: int = 2) -> str:
        return "–" if v is None else f"{v:.{d}f}"

    for c in summ:
        lines.append(f"| {c['fraction']:.0%} ({format_bytes(c['device_ram_bytes'])}) | {c['system']} | "
                     f"{c['ok']}/{c['runs']} | {fmt(c['decode_tokens_per_s'])} | {fmt(c['ttft_s'])} | "
                     f"{format_bytes(c['peak_rss_bytes']) if c['peak_rss_bytes'] else '–'} | "
                     f"{format_bytes(c['bytes_read_per_token']) if c['bytes_read_per_token'] else '–'} | "
                     f"{'; '.join(c['checked'] + c['errors'])} |")
    lines += ["", "| device RAM | width | hermes / llama.cpp (decode) | hermes int4 / hermes bf16 |",
              "|---|---|---|---|"]
    by = {(c["fraction"], c["system"]): c["decode_tokens_per_s"] for c in summ}
    for f in sorted({c["fraction"] for c in summ}, reverse=True):
        for w, q in WIDTHS.items():
            h, lc = by.get((f, f"hermes-{w}")), by.get((f, f"llama.cpp-{q}"))
            ratio = f"{h / lc:.2f}x" if h and lc else "–"
            i4, b16 = by.get((f, "hermes-int4")), by.get((f, "hermes-bf16"))
            own = f"{i4 / b16:.2f}x" if w == "int4" and i4 and b16 else ""
            lines.append(f"| {f:.0%} | {w} | {ratio} | {own} |")
    return "\n".join(lines) + "\n"


def write(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "results.json", json.dumps(results, indent=1))
    atomic_write_text(out / "results.md", to_markdown(results))


if __name__ == "__main__":
    sys.exit(main())
