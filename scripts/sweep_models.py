"""Architecture sweep over the installed transformers (issue #23): every model_type with a model class, built
small by ``hermes.shrink``, written by ``save_pretrained``, loaded by ``from_pretrained`` with its defaults and
streamed by Hermes at the minimum budget and at 2.5x it.

    nice -n 19 .venv/bin/python scripts/sweep_models.py [--only TYPE[,TYPE]] [--resume] [--limit N] [--timeout S]
                                                        [--jobs N]

Each case runs in its own forked process under a timeout (a hang or a crash is recorded; the sweep goes on) and
its record goes to docs/results/sweep/sweep.json as soon as it is known (written atomically). Statuses:

- exact: every output tensor of both streamed forwards at both budgets equals transformers' bit for bit, greedy
  ``generate`` gives transformers' tokens (where the class generates), weights peak <= budget;
- differs: an output or a token differs (``max_abs_diff``);
- over-budget: the weights peak exceeded the budget;
- hermes-error: Hermes raised (type and message);
- transformers-limitation: transformers itself cannot run the case: a backend it needs is not installed, its
  default config does not load back from its own ``to_dict``, or its forward is not deterministic (so nothing
  can equal it bit for bit);
- setup-error: transformers raised on the small model or its inputs (a config the shrinker's generic rules do
  not fit, inputs the model needs that ``hermes.shrink.make_inputs`` does not make: video, grids, prompts, ...);
- timeout / crash: the case did not finish within the timeout, or its process died.

``--only`` re-runs the given types and merges them into the existing file; docs/results/sweep/sweep.md (the
counts and every non-exact case grouped by mechanism) is rewritten from the JSON after each case. The whole sweep
(649 types with transformers 5.23) takes about 13 minutes on one core.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import multiprocessing.connection
import os
import re
import resource
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import transformers  # noqa: E402

import hermes  # noqa: E402
from hermes import shrink  # noqa: E402
from hermes.atomic import atomic_write_text  # noqa: E402

FORMAT_VERSION = 1
OUT = Path(__file__).resolve().parents[1] / "docs" / "results" / "sweep" / "sweep.json"
FACTORS = (1.0, 2.5)  # budgets, as multiples of the minimum
NEW_TOKENS = 4
MAX_PARAM_BYTES = 64 << 20  # a shrunk model bigger than this: the shrinker missed a size
MEMORY_LIMIT = 8 << 30  # address space of one case
_LIMITATION = re.compile(
    r"requires? (the )?[\w\-\s,`']*(librar|backend|package|install)|pip install|is not installed|No module named"
    r"|trust_remote_code|not supported|NotImplementedError|is not available|can only be used with"
    r"|requires_backends|you need to install|flash_attn|Cannot import", re.I)


class CaseError(Exception):
    """A failure at one stage of a case, with the status it gives."""

    def __init__(self, status: str, stage: str, exc: BaseException | str):
        text = exc if isinstance(exc, str) else f"{type(exc).__name__}: {exc}"
        super().__init__(text)
        self.status, self.stage, self.text = status, stage, text


def _before_hermes(stage: str, exc: BaseException) -> CaseError:
    """A failure of transformers' own path (build, save, load, run): a limitation where it says so, else the
    sweep's small config or inputs are not valid for it."""
    text = f"{type(exc).__name__}: {exc}"
    status = "transformers-limitation" if _LIMITATION.search(text) or isinstance(exc, ImportError) \
        else "setup-error"
    return CaseError(status, stage, exc)


# --- comparing outputs --------------------------------------------------------------------------------------

