"""Benchmark harness: each strategy run in a fresh subprocess (clean peak RSS), page cache evicted first,
strategies interleaved (A B A B ...) because the disk and CPU are shared and noisy; medians and ratios.
Writes results.json (every run, machine facts, versions) and results.md."""
from __future__ import annotations

import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from hermes.atomic import atomic_write_text
from hermes.baselines import STRATEGIES, same_outputs
from hermes.device import Device, DeviceSpec, available, device_info
from hermes.errors import HermesError
from hermes.figures import prediction, versus
from hermes.inputs import build_inputs
from hermes.memory import format_bytes, parse_bytes
from hermes.skeleton import load_config
from hermes.store import Store

log = logging.getLogger(__name__)

FORMAT_VERSION = 1


def parse_strategy(spec: str) -> tuple[str, dict[str, str]]:
    """``"pipeload:loaders=1,io=direct"`` -> ("pipeload", {"loaders": "1", "io": "direct"})."""
    name, _, opts = spec.partition(":")
    kw = dict(kv.split("=", 1) for kv in opts.replace(";", ",").split(",") if kv)
    return name, kw


#: the options each strategy takes after its colon (``budget`` overrides --budget for that strategy)
OPTIONS = {"pipeload": ("budget", "loaders", "io"), "sequential": ("budget", "io"), "double-buffer": ("budget", "io"),
           "accelerate": ("budget",), "full": (), "pipeswitch": (), "airllm": ()}


def check_strategies(strategies: list[str], budget: str) -> None:
    """Refuse an unknown strategy, option or value before any run (a bad one would only show as 'cannot run'
    rows after every run)."""
    if not strategies:
        raise HermesError(f"no strategy given; choose from {', '.join(STRATEGIES)}")
    parse_bytes(budget)
    for spec in strategies:
        name, _, opts = spec.partition(":")
        if name not in STRATEGIES:
            raise HermesError(f"unknown strategy {name!r}; choose from {', '.join(STRATEGIES)}")
        for kv in opts.replace(";", ",").split(","):
            if not kv:
                continue
            key, eq, value = kv.partition("=")
            if key not in OPTIONS[name] or not eq:
                takes = ", ".join(f"{k}=" for k in OPTIONS[name]) or "no options"
                raise HermesError(f"strategy {spec!r}: {kv!r} is not an option of {name} (it takes {takes})")
            if key == "budget":
                parse_bytes(value)
            elif key == "loaders" and not (value.isdigit() and int(value) >= 1):
                raise HermesError(f"strategy {spec!r}: loaders must be a whole number >= 1, got {value!r}")
            elif key == "io" and value not in ("buffered", "direct"):
                raise HermesError(f"strategy {spec!r}: io must be buffered or direct, got {value!r}")


def run_worker(args: list[str], device: Device | None = None, timeout: float | None = None,
               on_progress: Callable[[str], None] | None = None, env: dict[str, str] | None = None) -> dict[str, Any]:
    """One strategy run in a fresh process (inside the emulated device's cgroups when given), killed after
    ``timeout`` seconds: under a tight RAM cap a memory-mapped model can page for tens of minutes. Lines the
    worker writes to stderr as ``progress: …`` go to ``on_progress`` as they come; ``env``: variables added to its
    environment."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "hermes.baselines", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **env} if env else None,
                            preexec_fn=device.preexec if device is not None else None)
    err: list[str] = []
    out: list[str] = []

    def drain_err() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            if line.startswith("progress: ") and on_progress is not None:
                on_progress(line[len("progress: "):].rstrip())
            err.append(line)

    def drain_out() -> None:
        assert proc.stdout is not None
        out.append(proc.stdout.read())

    readers = [threading.Thread(target=f, daemon=True) for f in (drain_err, drain_out)]
    for t in readers:
        t.start()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return {"error": f"did not finish within {timeout:.0f} s (killed)", "timed_out": True}
    finally:
        for t in readers:
            t.join(5)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        if device is not None and (proc.returncode == -9 or device.oom_killed()):
            return {"error": f"killed by the emulated RAM cap ({device.spec.describe()})", "oom": True}
        return {"error": ("".join(err).strip().splitlines() or ["failed"])[-1]}
    return {**json.loads("".join(out).strip().splitlines()[-1]), "process_s": wall}


def _run_once(args: list[str], spec: DeviceSpec | None, data_path: str | os.PathLike[str],
              timeout: float | None = None, on_progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    if spec is None or spec.empty:
        return run_worker(args, timeout=timeout, on_progress=on_progress)
    with Device(spec, data_path) as dev:  # fresh groups per run: peak and OOM counters start at zero
        return run_worker(args, dev, timeout, on_progress)


def machine_facts() -> dict[str, Any]:
    """The profiler's machine facts plus the software versions a results file should record."""
    import transformers

    from hermes.profile import machine_facts as core_facts

    return {**core_facts(), "platform": platform.platform(), "python": platform.python_version(),
            "transformers": transformers.__version__}


