"""How a worker stops: the phases of a graceful (TERM) or fast (QUIT) stop and their deadlines.

First phase, draining: the worker stops accepting and reading and waits until
a marker it published comes back from the bus, so every batch sequenced
before the stop (lines other workers' clients sent before it among them) is
queued for its clients. Second phase, goodbye: the clients leave the room, get
the shutdown notice after their pending output, and are closed once it is all
sent. The stop is over when no client is left or at the deadline, which is
set to end before the supervisor's own (it kills what is left `grace` seconds
after its signal). This module decides when; the worker does the I/O. Pure.
"""

from __future__ import annotations

import signal

from .protocol import encode_line

SHUTDOWN_LINE = encode_line("*** Server is shutting down")
FAST_GRACE = 1.0  # seconds a fast stop (QUIT) gives, as the supervisor does
DRAIN_MAX = 1.0  # the first phase never takes longer than this

DRAINING, GOODBYE = "draining", "goodbye"


def _deadline(signum: int, now: float, graceful_timeout: float) -> float:
    grace = graceful_timeout if signum == signal.SIGTERM else FAST_GRACE
    return now + max(grace - 0.5, grace * 0.75)


class Stop:
    def __init__(self, signum: int, now: float, graceful_timeout: float) -> None:
        self.signum = signum
        self.deadline = _deadline(signum, now, graceful_timeout)
        self.drain_until = now + min(DRAIN_MAX, (self.deadline - now) / 2)
        self.phase = DRAINING

    def hurry(self, signum: int, now: float, graceful_timeout: float) -> None:
        """A second stop signal (QUIT during a TERM): the earlier deadline wins."""
        self.deadline = min(self.deadline, _deadline(signum, now, graceful_timeout))
        if self.phase == DRAINING:
            self.drain_until = min(self.drain_until, now + (self.deadline - now) / 2)

    @property
    def draining(self) -> bool:
        return self.phase == DRAINING

    def time_for_goodbye(self, now: float, bus_caught_up: bool) -> bool:
        """True once, when the draining phase ends (the marker is back, or its time is up)."""
        if self.phase == DRAINING and (bus_caught_up or now >= self.drain_until):
            self.phase = GOODBYE
            return True
        return False

    def over(self, now: float, clients_left: int) -> bool:
        return clients_left == 0 or now >= self.deadline

    @classmethod
    def after_handoff(cls, now: float, graceful_timeout: float) -> Stop:
        """An upgrade moved the clients away: only those already leaving remain to be flushed."""
        stop = cls(signal.SIGTERM, now, graceful_timeout)
        stop.deadline = now + graceful_timeout
        stop.phase = GOODBYE
        return stop