def flatten(x: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor of a model output, by path (nested outputs, tuples, caches' keys and values)."""
    out: dict[str, torch.Tensor] = {}
    if isinstance(x, torch.Tensor):
        out[prefix or "."] = x
    elif hasattr(x, "items"):
        for k, v in x.items():
            out.update(flatten(v, f"{prefix}.{k}"))
    elif isinstance(x, (list, tuple)):
        for i, v in enumerate(x):
            out.update(flatten(v, f"{prefix}[{i}]"))
    elif hasattr(x, "layers") and isinstance(x.layers, list):  # a transformers Cache
        for i, layer in enumerate(x.layers):
            for k in ("keys", "values"):
                v = getattr(layer, k, None)
                if isinstance(v, torch.Tensor):
                    out[f"{prefix}.layers[{i}].{k}"] = v
    return out


def max_diff(want: Any, got: Any) -> tuple[float, str]:
    """Largest absolute difference over every output tensor (inf: a tensor missing or of another shape or a
    NaN where the other has none) and the path where it is."""
    a, b = flatten(want), flatten(got)
    worst, where = 0.0, ""
    for k in sorted(set(a) | set(b)):
        if k not in a or k not in b or a[k].shape != b[k].shape:
            return float("inf"), k
        x, y = a[k], b[k]
        if not x.is_floating_point() and not x.is_complex():
            d = 0.0 if torch.equal(x, y) else float("inf")
        else:
            x, y = x.detach().double(), y.detach().double()
            nan = torch.isnan(x) | torch.isnan(y)
            if not torch.equal(torch.isnan(x), torch.isnan(y)):
                d = float("inf")
            elif bool(nan.all()):
                d = 0.0
            else:
                diff = (x - y).abs()[~nan]
                d = 0.0 if torch.equal(x[~nan], y[~nan]) else float(diff.max())
        if d > worst or (d == worst and not where):
            worst, where = d, k
    return worst, where


# --- one case -----------------------------------------------------------------------------------------------

def _peak(history: list[Any]) -> int:
    return max(max(p.weights_peak_bytes, *(a for _, a, _ in p.memory)) if p.memory else p.weights_peak_bytes
               for p in history)


def _generation_defaults(model: torch.nn.Module) -> None:
    """Ids ``generate`` needs that a default config may leave unset (an encoder-decoder's decoder start, a pad
    id), as a real checkpoint's generation_config.json sets them."""
    gc = getattr(model, "generation_config", None)
    if gc is None:
        return
    if getattr(model.config, "is_encoder_decoder", False) and gc.decoder_start_token_id is None:
        gc.decoder_start_token_id = next((i for i in (gc.bos_token_id, gc.pad_token_id) if isinstance(i, int)), 0)
    if gc.pad_token_id is None and isinstance(gc.eos_token_id, int):
        gc.pad_token_id = gc.eos_token_id


def input_variants(model: torch.nn.Module, config: Any) -> list[tuple[str, dict[str, Any]]]:
    """``shrink.make_inputs`` and the other layouts some models take, in the order to try them: a multimodal
    language model's text with an image (as many image tokens as ``get_image_features`` gives features), images
    as a video of the config's frames or of one frame (B, frames, C, H, W), mel features frames-first; each with a
    label of what was changed ("" for make_inputs itself)."""
    base = shrink.make_inputs(model, config)
    out = [("", base)]
    if shrink.image_token(config) is not None and "input_ids" in base:
        try:
            out.insert(0, ("", with_image(model, config, base)))
            out[1] = ("text only", base)
        except Exception as exc:  # noqa: BLE001 - the image features could not be had: text only
            out = [(f"text only (get_image_features: {type(exc).__name__}: {str(exc)[:200]})", base)]
    pv = base.get("pixel_values")
    if isinstance(pv, torch.Tensor) and pv.dim() == 4:
        frames = next((c.num_frames for c in (getattr(config, "vision_config", None), config)
                       if isinstance(getattr(c, "num_frames", None), int)), None)
        if frames:
            out.append((f"pixel_values as {frames} frames",
                        {**base, "pixel_values": pv.unsqueeze(1).expand(-1, frames, -1, -1, -1).contiguous()}))
        out.append(("pixel_values as one frame", {**base, "pixel_values": pv.unsqueeze(1)}))
    feats = base.get("input_features")
    if isinstance(feats, torch.Tensor) and feats.dim() == 3:
        out.append(("input_features frames-first", {**base, "input_features": feats.transpose(1, 2).contiguous()}))
    return out


def with_image(model: torch.nn.Module, config: Any, text: dict[str, Any]) -> dict[str, Any]:
    """The text with an image: the pixels, and after the first two tokens as many image tokens as
    ``get_image_features`` gives features per image."""
    pixels = shrink.pixels(config)
    with torch.no_grad():
        try:
            t = _first_tensor(model.get_image_features(pixel_values=pixels))
        except Exception:  # noqa: BLE001 - some take images as (B, images, C, H, W)
            pixels = pixels.unsqueeze(1)
            t = _first_tensor(model.get_image_features(pixel_values=pixels))
    tc = config.get_text_config(decoder=True)
    if t is None or t.numel() % (tc.hidden_size * shrink.BATCH):
        raise ValueError(f"get_image_features gave no features of width {tc.hidden_size}")
    ids = text["input_ids"]
    n = t.numel() // (tc.hidden_size * shrink.BATCH)
    ids = torch.cat([ids[:, :2], torch.full((shrink.BATCH, n), shrink.image_token(config)), ids[:, 2:]], dim=1)
    extra = {"attention_mask": torch.ones_like(ids)} if "attention_mask" in text else {}
    return {**text, "input_ids": ids, "pixel_values": pixels, **extra}


def _first_tensor(x: Any) -> torch.Tensor | None:
    """The image features in what ``get_image_features`` returns (a tensor, a list of them, an output)."""
    if isinstance(x, torch.Tensor) or x is None:
        return x
    if isinstance(getattr(x, "pooler_output", None), (torch.Tensor, list, tuple)):
        return _first_tensor(x.pooler_output)
    if isinstance(x, (list, tuple)):
        ts = [_first_tensor(y) for y in x]
        return torch.cat([t.reshape(-1) for t in ts]) if ts and all(t is not None for t in ts) else None
    if hasattr(x, "values"):
        return next((t for v in x.values() if (t := _first_tensor(v)) is not None), None)
    return None


def seed_weights(model: torch.nn.Module, seed: int = 0) -> None:
    """Add small seeded noise to every floating parameter (some inits are zeros or ones: make every tensor
    matter), as ``hermes.zoo.build`` does."""
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed)
        for p in model.parameters():
            if p.is_floating_point():
                p.add_(torch.randn(p.shape, generator=g) * 0.02)


def _inputs(ref: torch.nn.Module) -> tuple[dict[str, Any], Any, str]:
    """Inputs and transformers' output: the first of ``shrink.input_variants`` transformers runs, and what was
    changed to get there (with the first error)."""
    first: Exception | None = None
    for label, x in input_variants(ref, ref.config):
        try:
            with torch.no_grad():
                want = ref(**x)
        except Exception as exc:  # noqa: BLE001 - the next layout is tried
            first = first or exc
            continue
        note = f"{label} (as made: {type(first).__name__}: {str(first)[:300]})" if label and first else label
        return x, want, note
    assert first is not None
    raise first


def run_case(r: dict[str, Any], path: Path) -> dict[str, Any]:
    """Build, save, load and stream one architecture; ``r`` (model_type, model_class) gets what happened, also
    when it raises."""
    model_type, class_name = r["model_type"], r["model_class"]
    stage = "config"
    try:
        default = transformers.CONFIG_MAPPING[model_type]()
        try:
            type(default).from_dict(default.to_dict())
        except Exception as exc:  # noqa: BLE001
            raise CaseError("transformers-limitation", "config",
                            f"the default config does not load back from its own to_dict: {type(exc).__name__}: "
                            f"{exc}") from exc
        config = shrink.shrink_config(default)
        stage = "build"
        cls = getattr(transformers, class_name)
        torch.manual_seed(0)
        model = cls(config).eval()
        seed_weights(model)
        _generation_defaults(model)
        r["param_bytes"] = sum(p.numel() * p.element_size() for p in model.parameters())
        if r["param_bytes"] > MAX_PARAM_BYTES:
            raise CaseError("setup-error", "build", f"shrunk model still has {r['param_bytes']} bytes of parameters")
        stage = "save"
        model.save_pretrained(path)
        del model
        stage = "reference"
        ref, info = cls.from_pretrained(path, output_loading_info=True)
        ref = ref.eval()
        if info.get("missing_keys"):  # its own save/load round trip leaves weights random (ShieldGemma 2's config)
            r["reference_missing"] = sorted(info["missing_keys"])[:3] + [f"({len(info['missing_keys'])} in all)"]
        stage = "inputs"
        x, want, note = _inputs(ref)
        if note:
            r["inputs_note"] = note
        r["inputs"] = {k: list(v.shape) for k, v in x.items() if isinstance(v, torch.Tensor)}
        with torch.no_grad():
            again = ref(**x)
        d, where = max_diff(want, again)
        if d != 0.0:
            raise CaseError("transformers-limitation", "inputs",
                            f"transformers' forward is not deterministic ({d:g} at {where})")
    except CaseError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise _before_hermes(stage, exc) from exc
    got = _stream(r, path, ref, x, want)
    if any(f["max_abs_diff"] != 0.0 for f in r["forward"]):
        r["first_divergence"] = first_divergence(ref, path, x, int(r["minimum_budget"] * FACTORS[-1]))
        if r.get("experts"):
            _eager_reference(r, path, x, got)
    if ref.can_generate():
        _generate(r, path, ref, x)
    return r


def _stream(r: dict[str, Any], path: Path, ref: Any, x: dict[str, Any], want: Any) -> Any:
    """Forward twice at each budget; Hermes' first output at the minimum."""
    from hermes.engine import minimum_budget

    stage = "hermes-load"
    try:
        probe = hermes.load(path, budget=2**40)
        units = probe.hermes.units
        pinned = [units[i].name for i in probe.hermes.pinned]
        probe.hermes.remove()
        r["units"], r["pinned"] = len(units), pinned
        r["experts"] = sum(1 for u in units if u.kind == "expert")
        first = None
        r["minimum_budget"] = minimum = minimum_budget(units, pinned)
        r["forward"] = []
        for f in FACTORS:
            budget = int(minimum * f)
            stage = f"hermes-forward@{f}x"
            model = hermes.load(path, budget=budget)
            model.hermes.history = history = []
            with torch.no_grad():
                got = [model(**x) for _ in range(2)]
            diff, where = max(max_diff(want, g) for g in got)
            first = got[0] if first is None else first
            peak = _peak(history)
            model.hermes.remove()
            r["forward"].append({"factor": f, "budget": budget, "max_abs_diff": diff, "where": where,
                                 "weights_peak": peak, "surprises_after": sum(p.surprises for p in history[1:])})
    except Exception as exc:  # noqa: BLE001
        if stage == "hermes-load" and r.get("reference_missing") and "lacks" in str(exc):
            raise CaseError("transformers-limitation", stage,
                            f"transformers' from_pretrained of what its save_pretrained wrote leaves weights missing "
                            f"(initialized at random: {r['reference_missing']}); Hermes refuses the checkpoint: "
                            f"{type(exc).__name__}: {exc}") from exc
        raise CaseError("hermes-error", stage, exc) from exc
    return first


def _trace(model: torch.nn.Module, x: dict[str, Any]) -> list[tuple[str, str, dict[str, torch.Tensor]]]:
    """Every submodule's output in the order they finish: (name, class, tensors)."""
    seen: list[tuple[str, str, dict[str, torch.Tensor]]] = []

    def hook(name: str) -> Any:
        return lambda m, a, o: seen.append((name, type(m).__name__, {
            k: v.detach().clone() for k, v in flatten(o).items()}))
    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if n]
    try:
        with torch.no_grad():
            model(**x)
    finally:
        for h in handles:
            h.remove()
    return seen


