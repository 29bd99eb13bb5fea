"""Requests on a ring: every rank runs the same call (a forward, or transformers' ``generate``) in lockstep.

Rank 0 checks the input (as on one device, before any weight is read) and broadcasts the request — its settings as
JSON, its tensors as bytes — or the error that refused it, so that every rank stops with the same message. Each
rank then opens its stage under its own budget (``hermes.load(..., ring=)``); the ranks say whether they could
(a budget too small for its share stops every rank with that rank's message); they run the call; each reports its
measurements (budget, weights peak, bytes read, peak RSS above its runtime), gathered on rank 0.
"""
from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from hermes.errors import HermesError
from hermes.memory import peak_rss, reset_peak_rss, settled_rss
from hermes.ring.link import Ring, RingError
from hermes.store import evict_page_cache


def _request(ring: Ring, prepare: Callable[[], tuple[dict[str, Any], dict[str, torch.Tensor]]]
             ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Rank 0's ``prepare()`` (settings, tensors) on every rank; an error it raises stops every rank."""
    if ring.first:
        try:
            settings, tensors = prepare()
        except HermesError as exc:
            ring.broadcast_json({"error": str(exc)})
            raise
        ring.broadcast_json({"settings": settings})
        return settings, ring.broadcast_tensors(tensors)
    got = ring.broadcast_json(None)
    if "error" in got:
        raise RingError(f"rank 0 refused the request: {got['error']}")
    return got["settings"], ring.broadcast_tensors(None)


def _agree(ring: Ring, step: Callable[[], Any], what: str, cleanup: Callable[[], None] | None = None) -> Any:
    """``step()`` on every rank, and every rank learns whether every other's succeeded: an error on any rank (a
    budget too small for its share, say) stops them all with that rank's message, never one rank alone while the
    others wait for it."""
    error, result = None, None
    try:
        result = step()
    except RingError:
        raise  # the ring itself broke: the others see it too
    except HermesError as exc:
        error = str(exc)
    errors = [(r, e) for r, e in enumerate(ring.gather_json(error, f"whether each device {what}")) if e]
    if errors:
        if error is None and cleanup is not None:
            cleanup()
        raise RingError("; ".join(f"rank {r} could not {what}: {e}" for r, e in errors))
    return result


def _open(ring: Ring, model_dir: str | os.PathLike[str], budget: Any, **options: Any) -> torch.nn.Module:
    """This rank's stage of the model; every rank learns whether every other could open its own."""
    import hermes

    model: list[Any] = []
    return _agree(ring, lambda: model.append(hermes.load(model_dir, budget, ring=ring, **options)) or model[0],
                  "open its stage", lambda: model[0].hermes.remove())


def _report(ring: Ring, model: torch.nn.Module, baseline: int, stats: dict[str, Any]) -> list[dict[str, Any]]:
    engine = model.hermes
    facts = engine.stage.peers[ring.rank]
    mine = {"rank": ring.rank, "host": os.uname().nodename, "stage": engine.stage.describe(),
            "blocks": list(engine.stage.blocks), "parts": [list(p) for p in engine.stage.own],
            "compute_bps": facts.get("compute_bps"),
            "disk_bps": facts.get("disk_bps"), **stats, "baseline_rss_bytes": baseline,
            "peak_rss_above_baseline_bytes": peak_rss() - baseline}
    return ring.gather_json(mine, "each device's measurements")


class _TokenRelay:
    """``generate``'s last logits processor on a ring: the device that computes the head picks the token — the
    argmax, or a sample drawn from the random state that ``generate``'s own draw then uses (restored after it) —
    and sends it to every device (8 bytes a sequence instead of the logits); every device's scores become that
    token alone, so that each one's ``generate`` picks it (greedy or sampled) and goes on exactly as on one
    device. ``arrivals`` gets the moment each step's token is known here (the user's clock: a device's own pass
    ends before the devices after it have computed the token), ``cpu`` this process's CPU time then (all threads)."""

    def __init__(self, stage: Any, do_sample: bool, arrivals: list[float], cpu: list[float]) -> None:
        self.stage, self.do_sample, self.arrivals, self.cpu = stage, do_sample, arrivals, cpu

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        ring, tail = self.stage.ring, self.stage.tail
        token = torch.zeros(scores.shape[0], dtype=torch.int64)
        if ring.rank == tail and self.do_sample:  # as generate draws: softmax, then multinomial
            state = torch.get_rng_state()
            token = torch.multinomial(torch.nn.functional.softmax(scores, dim=-1), num_samples=1).squeeze(1)
            torch.set_rng_state(state)
        elif ring.rank == tail:
            token = torch.argmax(scores, dim=-1)
        token = ring.broadcast(token, tail, "the next token")
        self.stage.turn(False)  # the tail's turn ends with the token sent
        self.arrivals.append(time.perf_counter())
        self.cpu.append(time.process_time())
        return torch.full_like(scores, -math.inf).scatter_(1, token.unsqueeze(1), 0.0)


def relay_tokens(model: torch.nn.Module, stage: Any, do_sample: bool) -> tuple[list[float], list[float]]:
    """Make ``model.generate`` on this ring send the chosen token after each step, not the logits (``stage``'s
    relay off; :class:`_TokenRelay` last in generate's logits processors). Returns the lists that get each step's
    token arrival time (``time.perf_counter()``) and this process's CPU time then (``time.process_time()``)."""
    stage.relay = "token"
    arrivals: list[float] = []
    cpu: list[float] = []
    original = model._get_logits_processor

    def processors(*args: Any, **kwargs: Any) -> Any:
        out = original(*args, **kwargs)
        out.append(_TokenRelay(stage, do_sample, arrivals, cpu))
        return out

    model._get_logits_processor = processors
    return arrivals, cpu


def _token_clock(stats: dict[str, Any], arrivals: list[float], start: float, end: float,
                 cpu: list[float] | None = None) -> None:
    """A ring generation's times by its tokens' arrival (the user's clock), not by this device's passes: the first
    pass of rank 0 ends before the devices after it have computed the first token, which the pass clock would
    count into the decoding time (3.5 s of prefill in a 4-device Llama-3.2-1B ring's decode rate). With ``cpu``
    (this process's CPU time at each arrival): its CPU seconds per decoded token, all threads — what a device's
    cores must give a token, whether or not its turn."""
    if not arrivals:
        return
    steps = len(arrivals)
    if cpu and len(cpu) == steps and steps > 1:
        stats["cpu_s_per_token"] = (cpu[-1] - cpu[0]) / (steps - 1)
    stats.update(ttft_s=arrivals[0] - start, total_s=end - start,
                 tokens_per_s=stats["new_tokens"] / (end - start) if end > start else 0.0,
                 decode_tokens_per_s=(steps - 1) / (arrivals[-1] - arrivals[0]) if steps > 1 else 0.0)


def _generation_request(model_dir: str | os.PathLike[str], texts: list[str] | None, ids: list[list[int]] | None,
                        random_len: int | None, batch: int, seed: int, max_new_tokens: int, sampling: dict[str, Any]
                        ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Rank 0's generate request, checked as on one device before any weight is read: (settings, prompt)."""
    from hermes.inputs import pad_token_id
    from hermes.preflight import check_generates, check_generation_length
    from hermes.runner import prompt_inputs
    from hermes.skeleton import load_config

    config = load_config(model_dir)
    check_generates(config, model_dir)
    inputs = prompt_inputs(model_dir, config, texts=texts, ids=ids, random_len=random_len, batch=batch, seed=seed)
    if "input_ids" in inputs:
        check_generation_length(config, inputs["input_ids"].shape[1], max_new_tokens)
    kw: dict[str, Any] = {"max_new_tokens": max_new_tokens, "pad_token_id": pad_token_id(config)}
    kw.update({k: v for k, v in sampling.items() if v is not None})
    return {"kwargs": kw, "seed": seed}, inputs


def ring_generate(model_dir: str | os.PathLike[str], ring: Ring, *, budget: Any, max_new_tokens: int = 32,
                  texts: list[str] | None = None, ids: list[list[int]] | None = None, random_len: int | None = None,
                  batch: int = 1, do_sample: bool = False, temperature: float | None = None,
                  top_k: int | None = None, top_p: float | None = None, seed: int = 0, loaders: int = 1,
                  prefetch: int | None = None, io: str = "direct", cold: bool = False,
                  on_token: Callable[[int, str | None], None] | None = None) -> dict[str, Any]:
    """``hermes generate`` on a ring: rank 0's prompt, every rank's share; the tokens and every rank's figures
    (on rank 0; elsewhere this rank's figures only)."""
    from hermes.inputs import has_tokenizer, load_tokenizer
    from hermes.runner import TokenStream

    sampling = {"do_sample": do_sample, "temperature": temperature, "top_k": top_k, "top_p": top_p}
    settings, inputs = _request(ring, lambda: _generation_request(model_dir, texts, ids, random_len, batch, seed,
                                                                  max_new_tokens, sampling))
    # the tokenizer is part of rank 0's runtime, loaded before its baseline (Llama 3's holds ~150 MiB)
    tokenizer = load_tokenizer(model_dir) if ring.first and has_tokenizer(model_dir) else None
    model = _open(ring, model_dir, budget, loaders=loaders, prefetch=prefetch, io=io)
    baseline = settled_rss()
    reset_peak_rss()
    if cold:
        evict_page_cache(model.hermes.layout.store.files)
    kwargs = dict(settings["kwargs"])
    first = next(iter(inputs.values()))
    if ring.first and on_token is not None and first.shape[0] == 1:
        kwargs["streamer"] = TokenStream(on_token, tokenizer)
    arrivals, cpu = relay_tokens(model, model.hermes.stage, bool(settings["kwargs"].get("do_sample")))
    torch.manual_seed(settings["seed"])
    try:
        from hermes.generation import call_settings

        _agree(ring, lambda: call_settings(model, model.hermes, (), {**inputs, **settings["kwargs"]}),
               "hold this generation in its budget")
        ring.sent_bytes, ring.wait_s = 0, 0.0
        start = time.perf_counter()
        out = model.generate(**inputs, **kwargs)
        end = time.perf_counter()
        stats = model.hermes.last_generation.to_dict()
        _token_clock(stats, arrivals, start, end, cpu)
        stats.pop("passes", None)
        tokens = max(stats["new_tokens"], 1)
        stats.update(sent_bytes_per_token=ring.sent_bytes / tokens, ring_wait_s_per_token=ring.wait_s / tokens,
                     stall_s_per_token=stats["stall_s"] / tokens, meta_runs=meta_runs(model.hermes))
        reports = _report(ring, model, baseline, stats)
    finally:
        model.hermes.remove()
        model.hermes.stage.remove()
    new = out[:, first.shape[1]:].tolist()
    head = reports[0]
    return {"model_dir": str(Path(model_dir)), "world_size": ring.size, "rank": ring.rank,
            "tokens": new if ring.first else None,
            "texts": [tokenizer.decode(t, skip_special_tokens=True) for t in new] if tokenizer else None,
            **{k: head[k] for k in ("batch", "prompt_tokens", "new_tokens", "ttft_s", "total_s", "tokens_per_s",
                                    "decode_tokens_per_s") if k in head},
            "ring": reports if ring.first else [reports[ring.rank]]}


def meta_runs(engine: Any) -> dict[str, int]:
    """How the other devices' units ran here: replayed from a recorded meta run, or run on the meta device."""
    remote = engine.kinds.get("remote")
    replayed, ran = remote.meta_runs() if remote is not None else (0, 0)
    return {"replayed": replayed, "ran": ran}


def ring_forward(model_dir: str | os.PathLike[str], ring: Ring, *, budget: Any, loaders: int = 2,
                 prefetch: int | None = None, io: str = "buffered", cold: bool = False,
                 save_output: str | os.PathLike[str] | None = None, **input_args: Any) -> dict[str, Any]:
    """``hermes run`` on a ring: one forward of rank 0's input; its output on rank 0 (saved there with
    ``save_output``) and every rank's figures."""
    import time

    from hermes.engine import EngineConfig
    from hermes.inputs import build_inputs, output_tensors
    from hermes.runner import check_save_path, forward_share, save_outputs
    from hermes.skeleton import load_config

    def prepare() -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        check_save_path(save_output)
        return {}, build_inputs(model_dir, load_config(model_dir), **input_args)

    _, inputs = _request(ring, prepare)
    model = _open(ring, model_dir, budget, loaders=loaders, prefetch=prefetch, io=io)
    engine = model.hermes
    try:
        # this input's activations, not the 128 positions hermes.load sets aside for an unknown call
        shared = _agree(ring, lambda: forward_share(engine.layout, engine.generation_policy.budget_bytes, inputs),
                        "hold this input in its budget")
        c = engine.config
        engine.reconfigure(EngineConfig(shared.weights, loaders=c.loaders, prefetch=c.prefetch, io=c.io))
        baseline = settled_rss()
        reset_peak_rss()
        if cold:
            evict_page_cache(engine.layout.store.files)
        engine.stage.relay = "forward"
        t0 = time.perf_counter()
        with torch.no_grad():
            output = model(**inputs)
        latency = time.perf_counter() - t0
        st = engine.last
        stats = {"budget_bytes": shared.budget, "budget_share": shared.describe(), "latency_s": latency,
                 "weight_budget_bytes": shared.weights,
                 "weights_peak_bytes": st.weights_peak_bytes, "bytes_read": st.bytes_read,
                 "min_budget_bytes": engine.min_budget}
        reports = _report(ring, model, baseline, stats)
    finally:
        engine.remove()
        engine.stage.remove()
    result = {"model_dir": str(Path(model_dir)), "world_size": ring.size, "rank": ring.rank, "latency_s": latency,
              "input_shape": {k: list(v.shape) for k, v in inputs.items()}, "output_path": None,
              "ring": reports if ring.first else [reports[ring.rank]]}
    if ring.first and save_output is not None:
        result["output_path"] = str(save_outputs(output_tensors(output), save_output))
    return result
