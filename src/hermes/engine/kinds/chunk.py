"""LM-head chunks: a head's weight streamed in vocabulary slices, each a unit loaded like a block; the head's
forward runs once per chunk and the logits are concatenated. A head tied to a resident embedding runs as one
matmul over the whole vocabulary, from the embedding's loaded tensor."""
from __future__ import annotations

import functools
import time
from typing import Any

import torch

from hermes.engine.kinds.base import UnitKind
from hermes.units import Unit


def per_sequence(linear: Any, *args: Any, **kwargs: Any) -> Any:
    """An LM head's ``nn.Linear`` forward, one sequence at a time when its input is 3-D: transformers hands the head
    a slice of the hidden states (``hidden[:, -1:, :]``) whose batch stride cannot be folded into one matmul, and
    torch then materializes a copy of the whole weight for a batched matmul (116 MiB for one bf16 chunk of
    Llama-3.2-1B's head, 501 MiB for all of it: outside any budget). Per sequence the result is bit-identical
    to that batched matmul (checked for float32 and bfloat16, batch 1-4) and nothing is copied. A foldable
    (contiguous) input goes to the head as it is: torch folds it into one matmul without a copy."""
    x = args[0] if args else kwargs.pop("input")
    rest = args[1:]
    if isinstance(x, torch.Tensor) and x.dim() == 3 and x.shape[0] > 0 and x.stride(0) != x.shape[1] * x.shape[2]:
        return torch.stack([linear(x[b], *rest, **kwargs) for b in range(x.shape[0])])
    return linear(x, *rest, **kwargs)


def _trim(logits: torch.Tensor, width: int | None) -> torch.Tensor:
    return logits[..., :width].contiguous() if width is not None and logits.shape[-1] > width else logits


class HeadChunks(UnitKind):
    """Vocabulary slices of one or more LM heads."""

    def install(self) -> None:
        heads: dict[str, list[Unit]] = {}
        for u in self.units:
            heads.setdefault(u.module, []).append(u)
        for name, chunks in heads.items():
            # a 4-bit head stores its rows padded to its kernel's block: its logits end at its out_features
            width = getattr(self.engine.model.get_submodule(name), "out_features", None)
            self.wrap_forward(name, lambda orig, a, kw, c=tuple(u.index for u in chunks), w=width:
                              _trim(self._forward(c, orig, a, kw), w))

    def bypass_params(self, unit: Unit) -> list[torch.nn.Parameter] | None:
        res = self.engine.residency
        return res.loaded[unit.index].params if unit.index in res.loaded else None  # else: the head's one matmul

    def _forward(self, chunks: tuple[int, ...], orig: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        e, res = self.engine, self.engine.residency
        orig = functools.partial(per_sequence, orig)
        source = res.aliases.get(chunks[0])
        tied = source is not None and all(res.aliases.get(i) == source for i in chunks)
        if e.bypass.active:  # everything resident: the tied weight, or each resident chunk in turn
            if tied:
                res.attach(chunks[0], res.source_params(chunks[0]))
                return orig(*args, **kwargs)
            outs = []
            for i in chunks:
                res.attach(i, res.loaded[i].params if i in res.loaded else res.alias_params(i))
                outs.append(orig(*args, **kwargs))
            return torch.cat(outs, dim=-1)
        p = e.inference.current()
        if tied and p is not None:
            return self._tied(p, chunks[0], source, orig, args, kwargs)
        outs = []
        for i in chunks:
            e.inference.before_unit(i)
            try:
                outs.append(orig(*args, **kwargs))
            finally:
                e.inference.after_unit(i)
        return torch.cat(outs, dim=-1)

    def _tied(self, p: Any, first: int, source: int, orig: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """One matmul over the whole vocabulary from the resident tied source; its time goes on the first chunk's
        event (the others take none)."""
        e, res = self.engine, self.engine.residency
        if source not in res.loaded:
            e.inference.take(p, source)
        res.attach(first, res.source_params(first))
        ev = p.events[first]
        ev.compute_start = time.perf_counter() - p.t0
        try:
            return orig(*args, **kwargs)
        finally:
            ev.compute_end = time.perf_counter() - p.t0
            res.detach(first)
