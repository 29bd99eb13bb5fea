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
    """A device of a ring other than rank 0: compute its share of every step rank 0's server runs. When the ring
    breaks (a device left or was stopped) meet the devices again at the same address and go on; stop when rank 0
    stops (0), when this device is stopped (SIGTERM / Ctrl-C: 0; the others meet again without it), or when the
    ring does not assemble again within --ring-timeout (2)."""
    import signal

    from hermes.ring.serving import rejoin, wait_stopped

    print(service.layout.describe(), file=sys.stderr)
    service.start()
    stopping = []

    def stop(sig: int, frame: Any) -> None:
        stopping.append(sig)
        service.manager.stop(block=False, hard_stop=True)  # every device learns it at the next step

    old = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    code = 0
    try:
        while True:
            print(f"{service.engine.stage.describe()}: computing its share of every step of rank 0's server; "
                  "Ctrl-C stops this device", file=sys.stderr, flush=True)
            reason = wait_stopped(service)
            if stopping or service.manager.distributed_helper.final:
                break
            print(f"hermes: the ring stopped ({reason}); meeting the devices again", file=sys.stderr, flush=True)
            try:
                rejoin(service)
            except HermesError as exc:
                print(f"hermes: serve stopped: the ring did not assemble again: {exc}", file=sys.stderr)
                code = 2
                break
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        service.stop()
    if not code:
        print("stopped", file=sys.stderr)
    return code


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
