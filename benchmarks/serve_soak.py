"""The soak of ``hermes serve`` (issue 21), run by ``benchmarks/bench_serve.py --soak SECONDS``: one model in an
emulated device (RAM = runtime + a share of the model, page cache included), ``--budget auto``, and ``--clients``
clients sending, for SECONDS, a mix of normal requests (text and token ids, streamed or not, chat), oversized
bodies (2-10 MB), text far too long for the positions, malformed bodies (bad JSON, invalid UTF-8, lone
surrogates, wrong types, non-JSON content types) and clients that disconnect mid-stream.

What it checks: no OOM kill, every request answered (an HTTP status with the expected shape: a JSON body for
every error; a stream ending in ``[DONE]``; nothing lost to a reset or a timeout, no 5xx), the peak memory
within the device, and no leak: the server's RSS when idle after the first minute (warm-up) and when idle at
the end, within 5 %.
"""
from __future__ import annotations

import asyncio
import collections
import json
import random
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

_TEXT = ("the of and to in is was for on that with as by at from his her an were are which this be or has had it "
         "not first one their its new after who they two have been more she also time year into during other "
         "all some most only over city when would there where up out many may can about these than made")
WORDS = _TEXT.split(" ")
#: the mix: kind -> weight
MIX = {"text": 30, "ids": 10, "stream": 15, "chat": 5, "oversized": 8, "too_long": 7, "malformed": 12,
       "disconnect": 8, "info": 5}
WARMUP_S = 60.0
IDLE_S = 5.0


def _prompt(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


def _malformed(rng: random.Random) -> tuple[bytes, str]:
    """A bad body and its content type."""
    choice = rng.randrange(8)
    if choice == 0:
        return b'{"prompt": "the city", "max_tokens": ', "application/json"
    if choice == 1:
        return b'{"prompt": "the \xff\xfe city"}', "application/json"
    if choice == 2:
        return b'{"prompt": "the \\ud800 city"}', "application/json"
    if choice == 3:
        return json.dumps({"prompt": "the", "max_tokens": "many"}).encode(), "application/json"
    if choice == 4:
        return b"[" * 50_000 + b"]" * 50_000, "application/json"
    if choice == 5:
        return json.dumps({"prompt": "the city"}).encode(), "text/plain"
    if choice == 6:
        return json.dumps({"messages": [{"role": "user", "content": 5}]}).encode(), "application/json"
    return bytes(rng.randrange(256) for _ in range(200)), "application/json"


async def _one(http: Any, url: str, model: str, kind: str, rng: random.Random, vocab: int) -> tuple[str, str]:
    """Send one request of ``kind``; (outcome, detail): outcome "ok" (answered as expected) or "lost"."""
    import httpx2 as httpx

    route = "/completions"
    content_type = "application/json"
    stream = False
    if kind == "text":
        body = json.dumps({"model": model, "prompt": _prompt(rng, 30), "max_tokens": rng.randint(4, 16),
                           "temperature": rng.choice([0, 0.8])}).encode()
    elif kind == "ids":
        body = json.dumps({"prompt": [rng.randrange(vocab) for _ in range(32)], "max_tokens": 8}).encode()
    elif kind in ("stream", "disconnect"):
        body = json.dumps({"prompt": _prompt(rng, 20), "max_tokens": rng.randint(8, 24), "stream": True}).encode()
        stream = True
    elif kind == "chat":
        route = "/chat/completions"
        body = json.dumps({"messages": [{"role": "user", "content": _prompt(rng, 20)}], "max_tokens": 8}).encode()
    elif kind == "oversized":
        body = json.dumps({"prompt": "the " * (rng.randint(2, 10) * 250_000)}).encode()
    elif kind == "too_long":
        body = json.dumps({"prompt": _prompt(rng, 150_000)[:900_000]}).encode()
    elif kind == "malformed":
        body, content_type = _malformed(rng)
    else:
        path = rng.choice(["/health", "/metrics", "/models"])
        try:
            r = await http.get(url.removesuffix("/v1") + path if path != "/models" else url + path)
        except (httpx.HTTPError, OSError) as exc:
            return "lost", f"GET {path}: {type(exc).__name__}: {exc}"
        return ("ok", f"GET {path} {r.status_code}") if r.status_code == 200 else ("lost", f"GET {path} "
                                                                                    f"{r.status_code}")
    headers = {"content-type": content_type}
    try:
        if stream:
            async with http.stream("POST", url + route, content=body, headers=headers) as r:
                if r.status_code != 200:
                    text = (await r.aread()).decode()
                    return _error_outcome(kind, r.status_code, text)
                lines = []
                async for line in r.aiter_lines():
                    if line:
                        lines.append(line)
                    if kind == "disconnect" and len(lines) >= 2:
                        return "ok", "disconnected"
                if lines and lines[-1] == "data: [DONE]":
                    errors = [x for x in lines[:-1] if "error" in json.loads(x.removeprefix("data: "))]
                    if errors:
                        return "lost", "error event: " + errors[0][:200]
                    return "ok", "200 stream"
                return "lost", "stream without [DONE]: " + (lines[-1][:200] if lines else "nothing")
        r = await http.post(url + route, content=body, headers=headers)
    except (httpx.HTTPError, OSError) as exc:
        return "lost", f"{kind}: {type(exc).__name__}: {exc}"
    return _error_outcome(kind, r.status_code, r.text) if r.status_code != 200 else _ok(kind, r.text)


def _ok(kind: str, text: str) -> tuple[str, str]:
    if kind in ("oversized", "too_long", "malformed"):
        return "lost", f"{kind} accepted: {text[:200]}"
    try:
        json.loads(text)["choices"]
    except (ValueError, KeyError, TypeError):
        return "lost", f"{kind} 200 without choices: {text[:200]}"
    return "ok", "200"


def _error_outcome(kind: str, status: int, text: str) -> tuple[str, str]:
    try:
        err = json.loads(text)["error"]
        assert err["message"] and err["type"]
    except (ValueError, KeyError, TypeError, AssertionError):
        return "lost", f"{kind} {status} not in the OpenAI error shape: {text[:200]}"
    if status >= 500 or (status != 429 and kind in ("text", "ids", "stream", "chat", "disconnect")):
        return "lost", f"{kind} {status}: {err['message'][:200]}"
    return "ok", f"{status} {err.get('code') or err['type']}"


async def _load(url: str, model: str, clients: int, seconds: float, vocab: int, seed: int,
                tally: dict[str, collections.Counter], lost: list[str], stop: threading.Event) -> None:
    import httpx2 as httpx

    kinds, weights = zip(*MIX.items(), strict=True)
    deadline = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=clients * 2, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=300, limits=limits) as http:
        async def client(i: int) -> None:
            rng = random.Random(seed * 1000 + i)
            while time.monotonic() < deadline and not stop.is_set():
                kind = rng.choices(kinds, weights)[0]
                outcome, detail = await _one(http, url, model, kind, rng, vocab)
                tally[kind][detail if outcome == "ok" else "LOST"] += 1
                if outcome == "lost":
                    lost.append(detail)
                    if "ConnectError" in detail:  # the server is gone
                        stop.set()

        await asyncio.gather(*(client(i) for i in range(clients)))


