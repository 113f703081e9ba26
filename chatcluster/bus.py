"""The ZeroMQ bus that joins the workers: wire format, the worker's end, and the broker.

Workers PUSH batches of events to one broker; the broker stamps each batch with
its epoch and a global sequence number and PUBlishes it to every worker, so all
workers see one order. Nothing may be lost silently: high-water marks are off
on every socket (a stuck worker is killed by the supervisor long before memory
matters), a booting worker accepts clients only after its own probe came back
through the broker (so the slow-joiner window is behind it), every publisher
numbers its batches so receivers detect gaps and drop duplicates, and a worker
keeps what it published until it has seen it come back, so after a broker
restart it can send it again. The broker also keeps a roster replica, to hand
a snapshot to a booting worker at the exact point in the order where it asked.
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
from dataclasses import dataclass
from typing import Any

import zmq

from . import roster as R

log = logging.getLogger("chatcluster.bus")

WIRE_VERSION = 1
FLAG_ROSTER = 1  # the batch holds roster events: the broker must decode and apply it
HEADER = struct.Struct("!QQ")  # epoch, global sequence number
BROKER = "broker"


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
    return bytes((WIRE_VERSION, flags)) + marshal.dumps((publisher, pseq, events))


def decode(payload: bytes) -> tuple[str, int, list[tuple[Any, ...]]]:
    if payload[0] != WIRE_VERSION:
        raise ValueError(f"bus message of wire version {payload[0]}, this code speaks {WIRE_VERSION}")
    publisher, pseq, events = marshal.loads(payload[2:])
    return publisher, pseq, events


RESTARTED = "restarted"
GAP = "gap"


class BusClient:
    """A worker's end of the bus: publish batches, drain what the broker sends back."""

    def __init__(self, ctx: zmq.Context[Any], endpoints: Endpoints, worker_id: str) -> None:
        self.worker_id = worker_id
        self.sub = ctx.socket(zmq.SUB)
        self.sub.setsockopt(zmq.RCVHWM, 0)
        self.sub.setsockopt(zmq.LINGER, 0)
        self.sub.setsockopt(zmq.SUBSCRIBE, b"")
        self.sub.connect(endpoints.outbound)
        self.push = ctx.socket(zmq.PUSH)
        self.push.setsockopt(zmq.SNDHWM, 0)
        self.push.setsockopt(zmq.LINGER, 2000)
        self.push.connect(endpoints.inbound)
        # The FD signals edge-triggered "something may have changed"; EVENTS is the truth.
        self.fd: int = self.sub.getsockopt(zmq.FD)
        self.pseq = 0
        self.unacked: deque[tuple[int, bytes]] = deque()
        self.epoch: int | None = None
        self.gseq = 0
        self.last_pseq: dict[str, int] = {}
        self.gaps = 0
        self.received = 0

    def publish(self, events: list[tuple[Any, ...]]) -> None:
        self.pseq += 1
        payload = encode(self.worker_id, self.pseq, events)
        self.unacked.append((self.pseq, payload))
        self.push.send(payload, copy=len(payload) < 8192)

    def resend_unacked(self) -> int:
        for _, payload in self.unacked:
            self.push.send(payload)
        return len(self.unacked)

    def readable(self) -> bool:
        return bool(self.sub.getsockopt(zmq.EVENTS) & zmq.POLLIN)

    def drain(self, limit: int = 256) -> list[tuple[str, Any]]:
        """Up to `limit` messages as (publisher, events), or (RESTARTED|GAP, detail) markers."""
        out: list[tuple[str, Any]] = []
        sub = self.sub
        while len(out) < limit and sub.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            header, payload = sub.recv_multipart(zmq.NOBLOCK)
            epoch, gseq = HEADER.unpack(header)
            if epoch != self.epoch:
                if self.epoch is not None:
                    out.append((RESTARTED, epoch))
                self.epoch = epoch
            elif gseq != self.gseq + 1:
                self.gaps += 1
                out.append((GAP, f"bus sequence jumped from {self.gseq} to {gseq}"))
            self.gseq = gseq
            publisher, pseq, events = decode(payload)
            self.received += 1
            if publisher != BROKER:
                last = self.last_pseq.get(publisher)
                if last is not None and pseq <= last:
                    continue  # a batch sent again after a broker restart, seen already
                if last is not None and pseq != last + 1:
                    self.gaps += 1
                    out.append((GAP, f"{pseq - last - 1} batches from {publisher} never arrived"))
                self.last_pseq[publisher] = pseq
                if publisher == self.worker_id:
                    while self.unacked and self.unacked[0][0] <= pseq:
                        self.unacked.popleft()
            out.append((publisher, events))
        return out

    def forget(self, publisher: str) -> None:
        self.last_pseq.pop(publisher, None)

    def close(self) -> None:
        self.sub.close(0)
        self.push.close()


def run_broker(runtime_dir: str, control_fd: int, expected_subscribers: int = 0) -> None:
    """The broker process: sequence every batch, keep a roster replica, answer HELLOs."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the supervisor's to handle
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    endpoints = Endpoints.in_dir(runtime_dir)
    ctx: zmq.Context[Any] = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    pull.setsockopt(zmq.RCVHWM, 0)
    pull.bind(endpoints.inbound)
    pub = ctx.socket(zmq.XPUB)
    pub.setsockopt(zmq.SNDHWM, 0)
    pub.bind(endpoints.outbound)
    epoch = random.getrandbits(63) or 1
    roster = R.Roster()
    gseq = 0
    log.info("broker up (epoch %x)", epoch)

    # After a broker restart the workers' SUB sockets reconnect on their own; giving them
    # a moment before the first message keeps the restart from opening a slow-joiner gap.
    deadline = time.monotonic() + 1.0
    subscribers = 0
    while subscribers < expected_subscribers and time.monotonic() < deadline:
        if pub.poll(50, zmq.POLLIN):
            if pub.recv()[:1] == b"\x01":
                subscribers += 1

    def send(payload: bytes) -> None:
        nonlocal gseq
        gseq += 1
        pub.send(HEADER.pack(epoch, gseq), zmq.SNDMORE)
        pub.send(payload, copy=len(payload) < 8192)

    poller = zmq.Poller()
    poller.register(pull, zmq.POLLIN)
    poller.register(pub, zmq.POLLIN)
    poller.register(control_fd, zmq.POLLIN)
    control_buf = b""
    while True:
        for sock, _ in poller.poll(1000):
            if sock is pull:
                for _ in range(1000):
                    try:
                        payload = pull.recv(zmq.NOBLOCK, copy=True)
                    except zmq.Again:
                        break
                    send(payload)
                    if payload[1] & FLAG_ROSTER:
                        publisher, _pseq, events = decode(payload)
                        for ev in events:
                            roster.apply(publisher, ev)
                            if ev[0] == R.HELLO:
                                send(encode(BROKER, 0, [(R.SNAPSHOT, publisher, ev[1], roster.snapshot())]))
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
                        event = (R.GONE, arg)
                        roster.apply(BROKER, event)
                        send(encode(BROKER, 0, [event]))
