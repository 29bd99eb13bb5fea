"""Strategies a benchmark compares, each run once in the current (fresh) process.

- ``full``: ``from_pretrained`` + forward (what a user would do with enough memory).
- ``pipeswitch``: pipelined loading with one loader, keeping every layer (PipeSwitch).
- ``sequential``: load -> compute -> free, one unit at a time, no overlap (``prefetch=0``).
- ``double-buffer``: one loader, a unit read while the one before it computes (``prefetch=1``; issue 25).
- ``pipeload``: Hermes, with the planner's settings for the budget (``--profile``, made by the ``profile``
  command on the same device) or with the given loaders / I/O mode.
- ``accelerate``: transformers ``from_pretrained(device_map="auto", max_memory={"cpu": weights})`` (the weights'
  share of the budget, as Hermes's): what does not fit is disk-offloaded (read from the checkpoint's safetensors by
  accelerate's hooks).
- ``airllm``: the AirLLM package (Llama family), layer by layer with its own one-time per-layer split.
- ``gen-*``: text generation (see :func:`run_generation_strategy`).
Run as ``python -m hermes.baselines STRATEGY MODEL_DIR ...``: prints one JSON object.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from hermes.errors import HermesError
from hermes.inputs import build_inputs
from hermes.memory import parse_bytes, peak_rss, reset_peak_rss, settled_rss

STRATEGIES = ("full", "pipeswitch", "sequential", "double-buffer", "pipeload", "accelerate", "airllm")


def run_strategy(strategy: str, model_dir: str, *, budget: int, seq_len: int, loaders: int = 2,
                 io: str = "buffered", cold: bool = True, work_dir: str | None = None,
                 timeline: bool = False, profile: str | None = None) -> dict[str, Any]:
    """Run one strategy once: time from nothing loaded to the first output, and peak memory (with
    ``timeline``, a streaming strategy also returns its per-unit events and memory samples). ``budget`` is the
    process's, as everywhere (:mod:`hermes.share`): the streamed strategies' weights get what this input's
    activations and the runtime slack leave, and so does accelerate's ``max_memory``. ``pipeload`` with a
    ``profile`` runs the planner's plan for ``budget``, planned before the clock starts (as a user runs a saved
    plan.json)."""
    from hermes.skeleton import load_config, resolve_model_class
    from hermes.store import Store, evict_page_cache

    if work_dir is not None:
        Path(work_dir).mkdir(parents=True, exist_ok=True)
    config = load_config(model_dir)
    inputs = build_inputs(model_dir, config, random_seq_len=seq_len)
    model_class = resolve_model_class(config)  # imports count as runtime for every strategy, not as loading
    import hermes.api  # noqa: F401
    files = Store(model_dir).files
    air = None
    if strategy == "airllm":
        air, files = _airllm(config, model_dir, work_dir)
    planned: dict[str, Any] = {}
    if strategy == "pipeload" and profile is not None:
        planned = _planned_settings(profile, budget)
    elif strategy == "accelerate":  # its weights get what pipeload's get: equal weight memory, equal budget
        budget = _weights_share(hermes.api.open_model(model_dir), budget, inputs)
    if cold:
        evict_page_cache(files)
    baseline = settled_rss()
    reset_peak_rss()
    t0 = time.perf_counter()
    extra: dict[str, Any] = {}
    with torch.no_grad(), tempfile.TemporaryDirectory(dir=work_dir) as offload:
        if strategy in ("full", "accelerate", "airllm"):
            model, extra = _other_model(strategy, model_class, model_dir, budget=budget, offload=offload, air=air,
                                        work_dir=work_dir, dtype=config.dtype)
            t1 = time.perf_counter()
            out = model(**inputs)
            extra.update({"load_s": t1 - t0, "forward_s": time.perf_counter() - t1, **output_digest(out)})
        else:
            extra = _run_streamed(strategy, model_dir, inputs, t0, budget=budget, loaders=loaders, io=io,
                                  planned=planned, timeline=timeline)
    latency = time.perf_counter() - t0
    peak = peak_rss()
    return {"strategy": strategy, "latency_s": latency, "baseline_rss_bytes": baseline, "peak_rss_bytes": peak,
            "peak_rss_above_baseline_bytes": peak - baseline, **extra}


def _run_streamed(strategy: str, model_dir: str, inputs: dict[str, Any], t0: float, *, budget: int, loaders: int,
                  io: str, planned: dict[str, Any], timeline: bool) -> dict[str, Any]:
    """A streaming strategy (``planned`` settings when given): one forward pass; what the report records."""
    from hermes.api import open_model
    from hermes.engine import EngineConfig, PipeLoadEngine, minimum_budget

    extra: dict[str, Any] = {}
    layout = open_model(model_dir)
    names = tuple(u.name for u in layout.units)
    if strategy == "pipeswitch":  # every unit resident (tied ones once)
        kw: dict[str, Any] = {"budget": minimum_budget(layout.units, names), "loaders": 1, "resident": names,
                              "io": "buffered"}
    elif planned:
        kw = {k: planned[k] for k in ("budget", "loaders", "prefetch")}
        io = planned["io"]
        extra["plan"] = planned
    else:
        weights = _weights_share(layout, budget, inputs)
        kw = {"sequential": {"budget": weights, "loaders": 1, "prefetch": 0},
              "double-buffer": {"budget": weights, "loaders": 1, "prefetch": 1},
              "pipeload": {"budget": weights, "loaders": loaders}}[strategy]
    engine = PipeLoadEngine(layout.model, layout.units,
                            EngineConfig(kw["budget"], kw["loaders"], kw.get("prefetch"), kw.get("io", io),
                                         kw.get("resident", ())))
    engine.install()
    t1 = time.perf_counter()
    out = layout.model(**inputs)
    st = engine.last
    assert st is not None
    extra |= {"load_s": t1 - t0, "forward_s": st.latency_s, "stall_s": st.stall_s,
              "weights_peak_bytes": st.weights_peak_bytes, "budget_bytes": kw["budget"],
              "loaders": kw["loaders"], "prefetch": kw.get("prefetch"), "io": kw.get("io", io), **output_digest(out)}
    if timeline:
        d = st.to_dict(timeline=True)
        extra.update({"events": d["events"], "memory": d["memory"]})
    return extra


def output_digest(out: Any) -> dict[str, Any]:
    """What a forward produced, to check that every strategy computed the same: the sha256 of its first output
    tensor's bytes (the logits, else the last hidden state: ``inputs.output_tensors``' first), its shape and dtype."""
    from hermes.inputs import output_tensors

    t = next(iter(output_tensors(out).values()), None)
    if t is None or t.device.type == "meta":
        return {}
    data = t.reshape(-1).view(torch.uint8).numpy().tobytes()
    return {"output_sha256": hashlib.sha256(data).hexdigest(), "output_shape": list(t.shape),
            "output_dtype": str(t.dtype).removeprefix("torch.")}


def same_outputs(runs: list[dict[str, Any]]) -> dict[str, tuple[bool | None, str]]:
    """strategy -> (whether every run of it produced the reference's output bit for bit, by its sha256 — None where
    it recorded none; the reference): ``full`` (the model held whole by transformers) when it ran, else the first
    strategy that produced an output. A speed-up of a strategy that computed something else is no speed-up."""
    digests: dict[str, set[str | None]] = {}
    for r in runs:
        if "error" not in r:
            digests.setdefault(r["spec"], set()).add(r.get("output_sha256"))
    ref = "full" if digests.get("full", {None}) != {None} else next(
        (spec for spec, d in digests.items() if d != {None}), None)
    if ref is None:
        return {}
    want = digests[ref]
    return {spec: (None if d == {None} else len(want) == 1 and d == want, ref) for spec, d in digests.items()}


def _weights_share(layout: Any, budget: int, inputs: dict[str, Any]) -> int:
    """The weights' share of ``budget`` for one forward on ``inputs`` (:func:`hermes.runner.forward_share`)."""
    from hermes.runner import forward_share

    return forward_share(layout, budget, inputs).weights


