"""One measured forward pass of a checkpoint with PipeLoad (what ``hermes run`` does)."""
from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from hermes.api import forward_activation_bytes, open_model
from hermes.atomic import atomic_path
from hermes.engine import EngineConfig, PipeLoadEngine, minimum_budget, model_buffer_bytes, whole_model_bytes
from hermes.errors import HermesError, InputError
from hermes.figures import prediction
from hermes.inputs import build_inputs, output_tensors
from hermes.memory import auto_budget, parse_bytes, peak_rss, reset_peak_rss, settled_rss
from hermes.share import RUNTIME_SLACK_BYTES, Share, share
from hermes.store import evict_page_cache


def run_forward(model_dir: str | os.PathLike[str], *, budget: str | int | None = None, loaders: int = 2,
                prefetch: int | None = None, io: str = "buffered", resident: tuple[str, ...] = (), plan: Any = None,
                plan_source: str = "plan", cold: bool = False, save_output: str | os.PathLike[str] | None = None,
                timeline: bool = False, **input_args: Any) -> dict[str, Any]:
    """Open ``model_dir``, run one forward pass under ``budget`` and return its measurements.

    ``plan`` (a :class:`hermes.planner.Plan`) sets the budget and every engine option instead; the result then
    holds its predictions beside the measurements (``predictions``; ``plan_source`` names the plan there).
    ``input_args`` go to :func:`hermes.inputs.build_inputs` (text, input_ids, image, random_seq_len, batch); they
    are checked against the config before the model is opened. With ``cold`` the checkpoint files are evicted from
    the page cache first.
    """
    from hermes.skeleton import load_config

    if plan is not None:
        budget, loaders, prefetch, io, resident = (plan.weight_budget_bytes, plan.loaders, plan.prefetch, plan.io,
                                                   plan.resident)
    if budget is None:
        raise HermesError("give a budget (e.g. budget='300MiB' or 'auto') or a plan")
    auto = isinstance(budget, str) and budget.strip().lower() == "auto"
    budget_bytes = 0 if auto else parse_bytes(budget)
    check_save_path(save_output)
    t_open = time.perf_counter()
    inputs = build_inputs(model_dir, load_config(model_dir), **input_args)  # before any weight is read
    layout = open_model(model_dir)
    if cold:
        evict_page_cache(layout.store.files)
    baseline = settled_rss()  # before the engine claims its weight memory
    chosen = auto_budget() if auto else None
    shared = _share(layout, plan, chosen.budget_bytes if chosen else budget_bytes, inputs, tuple(resident))
    reset_peak_rss()
    engine = PipeLoadEngine(layout.model, layout.units, EngineConfig(shared.weights, loaders=loaders,
                                                                     prefetch=prefetch, io=io,
                                                                     resident=tuple(resident)))
    engine.install()
    open_s = time.perf_counter() - t_open
    try:
        with torch.no_grad():
            output = layout.model(**inputs)
        peak = peak_rss()
        stats = engine.last
        assert stats is not None
        result: dict[str, Any] = {
            "model_dir": str(Path(model_dir)), "auto_budget": chosen.describe() if chosen else None,
            "process_budget_bytes": shared.budget, "budget_share": shared.describe(),
            "activation_reserved_bytes": shared.activations, "slack_bytes": shared.slack,
            **_model_figures(layout, engine), "input_shape": {k: list(v.shape) for k, v in inputs.items()},
            "open_s": open_s, "io": io, "prefetch": prefetch, "cold": cold, **stats.to_dict(timeline=timeline),
            "baseline_rss_bytes": baseline, "peak_rss_bytes": peak, "peak_rss_above_baseline_bytes": peak - baseline,
            "output_path": None,
        }
        if plan is not None:
            result["predictions"] = plan_predictions(plan, stats, plan_source, cold=cold, rss_above=peak - baseline)
        if save_output is not None:
            result["output_path"] = str(save_outputs(output_tensors(output), save_output))
        return result
    finally:
        engine.remove()


def _model_figures(layout: Any, engine: PipeLoadEngine) -> dict[str, int]:
    return {"model_bytes": layout.nbytes,
            "model_buffer_bytes": model_buffer_bytes(layout.units),  # tensors in page-aligned buffers, each once
            "whole_model_bytes": whole_model_bytes(layout.units),  # the most the engine can hold for this model
            "units": len(layout.units),
            "min_budget_bytes": engine.min_budget}  # the minimum weight budget (hermes.figures)


def plan_predictions(plan: Any, stats: Any, source: str, *, cold: bool, rss_above: int) -> dict[str, Any]:
    """What ``plan`` predicted for one pass beside what the pass ``stats`` measured (:func:`hermes.figures.prediction`):
    the first pass's latency (the profile times cold reads: a warm page cache is faster), the weights peak, and
    the peak memory (weights + activations) beside the process's peak RSS above the runtime (``rss_above``)."""
    source = source if cold else f"{source}, made for a cold cache,"
    return {"latency_s": prediction(plan.predicted_first_pass_s, stats.latency_s, source),
            "weights_peak_bytes": prediction(plan.predicted_weights_peak_bytes, stats.weights_peak_bytes, source),
            "peak_rss_above_baseline_bytes": prediction(plan.predicted_peak_bytes, rss_above, source)}


