"""Engine settings and the records of a pass (leaf module: imports nothing from the engine)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from hermes.errors import HermesError

IO_MODES = ("buffered", "direct")


@dataclass(frozen=True)
class EngineConfig:
    """Settings of the PipeLoad engine (what a plan decides)."""

    budget_bytes: int  # hard cap on weight buffer memory held by the engine
    loaders: int = 2  # number of loading agents (threads)
    # most units loaded or loading besides the one computing (1: double buffering; 0: sequential, a unit is read
    # only when the forward asks for it, nothing overlaps; None: budget-bound)
    prefetch: int | None = None
    io: str = "buffered"  # "buffered" (page cache) or "direct" (O_DIRECT, no page cache)
    resident: tuple[str, ...] = ()  # unit names kept loaded across passes

    def __post_init__(self) -> None:
        if self.loaders < 1:
            raise HermesError(f"loaders must be >= 1, got {self.loaders}")
        if self.prefetch is not None and self.prefetch < 0:
            raise HermesError(f"prefetch must be >= 0 (0: sequential; None: budget-bound), got {self.prefetch}")
        if self.io not in IO_MODES:
            raise HermesError(f"io must be one of {IO_MODES}, got {self.io!r}")


@dataclass
class UnitEvent:
    """Timeline of one unit in one pass; times in seconds since the pass started."""

    unit: int
    name: str
    bytes: int
    agent: int | None = None  # loading agent id (None: resident, not loaded in this pass)
    reserve: float | None = None  # admission granted
    load_start: float | None = None
    load_end: float | None = None
    compute_start: float | None = None
    compute_end: float | None = None
    free: float | None = None

    @property
    def load_s(self) -> float:
        """Read time in this pass (0: not read, e.g. resident, pinned or an expert not routed)."""
        return self.load_end - self.load_start if self.load_end is not None and self.load_start is not None else 0.0

    @property
    def compute_s(self) -> float:
        """Compute time in this pass (0: not run)."""
        if self.compute_end is None or self.compute_start is None:
            return 0.0
        return self.compute_end - self.compute_start


@dataclass
class PassStats:
    """Measurements of one forward pass."""

    entry: str = ""  # what was called: "" (the model), a submodule such as "encoder", or "unit:NAME"
    latency_s: float = 0.0
    stall_s: float = 0.0  # time the inference agent waited for weights
    loaders: int = 0
    budget_bytes: int = 0
    weights_max_bytes: int = 0  # the weights held at most: the budget, or less when the whole model fits in it
    weights_peak_bytes: int = 0  # peak of engine-accounted weight memory (arena + resident buffers)
    weights_held_peak_bytes: int = 0  # peak bytes of units actually loaded at once
    bytes_read: int = 0
    units_loaded: int = 0
    surprises: int = 0  # units the forward asked for out of the predicted schedule (loaded on demand)
    experts_read: int = 0  # mixture-of-experts: routed experts read (unrouted ones are never read)
    finished_at: float = 0.0  # time.perf_counter() when the pass ended
    events: list[UnitEvent] = field(default_factory=list)
    memory: list[tuple[float, int, int]] = field(default_factory=list)  # (t, allocated, held by units)

    def to_dict(self, *, timeline: bool = False) -> dict[str, Any]:
        d = asdict(self)
        if not timeline:
            d.pop("events")
            d.pop("memory")
        return d
