"""The argument parser of ``hermes``: one function per subcommand."""
from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from hermes.cli.argtypes import (
    budget,
    budget_or_auto,
    non_negative_int,
    out_dir,
    out_file,
    port,
    positive_float,
    positive_int,
    probability,
    token_ids,
)

_Subparsers = Any  # what ArgumentParser.add_subparsers returns


def build_parser() -> argparse.ArgumentParser:
    from importlib.metadata import PackageNotFoundError, version

    try:
        ver = version("hermes-pipeload")
    except PackageNotFoundError:
        ver = "unknown"
    parser = argparse.ArgumentParser(prog="hermes", description="Run big Transformers under a memory budget.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what the library does")
    parser.add_argument("--version", action="version", version=f"hermes {ver}")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_synth, _add_run, _add_generate, _add_serve, _add_profile, _add_plan, _add_bench, _add_plot,
                _add_verify, _add_convert, _add_quantize, _add_demo):
        add(sub)
    return parser


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--budget", type=budget_or_auto, help="memory budget, e.g. 300MiB, 1.5GB (weights; with a plan: "
                   "weights + activations; generate: + KV cache), or auto: what this process may still take "
                   "(cgroup limit or MemAvailable) minus a margin, covering weights, KV cache and activations")
    p.add_argument("--plan", type=Path, help="a plan.json from `hermes plan` (sets budget, loaders, io, ...)")
    p.add_argument("--loaders", type=positive_int, default=None,
                   help="number of loading agents (default: planned, else 2)")
    p.add_argument("--prefetch", type=non_negative_int, default=None,
                   help="most units loaded besides the one computing; 0: sequential, nothing overlaps "
                   "(default: budget-bound)")
    p.add_argument("--io", choices=["buffered", "direct"], default=None,
                   help="read mode, direct = O_DIRECT (default: planned, else buffered)")
    p.add_argument("--cold", action="store_true", help="evict the checkpoint from the page cache first")


def _laps(text: str) -> int | None:
    return None if text.strip().lower() == "auto" else positive_int(text)


def _add_ring_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("several devices (a ring; docs/RING.md)")
    g.add_argument("--ring", metavar="HOST:PORT", help="run as one device of a ring: rank 0's address and a free port "
                   "(every device gives the same); under torchrun its environment is used instead")
    g.add_argument("--rank", type=non_negative_int, help="this device's rank, 0..N-1 (0 takes the input and prints)")
    g.add_argument("--world-size", type=positive_int, help="number of devices N")
    g.add_argument("--stages", type=token_ids, metavar="N0,N1,...",
                   help="blocks per rank, by hand (default: shared in proportion to each device's budget)")
    g.add_argument("--laps", type=_laps, default=1, metavar="N|auto",
                   help="passes of the ring per token: each device's share cut in N parts, computed in turn, so that "
                   "a device reads its next part while the others compute (auto: as many as the largest share "
                   "needs to fit its budget; default 1)")
    g.add_argument("--ring-timeout", type=positive_float, default=300.0,
                   help="seconds to wait for the other devices to join, and for any transfer (default 300)")