def _share(layout: Any, plan: Any, budget: int, inputs: dict[str, torch.Tensor], resident: tuple[str, ...]
           ) -> Share:
    """The budget's share for this pass: a plan's (weights: what its budget leaves after the profiled activations
    and the runtime slack), else :func:`forward_share` of ``budget``."""
    if plan is None:
        return forward_share(layout, budget, inputs, resident)
    act = plan.activation_bytes
    return Share(plan.budget_bytes, plan.weight_budget_bytes, activations=act,
                 slack=min(RUNTIME_SLACK_BYTES, plan.budget_bytes - plan.weight_budget_bytes - act))


def forward_share(layout: Any, budget: int, inputs: dict[str, torch.Tensor], resident: tuple[str, ...] = ()
                  ) -> Share:
    """How ``budget`` is shared for one forward pass on ``inputs``: the weights get what this pass's activations
    and the runtime slack leave (:mod:`hermes.share`).

    Raises:
        BudgetError: the budget cannot hold the minimum weight budget and these activations.
    """
    tokens = inputs.get("input_ids")
    act = forward_activation_bytes(layout, *tokens.shape) if tokens is not None and tokens.dim() == 2 else 0
    return share(budget, minimum_budget(layout.units, resident), activations=act,
                 fix=", or a shorter or smaller input")


def forward_settings(model_dir: str | os.PathLike[str], *, plan_file: str | os.PathLike[str] | None = None,
                     budget: str | None = None, loaders: int | None = None, prefetch: int | None = None,
                     io: str | None = None, random_seq_len: int | None = None, batch: int = 1) -> dict[str, Any]:
    """:func:`run_forward` keywords: ``plan`` (and ``plan_source``) of ``plan_file`` (a plan.json from
    ``hermes plan``), else the given options with defaults (2 loaders, buffered I/O).

    When no option but a fixed ``budget`` is given and the input is random (``random_seq_len`` tokens, ``batch``
    rows; None: not a random input), the plan is made now from the cached profile of that input, if there is one.
    """
    from hermes.planner import Plan, plan
    from hermes.profile import cached_profile
    from hermes.profiler import profile_inputs

    if plan_file is not None:
        try:
            p = Plan.from_json(Path(plan_file).read_text())
        except (OSError, ValueError, TypeError, KeyError) as exc:
            raise HermesError(f"cannot read plan {plan_file}: {exc}; re-create it with `hermes plan`") from exc
        return {"plan": p, "plan_source": "plan"}
    if budget is None:
        raise HermesError("give --budget (e.g. --budget 300MiB) or --plan plan.json")
    if loaders is None and prefetch is None and io is None and budget != "auto" and random_seq_len is not None:
        inputs = profile_inputs(model_dir, random_seq_len, batch)
        prof = cached_profile(model_dir, {k: list(v.shape) for k, v in inputs.items()})
        if prof is not None:
            return {"plan": plan(prof, parse_bytes(budget)), "plan_source": "plan of the cached profile"}
    return {"budget": budget, "loaders": loaders or 2, "prefetch": prefetch, "io": io or "buffered", "resident": ()}


def reference_outputs(model_dir: str | os.PathLike[str], **input_args: Any) -> dict[str, torch.Tensor]:
    """Outputs of the unmodified transformers model, fully loaded with ``from_pretrained``, on the inputs
    ``run_forward`` builds from the same ``input_args`` (what "same outputs as the full model" compares with)."""
    from hermes.skeleton import load_config, resolve_model_class

    config = load_config(model_dir)
    model = resolve_model_class(config).from_pretrained(str(model_dir)).eval()
    with torch.no_grad():
        return output_tensors(model(**build_inputs(model_dir, config, **input_args)))


def check_save_path(path: str | os.PathLike[str] | None) -> None:
    """Refuse, before anything runs, an output path whose directory does not exist."""
    if path is not None and not Path(path).parent.is_dir():
        raise InputError(f"cannot save the output to {path}: directory {Path(path).parent} does not exist; create "
                         "it first")


def save_outputs(tensors: dict[str, torch.Tensor], path: str | os.PathLike[str]) -> Path:
    """Write output tensors to a safetensors file atomically."""
    from safetensors.torch import save_file

    path = Path(path)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp))
    return path


