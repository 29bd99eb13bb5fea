"""The PipeLoad execution engine.

Modules, imports flowing one way: ``config`` (settings and records) and ``schedule`` (the traced order) are
leaves; ``arena`` (buffers, admission), ``reader`` (reads into buffers) and ``budget`` (minimum budget, tied
aliases) build on them; ``pipeline`` (the agents and hooks) uses them all.
"""
from hermes.engine.arena import Arena, Buf, Daemon, new_buffer, touch_pages
from hermes.engine.budget import minimum_budget, model_buffer_bytes, side_room, tied_aliases
from hermes.engine.config import IO_MODES, EngineConfig, PassStats, UnitEvent
from hermes.engine.pipeline import WAIT_TIMEOUT_S, PipeLoadEngine
from hermes.engine.reader import Reader, views
from hermes.engine.schedule import Schedule, entry_key

__all__ = ["IO_MODES", "WAIT_TIMEOUT_S", "Arena", "Buf", "Daemon", "EngineConfig", "PassStats", "PipeLoadEngine",
           "Reader", "Schedule", "UnitEvent", "entry_key", "minimum_budget", "model_buffer_bytes", "new_buffer",
           "side_room", "tied_aliases", "touch_pages", "views"]