def _add_input_args(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--text", help="text to encode with the checkpoint's tokenizer")
    g.add_argument("--input-ids", type=token_ids, help="token ids separated by commas or spaces, e.g. 1,2,3")
    g.add_argument("--image", help="image file (vision models)")
    g.add_argument("--random-input", type=int, metavar="SEQ_LEN", help="random token ids of this length "
                   "(vision models: a random image of the model's size)")
    p.add_argument("--batch", type=positive_int, default=1, help="batch size of --random-input (default 1)")


def _add_synth(sub: _Subparsers) -> None:
    from hermes.synth import ARCHS, DTYPES

    p = sub.add_parser("synth", help="write a random-weight checkpoint with a real architecture")
    p.add_argument("arch", choices=list(ARCHS), metavar="ARCH", help=f"one of: {', '.join(ARCHS)}")
    p.add_argument("out_dir", type=Path, help="directory to create (it must not hold a checkpoint yet)")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32", help="weight dtype (default float32)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights (same seed, same bytes)")
    p.add_argument("--force", action="store_true", help="replace a checkpoint already in OUT_DIR")
    p.add_argument("--no-tokenizer", dest="tokenizer", action="store_false",
                   help="write no tokenizer (by default a text model gets its real one, cut to its vocabulary, "
                        "taken once from llama.cpp's source distribution on PyPI)")


def _add_run(sub: _Subparsers) -> None:
    p = sub.add_parser("run", help="one forward pass with PipeLoad; prints latency and memory")
    p.add_argument("model_dir", type=Path)
    _add_engine_args(p)
    _add_input_args(p)
    p.add_argument("--save-output", type=out_file, metavar="FILE.safetensors", help="write the output tensors here")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--timeline", action="store_true", help="include the per-unit timeline in --json")
    _add_ring_args(p)


def _add_generate(sub: _Subparsers) -> None:
    p = sub.add_parser("generate", help="generate text under a memory budget (weights + KV cache), streaming tokens")
    p.add_argument("model_dir", type=Path)
    p.add_argument("--budget", type=budget_or_auto,
                   help="memory budget for weights + KV cache, e.g. 300MiB; or auto: what this process may still "
                   "take (cgroup limit or MemAvailable) minus a margin, covering weights, KV cache and activations")
    p.add_argument("--plan", type=Path, help="a plan.json from `hermes plan` (its budget, loaders and I/O)")
    p.add_argument("--loaders", type=positive_int, default=1, help="number of loading agents (default 1)")
    p.add_argument("--prefetch", type=non_negative_int, default=None,
                   help="most units loaded besides the one computing; 0: sequential, nothing overlaps "
                   "(default: budget-bound)")
    p.add_argument("--io", choices=["buffered", "direct"], default="direct",
                   help="read mode (default direct = O_DIRECT, the measured best here)")
    p.add_argument("--cold", action="store_true", help="evict the checkpoint from the page cache first")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--prompt", action="append", help="prompt text (the checkpoint's tokenizer); repeat for a batch")
    g.add_argument("--prompt-ids", action="append", type=token_ids,
                   help="token ids separated by commas or spaces; repeat for a batch")
    g.add_argument("--prompts-file", type=Path, help="a text file with one prompt per line (one batch)")
    g.add_argument("--random-prompt", type=positive_int, metavar="LEN",
                   help="random prompts of LEN tokens (default 16)")
    p.add_argument("--batch", type=positive_int, default=1, help="number of --random-prompt prompts (default 1)")
    p.add_argument("--max-new-tokens", type=positive_int, default=32, help="tokens to generate (default 32)")
    p.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=positive_float, help="sampling temperature > 0 (with --do-sample)")
    p.add_argument("--top-k", type=positive_int, help="sample among the K most likely tokens (with --do-sample)")
    p.add_argument("--top-p", type=probability,
                   help="sample among the most likely tokens of total probability P in (0, 1] (with --do-sample)")
    p.add_argument("--seed", type=int, default=0, help="seed of sampling and of random prompts")
    p.add_argument("--json", action="store_true", help="print one JSON object (no streaming)")
    p.add_argument("--timeline", action="store_true", help="include every pass's per-unit timeline in --json")
    _add_ring_args(p)


def _add_serve(sub: _Subparsers) -> None:
    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP server; concurrent requests share each layer read")
    p.add_argument("model_dir", type=Path)
    p.add_argument("--budget", type=budget_or_auto, default="auto",
                   help="memory for weights + KV cache pool + a step's activations, e.g. 300MiB; or auto (default): "
                   "what this process may still take (cgroup limit or MemAvailable) minus a margin")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=port, default=8000, help="TCP port (default 8000; 0: any free port)")
    p.add_argument("--max-batch", type=positive_int, default=8,
                   help="most requests decoded together in one step (default 8)")
    p.add_argument("--max-queue", type=non_negative_int, default=32,
                   help="most requests waiting beyond those; more are refused with 429 (default 32)")
    p.add_argument("--kv-cache", type=budget, help="KV cache pool inside the budget (default: a quarter of it, at "
                   "most 512 positions x --max-batch)")
    p.add_argument("--api-key", default=os.environ.get("HERMES_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on every route but /health (default: $HERMES_API_KEY; "
                   "none: open to this machine's programs, see --allowed-hosts)")
    p.add_argument("--max-body", type=budget, help="largest request body; larger ones get 413 (default: 1MiB, or "
                   "the request memory if smaller)")
    p.add_argument("--request-memory", type=budget, help="memory inside the budget for the bodies and token ids "
                   "of all requests in flight; past it, 429 (default: an eighth of the budget, at most 16MiB)")
    p.add_argument("--drain-timeout", type=float, default=30.0, help="on SIGTERM/Ctrl-C, seconds requests in flight "
                   "have to finish before they end with an error (default 30; a second signal stops at once)")
    p.add_argument("--allowed-hosts", type=lambda s: [h.strip().lower() for h in s.split(",") if h.strip()],
                   default=[], help="Host names answered besides the default (loopback names when --host is a "
                   "loopback address: a web page's name rebound to it is refused), comma-separated; '*': any")
    p.add_argument("--allowed-origins", type=lambda s: [h.strip().lower() for h in s.split(",") if h.strip()],
                   default=[], help="host names of web pages (browser Origin) allowed to call the server, "
                   "comma-separated (default: none but loopback pages)")
    p.add_argument("--model-name", help="the model id clients send (default: the directory's name)")
    p.add_argument("--loaders", type=positive_int, default=1, help="number of loading agents (default 1)")
    p.add_argument("--io", choices=["buffered", "direct"], default="direct", help="read mode (default direct)")
    _add_ring_args(p)


def _add_profile(sub: _Subparsers) -> None:
    p = sub.add_parser("profile", help="measure per-unit load/compute times and contention on this machine")
    p.add_argument("model_dir", type=Path)
    p.add_argument("--seq-len", type=positive_int, default=128, help="input length of text models (default 128)")
    p.add_argument("--batch", type=positive_int, default=1, help="batch size of the input (default 1)")
    p.add_argument("--repeat", type=positive_int, default=3, help="measured passes per setting (default 3)")
    p.add_argument("-o", "--out", type=out_file, help="also write the profile here (it is always cached next to "
                   "the model, in MODEL_DIR/.hermes/)")


def _add_plan(sub: _Subparsers) -> None:
    p = sub.add_parser("plan", help="the fastest execution plan that fits a memory budget")
    p.add_argument("model_dir", type=Path)
    p.add_argument("--budget", type=budget, required=True, help="weights + activations, e.g. 300MiB")
    p.add_argument("--profile", type=Path, help="profile.json (default: the cached one; profiled now if none)")
    p.add_argument("--seq-len", type=positive_int, help="input length of text models (default: that of the cached "
                   "profile, else 128)")
    p.add_argument("--batch", type=positive_int, help="batch size of the input (default: that of the cached profile, "
                   "else 1)")
    p.add_argument("--passes", type=positive_int, default=1, help="forward passes to optimize for (resident units pay "
                   "off from 2)")
    p.add_argument("--explain", action="store_true", help="show the candidates and why the winner won")
    p.add_argument("-o", "--out", type=out_file, help="write the plan JSON here")


def _add_bench(sub: _Subparsers) -> None:
    p = sub.add_parser("bench", help="compare strategies, each in a fresh process with a cold page cache")
    p.add_argument("model_dir", type=Path)
    p.add_argument("--budget", type=budget, required=True,
                   help="the process's budget, as in run (weights + the input's activations + runtime slack): "
                   "pipeload/sequential/double-buffer weights and accelerate's max_memory get the weights' share")
    p.add_argument("--strategies", default="full,pipeswitch,sequential,pipeload,accelerate,airllm",
                   help="comma-separated; options after a colon, e.g. pipeload:loaders=1;io=direct (a fixed "
                   "setting; plain pipeload runs the planner's plan, from a profile made first on the same device "
                   "and not timed); budget=SIZE overrides --budget for one strategy")
    p.add_argument("--seq-len", type=positive_int, default=128, help="input length of text models (default 128)")
    p.add_argument("--repeat", type=positive_int, default=3, help="runs per strategy, interleaved (default 3)")
    p.add_argument("--no-bounds", action="store_true", help="skip the lower-bound measurement")
    p.add_argument("--device-ram", help="emulate a device with this much RAM, page cache included (cgroup v1)")
    p.add_argument("--disk-bw", help="emulate this disk read bandwidth, e.g. 200MB/s (cgroup v1 blkio)")
    p.add_argument("--cpus", type=positive_int, help="emulate this many cores (cpuset)")
    p.add_argument("--timeout", type=positive_float, default=1800,
                   help="kill a run after this many seconds (default 1800)")
    p.add_argument("--find-min-ram", action="store_true",
                   help="also search the smallest RAM cap at which each strategy completes")
    p.add_argument("--work-dir", type=Path, help="scratch space for accelerate/airllm (default: the temp dir)")
    p.add_argument("-o", "--out", type=out_dir, default=Path("results"), help="output folder (default results/)")


def _add_plot(sub: _Subparsers) -> None:
    p = sub.add_parser("plot", help="redraw the PNG plots of a bench results.json")
    p.add_argument("results", type=Path)
    p.add_argument("-o", "--out", type=out_dir, help="output folder (default: next to results.json)")


def _add_verify(sub: _Subparsers) -> None:
    p = sub.add_parser("verify", help="check every tensor against the checksums recorded at synth/convert time")
    p.add_argument("model_dir", type=Path)
    p.add_argument("--record", action="store_true", help="record checksums of the current files instead")


def _add_convert(sub: _Subparsers) -> None:
    p = sub.add_parser("convert", help="convert pytorch_model.bin weights to model.safetensors (no pickle code), "
                       "or a GGUF file (llama.cpp's) to a checkpoint Hermes streams: convert MODEL.gguf OUT_DIR")
    p.add_argument("model_dir", type=Path, help="a checkpoint directory with .bin weights, or a .gguf file")
    p.add_argument("out_dir", type=Path, nargs="?", help="for a .gguf file: the directory to write")
    p.add_argument("--force", action="store_true", help="replace a checkpoint already in OUT_DIR")


def _add_quantize(sub: _Subparsers) -> None:
    from hermes.quant.linear import DEFAULT_GROUP_SIZE, GROUP_SIZES

    p = sub.add_parser("quantize", help="write a 4- or 8-bit weight-only quantized copy of a checkpoint "
                       "(transformers loads it after `import hermes`; hermes streams it as stored)")
    p.add_argument("model_dir", type=Path, help="the 16/32-bit checkpoint")
    p.add_argument("out_dir", type=Path, help="directory to create (it must not hold a checkpoint yet)")
    p.add_argument("--bits", type=int, choices=(4, 8), required=True, help="4 (a quarter of bf16's bytes) or 8")
    p.add_argument("--group-size", type=int, choices=GROUP_SIZES, default=DEFAULT_GROUP_SIZE,
                   help=f"4 bits: inputs per scale and zero (default {DEFAULT_GROUP_SIZE}; smaller: closer to the "
                   "16-bit model, a little larger and slower)")
    p.add_argument("--force", action="store_true", help="replace a checkpoint already in OUT_DIR")


def _add_demo(sub: _Subparsers) -> None:
    from hermes.synth import ARCHS, DEFAULT_CACHE

    p = sub.add_parser("demo", help="synthesize BERT-Large (once) and run it under a 25%% budget")
    p.add_argument("--arch", default="bert-large", choices=list(ARCHS), help="architecture (default bert-large)")
    p.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help=f"where to keep it (default {DEFAULT_CACHE})")
