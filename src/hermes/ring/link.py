"""The link between the devices of a ring: a ``torch.distributed`` gloo process group (its own TCP rendezvous — a
``tcp://HOST:PORT`` init method, or ``torchrun``'s environment), and the few transfers a ring makes over it.

Tensors travel as their bytes (``uint8`` views: any dtype, bfloat16 included); what is not a tensor (a request's
settings, a rank's report) travels as JSON text — nothing is ever unpickled. Every operation is bounded by the
process group's timeout, and a peer that disconnects fails the pending operation at once (its sockets close): either
way the caller gets a :class:`RingError` that names the operation and the peer, never a wait without end.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from hermes.errors import HermesError
from hermes.omp import TORCHRUN_ENV

log = logging.getLogger(__name__)

#: Default bound (s) of every wait on a peer: the rendezvous, and each transfer (a peer streaming its share of a
#: token on a slow device sends nothing for that long).
RING_TIMEOUT_S = 300.0

#: the rendezvous store's key naming the session devices may join now (rank 0 deletes it once the ring is whole)
_OPEN = "hermes/open"

#: dtypes a request's tensors may have (their code in a transfer's header is the position here)
_DTYPES = (torch.int64, torch.int32, torch.bool, torch.float32, torch.bfloat16, torch.float16, torch.uint8)


class RingError(HermesError):
    """The ring could not assemble, or broke: a peer left, timed out, or disagrees (another checkpoint)."""


@dataclass(frozen=True)
class RingSpec:
    """Where and as what this process joins a ring."""

    address: str | None  # "HOST:PORT" of rank 0's rendezvous; None: torchrun's environment (MASTER_ADDR, ...)
    rank: int
    world_size: int
    timeout_s: float = RING_TIMEOUT_S
    stages: tuple[int, ...] | None = None  # blocks per rank, by hand (None: by measurement, else budget)
    laps: int | None = 1  # passes of the ring per token, each device's share cut in that many parts (None: auto)

    def __post_init__(self) -> None:
        if self.world_size < 1:
            raise RingError(f"--world-size {self.world_size}: a ring has at least one device")
        if not 0 <= self.rank < self.world_size:
            raise RingError(f"--rank {self.rank} is not in 0..{self.world_size - 1} (--world-size "
                            f"{self.world_size}); give each device its own rank")
        if self.laps is not None and self.laps < 1:
            raise RingError(f"--laps {self.laps}: a token passes the ring at least once (give 1 or more, or auto)")
        if self.stages is not None and len(self.stages) != self.world_size:
            raise RingError(f"--stages gives {len(self.stages)} block counts for {self.world_size} devices; give "
                            "one count per rank, e.g. --stages 6,10")
        if self.address is not None:
            host, _, port = self.address.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise RingError(f"--ring {self.address!r} is not HOST:PORT (rank 0's address and a free port, "
                                "e.g. 192.168.1.10:29500)")

    @classmethod
    def from_environment(cls, timeout_s: float = RING_TIMEOUT_S, stages: tuple[int, ...] | None = None,
                         laps: int | None = 1) -> RingSpec | None:
        """The ring ``torchrun`` started this process in (RANK, WORLD_SIZE, MASTER_ADDR set), or None."""
        env = os.environ
        if not all(k in env for k in TORCHRUN_ENV):
            return None
        try:
            rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
        except ValueError as exc:
            raise RingError(f"torchrun's RANK / WORLD_SIZE are not numbers: {exc}") from exc
        return cls(None, rank, world, timeout_s, stages, laps)


class Ring:
    """This process's place in a ring: its rank among ``size`` devices, and the transfers between them."""

    def __init__(self, spec: RingSpec) -> None:
        self.spec = spec
        self.rank, self.size = spec.rank, spec.world_size
        self.joined = False
        self._store: Any = None  # the rendezvous store (rank 0: its server)
        self.session: str | None = None  # the session of the ring this device last joined
        self.on_break = "every rank stops — start them all again"  # what a broken ring's error says happens next
        self.broken = False  # a transfer failed: no other is tried (it could wait its whole timeout on a dead peer)
        self.sent_bytes = 0  # tensor bytes this rank sent (a broadcast's counted once per receiver)
        self.wait_s = 0.0  # time spent in transfers: waiting for a peer (its compute, its reads) and sending

    @property
    def first(self) -> bool:
        return self.rank == 0

    @property
    def last(self) -> bool:
        return self.rank == self.size - 1

    def join(self, wait_s: float | None = None) -> Ring:
        """Rendezvous with every other rank over gloo, waiting for them up to ``wait_s`` (default: the ring's
        timeout; a ring meeting again waits longer: a device stuck in the broken ring's last transfer may take up
        to one timeout to notice)."""
        import torch.distributed as dist

        spec = self.spec
        wait = spec.timeout_s if wait_s is None else wait_s
        where = f"tcp://{spec.address}" if spec.address else "env://"
        log.info("rank %d of %d joining the ring at %s", spec.rank, spec.world_size, where)
        timeout = datetime.timedelta(seconds=wait)
        try:
            if spec.address:
                dist.init_process_group("gloo", store=self._session(wait), rank=spec.rank,
                                        world_size=spec.world_size, timeout=timeout)
                if self.first:  # the ring is whole: no device joins this session any more
                    self._store.delete_key(_OPEN)
            else:  # torchrun's store (its agent restarts the devices as a whole)
                dist.init_process_group("gloo", init_method=where, rank=spec.rank, world_size=spec.world_size,
                                        timeout=timeout)
        except Exception as exc:  # noqa: BLE001 - torch raises RuntimeError, DistStoreError, TimeoutError, ValueError
            raise RingError(
                f"rank {spec.rank} could not join the ring of {spec.world_size} at {spec.address or where} within "
                f"{wait:g} s: {_first_line(exc)}; start every rank (0..{spec.world_size - 1}) with the "
                "same --ring address (rank 0's host, a port open to the others) and --world-size") from exc
        if wait != spec.timeout_s:  # each transfer from now on: the ring's own timeout again
            with contextlib.suppress(Exception):
                dist.distributed_c10d._set_pg_timeout(datetime.timedelta(seconds=spec.timeout_s))
        self.joined, self.broken = True, False
        return self

    def _session(self, wait_s: float) -> Any:
        """The rendezvous of a new session of the ring at ``--ring``: rank 0 hosts the store and opens a session
        there each time it joins; the others wait for an open session (a device restarted while the others
        still run their session waits until they meet again). Each session's keys are its own, so that a ring
        that meets again never reads the addresses of the devices of the one before."""
        import torch.distributed as dist

        spec = self.spec
        host, _, port = spec.address.rpartition(":")  # type: ignore[union-attr]
        deadline = time.monotonic() + wait_s
        if self.first:
            if self._store is None:  # one server for every session of this process (it keeps its port)
                self._store = dist.TCPStore(host, int(port), spec.world_size, is_master=True, wait_for_workers=False,
                                            timeout=datetime.timedelta(seconds=wait_s))
            session = uuid.uuid4().hex
            self._store.set(_OPEN, session)
        else:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise RingError("no session of the ring opened in time")
                try:
                    store = dist.TCPStore(host, int(port), is_master=False, wait_for_workers=False,
                                          timeout=datetime.timedelta(seconds=left))
                    session = store.get(_OPEN).decode()
                except Exception:  # noqa: BLE001 - rank 0's store not up (yet), or the last session's going away
                    time.sleep(min(0.5, max(left, 0)))
                    continue
                if session != self.session:
                    break
                time.sleep(0.5)  # the last session's store: rank 0 has not opened the next one yet
            self._store = store
        self.session = session
        return dist.PrefixStore(f"hermes/{session}", self._store)

    def close(self) -> None:
        """Leave the ring (idempotent)."""
        import torch.distributed as dist

        if self.joined and dist.is_initialized():
            with contextlib.suppress(Exception):
                dist.destroy_process_group()
        self.joined = False

    # ---- transfers -----------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def guard(self, what: str) -> Iterator[None]:
        """Time a transfer, and turn a failed one (a peer gone, a timeout) into a RingError that names it."""
        if self.broken:  # an earlier transfer failed: this one would wait on a dead peer
            raise RingError(f"rank {self.rank}: the ring is broken (while {what}); {self.on_break}")
        t0 = time.perf_counter()
        failure = None
        try:
            yield
            self.wait_s += time.perf_counter() - t0
        except RingError:
            raise
        except Exception as exc:  # noqa: BLE001 - gloo raises RuntimeError / DistError subclasses
            self.broken = True
            failure = _first_line(exc)
        if failure is not None:  # raised here, not chained: gloo's error holds the frames that hold its process
            # group, whose sockets must close when the ring is left (a peer waiting on them learns it at once)
            raise RingError(f"rank {self.rank}: the ring broke while {what}: {failure} (a device stopped, "
                            f"disconnected or sent nothing for {self.spec.timeout_s:g} s); {self.on_break}")

    def send(self, tensor: torch.Tensor, dst: int, what: str) -> None:
        import torch.distributed as dist

        with self.guard(f"sending {what} to rank {dst}"):
            dist.send(_bytes(tensor.contiguous()), dst)
        self.sent_bytes += tensor.numel() * tensor.element_size()

    def recv(self, like: torch.Tensor, src: int, what: str) -> torch.Tensor:
        """A tensor of ``like``'s shape and dtype (``like`` may be on the meta device) received from ``src``."""
        import torch.distributed as dist

        out = torch.empty(like.shape, dtype=like.dtype)
        with self.guard(f"waiting for {what} from rank {src}"):
            dist.recv(_bytes(out), src)
        return out

    def broadcast(self, tensor: torch.Tensor, src: int, what: str) -> torch.Tensor:
        """``tensor`` from ``src`` on every rank (elsewhere ``tensor`` gives only the shape and dtype)."""
        import torch.distributed as dist

        out = tensor.contiguous() if self.rank == src else torch.empty(tensor.shape, dtype=tensor.dtype)
        with self.guard(f"broadcasting {what} from rank {src}"):
            dist.broadcast(_bytes(out), src)
        if self.rank == src:
            self.sent_bytes += out.numel() * out.element_size() * (self.size - 1)
        return out

    def broadcast_json(self, obj: Any, src: int = 0, what: str = "the request") -> Any:
        """A JSON-serializable value from ``src`` on every rank (``obj`` is ignored elsewhere)."""
        data = torch.frombuffer(bytearray(json.dumps(obj).encode()), dtype=torch.uint8) if self.rank == src \
            else torch.empty(0, dtype=torch.uint8)
        n = self.broadcast(torch.tensor([data.numel()]), src, what)
        data = self.broadcast(data if self.rank == src else torch.empty(int(n[0]), dtype=torch.uint8), src, what)
        return json.loads(bytes(data.numpy()).decode())

    def broadcast_tensors(self, tensors: dict[str, torch.Tensor] | None, src: int = 0,
                          what: str = "the input") -> dict[str, torch.Tensor]:
        """Named tensors (shapes unknown elsewhere) from ``src`` on every rank."""
        head = None
        if self.rank == src:
            assert tensors is not None
            bad = [k for k, t in tensors.items() if t.dtype not in _DTYPES]
            if bad:
                raise RingError(f"inputs {bad} have a dtype a ring does not send; give token ids or float tensors")
            head = {k: [_DTYPES.index(t.dtype), list(t.shape)] for k, t in tensors.items()}
        head = self.broadcast_json(head, src, what)
        return {k: self.broadcast(tensors[k] if self.rank == src else torch.empty(shape, dtype=_DTYPES[code]),
                                  src, what) for k, (code, shape) in head.items()}

    def gather_json(self, obj: Any, what: str) -> list[Any]:
        """Every rank's ``obj`` (JSON-serializable), in rank order, on every rank."""
        import torch.distributed as dist

        data = json.dumps(obj).encode()
        with self.guard(f"gathering {what}"):
            sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(self.size)]
            dist.all_gather(sizes, torch.tensor([len(data)]))
            width = int(max(s.item() for s in sizes))
            mine = torch.zeros(width, dtype=torch.uint8)
            mine[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else mine[:0]
            parts = [torch.zeros(width, dtype=torch.uint8) for _ in range(self.size)]
            dist.all_gather(parts, mine)
        return [json.loads(bytes(p[: int(s.item())].numpy()).decode()) for p, s in zip(parts, sizes, strict=True)]


def _bytes(t: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor's bytes as a flat uint8 view (gloo sends any dtype that way)."""
    if not t.is_contiguous():
        raise RingError("internal: a ring transfer needs a contiguous tensor")
    return t.reshape(-1).view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]
