"""Backpressure on heavy senders: how much a client that sends as fast as TCP allows may be read.

Flood control (protocol.TokenBucket) limits lines per client when it is on. With
it off, nothing limited a client that sends as fast as TCP allows but the loop's
own speed, and its lines, delivered to everyone, buried everybody else's. A
worker reads every client for a budget per loop pass; a client that uses its
whole budget is a heavy sender, and heavy senders share a byte rate that adapts
the way TCP's congestion window does (AIMD): it is halved whenever a worker of
the cluster finds its clients are not keeping up (output waiting for kernel
buffers that are full, or its share of the bus piling up) and says so on the bus
(events.Pressure), and it grows back step by step while all is calm. While any
worker is under pressure, heavy senders are not read at all, and all clients of
a worker together are read for at most PASS_BUDGET_PRESSED bytes per loop pass
(PASS_BUDGET otherwise), so that a crowd of medium senders cannot pour more into
the room at once than its readers can take either; an ordinary line still gets
in within a pass or two. Pure: the caller passes the time and the
measurements in and publishes the events this returns.
"""

from __future__ import annotations

from . import events as E

HIGH = 32 << 10  # bytes waiting here for clients that do not keep up: pressure from here on
LOW = 8 << 10  # ... and below this it is over
BEHIND = 0.01  # seconds the bus may stay undrained before that counts as pressure too
REFRESH = 1.0  # seconds between repeats of "on", so a worker that missed it learns it
EXPIRES = 3.0  # another worker's "on" not repeated for this long no longer counts
CALM = 0.05  # seconds without pressure anywhere before heavy senders are read again
MAX_RATE = 16 << 20  # bytes/s for heavy senders when all is calm: in effect no limit
MIN_RATE = 64 << 10
STEP = 64 << 10  # the rate grows by this every GROW_EVERY seconds of calm
GROW_EVERY = 0.01
BURST = 64 << 10  # the most a heavy sender may take at once
PASS_BUDGET = 256 << 10  # bytes all clients of a worker together may be read for in one loop pass
PASS_BUDGET_PRESSED = 32 << 10  # ... while some worker is under pressure: ordinary lines still get in
BUS_BUDGET = 512 << 10  # bytes of bus traffic a worker takes in per loop pass (with PASS_BUDGET, under max_sendq_bytes)
BUS_BUDGET_PRESSED = 64 << 10  # ... while it is under pressure itself (the rest waits in the bus queue)


class Backpressure:
    def __init__(self, worker_id: str) -> None:
        self.worker_id = worker_id
        self.pressed = False  # our own clients are not keeping up
        self.elsewhere: dict[str, float] = {}  # other workers under pressure -> when they last said so
        self.rate = float(MAX_RATE)
        self.tokens = float(BURST)
        self.last = 0.0  # when tokens were last added
        self.calm_since: float | None = float("-inf")  # since when no worker is under pressure (None: one is)
        self.last_said = 0.0  # when we last published "on"
        self.last_growth = 0.0
        self.episodes = 0  # times this worker came under pressure

    @property
    def calm(self) -> bool:
        return not self.pressed and not self.elsewhere

    @property
    def active(self) -> bool:
        """Whether tick() has anything to do (otherwise the caller may skip it)."""
        return not self.calm or self.rate < MAX_RATE or self.tokens < BURST

    def tick(self, now: float, stuck_bytes: int, bus_behind_for: float) -> list[E.Event]:
        """Take this pass's measurements; returns the Pressure events to publish."""
        out: list[E.Event] = []
        if bus_behind_for > BEHIND:
            stuck_bytes += HIGH + 1  # the bus itself is backing up here: as good as stuck output
        if not self.pressed and stuck_bytes > HIGH:
            self.pressed = True
            self.episodes += 1
            self.slow_down()
        elif self.pressed and stuck_bytes < LOW:
            self.pressed = False
            self.last_said = 0.0
            out.append(E.Pressure(self.worker_id, 0))
        if self.pressed and now - self.last_said >= REFRESH:
            self.last_said = now
            out.append(E.Pressure(self.worker_id, 1))
        for worker, said in list(self.elsewhere.items()):
            if now - said > EXPIRES:
                del self.elsewhere[worker]  # it died or its "off" was lost: it would have said so again
        if self.last:
            self.tokens = min(float(BURST), self.tokens + (now - self.last) * self.rate)
        self.last = now
        if not self.calm:
            self.calm_since = None
        elif self.calm_since is None:
            self.calm_since = now
        elif self.rate < MAX_RATE and now - self.calm_since >= CALM and now - self.last_growth >= GROW_EVERY:
            self.last_growth = now
            self.rate = min(float(MAX_RATE), self.rate + STEP)
        return out

    def heard(self, ev: E.Pressure, now: float) -> None:
        """Another worker's Pressure event, in bus order."""
        if ev.worker == self.worker_id:
            return
        if ev.on:
            if ev.worker not in self.elsewhere:
                self.slow_down()
            self.elsewhere[ev.worker] = now
            self.calm_since = None
        else:
            self.elsewhere.pop(ev.worker, None)

    def gone(self, worker: str) -> None:
        self.elsewhere.pop(worker, None)

    def slow_down(self) -> None:
        self.rate = max(float(MIN_RATE), self.rate / 2)

    def allowance(self, now: float) -> int:
        """Bytes a heavy sender may be read now: none under pressure or right after it."""
        if not self.calm or self.calm_since is None or now - self.calm_since < CALM:
            return 0
        return int(self.tokens)

    def pass_budget(self) -> int:
        """Bytes all clients of this worker together may be read for in one loop pass."""
        return PASS_BUDGET if self.calm else PASS_BUDGET_PRESSED

    def bus_budget(self) -> int:
        """Bytes of bus traffic this worker takes in per loop pass: little while its clients lag."""
        return BUS_BUDGET_PRESSED if self.pressed else BUS_BUDGET

    def spend(self, nbytes: int) -> None:
        self.tokens -= nbytes
