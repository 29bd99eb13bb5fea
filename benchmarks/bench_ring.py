"""Several devices, one model: tokens/s of ``hermes generate`` on a ring of 1, 2, 4 emulated devices against one
such device, and against the model fully resident in one unconstrained process.

Each device is a cgroup-v1 group (RAM = runtime + a share of the model, page cache included; its own core(s) with
``cpuset`` where the machine has enough; its own disk read bandwidth cap) holding one ``hermes generate --ring``
process with ``--budget auto``; the ranks talk over loopback. Every run starts cold (the checkpoint evicted from the
page cache) in fresh processes; the configurations are interleaved in a shuffled order per round; medians.

    sudo .venv/bin/python benchmarks/bench_ring.py ckpt/llama1b --devices 1,2 --shares 0.25,0.5 \\
        --disk-bw 400MB/s --repeat 3 -o docs/results/ring

Writes results.json and results.md to ``-o``. Every ring run's tokens are checked against the resident run's
(greedy, the same random prompt): a speed-up never compares unverified work.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hermes.atomic import atomic_write_text
from hermes.device import Device, DeviceSpec
from hermes.memory import format_bytes, parse_bytes
from hermes.store import evict_page_cache


def cpu_ticks() -> tuple[int, int]:
    """(ticks this machine's CPUs were stolen by its host, all ticks) so far, from /proc/stat; (0, 0) elsewhere."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return 0, 0
    return (fields[7] if len(fields) > 7 else 0), sum(fields[:8])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def generate_cmd(model: Path, a: argparse.Namespace, ring: tuple[str, int, int] | None, laps: str = "1") -> list[str]:
    cmd = [sys.executable, "-m", "hermes.cli", "generate", str(model), "--budget", "auto", "--random-prompt",
           str(a.prompt), "--max-new-tokens", str(a.new_tokens), "--json", "--io", "direct"]
    if ring is not None:
        address, rank, world = ring
        cmd += ["--ring", address, "--rank", str(rank), "--world-size", str(world), "--ring-timeout", "600",
                "--laps", laps]
    return cmd


def emulated_devices(model: Path, a: argparse.Namespace, world: int, share: float, size: int
                     ) -> tuple[list[Device], int, int]:
    """(``world`` emulated devices of RAM = ``a.runtime`` + ``share`` x the model, ``a.disk_bw`` and
    ``a.cores_per_device`` each; their RAM; their cores)."""
    cores = len(os.sched_getaffinity(0))
    ram = parse_bytes(a.runtime) + int(share * size)
    bw = parse_bytes(a.disk_bw[:-2] if a.disk_bw.lower().endswith("/s") else a.disk_bw, what="--disk-bw")
    per = min(a.cores_per_device, cores)  # devices share cores where the machine has too few
    return [Device(DeviceSpec(ram_bytes=ram, read_bps=bw, cpus=per, first_cpu=(r * per) % cores), model)
            for r in range(world)], ram, per


def write_results(out: Path, results: dict[str, Any], markdown: Callable[[dict[str, Any]], str]) -> None:
    """results.json and results.md (``markdown(results)``, also printed) in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "results.json", json.dumps(results, indent=1))
    atomic_write_text(out / "results.md", markdown(results))
    print(markdown(results))


def plot_ring(results: dict[str, Any], path: Path) -> Path:
    """Decode tokens/s per configuration (devices x share), the resident process as a line."""
    from hermes.plots import _plt, _save

    rows = [r for r in results["summary"] if r["world"] and r.get("decode_tokens_per_s")]
    resident = next((r.get("decode_tokens_per_s") for r in results["summary"] if r["world"] == 0), None)
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3.6))
    labels = [f"{r['world']} x {r['share']:.0%}" + (f"\n{r['laps']} laps" if r["laps"] != "1" else "") for r in rows]
    bars = ax.bar(labels, [r["decode_tokens_per_s"] for r in rows], color=["#4c72b0" if r["world"] == 1 else "#dd8452"
                                                                         for r in rows])
    ax.bar_label(bars, fmt="%.2f", fontsize=8)
    if resident:
        ax.axhline(resident, color="#55a868", linestyle="--", label=f"resident, one process ({resident:.2f})")
        ax.legend(fontsize=8)
    ax.set_ylabel("decode tokens/s")
    ax.set_title(f"{Path(results['model']).name}: devices x RAM (runtime {results['runtime']} + share), "
                 f"{results['new_tokens']} new tokens", fontsize=9)
    return _save(fig, path)


def ring_run(model: Path, a: argparse.Namespace, world: int, share: float, size: int,
             laps: str = "1") -> dict[str, Any]:
    """One generate on ``world`` emulated devices of RAM = runtime + ``share`` x the model each, ``laps`` laps."""
    devices, ram, per = emulated_devices(model, a, world, share, size)
    address = f"127.0.0.1:{free_port()}"
    t0 = time.perf_counter()
    try:
        evict_page_cache(sorted(model.glob("*.safetensors")))
        procs = [subprocess.Popen(generate_cmd(model, a, (address, r, world) if world > 1 else None, laps),
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  preexec_fn=devices[r].preexec) for r in range(world)]
        outs = [p.communicate(timeout=a.timeout) for p in procs]
        oom = [d.oom_killed() for d in devices]
    finally:
        for d in devices:
            d.close()
    out: dict[str, Any] = {"world": world, "share": share, "laps": laps, "device_ram_bytes": ram,
                           "cores_per_device": per,
                           "wall_s": time.perf_counter() - t0, "rc": [p.returncode for p in procs], "oom": oom}
    if procs[0].returncode != 0:
        out["error"] = [e.strip().splitlines()[-1:] for _, e in outs]
        return out
    res = json.loads(outs[0][0])
    out |= {k: res.get(k) for k in ("decode_tokens_per_s", "tokens_per_s", "ttft_s", "tokens")}
    out["ranks"] = [{k: r.get(k) for k in ("rank", "blocks", "parts", "budget_bytes", "weights_peak_bytes",
                                           "bytes_read_per_token", "sent_bytes_per_token", "ring_wait_s_per_token",
                                           "stall_s_per_token", "peak_rss_above_baseline_bytes", "baseline_rss_bytes",
                                           "cpu_s_per_token")}
                    for r in res.get("ring", [res])]
    return out


def resident_run(model: Path, a: argparse.Namespace) -> dict[str, Any]:
    """The model fully resident in one unconstrained process (every core, no cap)."""
    evict_page_cache(sorted(model.glob("*.safetensors")))
    p = subprocess.run(generate_cmd(model, a, None), capture_output=True, text=True, timeout=a.timeout)
    if p.returncode != 0:
        return {"world": 0, "rc": [p.returncode], "error": p.stderr.strip().splitlines()[-1:]}
    res = json.loads(p.stdout)
    keep = ("decode_tokens_per_s", "tokens_per_s", "ttft_s", "tokens")
    return {"world": 0, "share": None, "laps": "1", "rc": [0], **{k: res.get(k) for k in keep}}


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    reference = next((r["tokens"] for r in runs if r["world"] == 0 and r.get("tokens")), None)
    rows = []
    def key_of(r: dict[str, Any]) -> tuple[int, float | None, str]:
        return r["world"], r["share"], str(r.get("laps", "1"))

    for key in sorted({key_of(r) for r in runs}, key=lambda k: (k[1] or 9, k[0], k[2])):
        cell = [r for r in runs if key_of(r) == key]
        ok = [r for r in cell if not r.get("error")]
        row: dict[str, Any] = {"world": key[0], "share": key[1], "laps": key[2], "runs": len(cell),
                               "failed": len(cell) - len(ok),
                               "exact": all(r.get("tokens") == reference for r in ok) if reference else None}
        if ok:
            if all("steal_share" in r for r in ok):
                row["steal_share"] = statistics.median(r["steal_share"] for r in ok)
            row["decode_tokens_per_s"] = statistics.median(r["decode_tokens_per_s"] for r in ok)
            row["ttft_s"] = statistics.median(r["ttft_s"] for r in ok)
            if ok[0].get("ranks"):
                row["ranks"] = [{k: statistics.median(r["ranks"][i][k] or 0 for r in ok)
                                 for k in ok[0]["ranks"][i] if k not in ("rank", "blocks", "parts")}
                                | {"rank": i, "blocks": ok[0]["ranks"][i]["blocks"],
                                   "parts": ok[0]["ranks"][i].get("parts")}
                                for i in range(len(ok[0]["ranks"]))]
        rows.append(row)
    for row in rows:  # ratios against one device of the same share, and the resident process
        one = next((r for r in rows if r["world"] == 1 and r["share"] == row["share"]), None)
        res = next((r for r in rows if r["world"] == 0), None)
        tps = row.get("decode_tokens_per_s")
        if tps and one and one.get("decode_tokens_per_s"):
            row["vs_one_device"] = tps / one["decode_tokens_per_s"]
        if tps and res and res.get("decode_tokens_per_s"):
            row["vs_resident"] = tps / res["decode_tokens_per_s"]
    return rows


def _blocks(k: dict[str, Any]) -> str:
    parts = k.get("parts") or ([k["blocks"]] if k.get("blocks") else None)
    return "all blocks" if not parts else "blocks " + ", ".join(f"{a}..{b - 1}" for a, b in parts)


def to_markdown(results: dict[str, Any]) -> str:
    lines = [f"# Ring: {results['model']} ({format_bytes(results['model_bytes'])}), {results['new_tokens']} new "
             f"tokens after {results['prompt']}, medians of {results['repeat']}", "",
             f"Devices: RAM = {results['runtime']} + share x model, disk {results['disk_bw']} each, "
             f"{results['cores']} core(s) on this machine.", "",
             "| devices | share each | laps | decode tok/s | vs one device | vs resident | first token (s) "
             "| per rank: blocks, read/token, sent/token, ring wait/token, stall/token, CPU/token, RSS above runtime "
             "| CPU s/token, all devices | CPU stolen | exact |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results["summary"]:
        ranks = "; ".join(
            f"{_blocks(k)}, "
            f"{format_bytes(k['bytes_read_per_token'])}, "
            f"{format_bytes(k['sent_bytes_per_token'])}, {k['ring_wait_s_per_token']:.2f} s, "
            f"{k['stall_s_per_token']:.2f} s, "
            + (f"{k['cpu_s_per_token']:.3f} s, " if k.get("cpu_s_per_token") else "–, ")
            + format_bytes(k["peak_rss_above_baseline_bytes"])
            for k in r.get("ranks", []))
        cpu = sum(k.get("cpu_s_per_token") or 0 for k in r.get("ranks", []))
        name = "resident (1 process, no cap)" if r["world"] == 0 else str(r["world"])
        share = "–" if r["share"] is None else f"{r['share']:.0%}"
        laps = r.get("laps", "1") if r["world"] > 1 else "–"
        tps = r.get("decode_tokens_per_s")
        lines.append(f"| {name} | {share} | {laps} | " + (f"{tps:.2f} | " if tps else "failed | "))
        lines[-1] += (f"{r['vs_one_device']:.2f}x | " if "vs_one_device" in r else "– | ") + \
            (f"{r['vs_resident']:.2f}x | " if "vs_resident" in r else "– | ") + \
            (f"{r['ttft_s']:.2f} | " if "ttft_s" in r else "– | ") + f"{ranks or '–'} | " + \
            (f"{cpu:.3f} | " if cpu else "– | ") + \
            (f"{r['steal_share']:.0%} | " if "steal_share" in r else "– | ") + f"{r['exact']} |"
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", type=Path)
    p.add_argument("--devices", default="1,2", help="ring sizes to run (default 1,2)")
    p.add_argument("--shares", default="0.25", help="each device's RAM beyond the runtime, as model shares")
    p.add_argument("--runtime", default="350MiB", help="RAM each device gives the runtime (default 350MiB)")
    p.add_argument("--disk-bw", default="400MB/s", help="each device's disk read bandwidth (default 400MB/s)")
    p.add_argument("--cores-per-device", type=int, default=1, help="cores each device gets (default 1; devices "
                   "beyond the machine's cores share them)")
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--laps", default="1", help="laps of the rings to compare, e.g. 1,auto (default 1)")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--timeout", type=float, default=1200)
    p.add_argument("--no-resident", action="store_true", help="skip the unconstrained resident process")
    p.add_argument("-o", "--out", type=Path, default=Path("docs/results/ring"))
    p.add_argument("--render", action="store_true", help="only write results.md again from -o's results.json")
    a = p.parse_args()
    if a.render:
        results = json.loads((a.out / "results.json").read_text())
        results["summary"] = summarize(results["runs"])
        write_results(a.out, results, to_markdown)
        plot_ring(results, a.out / "ring.png")
        return 0
    size = sum(f.stat().st_size for f in a.model.glob("*.safetensors"))
    cells: list[tuple[int, float | None, str]] = [(int(n), float(s), laps) for s in a.shares.split(",")
                                                  for n in a.devices.split(",")
                                                  for laps in (a.laps.split(",") if int(n) > 1 else ["1"])]
    if not a.no_resident:
        cells.append((0, None, "1"))
    runs: list[dict[str, Any]] = []
    rng = random.Random(0)
    for rnd in range(a.repeat):
        order = cells[:]
        rng.shuffle(order)
        for world, share, laps in order:
            steal, ticks = cpu_ticks()
            r = resident_run(a.model, a) if world == 0 else ring_run(a.model, a, world, share, size, laps)
            steal2, ticks2 = cpu_ticks()  # a shared host's steal: the share of the run the CPUs were not ours
            r["round"], r["steal_share"] = rnd, (steal2 - steal) / max(ticks2 - ticks, 1)
            runs.append(r)
            print(f"round {rnd}: {world or 'resident'} x {share} ({laps} laps): {r.get('decode_tokens_per_s')} tok/s "
                  f"{r.get('error', '')}", file=sys.stderr, flush=True)
    results = {"model": str(a.model), "model_bytes": size, "runtime": a.runtime, "disk_bw": a.disk_bw,
               "prompt": a.prompt, "new_tokens": a.new_tokens, "repeat": a.repeat,
               "cores": len(os.sched_getaffinity(0)), "runs": runs, "summary": summarize(runs)}
    write_results(a.out, results, to_markdown)
    plot_ring(results, a.out / "ring.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
