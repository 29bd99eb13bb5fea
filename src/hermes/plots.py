"""PNG plots of a benchmark's results.json: latency and memory per strategy, latency against memory (the
trade-off), the PipeLoad timeline (a Gantt chart of load / compute / free per unit and agent) and memory over
time against the budget line.
``hermes plot results.json`` redraws them."""
from __future__ import annotations

import json
import math
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
    """Median latency and peak RSS above baseline per strategy (failed strategies are marked).

    Horizontal bars: the strategy names (often long specs) read across on the left, one row each, never
    rotated into one another; the two panels share the rows, so only the left one carries the names."""
    plt = _plt()
    summary = result["summary"]
    names = list(summary)
    lat = [summary[n].get("latency_s", 0.0) for n in names]
    mem = [summary[n].get("peak_rss_above_baseline_bytes", 0) / 2**20 for n in names]
    fig, (a, b) = plt.subplots(1, 2, sharey=True, figsize=(11, 1.6 + 0.32 * len(names)), layout="constrained")
    colors = ["tab:red" if "error" in summary[n] else ("tab:blue" if n.startswith("pipeload") else "tab:gray")
              for n in names]
    rows = range(len(names))
    for ax, values, label in ((a, lat, "first output (s), median"),
                              (b, mem, "peak RSS above baseline (MiB), median")):
        ax.barh(rows, values, color=colors, height=0.7)
        ax.set_xlabel(label)
        ax.set_xlim(0, 1.08 * max(values, default=0) or 1)  # room past the longest bar
        ax.grid(axis="x", alpha=0.3)
        for i, n in enumerate(names):
            if "error" in summary[n]:
                ax.text(0, i, " failed", ha="left", va="center", color="tab:red", fontsize=8)
    a.set_yticks(list(rows), names, fontsize=8)
    a.invert_yaxis()  # first strategy on top, as in the results table
    dev = result.get("device") or {}
    fig.suptitle(f"{Path(result['model_dir']).name}, budget {result['budget']}"
                 + (f", emulated {dev['describe']}" if dev.get("emulated") else ""))
    return _save(fig, path)


def _label_offsets(rings: tuple[int, ...]) -> list[tuple[tuple[int, int], str, str]]:
    """Where a point's label may go, nearest first: (offset in points, ha, va) in eight directions per ring."""
    out = []
    for dist in rings:
        for sx, sy in ((1, 1), (1, -1), (-1, 1), (-1, -1), (0, 1), (0, -1), (1, 0), (-1, 0)):
            ha = {1: "left", -1: "right", 0: "center"}[sx]
            va = {1: "bottom", -1: "top", 0: "center_baseline"}[sy]
            out.append(((sx * dist, sy * dist), ha, va))
    return out


def place_labels(ax: Any, points: list[tuple[float, float]], texts: list[str], *, fontsize: float = 7,
                 rings: tuple[int, ...] = (5,), leaders: bool = False) -> list[Any | None]:
    """Annotate each point with its text at the first offset where the text lies inside the axes and clear of
    every point and every label placed before; None for a point where no offset fits (nothing is drawn).

    ``rings``: the distances (points) tried in eight directions. On the first ring a label must lie nearer its
    own point than any other (else it would name a neighbour); with ``leaders``, a label on a farther ring is
    tied to its point by a thin line instead. Call it once the axes' limits and layout are final: the check is
    made in display coordinates."""
    from matplotlib.text import Text
    from matplotlib.transforms import Bbox

    renderer = ax.figure.canvas.get_renderer()
    frame = ax.get_window_extent(renderer).padded(-2)
    r = ax.figure.dpi / 72 * 3.5  # a default scatter marker's radius (3 points) and a margin
    gap = ax.figure.dpi / 72 * 3
    pixels = [(float(x), float(y)) for x, y in ax.transData.transform(points)]
    taken = [Bbox.from_extents(x - r, y - r, x + r, y + r) for x, y in pixels]
    candidates = _label_offsets(rings) if leaders else _label_offsets(rings[:1])
    placed: list[Any | None] = []
    for i, (xy, text) in enumerate(zip(points, texts, strict=True)):
        placed.append(None)
        for k, (offset, ha, va) in enumerate(candidates):
            leader = k >= 8  # beyond the first ring
            ann = ax.annotate(text, xy, textcoords="offset points", xytext=offset, ha=ha, va=va, fontsize=fontsize,
                              annotation_clip=False, arrowprops=_LEADER if leader else None)
            ann.set_in_layout(False)
            ann.get_window_extent(renderer)  # places the text
            box = Text.get_window_extent(ann, renderer)  # the text alone, not its leader line
            if _label_fits(box, None if leader else i, frame, pixels, taken):
                taken.append(box.padded(gap))  # a gap to the next label: two labels never read as one
                placed[-1] = ann
                break
            ann.remove()
    return placed


