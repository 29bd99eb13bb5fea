"""PNG plots of a benchmark's results.json: latency and memory per strategy, latency against memory (the
trade-off), the PipeLoad timeline (a Gantt chart of load / compute / free per unit and agent) and memory over
time against the budget line.
``hermes plot results.json`` redraws them."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from hermes.atomic import atomic_path
from hermes.errors import HermesError


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png")
    _plt().close(fig)
    return path


def plot_bars(result: dict[str, Any], path: Path) -> Path:
    """Median latency and peak RSS above baseline per strategy (failed strategies are marked)."""
    plt = _plt()
    summary = result["summary"]
    names = list(summary)
    lat = [summary[n].get("latency_s", 0.0) for n in names]
    mem = [summary[n].get("peak_rss_above_baseline_bytes", 0) / 2**20 for n in names]
    fig, (a, b) = plt.subplots(1, 2, figsize=(max(8, 1.6 * len(names)), 4))
    colors = ["tab:red" if "error" in summary[n] else ("tab:blue" if n.startswith("pipeload") else "tab:gray")
              for n in names]
    a.bar(names, lat, color=colors)
    a.set_ylabel("first output (s), median")
    b.bar(names, mem, color=colors)
    b.set_ylabel("peak RSS above baseline (MiB), median")
    for ax in (a, b):
        ax.tick_params(axis="x", rotation=30)
        for i, n in enumerate(names):
            if "error" in summary[n]:
                ax.text(i, 0, "failed", ha="center", va="bottom", color="tab:red", rotation=90)
    dev = result.get("device") or {}
    fig.suptitle(f"{Path(result['model_dir']).name}, budget {result['budget']}"
                 + (f", emulated {dev['describe']}" if dev.get("emulated") else ""))
    return _save(fig, path)


def plot_tradeoff(result: dict[str, Any], path: Path) -> Path:
    """Median latency against median peak RSS, one point per strategy that ran: lower left is better."""
    plt = _plt()
    summary = {n: s for n, s in result["summary"].items() if "error" not in s and "latency_s" in s}
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for n, s in summary.items():
        x, y = s.get("peak_rss_above_baseline_bytes", 0) / 2**20, s["latency_s"]
        ax.scatter([x], [y], color="tab:blue" if n.startswith("pipeload") else "tab:gray", zorder=3)
        ax.annotate(n, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel("peak RSS above baseline (MiB), median")
    ax.set_ylabel("first output (s), median")
    ax.set_xlim(left=0)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.set_title(f"{Path(result['model_dir']).name}: latency vs memory (lower left is better)")
    return _save(fig, path)


def _timeline_run(result: dict[str, Any]) -> dict[str, Any] | None:
    return next((r for r in result["runs"] if r.get("events") and "error" not in r), None)


def plot_timeline(run: dict[str, Any], path: Path) -> Path:
    """Gantt chart of one PipeLoad pass: per unit, its load (colored by loading agent) and its compute."""
    plt = _plt()
    events = run["events"]
    fig, ax = plt.subplots(figsize=(10, max(3, 0.22 * len(events) + 1)))
    cmap = plt.get_cmap("tab10")
    for row, e in enumerate(events):
        if e.get("load_start") is not None and e.get("load_end") is not None:
            ax.barh(row, e["load_end"] - e["load_start"], left=e["load_start"], height=0.4, align="edge",
                    color=cmap((e.get("agent") or 0) % 10), label=f"load, agent {e.get('agent')}")
        if e.get("compute_start") is not None and e.get("compute_end") is not None:
            ax.barh(row - 0.4, e["compute_end"] - e["compute_start"], left=e["compute_start"], height=0.4,
                    align="edge", color="black", label="compute")
        if e.get("free") is not None:
            ax.plot([e["free"]], [row], marker="|", color="tab:red", markersize=8, label="free")
    handles, labels = ax.get_legend_handles_labels()
    uniq = dict(zip(labels, handles, strict=False))
    # outside the axes: inside, it covered the last units' bars
    ax.legend(uniq.values(), uniq.keys(), loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    ax.set_yticks(range(len(events)))
    ax.set_yticklabels([e["name"] for e in events], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("seconds since the pass began")
    ax.set_title(f"{run_label(run)}: PipeLoad timeline, {run.get('loaders')} loader(s), {run.get('io', '')} I/O")
    return _save(fig, path)


def run_label(run: dict[str, Any]) -> str:
    """``model · strategy`` for a plot title."""
    model = Path(run.get("model_dir") or "").name or "model"
    return f"{model} · {run.get('spec') or run.get('strategy') or 'pipeload'}"


def byte_unit(max_bytes: float) -> tuple[str, int]:
    """The byte unit that shows ``max_bytes`` as a number >= 1 (tiny models in KiB, not 0.25 MiB)."""
    for name, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if max_bytes >= size:
            return name, size
    return "bytes", 1


def plot_memory(run: dict[str, Any], path: Path) -> Path:
    """Engine weight memory (allocated and held by units) over one pass, against the budget line."""
    plt = _plt()
    t = [m[0] for m in run["memory"]]
    name, size = byte_unit(max([run["budget_bytes"], *(m[1] for m in run["memory"])]))
    fig, ax = plt.subplots(figsize=(9, 3.5))
    # the budget first and thin, so that the allocated line (usually equal to it: the arena is sized to the
    # budget) is drawn over it and stays visible
    ax.axhline(run["budget_bytes"] / size, color="tab:red", linestyle="--", linewidth=1, label="budget", zorder=1)
    ax.step(t, [m[1] / size for m in run["memory"]], where="post", linewidth=2.5, alpha=0.8, zorder=2,
            label="allocated (arena + resident)")
    ax.step(t, [m[2] / size for m in run["memory"]], where="post", zorder=3, label="held by loaded units")
    ax.set_xlabel("seconds since the pass began")
    ax.set_ylabel(name)
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_title(f"{run_label(run)}: weight memory vs budget")
    return _save(fig, path)


def plot_results(result: dict[str, Any], out_dir: str | os.PathLike[str]) -> list[Path]:
    """Every plot of a results object into ``out_dir``; returns the files written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [plot_bars(result, out / "bars.png"), plot_tradeoff(result, out / "tradeoff.png")]
    run = _timeline_run(result)
    if run is not None:
        run = {**run, "model_dir": result["model_dir"]}
        paths.append(plot_timeline(run, out / "timeline.png"))
        paths.append(plot_memory(run, out / "memory.png"))
    return paths


def plot_file(results_json: str | os.PathLike[str], out_dir: str | os.PathLike[str] | None = None) -> list[Path]:
    """Redraw the plots of a results.json (next to it unless ``out_dir``)."""
    path = Path(results_json)
    try:
        result = json.loads(path.read_text())
        result["summary"], result["runs"], result["model_dir"]  # noqa: B018 - the keys the plots need
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise HermesError(f"{path} is not a hermes bench results.json ({exc}); create one with `hermes bench`") \
            from exc
    return plot_results(result, out_dir or path.parent)
