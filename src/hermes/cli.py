"""Command-line interface: parses arguments, calls the library with keywords, prints."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from hermes.errors import HermesError
from hermes.memory import format_bytes

DEFAULT_CACHE = Path(os.environ.get("HERMES_CACHE", Path.home() / ".cache" / "hermes"))


def _ids(text: str) -> list[int]:
    try:
        return [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--input-ids takes comma-separated integers such as 1,2,3, got {text!r}") from None


def _positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {n}")
    return n


def _non_negative_int(text: str) -> int:
    return 0 if text.strip() == "0" else _positive_int(text)


def _port(text: str) -> int:
    n = _non_negative_int(text)
    if n > 65535:
        raise argparse.ArgumentTypeError(f"a TCP port is at most 65535, got {n}")
    return n


def _positive_float(text: str) -> float:
    try:
        x = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}") from None
    if not x > 0 or x == float("inf"):
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return x


def _probability(text: str) -> float:
    x = _positive_float(text)
    if x > 1:
        raise argparse.ArgumentTypeError(f"must lie in (0, 1], got {text}")
    return x


def _budget(text: str) -> str:
    """A budget the machine can hold (parsed now, so that a bad one fails before any work)."""
    from hermes.errors import BudgetError
    from hermes.memory import parse_bytes

    if text.strip().lower() == "auto":
        raise argparse.ArgumentTypeError("'auto' (the memory this process may still take) is for run and generate; "
                                         "plan and bench compare fixed budgets: give a size such as 300MiB")
    try:
        n = parse_bytes(text)
    except BudgetError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    ram = _machine_ram()
    if ram is not None and n > ram:
        raise argparse.ArgumentTypeError(f"{text} is more than this machine's RAM ({format_bytes(ram)}); give at "
                                         "most the memory the device really has")
    return text


def _out_file(text: str) -> Path:
    """A file to write: its folder must exist and be writable (checked before any work; nothing is created)."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a folder; give a file name in it, e.g. {path / 'out.json'}")
    parent = path.parent
    if not parent.is_dir():
        raise argparse.ArgumentTypeError(f"folder {parent} does not exist; create it first (mkdir -p {parent})")
    if not os.access(parent, os.W_OK):
        raise argparse.ArgumentTypeError(f"folder {parent} is not writable; pick another place")
    return path


def _out_dir(text: str) -> Path:
    """An output folder: created if missing (its parent must exist), refused if it is a file or not writable."""
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a file, not a folder; give a folder for the results")
    if not path.exists():
        _out_file(text)  # its parent must exist and be writable
    elif not os.access(path, os.W_OK):
        raise argparse.ArgumentTypeError(f"folder {text} is not writable; pick another place")
    return path


def _budget_or_auto(text: str) -> str:
    """A budget, or "auto": the memory this process may still take, measured when the model opens."""
    return "auto" if text.strip().lower() == "auto" else _budget(text)


def _machine_ram() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--budget", type=_budget_or_auto, help="memory budget, e.g. 300MiB, 1.5GB (weights; with a plan: "
                   "weights + activations; generate: + KV cache), or auto: what this process may still take "
                   "(cgroup limit or MemAvailable) minus a margin, covering weights, KV cache and activations")
    p.add_argument("--plan", type=Path, help="a plan.json from `hermes plan` (sets budget, loaders, io, ...)")
    p.add_argument("--loaders", type=_positive_int, default=None,
                   help="number of loading agents (default: planned, else 2)")
    p.add_argument("--prefetch", type=_positive_int, default=None, help="most units in flight (default: budget-bound)")
    p.add_argument("--io", choices=["buffered", "direct"], default=None,
                   help="read mode, direct = O_DIRECT (default: planned, else buffered)")
    p.add_argument("--cold", action="store_true", help="evict the checkpoint from the page cache first")


