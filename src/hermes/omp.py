"""How long OpenMP's idle workers spin, set before torch loads its OpenMP runtime (which reads it once).

After each parallel region, GNU OpenMP's workers spin waiting for the next one, by default 300,000 times
(``GOMP_SPINCOUNT``; ~10 ms of a core here, measured: a bf16 linear, then 50 ms idle, 10-12 ms of CPU) before
they sleep. On a ring (``hermes.ring``) a device's turn ends with its last block, and its workers then spin while
the next device computes: where devices share cores (devices emulated on one machine; one device running beside
other work) that spin is taken from the device whose turn it is — the first block of each turn took 13-18 ms
against 8-9 ms for the others (Llama-3.2-1B, 4 devices on 2 cores). A device of a ring therefore spins 30,000
times (~1 ms): long enough for the gaps between a block's parallel operators, short after its turn. Measured
there, interleaved, two rounds each: 4.08 → 4.49 and 4.35 → 4.75 decode tokens/s. Where the user set
``GOMP_SPINCOUNT`` or ``OMP_WAIT_POLICY``, or torch was loaded first (``hermes`` imported after torch: its
runtime has read its settings), nothing changes. A leaf module: nothing here imports torch.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Mapping, MutableMapping, Sequence

#: spins of an idle OpenMP worker on a ring's device (GNU OpenMP's default: 300,000)
RING_SPINCOUNT = 30_000
#: what torchrun sets in each process it starts (hermes.ring.link reads the ring from them)
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def is_ring_process(argv: Sequence[str], environ: Mapping[str, str]) -> bool:
    """Whether this process runs one device of a ring: ``--ring`` on its command line, or started by torchrun."""
    return any(a == "--ring" or a.startswith("--ring=") for a in argv) or all(k in environ for k in TORCHRUN_ENV)


def ring_spin(argv: Sequence[str] | None = None, environ: MutableMapping[str, str] | None = None,
              loaded: bool | None = None) -> bool:
    """Set ``GOMP_SPINCOUNT`` for a ring's device before torch loads (see the module); returns whether it did."""
    argv = sys.argv[1:] if argv is None else argv
    environ = os.environ if environ is None else environ
    loaded = "torch" in sys.modules if loaded is None else loaded
    if loaded or "GOMP_SPINCOUNT" in environ or "OMP_WAIT_POLICY" in environ or not is_ring_process(argv, environ):
        return False
    environ["GOMP_SPINCOUNT"] = str(RING_SPINCOUNT)
    return True
