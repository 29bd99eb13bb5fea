"""Pinned units: parameters the model reads as attributes (held by the model itself or by a container of blocks,
such as CLIP's ``logit_scale``), not through a forward of their own. No hook can tell when they are used, so they
are loaded by the first pass, held for good and always attached."""
from __future__ import annotations

from hermes.engine.kinds.base import UnitKind


class Pinned(UnitKind):
    """Loaded once (first in every plan until held), attached for good."""
