"""The worker's end of the ZeroMQ bus: publish batches to the broker, drain what it sends back.

Workers PUSH batches to one broker (see `broker`), which stamps each with its
epoch, a global sequence number and the receiving worker's own sequence
number, and PUBlishes a copy to each worker that needs it under that worker's
topic, to which the worker subscribes once (never per room: a subscription
travels apart from the messages, so subscribing on a join could miss the
first lines after it; the broker routes instead). All workers see one order.
Nothing may be lost silently: high-water marks are off on every socket (a
stuck worker is killed by the supervisor long before memory matters), and a
worker keeps what it published until it has seen it come back, so after a
broker restart it can send it again (`wire.OrderTracker`). The ZMQ FD is
edge-triggered: after a wake-up, `EVENTS` is the truth.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import zmq

from . import events as E
from .stats import WorkerCounters
from .wire import HEADER, OrderTracker, Outbox, encode, topic


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


class BusClient:
    """A worker's end of the bus: publish batches, drain what the broker sends back."""

    def __init__(self, ctx: zmq.Context[Any], endpoints: Endpoints, worker_id: str,
                 counters: WorkerCounters | None = None) -> None:
        self.worker_id = worker_id
        self.counters = counters
        self.oldest_stamp = 0  # the broker's earliest stamp (monotonic ns) among messages drained since reset
        self.sub = ctx.socket(zmq.SUB)
        self.sub.setsockopt(zmq.RCVHWM, 0)
        self.sub.setsockopt(zmq.LINGER, 0)
        self.sub.setsockopt(zmq.RECONNECT_IVL, 50)
        self.topic = topic(worker_id)
        self.sub.setsockopt(zmq.SUBSCRIBE, self.topic)
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
        self.drained_bytes = 0  # the size of what the last drain() took
        self.detached = False  # left the bus for good (see detach)

    @property
    def gaps(self) -> int:
        return self.order.gaps

    def publish(self, events: list[E.Event], route: str = "") -> None:
        """Send a numbered batch, kept until it comes back so that it can be sent again."""
        if self.detached:
            return
        payload = self.order.number(events, route)
        self.push.send(payload, copy=len(payload) < 8192)
        self._sent(payload)

    def publish_all(self, outbox: Outbox) -> list[E.Event]:
        """Publish a loop pass's events, one batch per room and one for the rest; returns them in that order."""
        sent: list[E.Event] = []
        for route, events in outbox.take():
            self.publish(events, route)
            sent.extend(events)
        return sent

    def send_control(self, events: list[E.Event]) -> None:
        """Send an unnumbered batch (HELLO, RESYNC): never resent, never a duplicate."""
        if self.detached:
            return
        payload = encode(self.worker_id, 0, events)
        self.push.send(payload)
        self._sent(payload)

    def restarted(self, control: list[E.Event]) -> int:
        """Answer a new broker: the control batch first, then everything not seen back."""
        if self.detached:
            return 0
        self.push.send(self.order.resync_batch(control))
        for _, _, payload in self.order.unacked:
            self.push.send(payload)
            self._sent(payload)
        return len(self.order.unacked)

    def _sent(self, payload: bytes) -> None:
        k = self.counters
        if k is not None:
            k.bus_batches_out += 1
            k.bus_bytes_out += len(payload)

    def readable(self) -> bool:
        if self.detached:
            return False
        return self._stash is not None or bool(self.sub.getsockopt(zmq.EVENTS) & zmq.POLLIN)

    def drain(self, limit: int = 256, max_bytes: int = 1 << 62) -> list[tuple[str, Any]]:
        """Up to `limit` items, or about `max_bytes` of messages: (publisher, events), or a marker.

        Draining stops right after RESTARTED, so the caller answers the new broker before it
        sees anything of the new epoch. What is left stays queued (`readable()` says so).
        """
        out: list[tuple[str, Any]] = []
        self.drained_bytes = 0
        if self.detached:
            return out
        sub = self.sub
        skip = len(self.topic)
        taken = 0
        while len(out) < limit and taken < max_bytes:
            if self._stash is not None:
                epoch, wseq, payload = self._stash
                self._stash = None
            elif sub.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                frames = sub.recv_multipart(zmq.NOBLOCK)
                # The stamp and a small payload come in one frame, a large payload in a second one.
                header = frames[0]
                payload = frames[1] if len(frames) > 1 else header[skip + HEADER.size:]
                epoch, _, wseq, sent = HEADER.unpack_from(header, skip)
                if sent and (not self.oldest_stamp or sent < self.oldest_stamp):
                    self.oldest_stamp = sent
                k = self.counters
                if k is not None:
                    k.bus_batches_in += 1
                    k.bus_bytes_in += len(payload)
            else:
                break
            if not self.order.accept(epoch, wseq, payload, out):
                self._stash = (epoch, wseq, payload)
                break
            taken += len(payload)
        self.drained_bytes = taken
        return out

    def detach(self) -> None:
        """Leave the bus for good, dropping what was not sent; from now on nothing goes out or comes in.

        For a worker whose supervisor was killed outright: its broker went with the supervisor,
        and a cluster started next in the same runtime directory binds a new broker at the same
        paths. ZeroMQ would reconnect to it and hand it this worker's batches under a name ("w1")
        one of the new cluster's own workers has too. What it published but never saw come back
        is dropped: no broker of its cluster is left to take it.
        """
        if self.detached:
            return
        self.detached = True
        self._stash = None
        self.order.unacked.clear()
        self.sub.close(0)
        self.push.close(0)

    def close(self) -> None:
        if self.detached:
            return
        self.sub.close(0)
        self.push.close()