_LEADER = {"arrowstyle": "-", "color": "0.45", "linewidth": 0.6, "shrinkA": 1, "shrinkB": 4}


def _label_fits(box: Any, own: int | None, frame: Any, pixels: list[tuple[float, float]], taken: list[Any]) -> bool:
    """``box`` lies inside ``frame``, clear of ``taken``, and (unless ``own`` is None) nearer point ``own`` than
    any other point (a label beside a neighbour would name the wrong point)."""
    if not (frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1):
        return False
    if any(box.overlaps(t) for t in taken):
        return False
    if own is None:
        return True

    def dist(x: float, y: float) -> float:
        return math.hypot(max(box.x0 - x, 0, x - box.x1), max(box.y0 - y, 0, y - box.y1))

    mine = dist(*pixels[own])
    return all(dist(*p) > mine for j, p in enumerate(pixels) if j != own)


def plot_tradeoff(result: dict[str, Any], path: Path) -> Path:
    """Median latency against median peak RSS, one point per strategy that ran: lower left is better.

    Each point is labelled with its strategy where the label fits clear of the others; when one does not,
    the points are numbered instead (each number placed clear of the rest) with a key of names beside."""
    plt = _plt()
    summary = {n: s for n, s in result["summary"].items() if "error" not in s and "latency_s" in s}
    names = list(summary)
    points = [(s.get("peak_rss_above_baseline_bytes", 0) / 2**20, s["latency_s"]) for s in summary.values()]
    fig, ax = plt.subplots(figsize=(8, 5))
    # pipeload's points over the others': where two coincide, the highlighted one stays visible
    dots = [ax.scatter([x], [y], color="tab:blue", zorder=4) if n.startswith("pipeload") else
            ax.scatter([x], [y], color="tab:gray", zorder=3) for n, (x, y) in zip(names, points, strict=True)]
    ax.set_xlabel("peak RSS above baseline (MiB), median")
    ax.set_ylabel("first output (s), median")
    # padded limits: a label beside the highest or rightmost point still fits inside the frame
    ax.set_xlim(0, 1.25 * max((x for x, _ in points), default=0) or 1)
    ax.set_ylim(0, 1.15 * max((y for _, y in points), default=0) or 1)
    ax.grid(alpha=0.3)
    ax.set_title(f"{Path(result['model_dir']).name}: latency vs memory (lower left is better)")
    fig.tight_layout()
    labels = place_labels(ax, points, names)
    if None in labels:
        for ann in labels:
            if ann is not None:
                ann.remove()
        _numbered_key(fig, ax, dots, names)
        place_labels(ax, points, [str(i + 1) for i in range(len(names))], fontsize=8, rings=(5, 12, 20, 30, 42),
                     leaders=True)
    return _save(fig, path)


def _numbered_key(fig: Any, ax: Any, dots: list[Any], names: list[str]) -> None:
    """Give each point its own color and a numbered entry in a key right of the axes, then lay out again."""
    cmap = _plt().get_cmap("tab10" if len(dots) <= 10 else "tab20")
    for i, dot in enumerate(dots):
        dot.set_color(cmap(i % cmap.N))
    ax.legend(dots, [f"{i + 1}  {n}" for i, n in enumerate(names)], loc="upper left", bbox_to_anchor=(1.01, 1.0),
              fontsize=8, borderaxespad=0)
    fig.set_figwidth(fig.get_figwidth() + 3)
    fig.tight_layout()


def _timeline_run(result: dict[str, Any]) -> dict[str, Any] | None:
    return next((r for r in result["runs"] if r.get("events") and "error" not in r), None)


def plot_timeline(run: dict[str, Any], path: Path) -> Path:
    """Gantt chart of one PipeLoad pass: per unit, its load (colored by loading agent) and its compute."""
    plt = _plt()
    events = run["events"]
    fig, ax = plt.subplots(figsize=(10, max(3, 0.22 * len(events) + 1)), layout="constrained")
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
    top = max([run["budget_bytes"], *(m[1] for m in run["memory"])])
    name, size = byte_unit(top)
    fig, ax = plt.subplots(figsize=(9, 3.5), layout="constrained")
    # the budget first and thin, so that the allocated line (usually equal to it: the arena is sized to the
    # budget) is drawn over it and stays visible
    ax.axhline(run["budget_bytes"] / size, color="tab:red", linestyle="--", linewidth=1, label="budget", zorder=1)
    ax.step(t, [m[1] / size for m in run["memory"]], where="post", linewidth=2.5, alpha=0.8, zorder=2,
            label="allocated (arena + resident)")
    ax.step(t, [m[2] / size for m in run["memory"]], where="post", zorder=3, label="held by loaded units")
    ax.set_xlabel("seconds since the pass began")
    ax.set_ylabel(name)
    ax.set_ylim(0, 1.1 * top / size or 1)  # the budget line below the frame, not on it
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
