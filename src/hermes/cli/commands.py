"""One function per ``hermes`` subcommand: it takes the parsed arguments, calls the library with keywords and
prints; it returns the exit status. Library modules are imported in the command that needs them."""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from hermes.cli.format import (
    format_comparison,
    format_generation,
    format_plan,
    format_profile,
    format_ring,
    format_run,
)
from hermes.errors import HermesError
from hermes.memory import format_bytes


@contextlib.contextmanager
def _progress_bar(**kw: Any) -> Iterator[Callable[..., Any]]:
    """``bar(**more)``: a tqdm bar on stderr, opened at its first use (so that none shows when there is nothing to
    wait for), closed on exit."""
    from tqdm import tqdm

    bars: list[Any] = []

    def bar(**more: Any) -> Any:
        if not bars:
            bars.append(tqdm(file=sys.stderr, **kw, **more))
        return bars[0]

    try:
        yield bar
    finally:
        for b in bars:
            b.close()


def _synth(arch: str, out_dir: Path, dtype: str = "float32", seed: int = 0, overwrite: bool = False,
           tokenizer: bool = True) -> Path:
    from hermes.synth import synthesize

    with _progress_bar(unit="B", unit_scale=True, desc=f"synth {arch}") as bar:
        def progress(done: int, total: int) -> None:
            # the first call, once the checks passed (before any tensor), opens the bar: the clock starts now
            b = bar(total=total)
            b.update(done - b.n)

        return synthesize(arch, out_dir, dtype=dtype, seed=seed, overwrite=overwrite, tokenizer=tokenizer,
                          progress=progress)


def _profile(model_dir: Path, seq_len: int, batch: int, *, repeat: int = 3, force: bool = False) -> Any:
    from hermes.profiler import load_or_profile

    with _progress_bar(desc="profiling", unit=" step") as bar:
        def progress(done: int, total: int, what: str) -> None:  # a step per measured setting: a few seconds each
            b = bar(total=total)
            b.set_postfix_str(what)
            b.update(done - b.n)

        return load_or_profile(model_dir, seq_len=seq_len, batch=batch, repeat=repeat, force=force,
                               progress=progress)


def cmd_synth(args: argparse.Namespace) -> int:
    from hermes.synth import ArchSpec, synthesized_as, tokenizer_note

    kept = not args.force and synthesized_as(args.out_dir) == (args.arch, args.dtype, args.seed)
    out = _synth(args.arch, args.out_dir, args.dtype, args.seed, overwrite=args.force, tokenizer=args.tokenizer)
    print(f"{out} already holds {args.arch} ({args.dtype}, seed {args.seed}); kept it (--force writes it anew)"
          if kept else f"wrote {args.arch} ({args.dtype}) to {out}")
    if (out / "tokenizer.json").is_file():
        print(f"tokenizer: {tokenizer_note(args.arch)}")
        verb = "generate" if ArchSpec.from_name(args.arch).chat else "run"
        flag = "--prompt" if verb == "generate" else "--text"
        print(f'try: hermes {verb} {out} --budget auto {flag} "Hello there"')
    return 0


def cmd_profile(args: argparse.Namespace) -> int:
    prof = _profile(args.model_dir, args.seq_len, args.batch, repeat=args.repeat, force=True)
    if args.out:
        prof.save(args.out)
    print(format_profile(prof))
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from hermes.atomic import atomic_write_text
    from hermes.memory import parse_bytes
    from hermes.planner import explain, plan
    from hermes.profile import Profile
    from hermes.profiler import choose_profile

    if args.profile:
        prof = Profile.load(args.profile)
    else:  # the cached profile; with no --seq-len / --batch, of whatever input was profiled
        choice = choose_profile(args.model_dir, seq_len=args.seq_len, batch=args.batch)
        if choice.note:
            print(f"hermes: {choice.note}", file=sys.stderr, flush=True)
        prof = choice.profile or _profile(args.model_dir, choice.seq_len, choice.batch)
    budget = parse_bytes(args.budget)
    result = plan(prof, budget, passes=args.passes)
    if args.explain:
        print(explain(prof, budget, passes=args.passes))
        print()
    print(format_plan(result))
    if args.out:
        atomic_write_text(args.out, result.to_json())
        print(f"wrote {args.out}")
    return 0


def _input_args(args: argparse.Namespace) -> dict[str, Any]:
    kw: dict[str, Any] = {"text": args.text, "input_ids": args.input_ids, "image": args.image,
                          "random_seq_len": args.random_input, "batch": args.batch}
    if all(v is None for k, v in kw.items() if k != "batch"):
        kw["random_seq_len"] = 128  # default input: 128 random tokens (or one random image)
    return kw


