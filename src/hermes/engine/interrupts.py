"""Ctrl-C ends a streamed call, every time, wherever it lands.

While a pass runs in the main thread, SIGINT goes through :class:`Interrupts` (the handler it replaced is
restored when the pass ends): inside the engine's own bookkeeping (a *deferred* section: the daemon's lock held
by the inference agent) it waits for the end of the section, so no buffer is ever half handed over; anywhere
else it cancels the pass (its loading agents stop now) and raises ``KeyboardInterrupt`` through the handler it
replaced. Python loses a ``KeyboardInterrupt`` that lands inside a finalizer or a callback run by C code ("Exception
ignored in ..."), and the forward goes on: the pass is marked interrupted, so the engine raises it again at the
next unit, wait, nested entry point or the end of the call (``Pass.interrupted``).
"""
from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any


class Interrupts:
    """SIGINT handling of one engine's passes (main thread only; elsewhere Python delivers no signals)."""

    def __init__(self, on_interrupt: Callable[[], None]) -> None:
        self._on_interrupt = on_interrupt  # cancels the running pass
        self._saved: Any = None  # the handler this one replaced (None: not installed)
        self._armed = False  # installed for a whole pass (else only for a deferred section)
        self._depth = 0  # deferred sections entered by the main thread
        self._pending: int | None = None  # a signal that arrived inside a deferred section

    def _install(self) -> bool:
        """Route SIGINT here; False where Python does not see SIGINT (SIG_IGN / SIG_DFL)."""
        current = signal.getsignal(signal.SIGINT)
        if current == self._handle:
            return True
        if not callable(current):
            return False
        self._saved = current
        signal.signal(signal.SIGINT, self._handle)
        return True

    def _restore(self) -> None:
        # the handler first, then forget it: a SIGINT in between is still delivered through the saved one
        if self._saved is not None and signal.getsignal(signal.SIGINT) == self._handle:
            signal.signal(signal.SIGINT, self._saved)
        self._saved = None

    def arm(self) -> None:
        """Route SIGINT through this object for the pass beginning now (no-op outside the main thread)."""
        if threading.current_thread() is threading.main_thread():
            self._pending = None
            self._armed = self._install()

    def disarm(self) -> None:
        """Give SIGINT back to the handler it had (the pass ended)."""
        if threading.current_thread() is threading.main_thread():
            self._armed = False
            if not self._depth:
                self._restore()

    def _handle(self, signum: int, frame: Any) -> None:
        if self._depth:
            self._pending = signum
            return
        self._deliver(signum, frame)

    def _deliver(self, signum: int, frame: Any, handler: Any = None) -> None:
        """Cancel the pass, then raise through the replaced handler. The handler stays installed until the pass
        is finished (the next call, or close): a second Ctrl-C meanwhile is handled the same way, and one during
        this bookkeeping is not lost in the middle of it."""
        self._pending = None
        depth, self._depth = self._depth, self._depth + 1
        try:
            self._on_interrupt()
        finally:
            self._depth = depth
        self._pending = None
        handler = handler or self._saved
        # the default handler raises KeyboardInterrupt
        (handler if callable(handler) else signal.default_int_handler)(signum, frame)

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        """A section of bookkeeping that a SIGINT must not cut in two (a lock taken and not yet released): it is
        delivered when the section ends. Outside a pass the handler is installed for the section only."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        temporary = not self._armed and signal.getsignal(signal.SIGINT) != self._handle and self._install()
        # depths are restored by assignment, not counted down: an interrupt raised inside a finally clause (an
        # inner allowed() section's) must not leave the count off by one
        depth, self._depth = self._depth, self._depth + 1
        try:
            yield
        finally:
            self._depth = depth
            if not depth:
                pending, saved = self._pending, self._saved
                if temporary and not self._armed:
                    self._restore()
                if pending is not None:
                    self._deliver(pending, None, saved)

    @contextlib.contextmanager
    def allowed(self) -> Iterator[None]:
        """Inside a deferred section, a stretch where a SIGINT is delivered at once (a wait for a unit)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        depth, self._depth = self._depth, 0
        try:
            if self._pending is not None:
                self._deliver(self._pending, None)
            yield
        finally:
            self._depth = depth
