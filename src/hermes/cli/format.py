"""Text the CLI prints: results of the library rendered for a terminal."""
from __future__ import annotations

from typing import Any

from hermes.figures import minimum_text, peak_share, versus, weights_use
from hermes.memory import format_bytes
from hermes.share import RUNTIME_SLACK_BYTES, slack_note


def format_generation(res: dict[str, Any]) -> str:
    rows = [
        ("model", f"{res['model_dir']} ({format_bytes(res['model_bytes'])} in {res['units']} units)"),
        ("tokens", f"{res['new_tokens']} new x {res['batch']} sequence(s) after a {res['prompt_tokens']}-token "
                   "prompt"),
        ("first token", f"{res['ttft_s'] * 1000:.1f} ms"),
        ("speed", f"{res['tokens_per_s']:.2f} tokens/s per sequence overall, {res['decode_tokens_per_s']:.2f} after "
                  f"the first ({res['loaders']} loader(s), {res['io']} I/O)"),
        ("budget", f"{format_bytes(res['budget_bytes'])}: weights "
                   f"{weights_use(res['weight_budget_bytes'], res['weights_max_bytes'])} + KV "
                   f"cache {format_bytes(res['kv_reserved_bytes'])} (used {format_bytes(res['kv_cache_bytes'])})"
                   + (f" + activations {format_bytes(res['activation_reserved_bytes'])}"
                      if res.get("activation_reserved_bytes") else "")
                   + (f" + runtime slack {format_bytes(res['slack_bytes'])}" if res.get("slack_bytes") else "")
                   + slack_note(res.get("slack_bytes", RUNTIME_SLACK_BYTES))),
        ("weights", f"peak {format_bytes(res['weights_peak_bytes'])}; {len(res['resident'])} of {res['units']} "
                    f"units resident ({format_bytes(res['resident_bytes'])}); "
                    f"{format_bytes(int(res['bytes_read_per_token']))} read per token"),
        ("process RSS", process_rss(res, res["budget_bytes"])),
    ]
    if res.get("auto_budget"):
        rows.insert(4, ("auto", res["auto_budget"]))
    return "\n".join(f"{k:>13}  {v}" for k, v in rows)


def format_run(res: dict[str, Any]) -> str:
    rows = [
        ("model", f"{res['model_dir']} ({format_bytes(res['model_bytes'])} in {res['units']} units)"),
        ("input", ", ".join(f"{k} {v}" for k, v in res["input_shape"].items())),
        ("latency", f"{res['latency_s'] * 1000:.1f} ms "
                    + (f"{versus(res['predictions']['latency_s'])} " if res.get("predictions") else "")
                    + f"(stalled {res['stall_s'] * 1000:.1f} ms waiting for weights)"),
        ("loaders", f"{res['loaders']} ({res['io']} I/O{', cold cache' if res['cold'] else ''})"),
        ("budget", res["budget_share"]),
        ("weights peak", _weights_peak(res)),
        ("process RSS", process_rss(res, res["process_budget_bytes"])),
    ]
    if res.get("auto_budget"):
        rows.insert(4, ("auto", res["auto_budget"]))
    if res.get("output_path"):
        rows.append(("output", res["output_path"]))
    return "\n".join(f"{k:>13}  {v}" for k, v in rows)


def format_ring(res: dict[str, Any]) -> str:
    """A ring command's result: the call's figures (rank 0) and one line per device."""
    rows = []
    if "new_tokens" in res:
        rows.append(("tokens", f"{res['new_tokens']} new x {res['batch']} sequence(s) after a "
                               f"{res['prompt_tokens']}-token prompt, on {res['world_size']} device(s)"))
        rows.append(("speed", f"first token {res['ttft_s'] * 1000:.1f} ms; {res['tokens_per_s']:.2f} tokens/s "
                              f"overall, {res['decode_tokens_per_s']:.2f} after the first"))
    else:
        rows.append(("latency", f"{res['latency_s'] * 1000:.1f} ms on {res['world_size']} device(s)"))
    for r in res["ring"]:
        budget = r["budget_bytes"]
        above = r["peak_rss_above_baseline_bytes"]
        read = r.get("bytes_read_per_token", r.get("bytes_read", 0))
        speeds = f" (computes {r['compute_bps'] / 1e9:.1f} GB/s, reads {r['disk_bps'] / 1e9:.1f} GB/s)" \
            if r.get("compute_bps") and r.get("disk_bps") else ""
        rows.append((f"rank {r['rank']}", f"{r['host']}{speeds}, {r['stage'].partition(': ')[2]}; budget "
                     f"{format_bytes(budget)}, weights peak {format_bytes(r['weights_peak_bytes'])}, read "
                     f"{format_bytes(int(read))}{' per token' if 'bytes_read_per_token' in r else ''}; "
                     f"RSS +{format_bytes(above)} above its runtime ({100 * above / max(budget, 1):.0f}% of the "
                     "budget)"))
    if res.get("output_path"):
        rows.append(("output", res["output_path"]))
    return "\n".join(f"{k:>13}  {v}" for k, v in rows)