class Sampler(threading.Thread):
    """The server's anonymous memory (RssAnon) every ``every`` seconds, until stopped."""

    def __init__(self, pid: int, every: float = 2.0) -> None:
        super().__init__(daemon=True)
        self.pid, self.every, self.t0 = pid, every, time.monotonic()
        self.samples: list[tuple[float, int]] = []
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(self.every):
            try:
                self.samples.append((round(time.monotonic() - self.t0, 1), _rss(self.pid)["RssAnon"]))
            except (OSError, KeyError):
                return


def _rss(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon"):
            out[key] = int(value.split()[0]) * 1024
    return out


def soak(model_dir: Path, args: Any, start_server: Any, metrics: Any) -> dict[str, Any]:
    """Run the soak; its results (also printed as they come)."""
    from hermes.api import open_model
    from hermes.device import ROOT, Device, DeviceSpec
    from hermes.memory import format_bytes, parse_bytes

    layout = open_model(model_dir)
    size = layout.nbytes
    vocab = layout.config.get_text_config(decoder=True).vocab_size
    fraction = float(args.fractions.split(",")[0])
    ram = parse_bytes(args.runtime) + int(fraction * size)
    print(f"soak: {model_dir.name} at {fraction:.0%}: device RAM {format_bytes(ram)}, {args.clients} clients, "
          f"{args.soak:g} s", file=sys.stderr, flush=True)
    tally: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    lost: list[str] = []
    with Device(DeviceSpec(ram_bytes=ram), model_dir) as dev:
        group = ROOT / "memory" / dev.name
        proc, url, log = start_server(model_dir, dev.preexec, ["--max-batch", "8", "--max-queue", "32"])
        sampler = Sampler(proc.pid)
        sampler.start()
        stop = threading.Event()
        rss_warm = rss = {"VmRSS": 0, "VmHWM": 0, "RssAnon": 0}
        m: dict[str, float] = {}
        t0 = time.monotonic()
        try:
            warm = min(WARMUP_S, args.soak / 4)
            asyncio.run(_load(url, model_dir.name, args.clients, warm, vocab, 1, tally, lost, stop))
            time.sleep(IDLE_S)
            rss_warm = _rss(proc.pid)
            print(f"  after warm-up ({warm:g} s): RSS {format_bytes(rss_warm['VmRSS'])} (anonymous "
                  f"{format_bytes(rss_warm['RssAnon'])}), lost {len(lost)}", file=sys.stderr, flush=True)
            asyncio.run(_load(url, model_dir.name, args.clients, args.soak - warm, vocab, 2, tally, lost, stop))
            time.sleep(IDLE_S)
            rss = _rss(proc.pid)
            m = metrics(url)
        except Exception as exc:  # noqa: BLE001 (the server died: report how)
            lost.append(f"soak aborted: {type(exc).__name__}: {exc}")
        finally:
            wall = time.monotonic() - t0
            sampler.done.set()
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            code = proc.wait(timeout=180)
        peak = int((group / "memory.max_usage_in_bytes").read_text())
        failcnt = int((group / "memory.failcnt").read_text())
        oom = dev.oom_killed()
    requests = sum(sum(c.values()) for c in tally.values())
    result = {
        "model": model_dir.name, "fraction": fraction, "device_ram_bytes": ram, "model_bytes": size,
        "clients": args.clients, "seconds": wall, "requests": requests, "lost": len(lost), "lost_examples": lost[:10],
        "by_kind": {k: dict(v) for k, v in tally.items()}, "oom_killed": oom, "server_exit": code,
        "device_peak_bytes": peak, "device_limit_hits": failcnt, "rss_after_warmup_bytes": rss_warm["VmRSS"],
        "rss_end_bytes": rss["VmRSS"], "rss_peak_bytes": rss["VmHWM"],
        "rss_end_vs_warm": rss["VmRSS"] / max(rss_warm["VmRSS"], 1),
        "anon_after_warmup_bytes": rss_warm["RssAnon"], "anon_end_bytes": rss["RssAnon"],
        "anon_end_vs_warm": rss["RssAnon"] / max(rss_warm["RssAnon"], 1),
        "anon_samples": sampler.samples[::max(len(sampler.samples) // 200, 1)],
        "anon_peak_bytes": max((b for _, b in sampler.samples), default=0),
        "metrics": m,
        "server_log": [line for line in log if "budget" in line or "WARNING" in line or "ERROR" in line][:20]
        + log[-30:],
    }
    return result


def to_markdown(r: dict[str, Any]) -> str:
    from hermes.memory import format_bytes

    m = r["metrics"]
    lines = [f"Soak: {r['model']} in a device of {format_bytes(r['device_ram_bytes'])} (runtime + "
             f"{r['fraction']:.0%} of the model, page cache included), `--budget auto`, {r['clients']} clients for "
             f"{r['seconds']:.0f} s, {r['requests']} requests.", "",
             "| check | result |", "|---|---|",
             f"| OOM kills | {'yes' if r['oom_killed'] else '0'} |",
             f"| requests without their answer | {r['lost']} of {r['requests']} |",
             f"| device memory peak (cgroup, page cache included) | {format_bytes(r['device_peak_bytes'])} of "
             f"{format_bytes(r['device_ram_bytes'])} (limit reached {r['device_limit_hits']} times) |",
             f"| server RSS peak | {format_bytes(r['rss_peak_bytes'])} (budget "
             f"{format_bytes(m.get('hermes_budget_bytes', 0))}) |",
             f"| server anonymous memory peak (sampled every 2 s) | {format_bytes(r['anon_peak_bytes'])} |",
             f"| server RSS idle after warm-up / at the end | {format_bytes(r['rss_after_warmup_bytes'])} / "
             f"{format_bytes(r['rss_end_bytes'])} ({(r['rss_end_vs_warm'] - 1) * 100:+.1f} %) |",
             f"| its anonymous part (RssAnon: heap, tensors; the rest is mapped files such as libtorch) | "
             f"{format_bytes(r['anon_after_warmup_bytes'])} / {format_bytes(r['anon_end_bytes'])} "
             f"({(r['anon_end_vs_warm'] - 1) * 100:+.1f} %) |",
             f"| server exit after SIGTERM | {r['server_exit']} |", "",
             "| request kind | answers |", "|---|---|"]
    for kind, counts in sorted(r["by_kind"].items()):
        lines.append(f"| {kind} | " + ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())) + " |")
    return "\n".join(lines) + "\n"
