"""The ZeroMQ bus that joins the workers: wire format, the worker's end, and the broker.

Workers PUSH batches of events to one broker; the broker stamps each batch with
its epoch and a global sequence number and PUBlishes it to every worker, so all
workers see one order. Nothing may be lost silently: high-water marks are off
on every socket (a stuck worker is killed by the supervisor long before memory
matters), a booting worker accepts clients only after its own probe came back
through the broker (so the slow-joiner window is behind it), every publisher
numbers its batches so receivers detect gaps and recognise duplicates, and a
worker keeps what it published until it has seen it come back, so after a
broker restart it can send it again. The broker alone keeps the cluster
roster: it decodes the batches that hold roster requests (claims, departures,
/who), decides each in order and sends the batch on with the verdicts in
place of the requests, under the publisher's own name and number.
"""

from __future__ import annotations

import logging
import marshal
import os
import random
import signal
import struct
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import zmq

from . import roster as R

log = logging.getLogger("chatcluster.bus")

WIRE_VERSION = 3
FLAG_ROSTER = 1  # the batch holds roster events: the broker must decode and apply it
# Version, flags, the publisher's batch number (0: an unnumbered control batch) and the length of
# the publisher's name, which follows; then the marshalled events. The broker reads only this.
PREFIX = struct.Struct("!BBQB")
HEADER = struct.Struct("!QQ")  # the broker's stamp: epoch, global sequence number
BROKER = "broker"
RESYNC_WAIT = 1.0  # seconds a restarted broker waits for the live workers to resync
SUBSCRIBER_WAIT = 1.0  # seconds a broker waits for the known workers' SUB sockets
NUDGE_EVERY = 0.1  # least seconds between two "new epoch" pings to unadmitted workers


@dataclass(frozen=True)
class Endpoints:
    inbound: str  # workers PUSH here, the broker PULLs
    outbound: str  # the broker PUBlishes here, workers SUBscribe

    @classmethod
    def in_dir(cls, runtime_dir: str) -> Endpoints:
        inbound = os.path.join(runtime_dir, "bus-in")
        if len(inbound) > 100:
            raise ValueError(
                f"runtime directory {runtime_dir} is too long for a Unix socket path "
                f"(max about 90 characters); choose a shorter one with --runtime-dir"
            )
        return cls("ipc://" + inbound, "ipc://" + os.path.join(runtime_dir, "bus-out"))


def encode(publisher: str, pseq: int, events: list[tuple[Any, ...]]) -> bytes:
    flags = FLAG_ROSTER if any(ev[0] in R.ROSTER_KINDS for ev in events) else 0
    name = publisher.encode()
    return PREFIX.pack(WIRE_VERSION, flags, pseq, len(name)) + name + marshal.dumps(events)


def peek(payload: bytes) -> tuple[int, int, str, int]:
    """(flags, publisher's batch number, publisher, offset of the events) without decoding events."""
    version, flags, pseq, n = PREFIX.unpack_from(payload)
    if version != WIRE_VERSION:
        raise ValueError(f"bus message of wire version {version}, this code speaks {WIRE_VERSION}")
    start = PREFIX.size + n
    return flags, pseq, payload[PREFIX.size:start].decode(), start


def decode(payload: bytes) -> tuple[str, int, list[tuple[Any, ...]]]:
    _, pseq, publisher, start = peek(payload)
    return publisher, pseq, marshal.loads(payload[start:])


# Markers `OrderTracker.accept` puts between (publisher, events) items.
RESTARTED = "restarted"  # (RESTARTED, epoch): the broker is new; nothing after it was processed yet
GAP = "gap"  # (GAP, text): batches were lost before the next item
REPLAY = "replay"  # (REPLAY, (publisher, events)): a batch seen before, sent again after a restart


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

    def number(self, events: list[tuple[Any, ...]]) -> bytes:
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
        publisher, pseq, events = decode(payload)
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