def process_rss(res: dict[str, Any], budget: int) -> str:
    """The process's peak RSS, above the runtime (its RSS before the engine claimed memory) as a share of the
    budget it is held to."""
    above = res["peak_rss_above_baseline_bytes"]
    return (f"peak {format_bytes(res['peak_rss_bytes'])}: +{format_bytes(above)} above the runtime "
            f"({format_bytes(res['baseline_rss_bytes'])}), {100 * above / max(budget, 1):.0f}% of the budget")


def _weights_peak(res: dict[str, Any]) -> str:
    """The weights peak of a run beside what the budget holds: its share of the whole model in the engine, or, when
    the budget holds more, what the engine holds at most (the whole model, or everything that streams)."""
    peak, budget = res["weights_peak_bytes"], res["budget_bytes"]
    predicted = (res.get("predictions") or {}).get("weights_peak_bytes")
    peak_text = format_bytes(peak) + (f" {versus(predicted, fmt=format_bytes)}" if predicted else "")
    most, whole = res["weights_max_bytes"], res["whole_model_bytes"]
    if most < budget:  # the budget holds more than the engine can use
        # a token embedding read by rows is never held whole: what streams is then less than the whole model
        held = "the whole model" if most >= whole else "everything it streams"
        return f"{peak_text} = {weights_use(budget, most, held=held, of='weight budget ')}"
    label = f"weight budget {format_bytes(budget)}" + (" (planned)" if res.get("predictions") else "")
    return f"{peak_text} of {label} ({peak_share(peak, whole)})"


def format_profile(prof: Any) -> str:
    """A :class:`hermes.profile.Profile` in a few lines: units, compute, loads per I/O mode, activations, the
    minimum budgets."""
    from hermes.planner import minimum_figure

    loads = {io: sum(u.load_s[io] for u in prof.units) for io in prof.bandwidth}
    lines = [f"{len(prof.units)} units, {format_bytes(prof.model_bytes)}; input {prof.input_shape}",
             f"compute (weights loaded, no I/O): {sum(u.compute_s for u in prof.units):.3f} s per pass"]
    for io, t in loads.items():
        bw = ", ".join(f"{k} reader(s) {v / 1e9:.2f} GB/s" for k, v in prof.bandwidth[io].items())
        slow = ", ".join(f"{k.split(':')[1]} loader(s) compute x{prof.compute_slowdown[k]:.2f} loads "
                         f"x{prof.load_slowdown[k]:.2f}" for k in prof.compute_slowdown if k.startswith(io + ":"))
        lines.append(f"{io:>8} loads: {t:.3f} s cold, one loader; {bw}\n{'':>10}while overlapping: {slow}")
    lines.append(f"activations: {format_bytes(prof.activation_bytes)}")
    lines.append(f"{minimum_text(prof.min_weight_budget)}: what `run --budget` needs")
    lines.append(f"{minimum_figure(prof)}: what `plan --budget` needs")
    return "\n".join(lines)


def format_plan(result: Any) -> str:
    """A :class:`hermes.planner.Plan` in one line: its settings and what it predicts."""
    return (f"plan: {result.loaders} loader(s), {result.io} I/O, prefetch "
            f"{result.prefetch if result.prefetch is not None else 'budget-bound'}, {len(result.resident)} resident "
            f"unit(s), w. budget {format_bytes(result.weight_budget_bytes)} (w. peak "
            f"{format_bytes(result.predicted_weights_peak_bytes)}); predicted {result.predicted_latency_s:.3f} s per "
            f"pass, peak {format_bytes(result.predicted_peak_bytes)} with activations")


def format_comparison(cmp: Any, res: dict[str, Any]) -> str:
    """The demo's verdict: a :class:`hermes.demo.OutputComparison` of the run ``res``."""
    return (f"{'same outputs' if cmp.same else 'DIFFERENT outputs'} as the full model: "
            f"{', '.join(cmp.outputs)} {'bit-exact' if cmp.same else f'differ by up to {cmp.max_diff:.3g}'}, with "
            f"{peak_share(res['weights_peak_bytes'], res['whole_model_bytes'])} in memory at once")