def first_divergence(ref: torch.nn.Module, path: Path, x: dict[str, Any], budget: int) -> str:
    """The first submodule (in the order they finish) whose output differs between transformers and Hermes."""
    try:
        model = hermes.load(path, budget=budget)
        want, got = _trace(ref, x), _trace(model, x)
        model.hermes.remove()
        for (n, cls, a), (m, _, b) in zip(want, got, strict=False):
            if n != m:
                return f"modules finish in another order from {n} (transformers) / {m} (Hermes)"
            d, where = max_diff(a, b)
            if d != 0.0:
                return f"{n} ({cls}){where}: {d:.2g}"
        return "no submodule output differs"
    except Exception as exc:  # noqa: BLE001 - a diagnostic only
        return f"not traced: {type(exc).__name__}: {str(exc)[:200]}"


def _eager_reference(r: dict[str, Any], path: Path, x: dict[str, Any], got: Any) -> None:
    """Where a mixture of experts differs: the difference against transformers' eager experts kernel (the one
    Hermes runs each routed expert with) instead of its default one."""
    try:
        ref = getattr(transformers, r["model_class"]).from_pretrained(path, experts_implementation="eager").eval()
        with torch.no_grad():
            r["eager_reference_diff"] = max_diff(ref(**x), got)[0]
    except Exception as exc:  # noqa: BLE001 - a diagnostic only
        r["eager_reference_diff"] = f"{type(exc).__name__}: {str(exc)[:200]}"


