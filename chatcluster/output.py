"""What a worker sends its clients, and the rules for it: queueing, sharing, flushing, the send queue limit.

Output is queued per client and given to the kernel in one `send()` per client
per loop pass (`flush_dirty`), in slices of the dirty list so a large room
does not hold the loop. A broadcast shares one output list between every
client that had the same thing queued (see `client.SharedOut`). The send
queue limit (`max_sendq_bytes`) is enforced as output is queued, not only when
the kernel refuses some, so a client that never reads cannot make the worker
grow: such a client is told why and disconnected. This module writes to
sockets; it never reads them and knows nothing of chat.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from .client import Client, SharedOut
from .protocol import CRLF, encode_line
from .registry import Registry
from .stats import WorkerCounters, latency_bucket

log = logging.getLogger("chatcluster.worker")

SLOW_READER_LINE = CRLF + encode_line("*** Error: disconnected: you are not reading fast enough")


class OutputLimits(Protocol):
    max_sendq_bytes: int


class Output:
    """The output queues of one worker's clients."""

    def __init__(self, registry: Registry[Client, Any], limits: OutputLimits,
                 close: Callable[[Client, str], None], worker_no: int, counters: WorkerCounters) -> None:
        self.registry = registry
        self.limits = limits
        self.close = close  # the worker's: forget the client, close the socket, tell the chat core
        self.worker_no = worker_no
        self.counters = counters
        self.stamp = 0  # monotonic ns the broker stamped the bus message being applied (0: none)
        self.pass_no = 0  # the worker's loop pass, so a broadcast's latency is worked out once per pass
        self.sent_bytes = 0  # bytes handed to the kernel since the last settle()
        self.delivered: list[SharedOut] = []  # shared outputs some client got whole in this pass
        self.dirty: list[Client] = []
        # Clients whose kernel buffer is full, with output still queued here, and since when
        # they have not caught up: the measure of whether the clients keep up (backpressure).
        self.stuck: dict[int, tuple[Client, float]] = {}

    def queue(self, c: Client, data: bytes) -> None:
        out = c.out
        if out is None:
            c.out = [data]
            self.dirty.append(c)
        elif type(out) is SharedOut:
            c.out = [*out, data]  # its own copy: the shared list is other clients' output too
        else:
            out.append(data)
        c.outlen += len(data)
        if c.outlen > self.limits.max_sendq_bytes and not c.closing:
            self.enforce_sendq(c)

    def broadcast(self, data: bytes, exclude: frozenset[int],
                  recipients: Iterable[tuple[int, Client]] | None = None) -> int:
        """Queue `data` for every recipient (default: every client receiving traffic) but those in `exclude`;
        returns how many got it."""
        dirty = self.dirty
        n = len(data)
        lines = data.count(b"\n")  # a broadcast may carry a run of lines
        count = 0
        limit = self.limits.max_sendq_bytes
        over: list[Client] | None = None
        fresh: SharedOut | None = None  # for the clients that had nothing queued
        grown: dict[int, tuple[SharedOut, SharedOut]] = {}  # id(shared) -> (it, it + data)
        for conn, c in self.registry.room() if recipients is None else recipients:
            if exclude and conn in exclude:
                continue
            out = c.out
            if out is None:
                if fresh is None:
                    fresh = SharedOut((data,), lines)
                    fresh.stamp = self.stamp
                c.out = fresh
                dirty.append(c)
            elif type(out) is SharedOut:
                pair = grown.get(id(out))
                if pair is None:
                    pair = grown[id(out)] = (out, out.plus(data, lines))  # holds `out`: its id stays its own
                c.out = pair[1]
            else:
                out.append(data)
            c.outlen += n
            count += 1
            if c.outlen > limit:
                over = [c] if over is None else [*over, c]
        self.counters.lines_delivered += count * lines
        if over is not None:
            for slow in over:
                self.enforce_sendq(slow)
        return count

    def enforce_sendq(self, c: Client) -> None:
        """More than max_sendq_bytes is queued for `c`: send what the kernel takes, kick if still over.

        Checked as output is queued, not only when the kernel refuses some, so one loop pass
        can never queue much more than the limit for a client that does not read; trying the
        socket first spares a client that reads but was handed a large batch at once.
        """
        if c.out is not None and c in self.registry and c.outlen > self.limits.max_sendq_bytes:
            self.flush(c)

    def flush_dirty(self, limit: int = 0) -> None:
        """Send what is queued for the dirty clients: all of them, or the first `limit` (in order)."""
        dirty = self.dirty
        if limit and len(dirty) > limit:
            batch = dirty[:limit]
            del dirty[:limit]
        else:
            batch, self.dirty = dirty, []
        get = self.registry.fd_index.get
        flush = self.flush
        for c in batch:
            if c.out is not None and get(c.fd) is c:
                flush(c)

    def flush(self, c: Client) -> None:
        out = c.out
        assert out is not None
        if len(out) == 1:
            data = out[0]
        elif type(out) is SharedOut:
            data = out.join()
        else:
            data = b"".join(out)
        try:
            sent = c.sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError:
            self.close(c, "connection lost")
            return
        self.sent_bytes += sent
        if sent == len(data):
            if type(out) is SharedOut and out.stamp:
                # Delivery latency: counted per recipient here, turned into the histogram once per
                # broadcast and pass in settle(), so a recipient in a large room costs an increment.
                if out.seen_in != self.pass_no:
                    out.seen_in = self.pass_no
                    out.done = 0
                    self.delivered.append(out)
                out.done += 1
            c.out = None
            c.outlen = 0
            if self.stuck:
                self.stuck.pop(c.conn, None)
            if c.closing:
                self.close(c, "")
            return
        # The kernel buffer is full: keep the rest; EPOLLOUT (edge) says when to go on.
        c.out = [data[sent:]]
        c.outlen = len(data) - sent
        if not c.closing and c.conn not in self.stuck:
            self.stuck[c.conn] = (c, time.monotonic())
        if c.outlen > self.limits.max_sendq_bytes and not c.closing:
            self.kick_slow_reader(c)

    def settle(self) -> None:
        """Put this pass's deliveries into the counters: bytes, and the latency of every line
        from the broker's stamp to the send() that handed it to the kernel."""
        k = self.counters
        k.bytes_delivered += self.sent_bytes
        self.sent_bytes = 0
        if self.delivered:
            now = time.monotonic_ns()
            for out in self.delivered:
                delay = (now - out.stamp) / 1e9
                n = out.done * out.lines
                k.latency[latency_bucket(delay)] += n
                k.latency_sum += delay * n
            self.delivered = []

    def forget(self, c: Client) -> None:
        """The client is gone from this worker: drop what was queued for it."""
        c.out = None
        c.outlen = 0
        self.stuck.pop(c.conn, None)

    def lagging_bytes(self, now: float, within: float) -> int:
        """Output queued here for clients whose kernel buffer filled up less than `within` seconds ago
        and who have not caught up since. A client that has not caught up for longer is a slow
        reader, which the send queue limit deals with: it must not hold everyone else back."""
        lagging = [c.outlen for c, since in self.stuck.values() if now - since < within]
        # One client falling behind is its own problem (the send queue limit); several at once is
        # congestion.
        return sum(lagging) if len(lagging) >= 2 else 0

    def kick_slow_reader(self, c: Client) -> None:
        log.warning("worker %d: disconnecting %s (conn %d): %d bytes unsent, over max_sendq_bytes=%d",
                    self.worker_no, c.ip, c.conn, c.outlen, self.limits.max_sendq_bytes)
        self.counters.dropped += 1
        c.ended = "sendq"
        try:
            c.sock.send(SLOW_READER_LINE)
        except OSError:
            pass
        self.close(c, "not reading fast enough")