def planned(spec: str) -> bool:
    """A ``pipeload`` spec that names no engine setting runs the planner's plan for its budget."""
    name, kw = parse_strategy(spec)
    return name == "pipeload" and not kw.keys() & {"loaders", "io"}


def _args(spec: str, model_dir: str | os.PathLike[str], budget: str, seq_len: int, work_dir: str,
          profile: str | None = None) -> list[str]:
    name, kw = parse_strategy(spec)
    if name not in STRATEGIES:
        raise HermesError(f"unknown strategy {name!r}; choose from {', '.join(STRATEGIES)}")
    args = [name, str(model_dir), "--budget", str(budget), "--seq-len", str(seq_len), "--work-dir", work_dir]
    if name == "pipeload":
        args.append("--timeline")
    if planned(spec) and profile is not None:
        args += ["--profile", profile]
    return args + [a for k, v in kw.items() for a in (f"--{k}", v)]


def _without_ram_cap(spec: DeviceSpec | None) -> DeviceSpec | None:
    return replace(spec, ram_bytes=None) if spec is not None else None


def _profile(strategies: list[str], model_dir: str | os.PathLike[str], seq_len: int, spec: DeviceSpec | None,
             work: str, progress: Callable[[str], None] | None) -> dict[str, Any] | None:
    """Profile once on the (emulated) device when a planned ``pipeload`` is compared; None otherwise. Without the
    RAM cap: the profiler's own passes use a larger budget than the one being compared."""
    if not any(planned(s) for s in strategies):
        return None
    if spec is None or spec.empty:  # the machine as it is: a profile cached for this input and machine serves
        from hermes.profile import cached_profile, default_profile_path

        shape = {k: list(v.shape) for k, v in
                 build_inputs(model_dir, load_config(model_dir), random_seq_len=seq_len).items()}
        cached = cached_profile(model_dir, shape)
        if cached is not None:
            path = default_profile_path(model_dir, cached.key)
            if progress:
                progress(f"using the cached profile {path} for pipeload's plan (`hermes profile` re-makes it)")
            return {"profile": str(path), "key": cached.key, "seconds": 0.0, "cached": True}
    if progress:
        progress("profiling the model for pipeload's plan (not timed; a few minutes for a large model)")
    res = _run_once(["profile", str(model_dir), "--seq-len", str(seq_len), "--profile",
                     str(Path(work) / "profile.json")], _without_ram_cap(spec), model_dir,
                    on_progress=(lambda msg: progress(f"profiling: {msg}")) if progress else None)
    if "error" in res:
        raise HermesError(f"profiling for the planned pipeload failed: {res['error']}")
    return res