def _ring(args: argparse.Namespace) -> Any:
    """The ring this command runs on (joined), from --ring/--rank/--world-size or torchrun's environment; None: one
    device."""
    from hermes.ring import Ring, RingError, RingSpec

    stages = tuple(args.stages) if args.stages else None
    if args.ring is None:
        given = [f for f, v in (("--rank", args.rank), ("--world-size", args.world_size), ("--stages", stages))
                 if v is not None]
        spec = RingSpec.from_environment(args.ring_timeout, stages, args.laps)
        if spec is None and given:
            raise RingError(f"{', '.join(given)} without --ring: give rank 0's HOST:PORT with --ring on every device")
        if spec is None:
            return None
    else:
        if args.rank is None or args.world_size is None:
            raise RingError("--ring needs --rank (this device's, 0..N-1) and --world-size N")
        spec = RingSpec(args.ring, args.rank, args.world_size, args.ring_timeout, stages, args.laps)
    if args.budget is None:
        raise RingError("each device of a ring needs its own --budget (e.g. --budget 300MiB, or auto); --plan is "
                        "made for one device")
    if not getattr(args, "json", False) and spec.rank == 0:
        print(f"waiting for the {spec.world_size} devices of the ring to join...", file=sys.stderr, flush=True)
    return Ring(spec).join()


def _ring_command(args: argparse.Namespace, ring: Any, run: Callable[[], dict[str, Any]]) -> int:
    try:
        res = run()
    finally:
        ring.close()
    if args.json:
        print(json.dumps(res))
    else:
        if res.get("tokens") is not None and len(res["tokens"]) > 1:
            for i, toks in enumerate(res["tokens"]):
                print(f"[{i}] {res['texts'][i] if res['texts'] else ' '.join(map(str, toks))}")
        elif res.get("tokens") is not None:
            print()
        print(format_ring(res), file=sys.stderr)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from hermes.runner import forward_settings, run_forward

    ring = _ring(args)
    if ring is not None:
        from hermes.ring.driver import ring_forward

        return _ring_command(args, ring, lambda: ring_forward(
            args.model_dir, ring, budget=args.budget, loaders=args.loaders or 2, prefetch=args.prefetch,
            io=args.io or "buffered", cold=args.cold, save_output=args.save_output, **_input_args(args)))

    random = args.text is None and args.input_ids is None and args.image is None
    settings = forward_settings(args.model_dir, plan_file=args.plan, budget=args.budget, loaders=args.loaders,
                                prefetch=args.prefetch, io=args.io, batch=args.batch,
                                random_seq_len=(args.random_input or 128) if random else None)
    res = run_forward(args.model_dir, **settings, cold=args.cold, save_output=args.save_output,
                      timeline=args.timeline, **_input_args(args))
    if args.json:
        print(json.dumps(res))
    else:
        print(format_run(res))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from hermes.inputs import prompts_from_file
    from hermes.runner import run_generation

    if args.budget is None and args.plan is None:
        raise HermesError("give --budget (e.g. --budget 300MiB; it covers weights and the KV cache) or --plan")
    texts = args.prompt if args.prompts_file is None else prompts_from_file(args.prompts_file)
    random_len = args.random_prompt
    if texts is None and args.prompt_ids is None and random_len is None:
        random_len = 16
    def on_load() -> None:  # once the prompt passed every check that needs no weight
        if not args.json:
            print(f"loading {args.model_dir} and streaming the prompt through it (the first token needs one pass "
                  "over every layer)...", file=sys.stderr, flush=True)

    def on_token(tok: int, piece: str | None) -> None:
        print(piece if piece is not None else f"{tok} ", end="", flush=True)

    ring = _ring(args)
    if ring is not None:
        from hermes.ring.driver import ring_generate

        return _ring_command(args, ring, lambda: ring_generate(
            args.model_dir, ring, budget=args.budget, max_new_tokens=args.max_new_tokens, texts=texts,
            ids=args.prompt_ids, random_len=random_len, batch=args.batch, do_sample=args.do_sample,
            temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed, loaders=args.loaders,
            prefetch=args.prefetch, io=args.io, cold=args.cold, on_token=None if args.json else on_token))
    res = run_generation(
        args.model_dir, budget=args.budget, plan=args.plan, max_new_tokens=args.max_new_tokens, texts=texts,
        ids=args.prompt_ids, random_len=random_len, batch=args.batch, do_sample=args.do_sample,
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed, loaders=args.loaders,
        prefetch=args.prefetch, io=args.io, cold=args.cold, timeline=args.timeline,
        on_token=None if args.json else on_token, on_load=on_load)
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


