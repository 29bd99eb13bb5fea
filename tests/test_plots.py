"""The plots stay readable whatever the results hold: no text runs into another text or off the figure, and
a point's label sits clear of the other points (many strategies, long names, points close together)."""
from __future__ import annotations

from itertools import combinations
from pathlib import Path
from typing import Any

import pytest

from hermes import plots

pytest.importorskip("matplotlib")
from matplotlib.text import Text  # noqa: E402


def _result(points: list[tuple[str, float, float]], *, failed: tuple[str, ...] = ()) -> dict[str, Any]:
    summary: dict[str, Any] = {n: {"latency_s": s, "peak_rss_above_baseline_bytes": int(mib * 2**20)}
                               for n, mib, s in points}
    summary.update({n: {"error": "MemoryError"} for n in failed})
    events = [{"name": f"model.layers.{i}", "agent": i % 2, "load_start": 0.1 * i, "load_end": 0.1 * i + 0.08,
               "compute_start": 0.1 * i + 0.08, "compute_end": 0.1 * i + 0.1, "free": 0.1 * i + 0.1}
              for i in range(30)]
    memory = [[0.1 * i, 200 * 2**20, (i % 3) * 60 * 2**20] for i in range(30)]
    run = {"spec": "pipeload:budget=160MB,loaders=2,io=direct", "loaders": 2, "io": "direct", "events": events,
           "memory": memory, "budget_bytes": 200 * 2**20}
    return {"model_dir": "/models/vit-large", "budget": "160MB", "summary": summary, "runs": [run]}


# a sweep: long names, several points within a few pixels of one another
CROWDED = [("pipeswitch", 1210.0, 4.05)] + [
    (f"pipeload:budget={b}MB,loaders=1,io=direct", 100 + 0.3 * b, 1.9 + 0.002 * b) for b in range(60, 420, 30)]
SPREAD = [("full", 1200.0, 1.9), ("pipeswitch", 1310.0, 2.8), ("accelerate", 50.0, 2.1),
          ("pipeload", 160.0, 0.8), ("sequential:io=direct", 600.0, 1.3)]


@pytest.fixture
def figures(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """The figures the plots draw, by file name, kept open instead of saved."""
    drawn: dict[str, Any] = {}

    def keep(fig: Any, path: Path) -> Path:
        drawn[path.name] = fig
        return path

    monkeypatch.setattr(plots, "_save", keep)
    yield drawn
    for fig in drawn.values():
        plots._plt().close(fig)


def _texts(fig: Any) -> list[tuple[str, Any]]:
    """(text, window extent) of every text the figure shows: titles, axis and tick labels in view, annotations,
    legend entries."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    shown = [fig._suptitle] if fig._suptitle is not None else []
    for ax in fig.axes:
        lo_x, hi_x = sorted(ax.get_xlim())
        lo_y, hi_y = sorted(ax.get_ylim())
        shown += [ax.title, ax.xaxis.label, ax.yaxis.label, *ax.texts]
        shown += [t for t in ax.get_xticklabels() if lo_x <= t.get_position()[0] <= hi_x]
        shown += [t for t in ax.get_yticklabels() if lo_y <= t.get_position()[1] <= hi_y]
        if ax.get_legend() is not None:
            shown += ax.get_legend().get_texts()
    return [(t.get_text(), Text.get_window_extent(t, renderer)) for t in shown  # a label's text, not its leader
            if t.get_visible() and t.get_text().strip()]


def _assert_readable(fig: Any) -> list[tuple[str, Any]]:
    texts = _texts(fig)
    for text, box in texts:
        assert fig.bbox.x0 <= box.x0 and box.x1 <= fig.bbox.x1 and fig.bbox.y0 <= box.y0 and box.y1 <= fig.bbox.y1, \
            f"{text!r} leaves the figure"
    clashes = [(a, b) for (a, box_a), (b, box_b) in combinations(texts, 2) if box_a.overlaps(box_b)]
    assert not clashes, clashes
    return texts


def _point_labels(fig: Any) -> tuple[Any, list[tuple[str, Any, bool]]]:
    ax = fig.axes[0]
    renderer = fig.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    labels = [(t.get_text(), Text.get_window_extent(t, renderer), t.arrow_patch is not None) for t in ax.texts]
    for text, box, _ in labels:
        assert frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1, \
            f"label {text!r} runs into the frame"
    return ax, labels


def test_tradeoff_labels_points_directly_when_they_fit(figures):
    plots.plot_tradeoff(_result(SPREAD), Path("tradeoff.png"))
    fig = figures["tradeoff.png"]
    _assert_readable(fig)
    ax, labels = _point_labels(fig)
    assert sorted(t for t, _, _ in labels) == sorted(n for n, _, _ in SPREAD)
    assert ax.get_legend() is None and not any(leader for _, _, leader in labels)


def test_tradeoff_numbers_crowded_points_with_a_key(figures):
    plots.plot_tradeoff(_result(CROWDED, failed=("airllm",)), Path("tradeoff.png"))
    fig = figures["tradeoff.png"]
    _assert_readable(fig)
    ax, labels = _point_labels(fig)
    # every point that ran is numbered, clear of the others, and its number is in the key beside its name
    assert sorted(int(t) for t, _, _ in labels) == list(range(1, len(CROWDED) + 1))
    key = [t.get_text() for t in ax.get_legend().get_texts()]
    assert key == [f"{i + 1}  {n}" for i, (n, _, _) in enumerate(CROWDED)]
    points = ax.transData.transform([(x, y) for _, x, y in CROWDED])
    for text, box, leader in labels:  # a number without a leader line lies nearer its own point than any other
        def dist(p: Any, box: Any = box) -> float:
            return max(box.x0 - p[0], 0, p[0] - box.x1) ** 2 + max(box.y0 - p[1], 0, p[1] - box.y1) ** 2
        own = dist(points[int(text) - 1])
        assert leader or all(dist(p) > own for i, p in enumerate(points) if i != int(text) - 1), text

def test_bars_names_never_collide_and_panels_keep_apart(figures):
    result = _result(CROWDED, failed=("airllm", "pipeload:budget=20MB,loaders=4,io=direct"))
    plots.plot_bars(result, Path("bars.png"))
    fig = figures["bars.png"]
    texts = _assert_readable(fig)
    left, right = fig.axes
    renderer = fig.canvas.get_renderer()
    names = {t.get_text() for t in left.get_yticklabels()}
    assert set(result["summary"]) <= names  # every strategy named once, on the left
    left_box = left.get_tightbbox(renderer)
    for t in (right.xaxis.label, right.yaxis.label, *right.texts, *right.get_yticklabels()):
        if t.get_visible() and t.get_text():
            assert not t.get_window_extent(renderer).overlaps(left_box), t.get_text()
    assert sum(t.strip() == "failed" for t, _ in texts) == 4  # both failures marked in both panels


def test_timeline_and_memory_keep_their_text_apart(figures):
    result = _result(SPREAD)
    run = {**result["runs"][0], "model_dir": result["model_dir"]}
    plots.plot_timeline(run, Path("timeline.png"))
    plots.plot_memory(run, Path("memory.png"))
    for name in ("timeline.png", "memory.png"):
        _assert_readable(figures[name])
    ax = figures["memory.png"].axes[0]
    assert ax.get_ylim()[1] > run["budget_bytes"] / 2**20  # the budget line is drawn inside the frame
