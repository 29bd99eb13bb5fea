"""``hermes serve``: the OpenAI-compatible server on one device, or on rank 0 of a ring (the other devices of a
ring compute their share of each step and take no requests)."""
from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Callable
from typing import Any

from hermes.errors import HermesError


def cmd_serve(args: argparse.Namespace) -> int:
    from hermes.serve import Service, serve
    from hermes.serve.app import listen

    def service(ring: Any) -> Service:
        return Service(args.model_dir, args.budget, loaders=args.loaders, io=args.io, max_batch=args.max_batch,
                       max_queue=args.max_queue, kv_cache=args.kv_cache, model_name=args.model_name,
                       request_memory=args.request_memory, max_body=args.max_body, ring=ring,
                       on_load=lambda: print(f"loading {args.model_dir} ...", file=sys.stderr, flush=True))

    try:  # bound once, before the model is loaded (a taken port fails now), and handed to uvicorn
        sock = listen(args.host, args.port) if _takes_requests(args) else None
    except OSError as exc:
        raise HermesError(f"cannot listen on {args.host}:{args.port}: {exc.strerror}; pick another --port "
                          "(0: any free one)") from None
    from hermes.cli.commands import _ring

    ring = _ring(args)
    if ring is not None and not ring.first:
        try:
            return _follow(service(ring))
        finally:
            ring.close()
    try:
        with sock or contextlib.nullcontext():
            return _serve(args, service(ring), serve, sock)
    finally:
        if ring is not None:
            ring.close()


def _takes_requests(args: argparse.Namespace) -> bool:
    """Whether this process listens: one device, or rank 0 of a ring (--rank, or torchrun's RANK)."""
    import os

    return (args.rank or 0) == 0 if args.ring is not None else os.environ.get("RANK", "0") == "0"


def _follow(service: Any) -> int:
    """A device of a ring other than rank 0: compute its share of every step rank 0's server runs, until the ring
    stops (rank 0 stopped: 0; the ring broke: 2). SIGTERM / Ctrl-C stop the whole ring."""
    import signal

    from hermes.ring.serving import wait_stopped

    print(service.layout.describe(), file=sys.stderr)
    service.start()
    stage = service.engine.stage
    print(f"{stage.describe()}: computing its share of every step of rank 0's server; Ctrl-C stops the ring",
          file=sys.stderr, flush=True)
    stopping = []

    def stop(sig: int, frame: Any) -> None:
        stopping.append(sig)
        service.manager.stop(block=False, hard_stop=True)  # every device learns it at the next step

    old = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        reason = wait_stopped(service)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        service.stop()
    error = service.manager.background_thread_status.fatal_error
    if error is not None and not stopping:
        print(f"hermes: serve stopped: {reason}", file=sys.stderr)
        return 2
    print("stopped", file=sys.stderr)
    return 0


def _serve(args: argparse.Namespace, service: Any, serve: Callable[..., Any], sock: Any) -> int:
    if service.auto is not None:
        print(service.auto.describe(), file=sys.stderr)
    print(service.layout.describe(), file=sys.stderr)
    ring = f" on a ring of {service.ring.size} devices" if service.ring is not None else ""

    def ready(url: str) -> None:
        print(f"serving {service.model_name}{ring} at {url} (max batch {args.max_batch}, queue {args.max_queue}"
              f"{', API key required' if args.api_key else ''}); Ctrl-C stops", file=sys.stderr, flush=True)

    code, failure = serve(service, host=args.host, api_key=args.api_key, on_ready=ready, sock=sock,
                          drain_timeout=args.drain_timeout, allowed_hosts=args.allowed_hosts,
                          allowed_origins=args.allowed_origins)
    if code:
        print(f"hermes: serve stopped: {failure}", file=sys.stderr)
        return code
    print("stopped", file=sys.stderr)
    return 0