def _generate(r: dict[str, Any], path: Path, ref: Any, x: dict[str, Any]) -> None:
    from hermes.generation import budget_for

    kw = {**{k: v for k, v in x.items() if not k.startswith("decoder")}, "max_new_tokens": NEW_TOKENS,
          "do_sample": False}
    try:
        with torch.no_grad():
            want = ref.generate(**kw)
    except Exception as exc:  # noqa: BLE001 - transformers' own generate fails: not a Hermes case
        r["generate_note"] = f"transformers' generate failed: {type(exc).__name__}: {str(exc)[:300]}"
        return
    r["generate"] = []
    stage = "hermes-generate"
    try:
        for f in FACTORS:
            stage = f"hermes-generate@{f}x"
            budget = budget_for(ref, int(r["minimum_budget"] * f), kw)
            model = hermes.load(path, budget=budget)
            with torch.no_grad():
                got = model.generate(**kw)
            g = model.hermes.last_generation
            same = isinstance(got, torch.Tensor) and isinstance(want, torch.Tensor) and torch.equal(got, want)
            if not same and not isinstance(want, torch.Tensor):
                same = max_diff(want, got)[0] == 0.0
            r["generate"].append({"factor": f, "budget": budget, "exact": bool(same),
                                  "weights_peak": g.weights_peak_bytes,
                                  **({} if same else {"want": _short(want), "got": _short(got)})})
            model.hermes.remove()
    except Exception as exc:  # noqa: BLE001
        raise CaseError("hermes-error", stage, exc) from exc


