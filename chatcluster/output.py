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
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from .client import Client, SharedOut
from .protocol import CRLF, encode_line
from .registry import Registry

log = logging.getLogger("chatcluster.worker")

SLOW_READER_LINE = CRLF + encode_line("*** Error: disconnected: you are not reading fast enough")


class OutputLimits(Protocol):
    max_sendq_bytes: int


class Output:
    """The output queues of one worker's clients."""

    def __init__(self, registry: Registry[Client, Any], limits: OutputLimits,
                 close: Callable[[Client, str], None], worker_no: int) -> None:
        self.registry = registry
        self.limits = limits
        self.close = close  # the worker's: forget the client, close the socket, tell the chat core
        self.worker_no = worker_no
        self.dirty: list[Client] = []
        self.lines_out = 0
        self.bytes_out = 0
        self.dropped = 0  # clients disconnected for not reading

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
                    fresh = SharedOut((data,))
                c.out = fresh
                dirty.append(c)
            elif type(out) is SharedOut:
                pair = grown.get(id(out))
                if pair is None:
                    pair = grown[id(out)] = (out, out.plus(data))  # holds `out`: its id stays its own
                c.out = pair[1]
            else:
                out.append(data)
            c.outlen += n
            count += 1
            if c.outlen > limit:
                over = [c] if over is None else [*over, c]
        self.lines_out += count * data.count(b"\n")  # a broadcast may carry a run of lines
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
        registry = self.registry
        for c in batch:
            if c.out is not None and c in registry:
                self.flush(c)

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
        self.bytes_out += sent
        if sent == len(data):
            c.out = None
            c.outlen = 0
            if c.closing:
                self.close(c, "")
            return
        # The kernel buffer is full: keep the rest; EPOLLOUT (edge) says when to go on.
        c.out = [data[sent:]]
        c.outlen = len(data) - sent
        if c.outlen > self.limits.max_sendq_bytes and not c.closing:
            self.kick_slow_reader(c)

    def kick_slow_reader(self, c: Client) -> None:
        log.warning("worker %d: disconnecting %s (conn %d): %d bytes unsent, over max_sendq_bytes=%d",
                    self.worker_no, c.ip, c.conn, c.outlen, self.limits.max_sendq_bytes)
        self.dropped += 1
        try:
            c.sock.send(SLOW_READER_LINE)
        except OSError:
            pass
        self.close(c, "not reading fast enough")
