"""The PipeLoad execution engine, as the paper draws it (imports flow one way, leaves first):

- ``config`` (settings and records) and ``schedule`` (the traced order): leaves;
- ``arena`` (buffers) -> ``daemon`` (the one owner of weight memory: admission, freeing);
- ``reader`` (reads into buffers), ``budget`` (minimum budget, tied aliases);
- ``passes`` (one call: plan, cursor, events, stats, cancellation; and the pass lifecycle), ``residency`` (units
  held for good, attach/detach), ``interrupts`` (Ctrl-C);
- ``loading_agent`` (the loading agents), ``inference_agent`` (hooks, waits, the watchdog), ``bypass`` (the
  all-resident mode), ``kinds/`` (how each kind of unit is read, attached and computed);
- ``pipeline`` (:class:`PipeLoadEngine`: wires them; ``install`` / ``reconfigure`` / ``close``).
"""
from hermes.engine.arena import Arena, Buf, new_buffer, touch_pages
from hermes.engine.budget import minimum_budget, model_buffer_bytes, side_room, tied_aliases, whole_model_bytes
from hermes.engine.config import IO_MODES, EngineConfig, PassStats, UnitEvent
from hermes.engine.daemon import Daemon
from hermes.engine.pipeline import WAIT_TIMEOUT_S, PipeLoadEngine
from hermes.engine.reader import Reader, views
from hermes.engine.schedule import Schedule, entry_key

__all__ = ["IO_MODES", "WAIT_TIMEOUT_S", "Arena", "Buf", "Daemon", "EngineConfig", "PassStats", "PipeLoadEngine",
           "Reader", "Schedule", "UnitEvent", "entry_key", "minimum_budget", "model_buffer_bytes", "new_buffer",
           "side_room", "tied_aliases", "touch_pages", "views", "whole_model_bytes"]