def _short(ids: Any) -> Any:
    return ids.tolist() if isinstance(ids, torch.Tensor) and ids.numel() <= 64 else None


def verdict(r: dict[str, Any]) -> str:
    """The status of a finished case."""
    fw, gen = r.get("forward", []), r.get("generate", [])
    if any(f["weights_peak"] > f["budget"] for f in fw + gen):
        return "over-budget"
    if any(f["max_abs_diff"] != 0.0 for f in fw) or any(not g["exact"] for g in gen):
        return "differs"
    return "exact"


def child(model_type: str, class_name: str, work: str, result: str, log: str) -> None:
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    r: dict[str, Any] = {"model_type": model_type, "model_class": class_name}
    try:
        run_case(r, Path(work) / "ckpt")
        r["status"] = verdict(r)
    except CaseError as exc:
        r.update(status=exc.status, stage=exc.stage, error=exc.text[:2000], where=_where(exc))
    except BaseException as exc:  # noqa: BLE001 - anything else is the sweep's own bug
        r.update(status="setup-error", stage="sweep", error=f"{type(exc).__name__}: {exc}"[:2000], where=_where(exc))
    r["seconds"] = round(time.perf_counter() - t0, 2)
    Path(result).write_text(json.dumps(r, default=str))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _where(exc: BaseException) -> str:
    """Where the error was raised: the innermost frame, and the innermost frames in transformers' model code and
    in Hermes (file:line function)."""
    e = exc.__cause__ or exc
    tb = traceback.extract_tb(e.__traceback__)
    if not tb:
        return ""
    at = [tb[-1]]
    for part in ("/transformers/models/", "/hermes/"):
        f = next((f for f in reversed(tb) if part in f.filename), None)
        if f is not None and f not in at:
            at.append(f)
    return "; ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in at)


