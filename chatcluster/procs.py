"""The supervisor's records of its child processes, shared with the upgrade machinery.

`WorkerProc` is what the supervisor knows of one worker (pid, number, stats
slot, generation, readiness, retirement); `Backoff` is the restart bookkeeping
of a worker position or of the broker. Both are plain data with no I/O, so
that `supervisor` and `upgrade` can share them without importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass

EXIT_BOOT_FAILED = 3  # a worker that cannot listen, a bus process whose node_name is taken: restarting will not help
YOUNG = 5.0  # a process that dies younger than this counts towards back-off
BACKOFF_BASE = 0.25  # delay before the second young restart in a row; doubles after each one
BACKOFF_MAX = 30.0


@dataclass
class WorkerProc:
    pid: int
    no: int
    slot: int
    generation: int
    started: float
    ready: bool = False
    retiring: bool = False
    retire_deadline: float = 0.0
    reload_pending: bool = False  # a HUP came while it booted: send it one once it is ready
    killed: str = ""  # why the supervisor killed it, for the log line when it is reaped
    cause: str = "crash"  # why it is replaced when it dies, counted in the stats file (stats.RESTART_CAUSES)


@dataclass
class Backoff:
    """Restart bookkeeping for a worker position (or the broker): young deaths in a row, next try."""

    failures: int = 0
    not_before: float = 0.0

    def died(self, age: float, now: float) -> float:
        """Record a death at `age` seconds; return how long to wait before the next start."""
        if age >= YOUNG:
            self.failures = 0
            delay = 0.0
        else:
            self.failures += 1
            # The first young death is restarted at once, like any crash; only a repeat backs off.
            delay = 0.0 if self.failures < 2 else min(BACKOFF_BASE * 2 ** (self.failures - 2), BACKOFF_MAX)
        self.not_before = now + delay
        return delay