def _planned_settings(profile_path: str, budget: int) -> dict[str, Any]:
    """The plan for ``budget`` (weights, the profiled activations, the runtime slack)."""
    from hermes.planner import plan
    from hermes.profile import Profile

    p = plan(Profile.load(profile_path), budget)
    return {"budget": p.weight_budget_bytes, "loaders": p.loaders, "prefetch": p.prefetch, "io": p.io,
            "predicted_latency_s": p.predicted_latency_s}


def make_profile(model_dir: str, *, seq_len: int, out: str) -> dict[str, Any]:
    """Profile the model for the benchmark's input on this (emulated) device; the planned ``pipeload`` uses it."""
    from hermes.profiler import profile_model
    from hermes.skeleton import load_config

    t0 = time.perf_counter()
    prof = profile_model(model_dir, build_inputs(model_dir, load_config(model_dir), random_seq_len=seq_len),
                         progress=lambda done, total, what: print(f"progress: {done}/{total} {what}", file=sys.stderr))
    prof.save(out)
    return {"profile": out, "key": prof.key, "seconds": time.perf_counter() - t0}


GEN_STRATEGIES = ("hermes", "full", "accelerate", "airllm")
AIRLLM_TYPES = ("llama", "mistral", "qwen2")


def run_generation_strategy(strategy: str, model_dir: str, *, budget: int | str, prompt_len: int, new_tokens: int,
                            loaders: int = 1, io: str = "direct", cold: bool = True,
                            work_dir: str | None = None) -> dict[str, Any]:
    """Greedy-generate ``new_tokens`` after a random ``prompt_len``-token prompt, once, from nothing loaded.

    - ``hermes``: ``hermes.load(budget)`` (weights + KV cache within the budget; ``"auto"``: what the process may
      still take, activations included) and ``generate``.
    - ``full``: ``from_pretrained`` then ``generate`` (needs the whole model in memory).
    - ``accelerate``: ``from_pretrained(device_map="auto", max_memory={"cpu": budget}, offload_folder=...)``:
      what fits stays in memory, the rest is disk-offloaded and read by accelerate's hooks at each use.
    - ``airllm``: the AirLLM package (4.0.0; Llama family; splits the checkpoint into per-layer files once, in
      ``work_dir``, before timing), streaming every layer per token; it has no budget setting.
    The token ids are returned so that a benchmark can check every strategy generated the same text.
    """
    from hermes.inputs import pad_token_id, prompt_batch
    from hermes.skeleton import load_config, resolve_model_class
    from hermes.store import Store, evict_page_cache

    if work_dir is not None:
        Path(work_dir).mkdir(parents=True, exist_ok=True)
    config = load_config(model_dir)
    inputs = prompt_batch(model_dir, config, random_len=prompt_len)
    kw = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False,
          "pad_token_id": pad_token_id(config)}
    model_class = resolve_model_class(config)
    import hermes.api  # noqa: F401  (imports are runtime for every strategy, not loading)
    if strategy not in GEN_STRATEGIES:
        raise ValueError(f"unknown generation strategy {strategy!r}; choose one of {GEN_STRATEGIES}")
    files = Store(model_dir).files
    air = None
    if strategy == "airllm":
        air, files = _airllm(config, model_dir, work_dir)
    if cold:
        evict_page_cache(files)
    baseline = settled_rss()
    reset_peak_rss()
    clock = _Clock()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=work_dir) as offload:
        if strategy == "hermes":
            model = hermes.api.load(model_dir, budget=budget, loaders=loaders, io=io)
            out = model.generate(**inputs, streamer=clock, **kw)
            g = model.hermes.last_generation
            extra = {"weights_peak_bytes": g.weights_peak_bytes, "kv_reserved_bytes": g.kv_reserved_bytes,
                     "hermes_budget_bytes": g.budget_bytes, "weight_budget_bytes": g.weight_budget_bytes,
                     "auto_budget": model.hermes.auto_budget.describe() if model.hermes.auto_budget else None,
                     "resident_units": len(g.resident), "bytes_read_per_token": g.bytes_read_per_token,
                     "loaders": loaders, "io": io}
        else:
            model, extra = _other_model(strategy, model_class, model_dir, budget=budget, offload=offload, air=air,
                                        work_dir=work_dir, dtype=config.dtype)
            out = model.generate(**inputs, streamer=clock, **kw)
    end = time.perf_counter()
    peak = peak_rss()
    n = len(clock.times)
    return {"strategy": strategy, "budget_bytes": budget, "prompt_tokens": prompt_len, "new_tokens": n,
            "ttft_s": clock.times[0] - t0, "total_s": end - t0, "tokens_per_s": n / (end - t0),
            "decode_tokens_per_s": (n - 1) / (clock.times[-1] - clock.times[0]) if n > 1 else 0.0,
            "baseline_rss_bytes": baseline, "peak_rss_bytes": peak, "peak_rss_above_baseline_bytes": peak - baseline,
            "tokens": out[0, inputs["input_ids"].shape[1]:].tolist(), **extra}