def run_generation(model_dir: str | os.PathLike[str], *, budget: str | int | None = None, max_new_tokens: int = 32,
                   texts: list[str] | None = None, ids: list[list[int]] | None = None,
                   random_len: int | None = None, batch: int = 1, do_sample: bool = False,
                   temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
                   seed: int = 0, loaders: int = 2, prefetch: int | None = None, io: str = "buffered",
                   plan: Any = None, cold: bool = False, timeline: bool = False,
                   on_token: Callable[[int, str | None], None] | None = None,
                   on_load: Callable[[], None] | None = None) -> dict[str, Any]:
    """Generate ``max_new_tokens`` per prompt under ``budget`` (weights + KV cache) and return the tokens and
    measurements (time to first token, tokens/s, bytes read per token, peak memory).

    Prompts: ``texts`` (the checkpoint's tokenizer), ``ids`` (token id lists) or ``random_len`` (``batch``
    random prompts); several prompts are left-padded into one batch that shares every layer load. With one
    prompt, ``on_token(id, text)`` is called as each token is produced (``text``: its decoded piece when the
    checkpoint has a tokenizer). Whatever can be checked from the config (a model that generates, a tokenizer for
    text, ids in the vocabulary, the length) is checked before the model is opened; then ``on_load()`` is called.
    """
    import hermes
    from hermes.inputs import has_tokenizer, load_tokenizer, pad_token_id
    from hermes.preflight import check_generates, check_generation_length
    from hermes.skeleton import load_config

    config = load_config(model_dir)
    check_generates(config, model_dir)  # also imports the model's code: the runtime's, not the budget's
    inputs = prompt_inputs(model_dir, config, texts=texts, ids=ids, random_len=random_len, batch=batch, seed=seed)
    first = next(iter(inputs.values()))
    if "input_ids" in inputs:
        check_generation_length(config, first.shape[1], max_new_tokens)
    tokenizer = load_tokenizer(model_dir) if has_tokenizer(model_dir) else None
    if on_load is not None:
        on_load()
    model = hermes.load(model_dir, budget, loaders=loaders, prefetch=prefetch, io=io, plan=plan)
    baseline = settled_rss()  # the runtime: the model opened (its skeleton), no weight memory claimed yet
    reset_peak_rss()
    if cold:
        evict_page_cache(model.hermes.layout.store.files)
    kwargs: dict[str, Any] = {"max_new_tokens": max_new_tokens, "do_sample": do_sample,
                              "pad_token_id": pad_token_id(config)}
    kwargs.update({k: v for k, v in (("temperature", temperature), ("top_k", top_k), ("top_p", top_p))
                   if v is not None})
    if on_token is not None and first.shape[0] == 1:
        kwargs["streamer"] = TokenStream(on_token, tokenizer)
    torch.manual_seed(seed)
    try:
        out = model.generate(**inputs, **kwargs)
        peak = peak_rss()
        stats = model.hermes.last_generation
    finally:
        model.hermes.remove()
    # an encoder-decoder's output is the decoder's: its start token, then the new tokens
    new = out[:, 1 if getattr(config, "is_encoder_decoder", False) else first.shape[1]:].tolist()
    return {
        "model_dir": str(Path(model_dir)), "model_bytes": model.hermes.layout.nbytes,
        "units": len(model.hermes.layout.units), "loaders": loaders, "prefetch": prefetch, "io": io, "cold": cold,
        "do_sample": do_sample, "seed": seed, **stats.to_dict(timeline=timeline),
        "auto_budget": model.hermes.auto_budget.describe() if model.hermes.auto_budget else None,
        "baseline_rss_bytes": baseline, "peak_rss_bytes": peak, "peak_rss_above_baseline_bytes": peak - baseline,
        "tokens": new, "texts": [tokenizer.decode(t, skip_special_tokens=True) for t in new] if tokenizer else None,
    }


def prompt_inputs(model_dir: str | os.PathLike[str], config: Any, *, texts: list[str] | None,
                   ids: list[list[int]] | None, random_len: int | None, batch: int, seed: int) -> dict[str, Any]:
    """The prompt batch to generate from; a speech model's prompt is audio: random features (or real ones via the
    API)."""
    from hermes.inputs import input_kind, prompt_batch

    if input_kind(config) == "audio":
        if texts is not None or ids is not None:
            raise InputError(f"this model ({config.model_type}) generates from audio, not a text prompt; use "
                             "--random-prompt N (random audio features), or hermes.load and generate in Python "
                             "with real input_features")
        return {k: v for k, v in build_inputs(model_dir, config, random_seq_len=random_len or 16, batch=batch,
                                              seed=seed).items() if not k.startswith("decoder")}
    return prompt_batch(model_dir, config, texts=texts, ids=ids, random_len=random_len, batch=batch, seed=seed)


class TokenStream:
    """A transformers streamer (``put``/``end``) that hands each new token of a single prompt to a callback."""

    def __init__(self, on_token: Callable[[int, str | None], None], tokenizer: Any) -> None:
        self.on_token, self.tokenizer = on_token, tokenizer
        self.prompt_seen = False
        self.ids: list[int] = []
        self.text = ""

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate first puts the prompt
            self.prompt_seen = True
            return
        for tok in value.reshape(-1).tolist():
            piece = None
            if self.tokenizer is not None:
                self.ids.append(tok)
                text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
                piece, self.text = text[len(self.text):], text
            self.on_token(tok, piece)

    def end(self) -> None:
        pass