class BusClient:
    """A worker's end of the bus: publish batches, drain what the broker sends back."""

    def __init__(self, ctx: zmq.Context[Any], endpoints: Endpoints, worker_id: str) -> None:
        self.worker_id = worker_id
        self.sub = ctx.socket(zmq.SUB)
        self.sub.setsockopt(zmq.RCVHWM, 0)
        self.sub.setsockopt(zmq.LINGER, 0)
        self.sub.setsockopt(zmq.RECONNECT_IVL, 50)
        self.sub.setsockopt(zmq.SUBSCRIBE, b"")
        self.sub.connect(endpoints.outbound)
        self.push = ctx.socket(zmq.PUSH)
        self.push.setsockopt(zmq.SNDHWM, 0)
        self.push.setsockopt(zmq.LINGER, 2000)
        self.push.setsockopt(zmq.RECONNECT_IVL, 50)
        self.push.connect(endpoints.inbound)
        # The FD signals edge-triggered "something may have changed"; EVENTS is the truth.
        self.fd: int = self.sub.getsockopt(zmq.FD)
        self.order = OrderTracker(worker_id)
        self._stash: tuple[int, int, bytes] | None = None  # the first message of a new epoch

    @property
    def gaps(self) -> int:
        return self.order.gaps

    def publish(self, events: list[tuple[Any, ...]]) -> None:
        """Send a numbered batch, kept until it comes back so that it can be sent again."""
        payload = self.order.number(events)
        self.push.send(payload, copy=len(payload) < 8192)

    def send_control(self, events: list[tuple[Any, ...]]) -> None:
        """Send an unnumbered batch (HELLO, RESYNC): never resent, never a duplicate."""
        self.push.send(encode(self.worker_id, 0, events))

    def restarted(self, control: list[tuple[Any, ...]]) -> int:
        """Answer a new broker: the control batch first, then everything not seen back."""
        self.send_control(control)
        for _, payload in self.order.unacked:
            self.push.send(payload)
        return len(self.order.unacked)

    def readable(self) -> bool:
        return self._stash is not None or bool(self.sub.getsockopt(zmq.EVENTS) & zmq.POLLIN)

    def drain(self, limit: int = 256) -> list[tuple[str, Any]]:
        """Up to `limit` items: (publisher, events), or a RESTARTED, GAP or REPLAY marker.

        Draining stops right after RESTARTED, so the caller answers the new broker before it
        sees anything of the new epoch.
        """
        out: list[tuple[str, Any]] = []
        sub = self.sub
        while len(out) < limit:
            if self._stash is not None:
                epoch, gseq, payload = self._stash
                self._stash = None
            elif sub.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                header, payload = sub.recv_multipart(zmq.NOBLOCK)
                epoch, gseq = HEADER.unpack(header)
            else:
                break
            if not self.order.accept(epoch, gseq, payload, out):
                self._stash = (epoch, gseq, payload)
                break
        return out

    def close(self) -> None:
        self.sub.close(0)
        self.push.close()


class Broker:
    """Sequence every batch, keep the roster and decide on it, answer HELLOs, rebuild after a restart.

    Pure apart from `emit(header, payload)`, which publishes one stamped message.

    Why a restarted broker admits publishers one by one: a new broker starts with an empty
    roster and knows nothing of the old order. Each worker, on seeing the new epoch, sends an
    unnumbered control batch (RESYNC of its clients, HELLO) and then everything it published
    but never saw come back, in the original numbering. The broker drops a worker's numbered
    batches until that control batch has arrived (whatever was queued before it is in the
    resend anyway), so every worker's traffic in the new epoch starts from its RESYNC. For a
    short resync phase the broker sequences only control batches and holds everything else;
    when every live worker has resynced (or the phase times out), it answers the waiting
    HELLOs with snapshots (which tell each worker which of its clients kept their names)
    and releases the held traffic. So every claim after a restart is decided against a
    complete roster, and no chat line reaches a worker before its snapshot.
    """

    def __init__(self, emit: Callable[[bytes, bytes], None], workers: Sequence[str], now: float) -> None:
        self.emit = emit
        self.epoch = random.getrandbits(63) or 1
        self.gseq = 0
        self.roster = R.Roster()
        self.admitted: set[str] = set()
        self.dead: set[str] = set()
        # The resync phase: the live workers of the cluster the old broker served.
        self.expected = set(workers)
        self.phase_ends = now + RESYNC_WAIT if self.expected else 0.0
        self.held: list[bytes] = []
        self.waiting: list[tuple[str, int]] = []  # HELLOs to answer when the phase ends
        self.last_nudge = -NUDGE_EVERY

    @property
    def resyncing(self) -> bool:
        return bool(self.phase_ends)

    def send(self, payload: bytes) -> None:
        self.gseq += 1
        self.emit(HEADER.pack(self.epoch, self.gseq), payload)

    def nudge(self, now: float) -> None:
        """Tell workers that have not noticed yet that there is a new broker."""
        if now - self.last_nudge >= NUDGE_EVERY:
            self.last_nudge = now
            self.send(encode(BROKER, 0, [(R.PING,)]))

    def snapshot(self, worker: str, nonce: int) -> None:
        self.send(encode(BROKER, 0, [self.roster.snapshot_for(worker, nonce)]))

    def receive(self, payload: bytes, now: float) -> None:
        try:
            flags, pseq, publisher, _ = peek(payload)
        except (ValueError, struct.error, UnicodeDecodeError) as exc:
            log.error("dropped an unreadable bus message: %s", exc)
            return
        if publisher in self.dead:
            return  # sent by a worker just before it died; its clients are gone already
        if pseq == 0:
            self.admitted.add(publisher)
            self.expected.discard(publisher)
        elif publisher not in self.admitted:
            self.nudge(now)  # dropped: the worker sends it again after its RESYNC
            return
        elif self.resyncing:
            self.held.append(payload)
            return
        if not flags & FLAG_ROSTER:
            self.send(payload)  # chat only: passed on as it came, never decoded
        else:
            # The verdicts take the requests' places, under the publisher's name and number,
            # so receivers still check that batch's place in the publisher's sequence.
            publisher, _, events = decode(payload)
            self.send(encode(publisher, pseq, self.roster.decide_batch(publisher, events)))
            for ev in events:
                if ev[0] == R.HELLO:
                    if self.resyncing:
                        self.waiting.append((publisher, ev[1]))
                    else:
                        self.snapshot(publisher, ev[1])
        if self.resyncing and not self.expected:
            self.end_resync(now)

    def end_resync(self, now: float) -> None:
        if self.expected:
            log.warning("broker: no resync from %s within %.1f s; going on without",
                        ", ".join(sorted(self.expected)), RESYNC_WAIT)
        self.phase_ends = 0.0
        self.expected.clear()
        waiting, self.waiting = self.waiting, []
        for worker, nonce in waiting:
            self.snapshot(worker, nonce)
        held, self.held = self.held, []
        for payload in held:
            self.receive(payload, now)
        log.info("broker: roster rebuilt, %d users", len(self.roster))

    def gone(self, worker: str, now: float) -> None:
        self.dead.add(worker)
        self.admitted.discard(worker)
        self.expected.discard(worker)
        self.send(encode(BROKER, 0, [self.roster.decide_batch(BROKER, [(R.GONE, worker)])[0]]))
        if self.resyncing and not self.expected:
            self.end_resync(now)

    def tick(self, now: float) -> None:
        if self.resyncing and now >= self.phase_ends:
            self.end_resync(now)


