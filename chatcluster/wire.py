"""The bus wire format and a receiver's bookkeeping of the order: framing, numbering, gaps, replays.

A batch on the bus is a small header (wire version, flags, the publisher's
batch number, its name) followed by the marshalled plain tuples of its events
(see `events`: typed events inside, plain tuples on the wire, converted here
at the edge). The broker stamps every batch with (epoch, global sequence) in
a second frame. `OrderTracker` is a worker's account of that order: it
numbers what the worker publishes and keeps it until it comes back, and
checks what arrives for gaps, duplicates and a new broker. Pure: no sockets.
"""

from __future__ import annotations

import marshal
import struct
from collections import deque
from typing import Any

from . import events as E

WIRE_VERSION = 3
FLAG_ROSTER = 1  # the batch holds roster events: the broker must decode and apply it
# Version, flags, the publisher's batch number (0: an unnumbered control batch) and the length of
# the publisher's name, which follows; then the marshalled events. The broker reads only this.
PREFIX = struct.Struct("!BBQB")
# The broker's stamp: epoch, global sequence number, and when it sent the message (CLOCK_MONOTONIC
# in ns, shared by every process of the machine: delivery latency inside the server is measured
# from it). A broker of the code before the time was added sends 16 bytes; both are read.
HEADER = struct.Struct("!QQQ")
OLD_HEADER = struct.Struct("!QQ")


def read_header(header: bytes) -> tuple[int, int, int]:
    """(epoch, global sequence, monotonic ns or 0) of a stamp of either size."""
    if len(header) == OLD_HEADER.size:
        epoch, gseq = OLD_HEADER.unpack(header)
        return epoch, gseq, 0
    epoch, gseq, stamp = HEADER.unpack(header)
    return epoch, gseq, stamp


def encode(publisher: str, pseq: int, events: list[E.Event]) -> bytes:
    requests = E.ROSTER_REQUESTS
    flags = FLAG_ROSTER if any(type(ev) in requests for ev in events) else 0
    name = publisher.encode()
    return PREFIX.pack(WIRE_VERSION, flags, pseq, len(name)) + name + marshal.dumps(E.to_wire(events))


def peek(payload: bytes) -> tuple[int, int, str, int]:
    """(flags, publisher's batch number, publisher, offset of the events) without decoding events."""
    version, flags, pseq, n = PREFIX.unpack_from(payload)
    if version != WIRE_VERSION:
        raise ValueError(f"bus message of wire version {version}, this code speaks {WIRE_VERSION}")
    start = PREFIX.size + n
    return flags, pseq, payload[PREFIX.size:start].decode(), start


def decode(payload: bytes) -> tuple[str, int, list[E.Event]]:
    """(publisher, its batch number, the events); ValueError and friends if the framing is broken.

    Events that cannot be read come back as E.Unknown or E.Malformed, for the receiver to count.
    """
    _, pseq, publisher, start = peek(payload)
    return publisher, pseq, E.batch_from_wire(marshal.loads(payload[start:]))


# What decode() raises on a payload whose framing or marshal data is broken.
UNREADABLE_PAYLOAD = (ValueError, EOFError, TypeError, struct.error, UnicodeDecodeError)


# Markers `OrderTracker.accept` puts between (publisher, events) items.
RESTARTED = "restarted"  # (RESTARTED, epoch): the broker is new; nothing after it was processed yet
GAP = "gap"  # (GAP, text): batches were lost before the next item
REPLAY = "replay"  # (REPLAY, (publisher, events)): a batch seen before, sent again after a restart
BAD = "bad"  # (BAD, text): a message that could not be decoded was dropped


class OrderTracker:
    """A worker's bookkeeping of the bus, without sockets: numbering, acks, gaps, duplicates.

    Outgoing batches are numbered per publisher and kept until they come back. Incoming
    messages are checked against the broker's (epoch, sequence) stamp and against each
    publisher's numbering: a jump is a gap, a number seen before is a replay.
    """

    def __init__(self, worker_id: str) -> None:
        self.worker_id = worker_id
        self.pseq = 0
        self.unacked: deque[tuple[int, bytes]] = deque()
        self.epoch: int | None = None
        self.gseq = 0
        self.last_pseq: dict[str, int] = {}
        self.gaps = 0
        self.received = 0
        self.unreadable = 0  # messages dropped because they could not be decoded

    def number(self, events: list[E.Event]) -> bytes:
        self.pseq += 1
        payload = encode(self.worker_id, self.pseq, events)
        self.unacked.append((self.pseq, payload))
        return payload

    def accept(self, epoch: int, gseq: int, payload: bytes, out: list[tuple[str, Any]]) -> bool:
        """Account for one message and append its items to `out`.

        Returns False, having appended only RESTARTED, for the first message of a new broker:
        the caller answers the new broker first and then gives the same message again.
        """
        if epoch != self.epoch:
            known = self.epoch is not None
            self.epoch = epoch
            self.gseq = gseq - 1  # where this epoch starts for us; what came before is not ours
            if known:
                out.append((RESTARTED, epoch))
                return False
        if gseq != self.gseq + 1:
            self.gaps += 1
            out.append((GAP, f"bus sequence jumped from {self.gseq} to {gseq}"))
        self.gseq = gseq
        try:
            publisher, pseq, events = decode(payload)
        except UNREADABLE_PAYLOAD as exc:
            self.unreadable += 1
            out.append((BAD, f"an unreadable bus message was dropped ({exc})"))
            return True
        self.received += 1
        if pseq:
            last = self.last_pseq.get(publisher)
            if last is not None and pseq <= last:
                out.append((REPLAY, (publisher, events)))
                return True
            if last is not None and pseq != last + 1:
                self.gaps += 1
                out.append((GAP, f"{pseq - last - 1} batches from {publisher} never arrived"))
            self.last_pseq[publisher] = pseq
            if publisher == self.worker_id:
                while self.unacked and self.unacked[0][0] <= pseq:
                    self.unacked.popleft()
        out.append((publisher, events))
        return True
