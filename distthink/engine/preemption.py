"""Preemption: a flag the loop checks at step boundaries (never mid-step), so every rank saves at the same step.

Set by SIGTERM / SIGUSR1 to the rank (what SLURM and slurm/launch.sh send), and by the death of the process
that launched this rank: a signal sent to `accelerate launch` / `torchrun` itself (SIGUSR1's default action
kills the launcher at once) would otherwise leave the ranks orphaned, training on silently. A watchdog thread
notices that the parent changed and treats it as preemption: save at the next step boundary, exit 75.
"""

from __future__ import annotations

import os
import signal
import threading

from distthink.logging_utils import get_logger

log = get_logger(__name__)

REQUEUE_EXIT_CODE = 75   # EX_TEMPFAIL: preempted after saving a checkpoint; requeue with checkpoint.resume=auto
PARENT_POLL_S = 1.0


class PreemptionFlag:
    """`requested` turns True on SIGTERM / SIGUSR1, or when the launcher (the parent process) is gone."""

    def __init__(self, watch_parent: bool = True):
        self.requested = False
        self.signal_name: str | None = None
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handler)
        self._stop = threading.Event()
        self._parent = os.getppid()
        if watch_parent and self._parent > 1:
            threading.Thread(target=self._watch_parent, name="distthink-parent-watchdog", daemon=True).start()

    def _handler(self, signum, _frame):
        self.requested = True
        self.signal_name = signal.Signals(signum).name

    def _watch_parent(self) -> None:
        while not self._stop.wait(PARENT_POLL_S):
            if os.getppid() != self._parent:  # re-parented: the launcher died
                if not self.requested:
                    log.warning("the launcher (pid %d) is gone: treating it as preemption (save at the next step "
                                "boundary, exit %d)", self._parent, REQUEUE_EXIT_CODE)
                self.signal_name = self.signal_name or "launcher gone"
                self.requested = True
                return

    def close(self) -> None:
        self._stop.set()