def run_broker(runtime_dir: str, control_fd: int, workers: Sequence[str] = ()) -> None:
    """The broker process. `workers` are the live workers when this broker replaces a dead one."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the supervisor's to handle
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    endpoints = Endpoints.in_dir(runtime_dir)
    ctx: zmq.Context[Any] = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    pull.setsockopt(zmq.RCVHWM, 0)
    pull.bind(endpoints.inbound)
    pub = ctx.socket(zmq.XPUB)
    pub.setsockopt(zmq.SNDHWM, 0)
    pub.setsockopt(zmq.XPUB_VERBOSE, 1)  # one notice per subscriber, not one per topic
    pub.bind(endpoints.outbound)

    # After a broker restart the workers' SUB sockets reconnect on their own; waiting for them
    # before the first message keeps the restart from opening a slow-joiner gap.
    deadline = time.monotonic() + SUBSCRIBER_WAIT
    subscribers = 0
    while subscribers < len(workers) and time.monotonic() < deadline:
        if pub.poll(20, zmq.POLLIN) and pub.recv()[:1] == b"\x01":
            subscribers += 1

    def emit(header: bytes, payload: bytes) -> None:
        pub.send(header, zmq.SNDMORE)
        pub.send(payload, copy=len(payload) < 8192)

    broker = Broker(emit, workers, time.monotonic())
    log.info("broker up (epoch %x)%s", broker.epoch,
             f", rebuilding the roster from {len(workers)} workers" if workers else "")
    if workers:
        broker.nudge(time.monotonic())

    poller = zmq.Poller()
    poller.register(pull, zmq.POLLIN)
    poller.register(pub, zmq.POLLIN)
    poller.register(control_fd, zmq.POLLIN)
    control_buf = b""
    while True:
        for sock, _ in poller.poll(50 if broker.resyncing else 1000):
            if sock is pull:
                for _ in range(1000):
                    try:
                        payload = pull.recv(zmq.NOBLOCK, copy=True)
                    except zmq.Again:
                        break
                    broker.receive(payload, time.monotonic())
            elif sock is pub:
                while pub.poll(0, zmq.POLLIN):
                    pub.recv()  # subscription notices; nothing to do with them
            else:
                chunk = os.read(control_fd, 65536)
                if not chunk:
                    log.info("supervisor went away; broker exits")
                    os._exit(0)
                control_buf += chunk
                while b"\n" in control_buf:
                    line, control_buf = control_buf.split(b"\n", 1)
                    word, _, arg = line.decode().partition(" ")
                    if word == "GONE":
                        broker.gone(arg, time.monotonic())
        broker.tick(time.monotonic())
