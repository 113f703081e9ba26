"""The bus wire format and a receiver's bookkeeping of the order: framing, routes, numbering, gaps, replays.

A batch on the bus is a small header (wire version, flags, the publisher's
number for it, how many events it holds, the publisher's name, its route)
followed by the marshalled plain tuples of its events (see `events`: typed
events inside, plain tuples on the wire, converted here at the edge). The
route is a room's key for a batch of that room's chat lines, which the broker
passes on without decoding to the workers with members there, or "" for
everything else, which every worker receives. A publisher numbers its batches
per route, densely, so a receiver of a route sees every number of it and a
jump is a gap even though it skips other rooms' traffic.

The broker sends each worker its own copy under a topic of its own, stamped
with (epoch, global sequence, the worker's own sequence): the last is dense
for each worker, so a lost message is seen at once. `OrderTracker` is a
worker's account of all this: it numbers what the worker publishes and keeps
it until it comes back, and checks what arrives for gaps, duplicates and a new
broker. `Outbox` collects a loop pass's events by route. Pure: no sockets.
"""

from __future__ import annotations

import marshal
import struct
from collections import Counter, deque
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, NamedTuple

from . import events as E

WIRE_VERSION = 4
FLAG_ROSTER = 1  # the batch holds roster requests: the broker must decode and decide it
# Version, flags, the publisher's number for the batch in its route (0: an unnumbered control batch),
# how many events it holds, the length of the publisher's name and of the route, which follow; then the
# marshalled events. The broker reads only this.
PREFIX = struct.Struct("!BBQHBB")
MAX_EVENTS = 0xFFFF  # events in one batch (the count field); a publisher splits longer runs
# The broker's stamp, after the receiving worker's topic (its name and a NUL): epoch, global sequence,
# the worker's own sequence (dense for each worker), and when the broker sent it (CLOCK_MONOTONIC in
# ns, which every process of the machine shares: delivery latency inside the server counts from it).
HEADER = struct.Struct("!QQQQ")


class Head(NamedTuple):
    flags: int
    pseq: int
    publisher: str
    route: str
    nevents: int  # how many events it holds (for a room, lines)
    start: int  # where the marshalled events begin


class Batch(NamedTuple):
    publisher: str
    pseq: int
    route: str
    events: list[E.Event]


def worker_name(no: int, node: str = "") -> str:
    """A worker's name on the bus: `w3`, or `w3@node` on a host of a multi-host cluster (unique across hosts)."""
    return f"w{no}@{node}" if node else f"w{no}"


def node_of(name: str) -> str:
    """The host a publisher of a multi-host cluster belongs to (`w3@node`, or its bus process `broker@node`)."""
    return name.rpartition("@")[2]


def topic(worker: str) -> bytes:
    """The subscription topic of a worker: its name and a NUL, so that w1 is not a prefix of w10."""
    return worker.encode() + b"\0"


def stamp(worker_topic: bytes, epoch: int, gseq: int, wseq: int, sent_ns: int = 0) -> bytes:
    return worker_topic + HEADER.pack(epoch, gseq, wseq, sent_ns)


def unstamp(frame: bytes) -> tuple[str, int, int, int]:
    """(worker, epoch, global sequence, worker sequence) of a stamp frame."""
    end = frame.index(b"\0")
    epoch, gseq, wseq, _ = HEADER.unpack_from(frame, end + 1)
    return frame[:end].decode(), epoch, gseq, wseq


def encode(publisher: str, pseq: int, events: list[E.Event], route: str = "") -> bytes:
    requests = E.ROSTER_REQUESTS
    flags = FLAG_ROSTER if any(type(ev) in requests for ev in events) else 0
    name, where = publisher.encode(), route.encode()
    head = PREFIX.pack(WIRE_VERSION, flags, pseq, min(len(events), MAX_EVENTS), len(name), len(where))
    return head + name + where + marshal.dumps(E.to_wire(events))


def peek(payload: bytes) -> Head:
    """The header, without decoding events; ValueError for another wire version."""
    version, flags, pseq, count, n, r = _unpack(payload)
    if version != WIRE_VERSION:
        raise ValueError(f"bus message of wire version {version}, this code speaks {WIRE_VERSION}")
    start = _SIZE + n
    # (a plain tuple made into a Head without NamedTuple's argument handling: the broker's hot path)
    return _head((flags, pseq, payload[_SIZE:start].decode(), payload[start:start + r].decode(), count, start + r))