class _Case:
    """One case's forked process, its work directory and when it started."""

    def __init__(self, model_type: str, class_name: str) -> None:
        self.model_type, self.class_name = model_type, class_name
        self.work = tempfile.mkdtemp(prefix=f"sweep-{model_type}-")
        self.result, self.log = os.path.join(self.work, "result.json"), os.path.join(self.work, "log.txt")
        ctx = multiprocessing.get_context("fork")
        self.p = ctx.Process(target=child, args=(model_type, class_name, self.work, self.result, self.log),
                             daemon=True)
        self.t0 = time.perf_counter()
        self.p.start()

    def record(self, timeout: float, ended: bool) -> dict[str, Any]:
        """Its record once the process ended (``ended``: its sentinel is ready — it is still exiting, its memory
        being freed, so it is waited for), or killed past ``timeout``."""
        try:
            if ended:
                self.p.join(timeout)  # bounded all the same: one that does not end is killed below
            if self.p.is_alive():
                self.p.kill()
                self.p.join()
                return {"model_type": self.model_type, "model_class": self.class_name, "status": "timeout",
                        "error": f"did not finish within {timeout:g} s",
                        "seconds": round(time.perf_counter() - self.t0, 1), "log_tail": _tail(self.log)}
            self.p.join()
            if os.path.exists(self.result):
                return json.loads(Path(self.result).read_text())
            return {"model_type": self.model_type, "model_class": self.class_name, "status": "crash",
                    "error": f"process exited with {self.p.exitcode}",
                    "seconds": round(time.perf_counter() - self.t0, 1), "log_tail": _tail(self.log)}
        finally:
            shutil.rmtree(self.work, ignore_errors=True)


def run_all(todo: list[Any], timeout: float, jobs: int) -> Iterator[tuple[Any, dict[str, Any]]]:
    """(candidate, record) of every case, ``jobs`` forked processes at a time (each case single-threaded), forked
    from this one thread only; in the order they finish."""
    waiting, running = list(todo), {}
    while waiting or running:
        while waiting and len(running) < jobs:
            c = waiting.pop(0)
            case = _Case(c.model_type, c.model_class)
            running[case.p.sentinel] = (c, case)
        soonest = min(case.t0 for _, case in running.values()) + timeout
        ended = multiprocessing.connection.wait(list(running), timeout=max(soonest - time.perf_counter(), 0.0))
        late = [s for s, (_, case) in running.items() if time.perf_counter() - case.t0 > timeout]
        for s in dict.fromkeys([*ended, *late]):
            c, case = running.pop(s)
            yield c, case.record(timeout, s in ended)


def _tail(log: str, n: int = 1500) -> str:
    try:
        return Path(log).read_text(errors="replace")[-n:]
    except OSError:
        return ""


def summary(cases: dict[str, dict[str, Any]]) -> dict[str, int]:
    counts: dict[str, int] = {"tried": len(cases)}
    for r in cases.values():
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    return counts


def save(out: Path, doc: dict[str, Any]) -> None:
    doc["summary"] = summary(doc["cases"])
    atomic_write_text(out, json.dumps(doc, indent=1, default=str))
    atomic_write_text(out.with_suffix(".md"), report(doc))


