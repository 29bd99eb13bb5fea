"""What ``/metrics`` reports, in Prometheus' text format."""

from __future__ import annotations

import collections
import statistics
import threading
from typing import Any, NamedTuple

from hermes.memory import current_rss, peak_rss


class Step(NamedTuple):
    """What /metrics needs of one step's pass (not its per-unit events: 256 steps of them add up)."""

    bytes_read: int
    latency_s: float
    weights_peak_bytes: int


class Window:
    """The last few steps, shared between the generation thread and the server."""

    def __init__(self, size: int = 256) -> None:
        self._lock = threading.Lock()
        self._passes: collections.deque[Step] = collections.deque(maxlen=size)
        self.steps = 0

    def append(self, stats: Any) -> None:  # engine.history protocol (called by the generation thread)
        with self._lock:
            self._passes.append(Step(stats.bytes_read, stats.latency_s, stats.weights_peak_bytes))
            self.steps += 1

    def passes(self) -> list[Step]:
        with self._lock:
            return list(self._passes)


def _kv_tensor_bytes(manager: Any) -> int:
    cache = getattr(getattr(manager, "batch_processor", None), "cache", None)
    t = getattr(cache, "cache_tensor", None)
    return int(t.numel() * t.element_size()) if t is not None else 0


#: what each /metrics value means (Prometheus' HELP lines)
METRICS_HELP = {
    "hermes_requests_running": "requests started (first token out, KV cache pages held), not finished; at most "
                               "--max-batch of them compute in one step, the others take turns",
    "hermes_requests_waiting": "requests admitted, waiting for their first token",
    "hermes_requests_completed_total": "requests finished",
    "hermes_requests_rejected_total": "requests refused because the queue was full (429)",
    "hermes_requests_cancelled_total": "requests whose client went away",
    "hermes_requests_failed_total": "requests ended by an error (a failed step, a shutdown)",
    "hermes_steps_total": "forward steps run",
    "hermes_tokens_per_second": "tokens delivered over the last 10 s, per second",
    "hermes_step_bytes_read": "median bytes read from disk per step (recent steps)",
    "hermes_step_seconds": "median seconds per step (recent steps)",
    "hermes_budget_bytes": "the memory budget",
    "hermes_weight_budget_bytes": "the budget's share for weights",
    "hermes_weights_peak_bytes": "most weight bytes held in one recent step",
    "hermes_weights_held_bytes": "weight bytes held now",
    "hermes_kv_cache_bytes": "the KV cache pool (allocated once)",
    "hermes_activation_reserved_bytes": "the budget's share for one step's activations",
    "hermes_request_memory_bytes": "the budget's share for request bodies and token ids",
    "hermes_runtime_slack_bytes": "the budget's runtime slack (torch's code paged in, thread stacks, allocator)",
    "hermes_request_memory_held_bytes": "request memory held now",
    "hermes_memory_held_bytes": "weights + KV cache + request memory held now",
    "hermes_rss_above_baseline_bytes": "process memory (RSS) above its runtime (the model opened, no weights held)",
    "hermes_rss_peak_above_baseline_bytes": "the most process memory (peak RSS) above its runtime so far",
    "hermes_up": "1 while requests are taken, 0 while draining, recovering or broken",
    "hermes_ring_remote_replayed_total": "on a ring: calls of other devices' blocks answered here by replaying a "
                                         "recorded meta run",
    "hermes_ring_remote_ran_total": "on a ring: calls of other devices' blocks run here on the meta device",
}


def service_metrics(service: Any) -> dict[str, float]:
    """What /metrics reports: requests, steps, throughput and memory against the budget (METRICS_HELP)."""
    passes = service.window.passes()
    running, waiting, recent = service.request_counts()
    kv = _kv_tensor_bytes(service.manager)
    if service.ring is not None:  # the pool is mapped for every layer; this device writes only its own layers'
        kv = min(kv, service.layout.kv_cache)
    counters, layout, held = service.counters, service.layout, service.engine.daemon.allocated
    return {
        "hermes_requests_running": running,
        "hermes_requests_waiting": waiting,
        "hermes_requests_completed_total": counters["completed"],
        "hermes_requests_rejected_total": counters["rejected"],
        "hermes_requests_cancelled_total": counters["cancelled"],
        "hermes_requests_failed_total": counters["errors"],
        "hermes_steps_total": service.window.steps,
        "hermes_tokens_per_second": recent / 10.0,
        "hermes_step_bytes_read": statistics.median(p.bytes_read for p in passes) if passes else 0,
        "hermes_step_seconds": statistics.median(p.latency_s for p in passes) if passes else 0,
        "hermes_budget_bytes": layout.budget,
        "hermes_weight_budget_bytes": layout.weights,
        "hermes_weights_peak_bytes": max((p.weights_peak_bytes for p in passes), default=0),
        "hermes_weights_held_bytes": held,
        "hermes_kv_cache_bytes": kv,
        "hermes_activation_reserved_bytes": layout.activations,
        "hermes_request_memory_bytes": layout.requests,
        "hermes_runtime_slack_bytes": layout.slack,
        "hermes_request_memory_held_bytes": service.memory.used,
        "hermes_memory_held_bytes": held + kv + service.memory.used,
        "hermes_rss_above_baseline_bytes": max(current_rss() - service.baseline_rss, 0),
        "hermes_rss_peak_above_baseline_bytes": max(peak_rss() - service.baseline_rss, 0),
        "hermes_up": int(service.healthy()),
        **_ring_metrics(service),
    }


def _ring_metrics(service: Any) -> dict[str, float]:
    if service.ring is None:
        return {}
    from hermes.ring.driver import meta_runs

    runs = meta_runs(service.engine)
    return {"hermes_ring_remote_replayed_total": runs["replayed"], "hermes_ring_remote_ran_total": runs["ran"]}


def prometheus_text(values: dict[str, float], helps: dict[str, str] | None = None) -> str:
    """``values`` in Prometheus' text format: names ending in ``_total`` are counters, the others gauges."""
    lines = []
    for name, value in values.items():
        kind = "counter" if name.endswith("_total") else "gauge"
        text = str(int(value)) if float(value).is_integer() else f"{float(value):.6g}"
        if helps and name in helps:
            lines.append(f"# HELP {name} {helps[name]}")
        lines += [f"# TYPE {name} {kind}", f"{name} {text}"]
    return "\n".join(lines) + "\n"
