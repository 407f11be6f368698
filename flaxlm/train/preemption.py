"""Graceful stop on SIGTERM / SIGINT: finish the step, save, exit 0. A second SIGINT exits
at once (the default handler comes back after the first)."""

from __future__ import annotations

import signal
import threading
from types import FrameType


class PreemptionGuard:
    """Context manager that turns the first SIGTERM/SIGINT into a flag the loop polls."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.signal_name = signal.Signals(signum).name
        # The next SIGINT interrupts immediately (KeyboardInterrupt), SIGTERM kills.
        for sig in self.SIGNALS:
            signal.signal(
                sig, signal.SIG_DFL if sig == signal.SIGTERM else signal.default_int_handler
            )

    def __enter__(self) -> PreemptionGuard:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