_unpack, _SIZE = PREFIX.unpack_from, PREFIX.size
_head = Head._make


def decode_batch(payload: bytes) -> Batch:
    """The batch; ValueError and friends if the framing is broken (see UNREADABLE_PAYLOAD).

    Events that cannot be read come back as E.Unknown or E.Malformed, for the receiver to count.
    """
    head = peek(payload)
    return Batch(head.publisher, head.pseq, head.route, E.batch_from_wire(marshal.loads(payload[head.start:])))


def decode(payload: bytes) -> tuple[str, int, list[E.Event]]:
    """(publisher, its number for the batch, the events)."""
    batch = decode_batch(payload)
    return batch.publisher, batch.pseq, batch.events


# What decode() raises on a payload whose framing or marshal data is broken.
UNREADABLE_PAYLOAD = (ValueError, EOFError, TypeError, struct.error, UnicodeDecodeError)


# Markers `OrderTracker.accept` (and `place`) put between (publisher, Batch) items.
RESTARTED = "restarted"  # (RESTARTED, epoch): the broker is new; nothing after it was processed yet
GAP = "gap"  # (GAP, text): messages were lost before the next item
REPLAY = "replay"  # a batch seen before, sent again after a restart (see place)
BAD = "bad"  # (BAD, text): a message that could not be decoded was dropped