def _add_input_args(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--text", help="text to encode with the checkpoint's tokenizer")
    g.add_argument("--input-ids", type=_ids, help="comma-separated token ids, e.g. 1,2,3")
    g.add_argument("--image", help="image file (vision models)")
    g.add_argument("--random-input", type=int, metavar="SEQ_LEN", help="random token ids of this length "
                   "(vision models: a random image of the model's size)")
    p.add_argument("--batch", type=_positive_int, default=1, help="batch size of --random-input (default 1)")


def build_parser() -> argparse.ArgumentParser:
    from importlib.metadata import PackageNotFoundError, version

    from hermes.synth import ARCHS, DTYPES

    try:
        ver = version("hermes-pipeload")
    except PackageNotFoundError:
        ver = "unknown"
    parser = argparse.ArgumentParser(prog="hermes", description="Run big Transformers under a memory budget.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what the library does")
    parser.add_argument("--version", action="version", version=f"hermes {ver}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("synth", help="write a random-weight checkpoint with a real architecture")
    p.add_argument("arch", choices=list(ARCHS), metavar="ARCH", help=f"one of: {', '.join(ARCHS)}")
    p.add_argument("out_dir", type=Path, help="directory to create (it must not hold a checkpoint yet)")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32", help="weight dtype (default float32)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights (same seed, same bytes)")
    p.add_argument("--force", action="store_true", help="replace a checkpoint already in OUT_DIR")

    p = sub.add_parser("run", help="one forward pass with PipeLoad; prints latency and memory")
    p.add_argument("model_dir", type=Path)
    _add_engine_args(p)
    _add_input_args(p)
    p.add_argument("--save-output", type=_out_file, metavar="FILE.safetensors", help="write the output tensors here")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--timeline", action="store_true", help="include the per-unit timeline in --json")

    p = sub.add_parser("generate", help="generate text under a memory budget (weights + KV cache), streaming tokens")
    p.add_argument("model_dir", type=Path)
    p.add_argument("--budget", type=_budget_or_auto,
                   help="memory budget for weights + KV cache, e.g. 300MiB; or auto: what this process may still "
                   "take (cgroup limit or MemAvailable) minus a margin, covering weights, KV cache and activations")
    p.add_argument("--plan", type=Path, help="a plan.json from `hermes plan` (its budget, loaders and I/O)")
    p.add_argument("--loaders", type=_positive_int, default=1, help="number of loading agents (default 1)")
    p.add_argument("--prefetch", type=_positive_int, default=None, help="most units in flight (default: budget-bound)")
    p.add_argument("--io", choices=["buffered", "direct"], default="direct",
                   help="read mode (default direct = O_DIRECT, the measured best here)")
    p.add_argument("--cold", action="store_true", help="evict the checkpoint from the page cache first")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--prompt", action="append", help="prompt text (the checkpoint's tokenizer); repeat for a batch")
    g.add_argument("--prompt-ids", action="append", type=_ids, help="comma-separated token ids; repeat for a batch")
    g.add_argument("--prompts-file", type=Path, help="a text file with one prompt per line (one batch)")
    g.add_argument("--random-prompt", type=_positive_int, metavar="LEN",
                   help="random prompts of LEN tokens (default 16)")
    p.add_argument("--batch", type=_positive_int, default=1, help="number of --random-prompt prompts (default 1)")
    p.add_argument("--max-new-tokens", type=_positive_int, default=32, help="tokens to generate (default 32)")
    p.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=_positive_float, help="sampling temperature > 0 (with --do-sample)")
    p.add_argument("--top-k", type=_positive_int, help="sample among the K most likely tokens (with --do-sample)")
    p.add_argument("--top-p", type=_probability,
                   help="sample among the most likely tokens of total probability P in (0, 1] (with --do-sample)")
    p.add_argument("--seed", type=int, default=0, help="seed of sampling and of random prompts")
    p.add_argument("--json", action="store_true", help="print one JSON object (no streaming)")
    p.add_argument("--timeline", action="store_true", help="include every pass's per-unit timeline in --json")

    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP server; concurrent requests share each layer read")
    p.add_argument("model_dir", type=Path)
    p.add_argument("--budget", type=_budget_or_auto, default="auto",
                   help="memory for weights + KV cache pool + a step's activations, e.g. 300MiB; or auto (default): "
                   "what this process may still take (cgroup limit or MemAvailable) minus a margin")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=_port, default=8000, help="TCP port (default 8000; 0: any free port)")
    p.add_argument("--max-batch", type=_positive_int, default=8,
                   help="most requests decoded together in one step (default 8)")
    p.add_argument("--max-queue", type=_non_negative_int, default=32,
                   help="most requests waiting beyond those; more are refused with 429 (default 32)")
    p.add_argument("--kv-cache", type=_budget, help="KV cache pool inside the budget (default: a quarter of it, at "
                   "most 512 positions x --max-batch)")
    p.add_argument("--api-key", default=os.environ.get("HERMES_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1/ (default: $HERMES_API_KEY; none: open)")
    p.add_argument("--model-name", help="the model id clients send (default: the directory's name)")
    p.add_argument("--loaders", type=_positive_int, default=1, help="number of loading agents (default 1)")
    p.add_argument("--io", choices=["buffered", "direct"], default="direct", help="read mode (default direct)")

    p = sub.add_parser("profile", help="measure per-unit load/compute times and contention on this machine")
    p.add_argument("model_dir", type=Path)
    p.add_argument("--seq-len", type=_positive_int, default=128, help="input length of text models (default 128)")
    p.add_argument("--batch", type=_positive_int, default=1, help="batch size of the input (default 1)")
    p.add_argument("--repeat", type=_positive_int, default=3, help="measured passes per setting (default 3)")
    p.add_argument("-o", "--out", type=_out_file, help="also write the profile here (it is always cached next to "
                   "the model, in MODEL_DIR/.hermes/)")

    p = sub.add_parser("plan", help="the fastest execution plan that fits a memory budget")
    p.add_argument("model_dir", type=Path)
    p.add_argument("--budget", type=_budget, required=True, help="weights + activations, e.g. 300MiB")
    p.add_argument("--profile", type=Path, help="profile.json (default: the cached one; profiled now if none)")
    p.add_argument("--seq-len", type=_positive_int, default=128, help="input length of text models (default 128)")
    p.add_argument("--batch", type=_positive_int, default=1, help="batch size of the input (default 1)")
    p.add_argument("--passes", type=_positive_int, default=1, help="forward passes to optimize for (resident units pay "
                   "off from 2)")
    p.add_argument("--explain", action="store_true", help="show the candidates and why the winner won")
    p.add_argument("-o", "--out", type=_out_file, help="write the plan JSON here")

    p = sub.add_parser("bench", help="compare strategies, each in a fresh process with a cold page cache")
    p.add_argument("model_dir", type=Path)
    p.add_argument("--budget", type=_budget, required=True,
                   help="weight budget of pipeload/sequential and accelerate's max_memory")
    p.add_argument("--strategies", default="full,pipeswitch,sequential,pipeload,accelerate,airllm",
                   help="comma-separated; options after a colon, e.g. pipeload:loaders=1;io=direct (a fixed "
                   "setting; plain pipeload runs the planner's plan, from a profile made first on the same device "
                   "and not timed); budget=SIZE overrides --budget for one strategy")
    p.add_argument("--seq-len", type=_positive_int, default=128, help="input length of text models (default 128)")
    p.add_argument("--repeat", type=_positive_int, default=3, help="runs per strategy, interleaved (default 3)")
    p.add_argument("--no-bounds", action="store_true", help="skip the lower-bound measurement")
    p.add_argument("--device-ram", help="emulate a device with this much RAM, page cache included (cgroup v1)")
    p.add_argument("--disk-bw", help="emulate this disk read bandwidth, e.g. 200MB/s (cgroup v1 blkio)")
    p.add_argument("--cpus", type=_positive_int, help="emulate this many cores (cpuset)")
    p.add_argument("--timeout", type=_positive_float, default=1800,
                   help="kill a run after this many seconds (default 1800)")
    p.add_argument("--find-min-ram", action="store_true",
                   help="also search the smallest RAM cap at which each strategy completes")
    p.add_argument("--work-dir", type=Path, help="scratch space for accelerate/airllm (default: the temp dir)")
    p.add_argument("-o", "--out", type=_out_dir, default=Path("results"), help="output folder (default results/)")

    p = sub.add_parser("plot", help="redraw the PNG plots of a bench results.json")
    p.add_argument("results", type=Path)
    p.add_argument("-o", "--out", type=_out_dir, help="output folder (default: next to results.json)")

    p = sub.add_parser("verify", help="check every tensor against the checksums recorded at synth/convert time")
    p.add_argument("model_dir", type=Path)
    p.add_argument("--record", action="store_true", help="record checksums of the current files instead")

    p = sub.add_parser("convert", help="convert pytorch_model.bin weights to model.safetensors (no pickle code)")
    p.add_argument("model_dir", type=Path)

    p = sub.add_parser("demo", help="synthesize BERT-Large (once) and run it under a 25%% budget")
    p.add_argument("--arch", default="bert-large", choices=list(ARCHS), help="architecture (default bert-large)")
    p.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help=f"where to keep it (default {DEFAULT_CACHE})")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return {"synth": cmd_synth, "run": cmd_run, "generate": cmd_generate, "convert": cmd_convert, "demo": cmd_demo,
                "bench": cmd_bench, "plot": cmd_plot, "verify": cmd_verify,
                "profile": cmd_profile, "plan": cmd_plan, "serve": cmd_serve}[args.command](args)
    except HermesError as exc:
        print(f"hermes: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("hermes: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into e.g. `head`
        sys.stderr.close()
        return 0
    except OSError as exc:  # a file that cannot be read or written (disk full, permissions, a special filesystem)
        where = f" {exc.filename}" if exc.filename else ""
        print(f"hermes: error: cannot access{where}: {exc.strerror or exc}", file=sys.stderr)
        return 2


def _synth(arch: str, out_dir: Path, dtype: str = "float32", seed: int = 0, overwrite: bool = False) -> Path:
    from tqdm import tqdm

    from hermes.synth import synthesize

    bars: list[Any] = []

    def progress(done: int, total: int) -> None:
        if not bars:  # the first call, once the checks passed (before any tensor): the clock starts now
            bars.append(tqdm(total=total, unit="B", unit_scale=True, desc=f"synth {arch}", file=sys.stderr))
        bars[0].update(done - bars[0].n)
    try:
        return synthesize(arch, out_dir, dtype=dtype, seed=seed, overwrite=overwrite, progress=progress)
    finally:
        for bar in bars:
            bar.close()


def cmd_synth(args: argparse.Namespace) -> int:
    out = _synth(args.arch, args.out_dir, args.dtype, args.seed, overwrite=args.force)
    print(f"wrote {args.arch} ({args.dtype}) to {out}")
    return 0


def _input_args(args: argparse.Namespace) -> dict[str, Any]:
    kw: dict[str, Any] = {"text": args.text, "input_ids": args.input_ids, "image": args.image,
                          "random_seq_len": args.random_input, "batch": args.batch}
    if all(v is None for k, v in kw.items() if k != "batch"):
        kw["random_seq_len"] = 128  # default input: 128 random tokens (or one random image)
    return kw


def _profile_inputs(model_dir: Path, seq_len: int, batch: int) -> dict[str, Any]:
    from hermes.inputs import build_inputs
    from hermes.units import load_config

    return build_inputs(model_dir, load_config(model_dir), random_seq_len=seq_len, batch=batch)


def _get_profile(model_dir: Path, seq_len: int, batch: int, *, repeat: int = 3, force: bool = False) -> Any:
    from hermes.profile import cached_profile, default_profile_path
    from hermes.profiler import profile_model

    inputs = _profile_inputs(model_dir, seq_len, batch)
    shape = {k: list(v.shape) for k, v in inputs.items()}
    prof = None if force else cached_profile(model_dir, shape)
    if prof is None:
        from tqdm import tqdm

        with tqdm(desc="profiling", unit=" step", file=sys.stderr) as bar:
            def progress(msg: str) -> None:  # one step per measured setting: the bar moves every few seconds
                bar.set_postfix_str(msg)
                bar.update()

            prof = profile_model(model_dir, inputs, repeat=repeat, progress=progress)
        prof.save(default_profile_path(model_dir, prof.key))
    return prof


def cmd_profile(args: argparse.Namespace) -> int:
    prof = _get_profile(args.model_dir, args.seq_len, args.batch, repeat=args.repeat, force=True)
    if args.out:
        prof.save(args.out)
    loads = {io: sum(u.load_s[io] for u in prof.units) for io in prof.bandwidth}
    print(f"{len(prof.units)} units, {format_bytes(prof.model_bytes)}; input {prof.input_shape}")
    print(f"compute (weights loaded, no I/O): {sum(u.compute_s for u in prof.units):.3f} s per pass")
    for io, t in loads.items():
        bw = ", ".join(f"{k} reader(s) {v / 1e9:.2f} GB/s" for k, v in prof.bandwidth[io].items())
        slow = ", ".join(f"{k.split(':')[1]} loader(s) compute x{prof.compute_slowdown[k]:.2f} loads "
                         f"x{prof.load_slowdown[k]:.2f}" for k in prof.compute_slowdown if k.startswith(io + ":"))
        print(f"{io:>8} loads: {t:.3f} s cold, one loader; {bw}\n{'':>10}while overlapping: {slow}")
    print(f"activations: {format_bytes(prof.activation_bytes)}; minimum budget "
          f"{format_bytes(prof.min_weight_budget + prof.activation_bytes)}")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from hermes.memory import parse_bytes
    from hermes.planner import explain, plan
    from hermes.profile import Profile
    from hermes.store import atomic_write_text

    prof = Profile.load(args.profile) if args.profile else _get_profile(args.model_dir, args.seq_len, args.batch)
    budget = parse_bytes(args.budget)
    result = plan(prof, budget, passes=args.passes)
    if args.explain:
        print(explain(prof, budget, passes=args.passes))
        print()
    print(f"plan: {result.loaders} loader(s), {result.io} I/O, prefetch "
          f"{result.prefetch if result.prefetch is not None else 'budget-bound'}, {len(result.resident)} resident "
          f"unit(s), w. budget {format_bytes(result.weight_budget_bytes)} (w. peak "
          f"{format_bytes(result.predicted_weights_peak_bytes)}); predicted {result.predicted_latency_s:.3f} s per "
          f"pass, peak {format_bytes(result.predicted_peak_bytes)} with activations")
    if args.out:
        atomic_write_text(args.out, result.to_json())
        print(f"wrote {args.out}")
    return 0


def _plan_settings(p: Any) -> dict[str, Any]:
    """``run_forward`` keywords of a plan."""
    return {"budget": p.weight_budget_bytes, "loaders": p.loaders, "prefetch": p.prefetch, "io": p.io,
            "resident": p.resident}


def _engine_settings(args: argparse.Namespace) -> dict[str, Any]:
    """Engine settings from --plan, explicit options, or a plan made on the fly from a cached profile."""
    from hermes.errors import HermesError
    from hermes.memory import parse_bytes
    from hermes.planner import Plan, plan
    from hermes.profile import cached_profile

    if args.plan is not None:
        try:
            p = Plan.from_json(args.plan.read_text())
        except (OSError, ValueError, TypeError, KeyError) as exc:
            raise HermesError(f"cannot read plan {args.plan}: {exc}; re-create it with `hermes plan`") from exc
        return _plan_settings(p)
    if args.budget is None:
        raise HermesError("give --budget (e.g. --budget 300MiB) or --plan plan.json")
    manual = {"loaders": args.loaders, "prefetch": args.prefetch, "io": args.io}
    if all(v is None for v in manual.values()) and args.budget != "auto":
        inputs = _profile_inputs(args.model_dir, args.random_input or 128, args.batch) if (
            args.text is None and args.input_ids is None and args.image is None) else None
        prof = cached_profile(args.model_dir, {k: list(v.shape) for k, v in inputs.items()}) if inputs else None
        if prof is not None:
            return {**_plan_settings(plan(prof, parse_bytes(args.budget))), "user_budget": parse_bytes(args.budget)}
    return {"budget": args.budget, "loaders": args.loaders or 2, "prefetch": args.prefetch,
            "io": args.io or "buffered", "resident": ()}


def cmd_run(args: argparse.Namespace) -> int:
    from hermes.runner import run_forward

    settings = _engine_settings(args)
    user_budget = settings.pop("user_budget", None)
    res = run_forward(args.model_dir, **settings, cold=args.cold, save_output=args.save_output,
                      timeline=args.timeline, **_input_args(args))
    if user_budget is not None:  # planned: the engine's budget is the weights' share of the user's
        res["user_budget_bytes"] = user_budget
    if args.json:
        print(json.dumps(res))
    else:
        print(format_run(res))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from hermes.runner import run_generation

    if args.budget is None and args.plan is None:
        raise HermesError("give --budget (e.g. --budget 300MiB; it covers weights and the KV cache) or --plan")
    texts = args.prompt
    if args.prompts_file is not None:
        try:
            texts = [line for line in args.prompts_file.read_text().splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as exc:
            raise HermesError(f"cannot read prompts file {args.prompts_file}: {exc}") from exc
        if not texts:
            raise HermesError(f"prompts file {args.prompts_file} has no prompt (one per line)")
    random_len = args.random_prompt
    if texts is None and args.prompt_ids is None and random_len is None:
        random_len = 16

    if not args.json:
        print(f"loading {args.model_dir} and streaming the prompt through it (the first token needs one pass over "
              "every layer)...", file=sys.stderr, flush=True)

    def on_token(tok: int, piece: str | None) -> None:
        print(piece if piece is not None else f"{tok} ", end="", flush=True)

    res = run_generation(
        args.model_dir, budget=args.budget, plan=args.plan, max_new_tokens=args.max_new_tokens, texts=texts,
        ids=args.prompt_ids, random_len=random_len, batch=args.batch, do_sample=args.do_sample,
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed, loaders=args.loaders,
        prefetch=args.prefetch, io=args.io, cold=args.cold, timeline=args.timeline,
        on_token=None if args.json else on_token)
    if args.json:
        print(json.dumps(res))
        return 0
    if res["batch"] == 1:
        print()
    else:
        for i, toks in enumerate(res["tokens"]):
            print(f"[{i}] {res['texts'][i] if res['texts'] else ' '.join(map(str, toks))}")
    print(format_generation(res), file=sys.stderr)
    return 0


def format_generation(res: dict[str, Any]) -> str:
    rows = [
        ("model", f"{res['model_dir']} ({format_bytes(res['model_bytes'])} in {res['units']} units)"),
        ("tokens", f"{res['new_tokens']} new x {res['batch']} sequence(s) after a {res['prompt_tokens']}-token "
                   "prompt"),
        ("first token", f"{res['ttft_s'] * 1000:.1f} ms"),
        ("speed", f"{res['tokens_per_s']:.2f} tokens/s per sequence overall, {res['decode_tokens_per_s']:.2f} after "
                  f"the first ({res['loaders']} loader(s), {res['io']} I/O)"),
        ("budget", f"{format_bytes(res['budget_bytes'])}: weights {format_bytes(res['weight_budget_bytes'])} + KV "
                   f"cache {format_bytes(res['kv_reserved_bytes'])} (used {format_bytes(res['kv_cache_bytes'])})"
                   + (f" + activations {format_bytes(res['activation_reserved_bytes'])}"
                      if res.get("activation_reserved_bytes") else "")),
        ("weights", f"peak {format_bytes(res['weights_peak_bytes'])}; {len(res['resident'])} of {res['units']} "
                    f"units resident ({format_bytes(res['resident_bytes'])}); "
                    f"{format_bytes(int(res['bytes_read_per_token']))} read per token"),
        ("process RSS", f"peak {format_bytes(res['peak_rss_bytes'])} "
                        f"(+{format_bytes(res['peak_rss_above_baseline_bytes'])} above baseline)"),
    ]
    if res.get("auto_budget"):
        rows.insert(4, ("auto", res["auto_budget"]))
    return "\n".join(f"{k:>13}  {v}" for k, v in rows)


def format_run(res: dict[str, Any]) -> str:
    share = 100 * res["weights_peak_bytes"] / res["model_buffer_bytes"]
    budget = f"budget {format_bytes(res['budget_bytes'])}"
    if res.get("user_budget_bytes"):  # planned: the engine holds the weights' share of the user's budget
        budget = (f"weight budget {format_bytes(res['budget_bytes'])} (planned within your "
                  f"{format_bytes(res['user_budget_bytes'])} budget, which also covers activations)")
    rows = [
        ("model", f"{res['model_dir']} ({format_bytes(res['model_bytes'])} in {res['units']} units)"),
        ("input", ", ".join(f"{k} {v}" for k, v in res["input_shape"].items())),
        ("latency", f"{res['latency_s'] * 1000:.1f} ms (stalled {res['stall_s'] * 1000:.1f} ms waiting for weights)"),
        ("loaders", f"{res['loaders']} ({res['io']} I/O{', cold cache' if res['cold'] else ''})"),
        ("weights peak", f"{format_bytes(res['weights_peak_bytes'])} of {budget} ({share:.1f}% of the model's "
                         f"{format_bytes(res['model_buffer_bytes'])} in page-aligned buffers)"),
        ("process RSS", (f"peak {format_bytes(res['peak_rss_bytes'])}, "
                         f"baseline {format_bytes(res['baseline_rss_bytes'])} "
                         f"(+{format_bytes(res['peak_rss_above_baseline_bytes'])})")),
    ]
    if res.get("output_path"):
        rows.append(("output", res["output_path"]))
    return "\n".join(f"{k:>13}  {v}" for k, v in rows)


def _device_spec(args: argparse.Namespace) -> Any:
    from hermes.device import DeviceSpec
    from hermes.memory import parse_bytes

    bw = args.disk_bw
    if bw is not None:
        bw = bw.strip()
        bw = bw[:-2] if bw.lower().endswith("/s") else bw
    cores = len(os.sched_getaffinity(0))
    if args.cpus is not None and args.cpus > cores:
        raise HermesError(f"--cpus {args.cpus}: this machine gives this process {cores} core(s); emulate at most "
                          f"{cores}")
    ram = parse_bytes(args.device_ram, what="--device-ram") if args.device_ram else None
    if ram is not None and ram <= parse_bytes(args.budget):
        raise HermesError(f"--device-ram {args.device_ram} does not exceed the budget {args.budget}: the device "
                          "also holds the runtime (Python, torch: about 350 MiB) and the page cache; give more RAM "
                          "or a smaller budget")
    return DeviceSpec(ram_bytes=ram, read_bps=parse_bytes(bw, what="--disk-bw") if bw else None, cpus=args.cpus)


def cmd_bench(args: argparse.Namespace) -> int:
    from hermes.bench import find_min_ram, run_benchmark, to_markdown, write_results
    from hermes.plots import plot_results

    # ";" separates a strategy's options on the command line, since "," separates strategies.
    strategies = [s.replace(";", ",") for s in args.strategies.split(",") if s]
    device = _device_spec(args)
    progress = lambda msg: print(msg, file=sys.stderr)  # noqa: E731
    res = run_benchmark(args.model_dir, strategies=strategies, budget=args.budget, seq_len=args.seq_len,
                        repeat=args.repeat, bounds=not args.no_bounds, device=device, work_dir=args.work_dir,
                        timeout=args.timeout, progress=progress)
    if res["device"].get("skipped_because"):
        print(f"hermes: device emulation skipped: {res['device']['skipped_because']}", file=sys.stderr)
    if args.find_min_ram:
        res["min_ram"] = [find_min_ram(args.model_dir, s, budget=args.budget, seq_len=args.seq_len, device=device,
                                       work_dir=args.work_dir, progress=progress) for s in strategies]
    paths = write_results(res, args.out)
    plots = plot_results(res, args.out)
    print(to_markdown(res))
    print(f"wrote {', '.join(str(p) for p in [*paths, *plots])}")
    if all("error" in s for s in res["summary"].values()):
        print("hermes: error: no strategy completed a run (see 'cannot run' above)", file=sys.stderr)
        return 1
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import socket

    from hermes.serve import Service, serve

    port = args.port
    with socket.socket() as sock:  # a taken port fails now, not after the model is loaded
        try:
            sock.bind((args.host, port))
        except OSError as exc:
            raise HermesError(f"cannot listen on {args.host}:{port}: {exc.strerror}; pick another --port "
                              "(0: any free one)") from None
        port = sock.getsockname()[1]
    print(f"loading {args.model_dir} ...", file=sys.stderr)
    service = Service(args.model_dir, args.budget, loaders=args.loaders, io=args.io, max_batch=args.max_batch,
                      max_queue=args.max_queue, kv_cache=args.kv_cache, model_name=args.model_name)
    if service.auto is not None:
        print(service.auto.describe(), file=sys.stderr)
    print(service.layout.describe(), file=sys.stderr)

    def ready(url: str) -> None:
        print(f"serving {service.model_name} at {url} (max batch {args.max_batch}, queue {args.max_queue}"
              f"{', API key required' if args.api_key else ''}); Ctrl-C stops", file=sys.stderr, flush=True)

    serve(service, host=args.host, port=port, api_key=args.api_key, on_ready=ready)
    print("stopped", file=sys.stderr)
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from hermes.plots import plot_file

    print("wrote " + ", ".join(str(p) for p in plot_file(args.results, args.out)))
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from hermes.verify import verify

    report = verify(args.model_dir, record=args.record)
    if report.ok:
        print(f"ok: {report.detail or f'{report.tensors_checked} tensors match their checksums'}")
        return 0
    print(f"hermes: verify failed: {report.detail}", file=sys.stderr)
    return 1


def cmd_convert(args: argparse.Namespace) -> int:
    from hermes.store import convert_bin_checkpoint

    out = convert_bin_checkpoint(args.model_dir)
    print(f"wrote {out}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from hermes.runner import run_forward
    from hermes.synth import ArchSpec

    model_dir = args.cache / args.arch
    if not (model_dir / "config.json").is_file():
        note = ArchSpec.from_name(args.arch).note
        print(f"synthesizing {args.arch}{f' ({note})' if note else ''} into {model_dir} (one time)")
        _synth(args.arch, model_dir)
    from hermes.api import open_model
    from hermes.engine import minimum_budget

    layout = open_model(model_dir)
    size = layout.nbytes
    budget = max(size // 4, minimum_budget(layout.units))  # a tiny model's largest unit can exceed a quarter
    print(f"running {args.arch} with PipeLoad under a {format_bytes(budget)} weight budget "
          f"({100 * budget / size:.0f}% of the model), cold page cache, 128 random tokens\n")
    # 1 loader with O_DIRECT measured fastest on a 2-core machine (docs/BENCHMARKS.md).
    import tempfile

    from safetensors.torch import load_file

    from hermes.runner import reference_outputs

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "streamed.safetensors"
        res = run_forward(model_dir, budget=budget, loaders=1, io="direct", cold=True, random_seq_len=128,
                          save_output=out)
        streamed = load_file(out)
    res["output_path"] = None  # a temporary file, gone now
    print(format_run(res))
    print(f"\nchecking against the full model (transformers from_pretrained, {format_bytes(size)} in memory)...",
          flush=True)
    full = reference_outputs(model_dir, random_seq_len=128)
    diff = max(((streamed[k].double() - full[k].double()).abs().max().item() for k in full if k in streamed),
               default=float("inf"))
    same = set(streamed) == set(full) and diff == 0.0
    print(f"{'same outputs' if same else 'DIFFERENT outputs'} as the full model: "
          f"{', '.join(sorted(full))} {'bit-exact' if same else f'differ by up to {diff:.3g}'}, with "
          f"{100 * res['weights_peak_bytes'] / res['model_buffer_bytes']:.0f}% of its weights in memory at once")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
