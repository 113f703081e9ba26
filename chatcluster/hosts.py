"""The hosts of a multi-host cluster as seen in the order of the shared stream.

Every host's bridge applies this state machine to the same stream messages in
the same order, so every host reaches the same verdicts at the same stream
sequence: which host is up, which incarnation of it is current, which message
is a duplicate or comes from an incarnation already declared gone, which
publisher numbers are missing, and when a silent host's lease runs out. That
is what lets a dead host's users be removed everywhere at one point of the
chat without any host asking another, and without a lock or a vote.

Time comes only from the stream: each message carries the timestamp the
stream's leader stamped on it. Leases run on a virtual clock that advances by
the timestamp difference between consecutive messages, capped at `tick_cap`
per message, so a stall of the whole stream (a leader election takes about
5 s) or a jump of the leader's wall clock after a failover cannot expire a
host that was merely waiting like everyone else. Live hosts publish at least
a heartbeat every second, which keeps the clock moving.

Pure: no I/O, no clock, no NATS; the bridge feeds it and acts on its answers.
It decides nothing about nicknames or rooms: the roster does that, in the same
order, from the events this module reports.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

KINDS = ("hello", "batch", "heartbeat", "bye")


@dataclass(frozen=True, slots=True)
class Stamp:
    """What the bridge reads from one stream message's metadata and headers."""
    seq: int  # stream sequence
    ts: float  # the stream leader's timestamp, seconds
    node: str  # the publishing host's node name
    incarnation: str  # random per start of that host
    number: int  # the publisher's own consecutive message number, from 1 per incarnation
    kind: str  # one of KINDS


@dataclass(frozen=True, slots=True)
class HostUp:
    node: str
    incarnation: str
    seq: int


@dataclass(frozen=True, slots=True)
class HostGone:
    node: str
    incarnation: str
    seq: int  # the stream position at which every host applies the departure
    reason: str  # "lease" (silent too long), "restarted" (a newer incarnation spoke), "stopped" (said bye)


@dataclass(frozen=True, slots=True)
class LostMessages:
    """A publisher's numbers jumped: its messages first..last never reached the stream."""
    node: str
    incarnation: str
    first: int
    last: int
    seq: int


@dataclass(frozen=True, slots=True)
class Deliver:
    """The message itself is to be delivered, at this point among the other outcomes."""
    stamp: Stamp


@dataclass(frozen=True, slots=True)
class Dropped:
    stamp: Stamp
    reason: str  # "duplicate" (number already seen) or "stale" (incarnation already gone)


Outcome = HostUp | HostGone | LostMessages | Deliver | Dropped


@dataclass(slots=True)
class _Host:
    incarnation: str
    last_number: int
    last_seen: float  # virtual clock


class HostBook:
    """Apply stream messages in order; `apply()` returns what happened, in the order to act on it."""

    def __init__(self, lease: float = 5.0, tick_cap: float = 1.5, remember: int = 4096) -> None:
        if not 0 < tick_cap < lease:
            raise ValueError(f"tick_cap ({tick_cap}) must be positive and shorter than the lease ({lease})")
        self.lease = lease
        self.tick_cap = tick_cap
        self.remember = remember
        self.clock = 0.0  # virtual seconds
        self.last_ts: float | None = None
        self.last_seq = 0
        self.hosts: dict[str, _Host] = {}
        self.gone: OrderedDict[tuple[str, str], None] = OrderedDict()  # (node, incarnation), oldest first

    def apply(self, st: Stamp) -> list[Outcome]:
        if st.kind not in KINDS:
            raise ValueError(f"unknown stream message kind {st.kind!r}")
        if self.last_ts is not None:
            self.clock += min(max(st.ts - self.last_ts, 0.0), self.tick_cap)
        self.last_ts = st.ts
        self.last_seq = st.seq
        out: list[Outcome] = []
        # The sender's own message proves it alive; everyone else's lease is checked first.
        for node in sorted(self.hosts):
            if node != st.node and self.clock - self.hosts[node].last_seen > self.lease:
                out.append(self._forget(node, st.seq, "lease"))
        key = (st.node, st.incarnation)
        if key in self.gone:
            out.append(Dropped(st, "stale"))
            return out
        h: _Host | None = self.hosts.get(st.node)
        if h is not None and h.incarnation != st.incarnation:
            out.append(self._forget(st.node, st.seq, "restarted"))
            h = None
        if h is None:
            self.hosts[st.node] = _Host(st.incarnation, st.number, self.clock)
            out.append(HostUp(st.node, st.incarnation, st.seq))
        else:
            if st.number <= h.last_number:
                out.append(Dropped(st, "duplicate"))
                return out
            if st.number > h.last_number + 1:
                out.append(LostMessages(st.node, st.incarnation, h.last_number + 1, st.number - 1, st.seq))
            h.last_number = st.number
            h.last_seen = self.clock
        out.append(Deliver(st))
        if st.kind == "bye":
            out.append(self._forget(st.node, st.seq, "stopped"))
        return out

    def _forget(self, node: str, seq: int, reason: str) -> HostGone:
        h = self.hosts.pop(node)
        self.gone[(node, h.incarnation)] = None
        while len(self.gone) > self.remember:
            self.gone.popitem(last=False)
        return HostGone(node, h.incarnation, seq, reason)

    def current(self, node: str) -> str | None:
        """The live incarnation of `node`, if any."""
        h = self.hosts.get(node)
        return h.incarnation if h else None

    def snapshot(self) -> dict[str, Any]:
        """Plain data (JSON-able) from which `restore` rebuilds an identical book."""
        return {"lease": self.lease, "tick_cap": self.tick_cap, "remember": self.remember, "clock": self.clock,
                "last_ts": self.last_ts, "last_seq": self.last_seq,
                "hosts": {n: [h.incarnation, h.last_number, h.last_seen] for n, h in self.hosts.items()},
                "gone": [list(k) for k in self.gone]}

    @classmethod
    def restore(cls, data: dict[str, Any]) -> HostBook:
        book = cls(data["lease"], data["tick_cap"], data["remember"])
        book.clock = data["clock"]
        book.last_ts = data["last_ts"]
        book.last_seq = data["last_seq"]
        book.hosts = {n: _Host(inc, num, seen) for n, (inc, num, seen) in data["hosts"].items()}
        book.gone = OrderedDict(((n, inc), None) for n, inc in data["gone"])
        return book