class OrderTracker:
    """A worker's bookkeeping of the bus, without sockets: numbering, acks, gaps, duplicates.

    Outgoing batches are numbered per route and kept until they come back (a publisher
    receives all of its own batches). Incoming messages are checked against the broker's
    stamp (`accept`: a new epoch, a jump in this worker's sequence) and against each
    publisher's numbering of the route (`place`, called in order as the batches are
    applied, with the route's generation: a worker that starts receiving a room's traffic
    again has no baseline for it, so the first batch it gets sets one).
    """

    def __init__(self, worker_id: str) -> None:
        self.worker_id = worker_id
        self.pseq: dict[str, int] = {}  # route -> our last number in it
        self.unacked: deque[tuple[str, int, bytes]] = deque()
        self.epoch: int | None = None
        self.wseq = 0
        self.acked: dict[str, int] = {}  # route -> our last number in it that came back
        # route -> (generation, {publisher: last number seen}, whether a publisher not listed starts at 1)
        self.last: dict[str, tuple[int, dict[str, int], bool]] = {}
        self.gaps = 0
        self.received = 0
        self.unreadable = 0  # messages dropped because they could not be decoded
        self.room_batches = 0  # batches of some room's chat received, and their bytes
        self.room_bytes = 0
        self.routes: Counter[str] = Counter()  # batches received, by room

    def number(self, events: list[E.Event], route: str = "") -> bytes:
        pseq = self.pseq[route] = self.pseq.get(route, 0) + 1
        payload = encode(self.worker_id, pseq, events, route)
        self.unacked.append((route, pseq, payload))
        return payload

    def accept(self, epoch: int, wseq: int, payload: bytes, out: list[tuple[str, Any]]) -> bool:
        """Account for one message and append its item to `out`.

        Returns False, having appended only RESTARTED, for the first message of a new broker:
        the caller answers the new broker first and then gives the same message again.
        """
        if epoch != self.epoch:
            known = self.epoch is not None
            self.epoch = epoch
            self.wseq = wseq - 1  # where this epoch starts for us; what came before is not ours
            if known:
                out.append((RESTARTED, epoch))
                return False
        if wseq != self.wseq + 1:
            self.gaps += 1
            out.append((GAP, f"bus sequence jumped from {self.wseq} to {wseq}"))
        self.wseq = wseq
        try:
            batch = decode_batch(payload)
        except UNREADABLE_PAYLOAD as exc:
            self.unreadable += 1
            out.append((BAD, f"an unreadable bus message was dropped ({exc})"))
            return True
        self.received += 1
        if batch.route:
            self.room_batches += 1
            self.room_bytes += len(payload)
            self.routes[batch.route] += 1
        if batch.publisher == self.worker_id and batch.pseq:
            self._acked(batch.route, batch.pseq)
        out.append((batch.publisher, batch))
        return True

    def _acked(self, route: str, pseq: int) -> None:
        self.acked[route] = pseq
        unacked = self.unacked
        if unacked and unacked[0][0] == route and unacked[0][1] == pseq:
            unacked.popleft()
            return
        for i, (r, p, _) in enumerate(unacked):
            if r == route and p == pseq:
                for _ in range(i + 1):  # and the ones before it, which never made it to the broker
                    unacked.popleft()
                return

    def place(self, publisher: str, route: str, pseq: int, gen: int = 0) -> str | None:
        """Where a numbered batch stands in its publisher's numbering of the route, as it is applied.

        None for the next one (or the first since the route's generation `gen` began), REPLAY
        for one seen before, or a description of the gap before it.
        """
        entry = self.last.get(route)
        if entry is None or entry[0] != gen:
            entry = self.last[route] = (gen, {}, False)
        seen = entry[1]
        last = seen.get(publisher, 0 if entry[2] else None)
        if last is not None and pseq <= last:
            return REPLAY
        seen[publisher] = pseq
        if last is not None and pseq != last + 1:
            self.gaps += 1
            where = f" in {route}" if route else ""
            return f"{pseq - last - 1} batches from {publisher} never arrived{where}"
        return None

    def baseline(self, route: str, gen: int, seqs: Iterable[Sequence[Any]] | None) -> None:
        """We start receiving a room's route: where each publisher's numbering of it stands (see
        events.Seed); a publisher not listed has not published in it yet. None: not known, so the
        first batch of each publisher sets its place."""
        if seqs is None:
            self.last[route] = (gen, {}, False)
        else:
            self.last[route] = (gen, {str(p): int(n) for p, n in seqs}, True)

    def prune(self, live: dict[str, int]) -> None:
        """Forget the numbering of routes whose generation is over (`live`: route -> current generation)."""
        for route in [r for r, entry in self.last.items() if r and live.get(r) != entry[0]]:
            del self.last[route]

    def forget_unacked(self, batches: Iterable[Sequence[Any]]) -> None:
        """Stop keeping these (route, number) batches for a resend: they will never come back."""
        drop = {(str(r), int(n)) for r, n in batches}
        self.unacked = deque(u for u in self.unacked if (u[0], u[1]) not in drop)

    def forget_publisher(self, publisher: str) -> None:
        for entry in self.last.values():
            entry[1].pop(publisher, None)

    def resync_batch(self, control: list[E.Event]) -> bytes:
        """The control batch for a new broker: `control` and where our numbering of each route stands."""
        return encode(self.worker_id, 0, [E.Numbering(sorted(self.acked.items())), *control])


class Outbox:
    """The events of one loop pass waiting to be published, each with its route.

    `take` groups them into batches: one per room, in the order the rooms first appear, then
    one for everything else. Moving the requests after the chat lines of the same pass keeps
    every client's own order: a client whose request is in flight says nothing more until
    the answer is back. Reads like the list of its events (`outbox[0]`, `outbox == []`).
    """

    __slots__ = ("items",)

    def __init__(self) -> None:
        self.items: list[tuple[str, E.Event]] = []

    def append(self, event: E.Event, route: str = "") -> None:
        self.items.append((route, event))

    def take(self) -> list[tuple[str, list[E.Event]]]:
        items, self.items = self.items, []
        if all(not route for route, _ in items):
            return [("", [ev for _, ev in items])] if items else []
        groups: dict[str, list[E.Event]] = {}
        for route, ev in items:
            group = groups.get(route)
            if group is None:
                group = groups[route] = []
            group.append(ev)
        rest = groups.pop("", None)
        out = []
        for route, events in groups.items():
            for i in range(0, len(events), MAX_EVENTS):
                out.append((route, events[i:i + MAX_EVENTS]))
        if rest:
            out.append(("", rest))
        return out

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self) -> Iterator[E.Event]:
        return (ev for _, ev in self.items)

    def __getitem__(self, i: int) -> E.Event:
        return self.items[i][1]

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Outbox):
            return self.items == other.items
        if isinstance(other, list):
            return list(self) == other
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Outbox({self.items!r})"