def cmd_bench(args: argparse.Namespace) -> int:
    from hermes.bench import find_min_ram, run_benchmark, to_markdown, write_results
    from hermes.device import emulated_device
    from hermes.plots import plot_results

    # ";" separates a strategy's options on the command line, since "," separates strategies.
    strategies = [s.replace(";", ",") for s in args.strategies.split(",") if s]
    device = emulated_device(budget=args.budget, device_ram=args.device_ram, disk_bw=args.disk_bw, cpus=args.cpus)
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
    from hermes.writer import convert_bin_checkpoint

    if args.model_dir.suffix == ".gguf":
        return _convert_gguf(args)
    if args.out_dir is not None:
        raise HermesError("OUT_DIR is for a .gguf file; .bin weights are converted in place")
    out = convert_bin_checkpoint(args.model_dir)
    print(f"wrote {out}")
    return 0


def _convert_gguf(args: argparse.Namespace) -> int:
    from hermes.quant.gguf import convert_gguf

    if args.out_dir is None:
        raise HermesError(f"where to write it? pass an output directory: hermes convert {args.model_dir} OUT_DIR")
    with _progress_bar(unit="B", unit_scale=True, desc="convert gguf") as bar:
        def progress(done: int, total: int) -> None:
            b = bar(total=total)
            b.update(done - b.n)

        out = convert_gguf(args.model_dir, args.out_dir, overwrite=args.force, progress=progress)
    q = json.loads((out / "config.json").read_text())["quantization_config"]
    widths = sorted({q["bits"], *q["module_bits"].values()})
    print(f"wrote {out}: {len(q['modules'])} layers at {' and '.join(map(str, widths))} bits, "
          f"{format_bytes(_dir_bytes(out))} of weights{'' if (out / 'tokenizer.json').exists() else ' (no tokenizer)'}")
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from hermes.quant.convert import quantize_checkpoint

    with _progress_bar(unit="B", unit_scale=True, desc=f"quantize {args.bits}-bit") as bar:
        def progress(done: int, total: int) -> None:
            b = bar(total=total)
            b.update(done - b.n)

        out = quantize_checkpoint(args.model_dir, args.out_dir, bits=args.bits, group_size=args.group_size,
                                  overwrite=args.force, progress=progress)
    src, dst = _dir_bytes(args.model_dir), _dir_bytes(out)
    print(f"wrote {args.bits}-bit {out}: {format_bytes(dst)} of weights ({100 * dst / max(src, 1):.0f}% of "
          f"{format_bytes(src)})")
    return 0


def _dir_bytes(d: Path) -> int:
    return sum(f.stat().st_size for f in Path(d).glob("*.safetensors"))


def cmd_demo(args: argparse.Namespace) -> int:
    from hermes.demo import DEMO_SEQ_LEN, check_against_full_model, demo_budget, streamed_forward
    from hermes.synth import ArchSpec

    model_dir = args.cache / args.arch
    if not (model_dir / "config.json").is_file():
        note = ArchSpec.from_name(args.arch).note
        print(f"synthesizing {args.arch}{f' ({note})' if note else ''} into {model_dir} (one time)")
        _synth(args.arch, model_dir)
    budget, size = demo_budget(model_dir)
    print(f"running {args.arch} with PipeLoad under a {format_bytes(budget)} budget "
          f"({100 * budget / size:.0f}% of the model), cold page cache, {DEMO_SEQ_LEN} random tokens\n")
    res, streamed = streamed_forward(model_dir, budget=budget)
    print(format_run(res))
    print(f"\nchecking against the full model (transformers from_pretrained, {format_bytes(size)} in memory)...",
          flush=True)
    comparison = check_against_full_model(model_dir, streamed)
    print(format_comparison(comparison, res))
    if (model_dir / "tokenizer.json").is_file():
        print(f'\nnext, text in: hermes run {model_dir} --budget 300MiB --text "Hello there"')
    return 0 if comparison.same else 1


from hermes.cli.serving import cmd_serve  # noqa: E402 (its own module: the server and the ring's devices)

COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "synth": cmd_synth, "run": cmd_run, "generate": cmd_generate, "convert": cmd_convert, "quantize": cmd_quantize,
    "demo": cmd_demo,
    "bench": cmd_bench, "plot": cmd_plot, "verify": cmd_verify, "profile": cmd_profile, "plan": cmd_plan,
    "serve": cmd_serve,
}
