"""Gathered token embeddings: only the rows of the ids a call embeds are read (into the side buffer, by the
inference agent), and the embedding's own forward runs on them with the ids renumbered, ``GATHER_ROWS`` distinct
ids at a time. Kept resident, the embedding is loaded whole and computed like a leftover module."""
from __future__ import annotations

import time
from typing import Any

import torch

from hermes.engine.budget import gather_layout
from hermes.engine.kinds.base import UnitKind
from hermes.errors import InputError
from hermes.units import GATHER_ROWS, Unit


class RowGather(UnitKind):
    """A token embedding read a few rows at a time."""

    def planned(self, index: int) -> bool:
        return index in self.engine.residency.resident  # whole only when kept resident

    def install(self) -> None:
        for u in self.units:
            self.wrap_forward(u.name, lambda orig, a, kw, u=u: self._forward(u, orig, a, kw))

    def _forward(self, unit: Unit, orig: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        e = self.engine
        if e.bypass.active:  # resident and attached
            return orig(*args, **kwargs)
        if unit.index in e.residency.resident:  # loaded whole, computed like a leftover module
            e.inference.before_unit(unit.index)
            try:
                return orig(*args, **kwargs)
            finally:
                e.inference.after_unit(unit.index)
        if args:
            ids, rest, kw = args[0], args[1:], kwargs
        else:
            first = next(iter(kwargs))
            ids, rest, kw = kwargs[first], (), {k: v for k, v in kwargs.items() if k != first}
        mod = e.model.get_submodule(unit.name)
        padding, mod.padding_idx = mod.padding_idx, None  # only used by backward; renumbered ids would not match
        try:
            return self._embed(unit, ids, lambda x: orig(x, *rest, **kw))
        finally:
            mod.padding_idx = padding
            e.residency.detach(unit.index)

    def _embed(self, unit: Unit, ids: torch.Tensor, embed: Any) -> torch.Tensor:
        flat = ids.reshape(-1)
        uniq, inv = torch.unique(flat, sorted=True, return_inverse=True)
        rows = unit.slots[0].shape[0]
        if uniq.numel() and (int(uniq[0]) < 0 or int(uniq[-1]) >= rows):
            raise InputError(f"token id {int(uniq[-1]) if int(uniq[-1]) >= rows else int(uniq[0])} is outside "
                             f"the vocabulary of {unit.name!r} ({rows} rows, ids 0..{rows - 1})")
        attach = self.engine.residency.attach
        if uniq.numel() <= GATHER_ROWS:
            attach(unit.index, [self._read_rows(unit, uniq.tolist())])
            return embed(inv.view(ids.shape))
        out = None
        for a in range(0, uniq.numel(), GATHER_ROWS):
            sel = (inv >= a) & (inv < a + GATHER_ROWS)
            attach(unit.index, [self._read_rows(unit, uniq[a: a + GATHER_ROWS].tolist())])
            piece = embed(inv[sel] - a)
            if out is None:
                out = piece.new_empty((flat.numel(), *piece.shape[1:]))
            out[sel] = piece
        assert out is not None
        return out.view(*ids.shape, *out.shape[1:])

    def _read_rows(self, unit: Unit, ids: list[int]) -> torch.nn.Parameter:
        """Rows ``ids`` (ascending) of the embedding, read into the side buffer."""
        e = self.engine
        slot, seg = unit.slots[0], unit.segments[0]
        row = slot.nbytes // slot.shape[0]
        buffer, reader = e.side_buffer()
        room, bounce = gather_layout(unit)
        t0 = time.perf_counter()
        with memoryview(buffer) as mv:
            reader.read_rows(seg.path, seg.start + slot.offset - seg.buf_offset, row, ids, mv[: len(ids) * row],
                             mv[room: room + bounce])
        p = e.inference.current()
        if p is not None:
            p.stats.bytes_read += len(ids) * row
            p.stats.stall_s += time.perf_counter() - t0
        t = torch.frombuffer(buffer, dtype=slot.dtype, count=len(ids) * row // slot.dtype.itemsize) if ids else \
            torch.empty(0, dtype=slot.dtype)
        return torch.nn.Parameter(t.view(len(ids), *slot.shape[1:]), requires_grad=False)
