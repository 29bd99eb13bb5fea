"""Unit kinds: each says how its units are read, attached, computed and released, behind one interface
(:class:`UnitKind`). Adding a kind (a quantized unit, say) adds a module here and a row in ``KINDS``, not branches
across the engine.

| kind | read | computed by |
|---|---|---|
| ``block``, ``leftover`` (``whole.py``) | whole, by a loading agent, in schedule order | its forward (hooked) |
| ``pinned`` (``pinned.py``) | whole, by the first pass; held for good | whatever reads the attribute |
| ``gather`` (``gather.py``) | the rows of the ids embedded, by the inference agent | the embedding's forward |
| ``chunk`` (``chunk.py``) | a vocabulary slice of an LM head, like a block | the head's forward, chunk by chunk |
| ``expert`` (``expert.py``) | one routed expert, by the inference agent | transformers' experts interface |
| ``remote`` (``remote.py``) | never: another device of a ring computes it | its forward, on the meta device |
"""
from __future__ import annotations

from hermes.engine.kinds.base import UnitKind
from hermes.engine.kinds.chunk import HeadChunks
from hermes.engine.kinds.expert import RoutedExperts
from hermes.engine.kinds.gather import RowGather
from hermes.engine.kinds.pinned import Pinned
from hermes.engine.kinds.remote import Remote
from hermes.engine.kinds.whole import WholeModule

#: Unit.kind -> the class that handles units of that kind.
KINDS: dict[str, type[UnitKind]] = {
    "block": WholeModule,
    "leftover": WholeModule,
    "pinned": Pinned,
    "gather": RowGather,
    "chunk": HeadChunks,
    "expert": RoutedExperts,
    "remote": Remote,
}

__all__ = ["KINDS", "HeadChunks", "Pinned", "Remote", "RoutedExperts", "RowGather", "UnitKind", "WholeModule"]