class _Clock:
    """A transformers streamer that records when each new token arrives (the first ``put`` is the prompt)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.prompt_seen = False

    def put(self, value: Any) -> None:
        if self.prompt_seen:
            self.times.append(time.perf_counter())
        self.prompt_seen = True

    def end(self) -> None:
        pass


def _count_devices(device_map: dict[str, Any]) -> dict[str, int]:
    out: dict[str, int] = {}
    for dev in device_map.values():
        out[str(dev)] = out.get(str(dev), 0) + 1
    return out


def _other_model(strategy: str, model_class: Any, model_dir: str, *, budget: int, offload: str, air: Any,
                 work_dir: str | None, dtype: Any) -> tuple[Any, dict[str, Any]]:
    """The model as a user of ``full`` / ``accelerate`` / ``airllm`` loads it (timed by the caller), and what
    the report records about that load."""
    if strategy == "full":
        return model_class.from_pretrained(model_dir).eval(), {}
    if strategy == "accelerate":
        model = model_class.from_pretrained(model_dir, device_map="auto", max_memory={"cpu": budget},
                                            offload_folder=offload).eval()
        return model, {"device_map": _count_devices(getattr(model, "hf_device_map", {}))}
    return air(str(model_dir), device="cpu", layer_shards_saving_path=work_dir, dtype=dtype), {}


def _airllm(config: Any, model_dir: str, work_dir: str | None) -> tuple[Any, list[Any]]:
    """AirLLM's model class and its per-layer files (split once, before timing).

    Raises:
        HermesError: the model is not of the Llama family AirLLM runs.
    """
    if config.model_type not in AIRLLM_TYPES:
        raise HermesError(f"airllm runs Llama-family models ({', '.join(AIRLLM_TYPES)}) in this harness, not "
                          f"{config.model_type}")
    return _airllm_class(), _airllm_split(model_dir, work_dir)


def _airllm_class() -> Any:
    try:
        from airllm.airllm import AirLLMLlama2
    except ImportError as exc:
        raise RuntimeError(f"the airllm package is not installed ({exc}); pip install airllm==4.0.0") from exc

    class AirLLMNoTokenizer(AirLLMLlama2):  # type: ignore[misc, valid-type]
        """AirLLM loads a tokenizer it does not need for token ids; synthesized checkpoints have none."""

        def get_tokenizer(self, hf_token: Any = None) -> Any:
            return None

    return AirLLMNoTokenizer


def _airllm_split(model_dir: str, work_dir: str | None) -> list[Any]:
    """AirLLM's one-time split of the checkpoint into per-layer files (not timed); returns those files."""
    from airllm.utils import find_or_create_local_splitted_path

    if work_dir is None:
        raise ValueError("airllm needs a work directory for its per-layer copy of the checkpoint")
    from types import SimpleNamespace

    holder = SimpleNamespace()
    _airllm_class().set_layer_names_dict(holder)
    find_or_create_local_splitted_path(model_dir, work_dir, compression=None, layer_names=holder.layer_names_dict,
                                       hf_token=None, delete_original=False)
    return sorted(Path(work_dir).rglob("*.safetensors"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m hermes.baselines")
    p.add_argument("strategy", choices=[*STRATEGIES, "bounds", "profile", *(f"gen-{s}" for s in GEN_STRATEGIES)])
    p.add_argument("model_dir")
    p.add_argument("--budget", default="0")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--loaders", type=int, default=2)
    p.add_argument("--io", default="buffered")
    p.add_argument("--warm", action="store_true", help="do not evict the page cache first")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--work-dir", help="scratch space (accelerate offload folder, airllm's per-layer copy)")
    p.add_argument("--timeline", action="store_true", help="include the per-unit timeline (streaming strategies)")
    p.add_argument("--profile", help="pipeload: plan from this profile; profile: write the profile here")
    a = p.parse_args(argv)
    if a.strategy == "profile" and not a.profile:
        p.error("profile needs --profile PATH (where to write it)")
    if a.strategy.startswith("gen-"):
        res = run_generation_strategy(a.strategy[4:], a.model_dir,
                                      budget=a.budget if a.budget == "auto" else parse_bytes(a.budget),
                                      prompt_len=a.prompt_len, new_tokens=a.new_tokens, loaders=a.loaders,
                                      io=a.io, cold=not a.warm, work_dir=a.work_dir)
    elif a.strategy == "bounds":
        from hermes.bounds import profile_bounds

        res = profile_bounds(a.model_dir, seq_len=a.seq_len)
    elif a.strategy == "profile":
        res = make_profile(a.model_dir, seq_len=a.seq_len, out=a.profile)
    else:
        budget = parse_bytes(a.budget) if a.strategy not in ("full", "pipeswitch", "airllm") else 0
        try:
            res = run_strategy(a.strategy, a.model_dir, budget=budget, seq_len=a.seq_len, loaders=a.loaders,
                               io=a.io, cold=not a.warm, work_dir=a.work_dir, timeline=a.timeline,
                               profile=a.profile)
        except HermesError as exc:  # this strategy cannot run this model: said in the report
            res = {"strategy": a.strategy, "error": str(exc)}
    sys.stdout.write(json.dumps(res) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
