"""Graceful stop on SIGTERM / SIGINT: finish the step, save, exit 0. A second SIGINT exits
at once (the default handler comes back after the first).

On several processes the save is a collective, so every process must stop after the same step,
yet a signal may reach only one of them (or each at a different step). The loop asks
``stop_at`` once per iteration; the processes agree on the iteration to stop at through
jax.distributed's key-value store, with no per-step collective and no per-step RPC:

1. The signalled process proposes "stop at my current iteration + ``STOP_MARGIN``" (the first
   proposal stored wins; a process signalled later adopts it).
2. It wakes a watcher thread on every process (each waits in a long-poll on its own key), and
   waits until every watcher has read the proposal, before it dispatches another step.
3. Every process then stops at that iteration, the same one everywhere.

Why 3 iterations are enough: an iteration reads the metrics of a step dispatched at that
iteration or the one before, and these cannot be read before every process has dispatched that
step; or it reads nothing, which happens only right after an iteration that did read (after a
rollback or a checkpoint/eval boundary; and the first). So while the proposer sits at iteration
t, before dispatching, a peer can have finished at most iteration t + 1, and to finish t + 2 it
must read a step the proposer dispatches after step 2, when the peer's watcher already knows.
Iterations, not steps, are counted because a rollback moves the step back; the loop makes the
same iterations on every process, so they agree on the step too.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections import Counter
from types import FrameType
from typing import Any

STOP_MARGIN = 3  # iterations between a proposal and the stop; see the module docstring
# The n-th guard of each process shares keys with the n-th of every other: one prefix per run.
_GUARDS_MADE: Counter[int] = Counter()
_WAIT_MS = 10 * 60 * 1000  # a watcher's long-poll; it re-arms on timeout


class PreemptionGuard:
    """Context manager that turns the first SIGTERM/SIGINT into a stop the loop polls with
    :meth:`stop_at`, the same iteration on every process.

    ``client`` is jax.distributed's key-value client (found by itself when several processes
    run); ``ack_timeout_s`` bounds the one wait for the peers' watchers, after a signal.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(
        self,
        client: Any = None,
        process_index: int | None = None,
        process_count: int | None = None,
        ack_timeout_s: float = 60.0,
    ) -> None:
        self.received: str | None = None  # the signal this process got
        self.signal_name: str | None = None  # why the run stopped early (set by the stop)
        self._previous: dict[int, object] = {}
        self._client, self._index, self._count = client, process_index, process_count
        self._ack_ms = int(ack_timeout_s * 1000)
        self._calls = 0
        self._stop_call: int | None = None
        self._reason: str | None = None
        self._lock = threading.Lock()
        self._watcher: threading.Thread | None = None

    @property
    def requested(self) -> bool:
        """Whether this process got a signal (the run may still be stopping elsewhere)."""
        return self.received is not None

    def stop_at(self, step: int) -> bool:
        """Call once per loop iteration, before dispatching the step after ``step``. True:
        stop now (and at every later call). One process: as soon as a signal came."""
        self._calls += 1
        if (self._count or 1) == 1:  # one process, or outside the context manager
            if self.received is not None:
                self.signal_name = self.received
            return self.received is not None
        if self._stop_call is None and self.received is not None:
            self._propose()
        if self._stop_call is None or self._calls < self._stop_call:
            return False
        self.signal_name = self._reason
        return True

    # -- the agreement (several processes) ---------------------------------------------------

    def _propose(self) -> None:
        proposal = f"{self._calls + STOP_MARGIN} {self.received} {self._index}"
        try:
            self._client.key_value_set(f"{self._prefix}/stop", proposal)
        except Exception as exc:  # another process proposed first: its proposal holds
            if "ALREADY_EXISTS" not in str(exc):
                raise
            self._learn(self._client.key_value_try_get(f"{self._prefix}/stop"))
            return
        self._learn(proposal)
        for process in range(self._count):
            self._client.key_value_set(f"{self._prefix}/wake/{process}", "stop", True)
        try:  # every watcher has read it before this process dispatches another step
            self._client.blocking_key_value_get(f"{self._prefix}/all_seen", self._ack_ms)
        except Exception as exc:
            print(
                f"flaxlm: {self.received}: not every process confirmed the stop within "
                f"{self._ack_ms // 1000}s ({exc}); stopping at iteration {self._stop_call} anyway",
                file=sys.stderr,
                flush=True,
            )

    def _learn(self, proposal: str) -> None:
        call, name, process = proposal.split()
        with self._lock:
            self._stop_call, self._reason = int(call), f"{name} to process {process}"

    def _watch(self) -> None:
        """Waits for a wake-up; then, if a stop was proposed, learns it and counts itself in."""
        while True:
            try:
                self._client.blocking_key_value_get(f"{self._prefix}/wake/{self._index}", _WAIT_MS)
                break
            except Exception as exc:
                if "DEADLINE_EXCEEDED" not in str(exc):
                    return  # the coordinator is gone: the run is over anyway
        try:
            proposal = self._client.key_value_try_get(f"{self._prefix}/stop")
        except Exception:
            return  # woken by our own exit, nothing was proposed
        self._learn(proposal)
        seen = self._client.key_value_increment(f"{self._prefix}/seen", 1)
        if seen == self._count:
            self._client.key_value_set(f"{self._prefix}/all_seen", "1")

    # -- context manager ----------------------------------------------------------------------

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received = signal.Signals(signum).name
        # The next SIGINT interrupts immediately (KeyboardInterrupt), SIGTERM kills.
        for sig in self.SIGNALS:
            signal.signal(
                sig, signal.SIG_DFL if sig == signal.SIGTERM else signal.default_int_handler
            )

    def __enter__(self) -> PreemptionGuard:
        if self._count is None:
            import jax

            self._index, self._count = jax.process_index(), jax.process_count()
        if self._count > 1:
            if self._client is None:
                from jax._src.distributed import global_state

                self._client = global_state.client
            if self._client is None:
                raise RuntimeError(
                    f"{self._count} processes but no jax.distributed client: call "
                    "flaxlm.runtime.distributed.initialize (or jax.distributed.initialize) first"
                )
            self._prefix = f"flaxlm/preemption/{_GUARDS_MADE[self._index]}"
            _GUARDS_MADE[self._index] += 1
            self._watcher = threading.Thread(
                target=self._watch, name="flaxlm-preemption", daemon=True
            )
            self._watcher.start()
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
        if self._watcher is not None:
            try:  # end our own long-poll (a no-op if a stop already woke it)
                self._client.key_value_set(f"{self._prefix}/wake/{self._index}", "exit", True)
            except Exception:
                pass
            self._watcher.join(timeout=10)
            self._watcher = None
