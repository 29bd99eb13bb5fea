"""Which units stay loaded across passes (resident units, pinned units, tied units served by them), the minimum
budget that implies, and the one place where loaded tensors are attached to — and detached from — the model's
parameter slots (the skeleton's meta tensors stand in between calls)."""
from __future__ import annotations

import torch

from hermes.engine.budget import minimum_budget, side_room, tied_aliases
from hermes.engine.config import EngineConfig
from hermes.engine.passes import Loaded
from hermes.errors import BudgetError, HermesError
from hermes.figures import MIN_WEIGHTS, budget_flag
from hermes.memory import format_bytes
from hermes.units import Unit, base_key


class Residency:
    """The units held for good and the units attached now, for one model."""

    def __init__(self, model: torch.nn.Module, units: list[Unit]) -> None:
        self.model = model
        self.units = units
        self.pinned = tuple(u.index for u in units if u.kind == "pinned")
        self.side_bytes = side_room(units)
        self.resident: set[int] = set()  # unit indices kept loaded across passes
        self.aliases: dict[int, int] = {}  # tied unit -> the resident unit whose tensors serve it
        self.min_budget = 0
        self.loaded: dict[int, Loaded] = {}  # resident units loaded so far (kept across passes)
        self.attached: dict[int, Loaded] = {}  # streamed units computing now (released by their unit's end)
        self._meta: dict[int, list[torch.Tensor]] = {
            u.index: [model.get_submodule(s.module)._parameters[s.attr] for s in u.slots] for u in units}

    def configure(self, config: EngineConfig) -> None:
        """Take ``config``'s resident units (checked first: nothing changes if it raises).

        Raises:
            HermesError: a resident name is not a unit. BudgetError: the budget is below the minimum.
        """
        units = self.units
        names = {u.name for u in units}
        unknown = [r for r in config.resident if r not in names]
        if unknown:
            raise HermesError(f"resident units {unknown} are not units of this model; units are {sorted(names)}")
        remote = [r for r in config.resident if any(u.name == r and u.kind == "remote" for u in units)]
        if remote:
            raise HermesError(f"resident units {remote} are computed by another device of the ring; name units of "
                              "this device's blocks")
        wanted = tuple(config.resident) + tuple(units[i].name for i in self.pinned)
        aliases = tied_aliases(units, wanted)
        resident = {u.index for u in units if u.name in wanted and u.index not in aliases}
        minimum = minimum_budget(units, wanted)
        if config.budget_bytes < minimum:
            largest = max((u for u in units if u.index not in resident and u.called), key=lambda u: u.buffer_bytes,
                          default=units[0])
            held = sum(u.buffer_bytes for u in units if u.index in resident)
            raise BudgetError(
                f"budget {format_bytes(config.budget_bytes)} is below the {MIN_WEIGHTS} {format_bytes(minimum)} "
                f"of this model (largest unit {largest.name!r} {format_bytes(largest.buffer_bytes)}"
                + (f" + {len(resident)} resident unit(s) {format_bytes(held)}" if resident else "")
                + (f" + side buffer {format_bytes(self.side_bytes)} for embedding rows / experts"
                   if self.side_bytes else "")
                + f"); use a budget of at least {minimum} bytes ({budget_flag(minimum)})")
        self.aliases, self.resident, self.min_budget = aliases, resident, minimum

    def arena_bytes(self, budget_bytes: int) -> int:
        """Bytes of the arena for streamed units: the budget less resident units and the side buffer, capped at
        what every streamed unit takes at once."""
        resident = sum(u.buffer_bytes for u in self.units if u.index in self.resident)
        streamed = sum(u.buffer_bytes for u in self.units
                       if u.index not in self.resident and u.index not in self.aliases and u.called)
        return min(budget_bytes - resident - self.side_bytes, streamed)

    def held_at_most(self, budget_bytes: int) -> int:
        """The weights held at most under ``budget_bytes`` with these resident units: the arena, the resident
        units' buffers and the side buffer; less than the budget when the whole model fits in it."""
        resident = sum(u.buffer_bytes for u in self.units if u.index in self.resident)
        return self.arena_bytes(budget_bytes) + resident + self.side_bytes

    def keep(self, loaded: Loaded) -> bool:
        """Keep ``loaded`` for good if it is a resident unit not yet held (``cond`` held); False: free it."""
        i = loaded.unit.index
        if i in self.resident and i not in self.loaded:
            self.loaded[i] = loaded
            return True
        return False

    def dropped(self) -> list[Loaded]:
        """Forget the loaded units that are no longer resident (after a reconfigure); the caller frees them."""
        out = []
        for i in [i for i in self.loaded if i not in self.resident]:
            self.detach(i)
            out.append(self.loaded.pop(i))
        return out

    def held_params(self, index: int) -> list[torch.nn.Parameter]:
        """The tensors of unit ``index`` loaded now: held for good, or computing."""
        return (self.loaded.get(index) or self.attached[index]).params

    def source_params(self, index: int) -> list[torch.nn.Parameter]:
        """The whole tensors tied unit ``index`` reads, from its loaded resident source (for a head chunk: the
        whole head's weight)."""
        src = self.loaded[self.aliases[index]]
        by_key = {s.key: prm for s, prm in zip(src.unit.slots, src.params, strict=True)}
        return [by_key[base_key(s.key)] for s in self.units[index].slots]

    def alias_params(self, index: int) -> list[torch.nn.Parameter]:
        """The parameters of tied unit ``index`` from its resident source (a head chunk: its rows of it)."""
        params, rows = self.source_params(index), self.units[index].rows
        if rows is not None:
            params = [torch.nn.Parameter(t[rows[0]: rows[1]], requires_grad=False) for t in params]
        return params

    def attach(self, index: int, params: list[torch.nn.Parameter]) -> None:
        """Put ``params`` into unit ``index``'s parameter slots of the model, flagged as the skeleton's parameters
        are (``requires_grad`` as ``from_pretrained`` leaves it: torch picks some kernels by that flag, even
        under ``no_grad``; a streamed call runs under ``no_grad`` whatever the caller's mode)."""
        for slot, param, meta in zip(self.units[index].slots, params, self._meta[index], strict=True):
            if param.requires_grad != meta.requires_grad and param.is_floating_point():
                param.requires_grad_(meta.requires_grad)
            self.model.get_submodule(slot.module)._parameters[slot.attr] = param

    def detach(self, index: int) -> None:
        """Put the skeleton's meta tensors back into unit ``index``'s slots."""
        for slot, meta in zip(self.units[index].slots, self._meta[index], strict=True):
            self.model.get_submodule(slot.module)._parameters[slot.attr] = meta

    def detach_streamed(self) -> None:
        """Detach every unit not held for good (the end of a pass)."""
        for i in range(len(self.units)):
            if i not in self.loaded:
                self.detach(i)
