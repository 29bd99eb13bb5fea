"""What a budget must hold: tied aliases served from resident units, and the minimum weight budget."""
from __future__ import annotations

from hermes.store import PAGE
from hermes.units import GATHER_ROWS, Unit, base_key, round_up


def tied_aliases(units: list[Unit], resident: tuple[str, ...] | list[str] | set[str]) -> dict[int, int]:
    """Units every tensor of which is also a tensor of an earlier resident unit (tied weights, e.g. GPT-2's
    lm_head and its token embedding): they are served from that unit's loaded bytes — no buffer, no read.
    Returns {unit index: index of the resident unit serving it}."""
    sources = [u for u in units if u.name in resident]
    out: dict[int, int] = {}
    for u in units:
        if not u.shares:
            continue
        keys = {base_key(s.key) for s in u.slots}  # a head chunk is served by rows of the whole tensor
        for r in sources:
            if r.index < u.index and r.index not in out and keys <= {s.key for s in r.slots}:
                out[u.index] = r.index
                break
    return out


def gather_layout(unit: Unit) -> tuple[int, int]:
    """(bytes for GATHER_ROWS rows, bytes of the page-aligned bounce area for O_DIRECT reads of one row) of a
    gathered embedding's room in the side buffer."""
    slot = unit.slots[0]
    row = slot.nbytes // slot.shape[0]
    return round_up(GATHER_ROWS * row, PAGE), round_up(row, PAGE) + PAGE


def gather_room(unit: Unit) -> int:
    """Bytes a gathered embedding reads its rows into (GATHER_ROWS rows at a time, plus O_DIRECT page room)."""
    return sum(gather_layout(unit))


def side_room(units: list[Unit]) -> int:
    """Bytes of the side buffer the inference agent reads into, inside a unit's forward: the routed experts (one
    at a time, the largest) and the rows of a gathered token embedding (never at the same moment)."""
    experts = max((u.buffer_bytes for u in units if u.kind == "expert"), default=0)
    gathers = max((gather_room(u) for u in units if u.kind == "gather"), default=0)
    return max(experts, gathers)


def minimum_budget(units: list[Unit], resident: tuple[str, ...] | list[str] = ()) -> int:
    """Smallest weight budget that can run the model: every resident unit plus the largest streamed unit
    (units served by a resident unit's tied weights cost nothing), plus the side buffer (routed experts,
    gathered embedding rows)."""
    alias = tied_aliases(units, resident)
    res = sum(u.buffer_bytes for u in units if (u.name in resident or u.kind == "pinned") and u.index not in alias)
    streamed = [u.buffer_bytes for u in units if u.name not in resident and u.index not in alias and u.called]
    return res + (max(streamed) if streamed else 0) + side_room(units)


def model_buffer_bytes(units: list[Unit]) -> int:
    """Bytes of the whole model in load buffers, each tensor once (a head tied to the embedding is not counted
    again): what holding every unit takes, without the side buffer."""
    alias = tied_aliases(units, [u.name for u in units])
    return sum(u.buffer_bytes for u in units if u.index not in alias)


def whole_model_bytes(units: list[Unit]) -> int:
    """The most weight memory the engine can hold for this model, whatever its budget and resident units: every
    unit's buffer once plus the side buffer. A tied head counts as its own chunks while its source streams and as
    nothing once the source is resident: the larger of the two ways is taken. No weights peak exceeds it."""
    streamed = sum(u.buffer_bytes for u in units if u.called or u.kind == "pinned")
    return max(model_buffer_bytes(units), streamed) + side_room(units)
