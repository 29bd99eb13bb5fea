"""Several devices, one model: a pipeline ring on ``torch.distributed`` (gloo over TCP).

Each device (a process, started the way distributed PyTorch starts: ``--ring HOST:PORT --rank R --world-size N``, or
under ``torchrun``) streams a contiguous range of the model's blocks under its own budget with its own PipeLoad
engine; hidden states pass between neighbours with point-to-point sends; rank 0 takes the input and returns the
output. ``link`` is the process group and its transfers, ``split`` which blocks each device computes (in laps),
``stage`` a device's share of the model and the hooks joining neighbours, ``driver`` the requests (a forward, a
``generate``) every rank runs in lockstep.
"""
from __future__ import annotations

from hermes.ring.link import RING_TIMEOUT_S, Ring, RingError, RingSpec
from hermes.ring.split import assign, laps_of
from hermes.ring.stage import Stage, checkpoint_fingerprint

__all__ = ["RING_TIMEOUT_S", "Ring", "RingError", "RingSpec", "Stage", "assign", "checkpoint_fingerprint", "laps_of"]