def mechanism(r: dict[str, Any]) -> str:
    """What went wrong, with numbers and paths blanked so the same mechanism groups together."""
    if r["status"] == "differs":
        fw = [f for f in r.get("forward", []) if f["max_abs_diff"] != 0.0]
        worst = max(fw, key=lambda f: f["max_abs_diff"], default=None)
        cls = re.search(r"\((\w+)\)", r.get("first_divergence", ""))
        text = (f"forward differs (up to {worst['max_abs_diff']:.1g}), first in a "
                f"{cls.group(1) if cls else r.get('first_divergence', '?')}") if worst else "forward exact"
        if any(not g["exact"] for g in r.get("generate", [])):
            text += "; greedy tokens differ"
        return text
    if r["status"] == "over-budget":
        return "weights peak above the budget"
    text = " ".join(r.get("error", "").split())
    return re.sub(r"/tmp/\S+", "PATH", re.sub(r"\b\d+\b", "N", text))[:160]


def report(doc: dict[str, Any]) -> str:
    """docs/results/sweep/sweep.md: the counts, and every case that is not exact grouped by status and mechanism."""
    groups: dict[tuple[str, str], list[str]] = {}
    for t, r in sorted(doc["cases"].items()):
        if r["status"] != "exact":
            groups.setdefault((r["status"], mechanism(r)), []).append(t)
    lines = [f"# Architecture sweep (transformers {doc['transformers']}, torch {doc['torch']})", "",
             "Written by `scripts/sweep_models.py` from `sweep.json` (see the script's doc for the statuses).", "",
             "| status | model types |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in doc["summary"].items()]
    lines += ["", "## Not exact, by mechanism", ""]
    for (status, why), types in sorted(groups.items(), key=lambda kv: (kv[0][0], -len(kv[1]))):
        lines.append(f"- **{status}** ({len(types)}): `{why}`: {', '.join(types)}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", default="", help="model types, comma-separated")
    p.add_argument("--resume", action="store_true", help="skip the types already in the output")
    p.add_argument("--limit", type=int, default=0, help="at most this many cases")
    p.add_argument("--timeout", type=float, default=180.0, help="seconds per case")
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--jobs", type=int, default=1, help="cases run at once (each on one core)")
    args = p.parse_args(argv)
    transformers.logging.set_verbosity_error()
    torch.set_num_threads(1)
    todo = shrink.candidates()
    if args.only:
        only = set(args.only.split(","))
        todo = [c for c in todo if c.model_type in only]
        unknown = only - {c.model_type for c in todo}
        if unknown:
            print(f"no model class for: {', '.join(sorted(unknown))}", file=sys.stderr)
    doc: dict[str, Any] = {"format_version": FORMAT_VERSION, "transformers": transformers.__version__,
                           "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "factors": list(FACTORS),
                           "new_tokens": NEW_TOKENS, "cases": {}}
    if (args.resume or args.only) and args.out.exists():
        old = json.loads(args.out.read_text())
        if old.get("format_version") == FORMAT_VERSION:
            doc["cases"] = old["cases"]
    if args.resume:
        todo = [c for c in todo if c.model_type not in doc["cases"]]
    if args.limit:
        todo = todo[: args.limit]
    t0 = time.perf_counter()
    for i, (c, r) in enumerate(run_all(todo, args.timeout, args.jobs), 1):
        r["mapping"] = c.mapping
        doc["cases"][c.model_type] = r
        save(args.out, doc)
        err = f"  {r.get('stage', '')} {r.get('error', '')[:120]}" if r["status"] != "exact" else ""
        print(f"[{i}/{len(todo)}] {c.model_type} ({c.model_class}): {r['status']} {r.get('seconds', '')}s{err}",
              flush=True)
    doc["elapsed_s"] = round(time.perf_counter() - t0, 1)
    save(args.out, doc)
    print(json.dumps(doc["summary"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