def run_benchmark(model_dir: str | os.PathLike[str], *, strategies: list[str], budget: str, seq_len: int = 128,
                  repeat: int = 3, bounds: bool = True, device: DeviceSpec | None = None,
                  work_dir: str | os.PathLike[str] | None = None, timeout: float | None = 1800,
                  progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run every strategy ``repeat`` times, interleaved, each in a fresh subprocess with a cold page cache,
    inside an emulated device (cgroup v1) when ``device`` is given and emulation is possible here; a run
    taking longer than ``timeout`` seconds is killed and reported."""
    check_strategies(strategies, budget)
    build_inputs(model_dir, load_config(model_dir), random_seq_len=seq_len)  # a bad input fails now, not per run
    dev = device_info(device)
    if dev.get("skipped_because"):
        log.warning("device emulation skipped: %s", dev["skipped_because"])
    spec = device if dev["emulated"] else None
    with tempfile.TemporaryDirectory(dir=work_dir, prefix="hermes-bench-") as work:
        prof = _profile(strategies, model_dir, seq_len, spec, work, progress)
        runs: list[dict[str, Any]] = []
        for r in range(repeat):
            for i, s in enumerate(strategies):
                if progress:
                    progress(f"run {r * len(strategies) + i + 1}/{repeat * len(strategies)}: {s} (repeat {r + 1})")
                res = _run_once(_args(s, model_dir, budget, seq_len, work, prof and prof["profile"]), spec, model_dir,
                                timeout)
                runs.append({"spec": s, "repeat": r, **res})
    result: dict[str, Any] = {"format_version": FORMAT_VERSION, "model_dir": str(model_dir), "budget": budget,
                              "model_bytes": Store(model_dir).nbytes, "seq_len": seq_len, "repeat": repeat,
                              "machine": machine_facts(), "device": dev, "runs": runs}
    if prof is not None:
        result["profile"] = {"key": prof["key"], "seconds": prof["seconds"], "cached": prof.get("cached", False)}
    if bounds:
        if progress:
            progress("lower bound: per-unit compute (weights resident) and best cold read bandwidth")
        # the bound needs every unit's weights resident at once to time compute; a RAM cap does not change
        # what it bounds (compute and read bandwidth), so it runs with the device's disk and cores only
        result["bounds"] = _run_once(["bounds", str(model_dir), "--seq-len", str(seq_len)], _without_ram_cap(spec),
                                     model_dir)
    result["summary"] = summarize(result)
    seconds, basis = lower_bound(result)
    if seconds is not None:
        result["lower_bound"] = {"seconds": seconds, "basis": basis}
    return result


def find_min_ram(model_dir: str | os.PathLike[str], strategy: str, *, budget: str, seq_len: int = 128,
                 device: DeviceSpec | None = None, low: int = 64 * 2**20, high: int | None = None,
                 tolerance: float = 0.05, slowdown: float = 5.0, work_dir: str | os.PathLike[str] | None = None,
                 progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Smallest emulated RAM cap (page cache included) at which ``strategy`` completes, by bisection between
    ``low`` and ``high`` (default: twice the model plus 2 GiB) to within ``tolerance``. Each probe is a fresh
    run with a cold page cache. "Completes" means within ``slowdown`` times the run at ``high`` (at least
    60 s): under a tight cap a memory-mapped model (``full`` loads safetensors that way) pages weights in and
    out and may finish only after tens of minutes; such a probe is killed and counts as not completing."""
    base = device or DeviceSpec()
    why = available(DeviceSpec(ram_bytes=1, read_bps=base.read_bps, cpus=base.cpus))
    if why is not None:
        raise HermesError(f"--find-min-ram needs cgroup v1 memory control: {why}")
    high = high or 2 * Store(model_dir).nbytes + 2 * 2**30
    probes: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(dir=work_dir, prefix="hermes-minram-") as work:
        prof = _profile([strategy], model_dir, seq_len, device, work, progress)

        limit: float | None = None  # set from the run at ``high``

        def ok(cap: int) -> bool:
            if progress:
                progress(f"{strategy}: RAM cap {format_bytes(cap)}")
            res = _run_once(_args(strategy, model_dir, budget, seq_len, work, prof and prof["profile"]),
                            DeviceSpec(ram_bytes=cap, read_bps=base.read_bps, cpus=base.cpus), model_dir, limit)
            probes.append({"ram_bytes": cap, "ok": "error" not in res, "error": res.get("error"),
                           "latency_s": res.get("latency_s"), "process_s": res.get("process_s")})
            return "error" not in res

        if not ok(high):
            return {"strategy": strategy, "min_ram_bytes": None, "probes": probes,
                    "error": f"does not complete even with {format_bytes(high)}"}
        limit = max(60.0, slowdown * probes[0]["process_s"])
        while high - low > tolerance * high:
            mid = (low + high) // 2
            if ok(mid):
                high = mid
            else:
                low = mid
    at_min = next(pr for pr in probes if pr["ram_bytes"] == high)
    return {"strategy": strategy, "min_ram_bytes": high, "latency_at_min_s": at_min["latency_s"],
            "time_limit_s": limit, "slowdown": slowdown, "probes": probes}


def summarize(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Median latency / peak memory per strategy, and ratios to ``full`` and to the lower bound."""
    out: dict[str, dict[str, Any]] = {}
    for spec in dict.fromkeys(r["spec"] for r in result["runs"]):
        ok = [r for r in result["runs"] if r["spec"] == spec and "error" not in r]
        if not ok:
            out[spec] = {"error": next(r["error"] for r in result["runs"] if r["spec"] == spec)}
            continue
        s: dict[str, Any] = {"n": len(ok)}
        if "plan" in ok[0]:
            s["plan"] = ok[0]["plan"]
        for key in ("latency_s", "load_s", "forward_s", "stall_s", "peak_rss_above_baseline_bytes",
                    "weights_peak_bytes", "peak_rss_bytes", "baseline_rss_bytes"):
            vals = [r[key] for r in ok if key in r]
            if vals:
                s[key] = statistics.median(vals)
        out[spec] = s
    for spec, (same, ref) in same_outputs(result["runs"]).items():
        out[spec] |= {"same_output": same, "output_reference": ref}
    full = out.get("full", {})
    ps = out.get("pipeswitch", {})
    bound = lower_bound(result)[0]
    for s in out.values():
        if "latency_s" in s and "latency_s" in full:
            s["latency_vs_full"] = s["latency_s"] / full["latency_s"]
            s["memory_vs_full"] = s["peak_rss_above_baseline_bytes"] / full["peak_rss_above_baseline_bytes"]
        if "latency_s" in s and "latency_s" in ps:
            s["speedup_vs_pipeswitch"] = ps["latency_s"] / s["latency_s"]
            s["memory_reduction_vs_pipeswitch"] = 1 - (s["peak_rss_above_baseline_bytes"]
                                                       / ps["peak_rss_above_baseline_bytes"])
        if "forward_s" in s and bound:
            s["forward_vs_lower_bound"] = s["forward_s"] / bound
        if "forward_s" in s and s.get("plan", {}).get("predicted_latency_s"):  # hermes.figures.prediction
            s["forward_prediction"] = prediction(s["plan"]["predicted_latency_s"], s["forward_s"], "plan")
    return out


def lower_bound(result: dict[str, Any]) -> tuple[float | None, str]:
    """(seconds, how it was made) of the lower bound on a cold forward: max(Σ load at the best cold read
    bandwidth, Σ compute of a warm pass with every weight resident) + the first unit's load. (Full's own first
    forward in a fresh process is no bound: on GPT-2 it took 0.49 s where a planned pipeload's took 0.40 s.)"""
    b = result.get("bounds") or {}
    if "lower_bound_s" not in b:
        return None, ""
    return b["lower_bound_s"], f"Σ compute of a warm pass with weights resident {b['sum_compute_s']:.3f} s"


def to_markdown(result: dict[str, Any]) -> str:
    dev = result.get("device") or {}
    where = (f"emulated device: {dev['describe']}" if dev.get("emulated") else
             f"device emulation skipped ({dev['skipped_because']})" if dev.get("skipped_because") else
             "no device emulation")
    size = result.get("model_bytes", 0)
    whole = f" (more than the model's {format_bytes(size)}; the weights get what activations and slack leave)" \
        if size and parse_bytes(result["budget"]) > size else ""
    lines = [f"Model `{result['model_dir']}`, input length {result['seq_len']}, budget {result['budget']}"
             f"{whole}, median of {result['repeat']} cold runs per strategy (fresh process each, interleaved); "
             f"{where}.", "",
             "| strategy | first output (s) | of which load (s) | forward (s) | stall (s) | peak RSS above baseline "
             "| weights peak | speedup vs pipeswitch | memory reduction vs pipeswitch | latency vs full "
             "| memory vs full | forward vs lower bound | same output |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for spec, s in result["summary"].items():
        if "error" in s:
            lines.append(f"| {spec} | cannot run: {s['error']} ||||||||||||")
            continue

        def f(k: str, fmt: str = "{:.3f}", s: dict = s) -> str:
            return fmt.format(s[k]) if k in s else "–"

        label = spec + (f" ({_plan_label(s)})" if "plan" in s else "")
        lines.append(f"| {label} | {f('latency_s')} | {f('load_s')} | {f('forward_s')} | {f('stall_s')} | "
                     f"{format_bytes(s['peak_rss_above_baseline_bytes'])} | "
                     f"{format_bytes(s['weights_peak_bytes']) if 'weights_peak_bytes' in s else '–'} | "
                     f"{f('speedup_vs_pipeswitch', '{:.2f}x')} | {f('memory_reduction_vs_pipeswitch', '{:.1%}')} | "
                     f"{f('latency_vs_full', '{:.2f}x')} | {f('memory_vs_full', '{:.1%}')} | "
                     f"{f('forward_vs_lower_bound', '{:.2f}x')} | {_same(s)} |")
    b = result.get("bounds")
    if b and "error" not in b:
        bw = ", ".join(f"{k} {v / 1e9:.2f}" for k, v in b["read_bandwidth_bps"].items())
        bound, basis = lower_bound(result)
        lines += ["", f"Lower bound on a cold forward max(Σ load, compute) + first load = **{bound:.3f} s** "
                      f"({basis}; Σ load at the best cold bandwidth {b['best_bandwidth_bps'] / 1e9:.2f} GB/s = "
                      f"{b['sum_load_s']:.3f} s). Cold read bandwidth by mode x readers (GB/s): {bw}."]
    if result.get("min_ram"):
        lines += ["", "Smallest emulated RAM cap (page cache included) at which each strategy completes:", "",
                  "| strategy | min RAM | first output at that cap (s) | probes |", "|---|---|---|---|"]
        for mr in result["min_ram"]:
            found = format_bytes(mr["min_ram_bytes"]) if mr.get("min_ram_bytes") else f"– ({mr.get('error')})"
            at = mr.get("latency_at_min_s")
            lines.append(f"| {mr['strategy']} | {found} | {f'{at:.2f}' if at else '–'} | {len(mr['probes'])} |")
        timed = [mr for mr in result["min_ram"] if mr.get("time_limit_s")]
        if timed:
            limits = ", ".join(f"{mr['time_limit_s']:.0f} s" for mr in timed)
            lines += ["", f"A probe counts as completing when it finishes within {timed[0]['slowdown']:g}x its time "
                          f"at ample RAM (limits {limits}); slower ones were paging weights in and out and were "
                          "killed."]
    m = result["machine"]
    lines += ["", f"Machine: {m['cpu']}, {m['cpus']} cores, torch {m['torch']} ({m['torch_threads']} threads), "
                  f"transformers {m['transformers']}."]
    return "\n".join(lines) + "\n"


def _same(s: dict[str, Any]) -> str:
    same = s.get("same_output")
    return "–" if same is None else "yes" if same else f"**no** (differs from {s.get('output_reference')})"


def _plan_label(s: dict[str, Any]) -> str:
    """A planned strategy's settings, and its forward time beside the plan's prediction."""
    pl = s["plan"]
    seen = (f"; forward {s['forward_s']:.3f} s {versus(s['forward_prediction'], fmt=lambda v: f'{v:.3f} s')}"
            if "forward_prediction" in s else "")
    return (f"plan: {pl['loaders']} loader(s), {pl['io']}, prefetch {_prefetch(pl['prefetch'])}, "
            f"weights ≤ {format_bytes(pl['budget'])}{seen}")


def _prefetch(depth: int | None) -> str:
    return "budget" if depth is None else "0 (sequential)" if depth == 0 else str(depth)


def write_results(result: dict[str, Any], out_dir: str | os.PathLike[str]) -> tuple[Path, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "results.json", json.dumps(result, indent=2))
    atomic_write_text(out / "results.md", to_markdown(result))
    return out / "results.json", out / "results.md"
