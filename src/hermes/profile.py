"""Profile data: what the Layer Profiler measured (per-unit bytes, load and compute times, contention, bandwidth),
as a versioned JSON document cached next to the model. Data only — measuring is ``profiler.py``; the planner
reads this module and nothing that measures (imports flow one way: profile <- planner <- profiler)."""
from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from hermes.atomic import atomic_write_text
from hermes.engine.config import IO_MODES  # noqa: F401 - part of the profile vocabulary
from hermes.errors import HermesError, versioned_json

log = logging.getLogger(__name__)

FORMAT_VERSION = 8  # 6: clean times from a truly sequential pass (prefetch 0); 8: calibrated on the planner's
# model of the ring arena and of concurrent reads, double buffering calibrated apart (issue 25)
READERS = (1, 2, 4)
_SIDE = ("gather", "expert")  # unit kinds read into the side buffer (their UnitProfile.bytes: the room they take)


@dataclass(frozen=True)
class UnitProfile:
    """Measurements of one execution unit."""

    name: str
    bytes: int  # buffer bytes: what the budget counts
    load_s: dict[str, float]  # io mode -> cold load time, one loader, nothing else running
    compute_s: float  # compute time with its weights loaded, no I/O running
    kind: str = ""  # the unit's kind (hermes.units.Unit.kind)


@dataclass(frozen=True)
class Profile:
    """Everything the planner needs; a versioned JSON file written next to the model."""

    format_version: int
    key: str  # fingerprint of model files + input shape + machine: a profile is reused only when equal
    model_dir: str
    input_shape: dict[str, list[int]]
    machine: dict[str, Any]
    units: tuple[UnitProfile, ...]
    bandwidth: dict[str, dict[str, float]]  # io mode -> readers ("1","2","4") -> aggregate cold bytes/s
    compute_slowdown: dict[str, float]  # "io:loaders" -> factor on compute while loads run
    load_slowdown: dict[str, float]  # "io:loaders" -> factor on loads while compute runs (beyond bandwidth share)
    activation_bytes: int  # peak memory of one forward beyond weights and runtime
    pass_overhead_s: float  # per-pass cost outside units (hooks, thread start, Python glue)
    # "io:loaders" -> [[weight budget, measured / simulated latency], ...] of the profiled pipelined passes, by
    # budget: how well the simulation reproduces each setting depends on how much the budget lets it overlap
    calibration: dict[str, list[list[float]]]

    @property
    def min_weight_budget(self) -> int:
        """The minimum weight budget, as the engine counts it (``hermes.engine.minimum_budget``): the pinned units,
        the largest streamed unit and the side buffer (a gathered embedding's rows or a routed expert)."""
        pinned = sum(u.bytes for u in self.units if u.kind == "pinned")
        streamed = max((u.bytes for u in self.units if u.kind not in (*_SIDE, "pinned")), default=0)
        return pinned + streamed + self._side

    @property
    def _side(self) -> int:
        return max((u.bytes for u in self.units if u.kind in _SIDE), default=0)

    def weights_peak(self, weight_budget: int) -> int:
        """The weights peak the engine reports under ``weight_budget`` (its ``weights_max``): it claims its arena
        whole when the model opens, so the budget, or less when every unit and the side buffer fit in it."""
        return min(weight_budget, sum(u.bytes for u in self.units if u.kind not in _SIDE) + self._side)

    @property
    def model_bytes(self) -> int:
        return sum(u.bytes for u in self.units)

    def calibration_factor(self, key: str, weight_budget: int) -> float:
        """The calibration of setting ``key`` at ``weight_budget``: interpolated between the profiled budgets
        (linearly in log budget), the nearest one outside them, 1.0 when the setting was not profiled."""
        points = sorted(self.calibration.get(key, ()))
        if not points:
            return 1.0
        if weight_budget <= points[0][0]:
            return points[0][1]
        for (b0, f0), (b1, f1) in itertools.pairwise(points):
            if weight_budget <= b1:
                t = math.log(weight_budget / b0) / math.log(b1 / b0)
                return f0 + t * (f1 - f0)
        return points[-1][1]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> Profile:
        d = versioned_json(text, FORMAT_VERSION, what="profile", command="hermes profile")
        d["units"] = tuple(UnitProfile(**u) for u in d["units"])
        return cls(**d)

    def save(self, path: str | os.PathLike[str]) -> Path:
        atomic_write_text(path, self.to_json())
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Profile:
        try:
            return cls.from_json(Path(path).read_text())
        except (OSError, ValueError, TypeError, KeyError) as exc:
            raise HermesError(f"cannot read profile {path}: {exc}; re-run `hermes profile`") from exc


def machine_facts() -> dict[str, Any]:
    cpu = ""
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                   if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "cpu": cpu,
            "torch": torch.__version__}


def profile_key(model_dir: str | os.PathLike[str], input_shape: dict[str, list[int]]) -> str:
    """Changes when the model files, the input shape or the machine change."""
    from hermes.store import Store

    d = Path(model_dir)
    files = [(p.name, p.stat().st_size, int(p.stat().st_mtime)) for p in Store(d).files]
    m = machine_facts()
    raw = json.dumps([files, (d / "config.json").read_text(), input_shape, m["cpus"], m["torch_threads"], m["cpu"]])
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


def default_profile_path(model_dir: str | os.PathLike[str], key: str) -> Path:
    """``MODEL_DIR/.hermes/profile-KEY.json``, or the user cache when the model directory is read-only."""
    d = Path(model_dir) / ".hermes"
    if os.access(model_dir, os.W_OK):
        return d / f"profile-{key}.json"
    cache = Path(os.environ.get("HERMES_CACHE", Path.home() / ".cache" / "hermes")) / "profiles"
    return cache / f"{hashlib.sha256(str(Path(model_dir).resolve()).encode()).hexdigest()[:12]}-{key}.json"


def cached_profile(model_dir: str | os.PathLike[str], input_shape: dict[str, list[int]]) -> Profile | None:
    key = profile_key(model_dir, input_shape)
    path = default_profile_path(model_dir, key)
    if path.is_file():
        try:
            return Profile.load(path)
        except HermesError:
            log.warning("ignoring unreadable cached profile %s", path)
    return None


def cached_profiles(model_dir: str | os.PathLike[str]) -> list[Profile]:
    """Every profile cached for ``model_dir`` that still matches its files and this machine, whatever its input;
    the newest first."""
    pattern = default_profile_path(model_dir, "*")
    paths = sorted(pattern.parent.glob(pattern.name), key=lambda p: p.stat().st_mtime, reverse=True)
    found = []
    for path in paths:
        try:
            prof = Profile.load(path)
        except HermesError:
            continue
        if prof.key == profile_key(model_dir, prof.input_shape):
            found.append(prof)
    return found


def setting(io: str, loaders: int, prefetch: int | None = None) -> str:
    """Key of per-setting profile entries, e.g. ``"direct:2"``; a prefetch depth of 1 (double buffering: one
    loader, one unit ahead) has calibrations of its own, ``"direct:1:p1"``."""
    return f"{io}:{loaders}" if prefetch != 1 else f"{io}:{loaders}:p1"


def calibration_budgets(minimum: int, model_bytes: int) -> list[int]:
    """Weight budgets at which pipelined passes are profiled: the minimum, a quarter and half of the model
    (those at least 1.25x apart, so each point tells something new)."""
    points: list[int] = []
    for b in sorted({minimum, max(minimum, model_bytes // 4), max(minimum, model_bytes // 2)}):
        if not points or b >= points[-1] * 1.25:
            points.append(b)
    return points
