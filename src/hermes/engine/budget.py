"""What a budget must hold: tied aliases served from resident units, and the minimum weight budget."""
from __future__ import annotations

from hermes.units import Unit


def tied_aliases(units: list[Unit], resident: tuple[str, ...] | list[str] | set[str]) -> dict[int, int]:
    """Units every tensor of which is also a tensor of an earlier resident unit (tied weights, e.g. GPT-2's
    lm_head and its token embedding): they are served from that unit's loaded bytes — no buffer, no read.
    Returns {unit index: index of the resident unit serving it}."""
    sources = [u for u in units if u.name in resident]
    out: dict[int, int] = {}
    for u in units:
        if not u.shares:
            continue
        keys = {s.key for s in u.slots}
        for r in sources:
            if r.index < u.index and r.index not in out and keys <= {s.key for s in r.slots}:
                out[u.index] = r.index
                break
    return out


def expert_room(units: list[Unit]) -> int:
    """Bytes of the buffer experts are read into, one at a time, inside their layer's forward (the largest)."""
    return max((u.buffer_bytes for u in units if u.kind == "expert"), default=0)


def minimum_budget(units: list[Unit], resident: tuple[str, ...] | list[str] = ()) -> int:
    """Smallest weight budget that can run the model: every resident unit plus the largest streamed unit
    (units served by a resident unit's tied weights cost nothing), plus the expert buffer of a
    mixture-of-experts model."""
    alias = tied_aliases(units, resident)
    res = sum(u.buffer_bytes for u in units if u.name in resident and u.index not in alias)
    streamed = [u.buffer_bytes for u in units
                if u.name not in resident and u.index not in alias and u.kind != "expert"]
    return res + (max(streamed) if streamed else 0) + expert_room(units)


def ceil_mib(n: int) -> int:
    return -(-n // 2**20)
