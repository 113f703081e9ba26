"""One client connection as the worker holds it: its socket, its input state and its output queue.

A `Client` is kept small while idle, which most of them are: `out` is None
while nothing is queued, and the line reader and the flood-control bucket are
made when first needed (`reader_of`, `bucket_of`) from the worker's live
settings. `SharedOut` is output queued for many clients at once. This module
holds state; reading, writing and the rules for both are the worker's
(`worker`, `output`).
"""

from __future__ import annotations

import socket
from typing import Protocol

from .protocol import LineReader, TokenBucket


class InputLimits(Protocol):
    max_line_bytes: int
    telnet_negotiation: str
    flood_rate: float
    flood_burst: int


class Client:
    __slots__ = ("sock", "fd", "conn", "ip", "reader", "bucket", "out", "outlen", "pending",
                 "throttled", "eof", "closing", "last_rx", "ended")

    def __init__(self, sock: socket.socket, conn: int, ip: str, reader: LineReader | None,
                 bucket: TokenBucket | None, now: float) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.conn = conn
        self.ip = ip
        self.reader = reader
        self.bucket = bucket
        self.out: list[bytes] | None = None
        self.outlen = 0
        self.pending = b""  # bytes read but not parsed yet: the client is out of flood-control tokens
        # Not read until a timer of the worker fires: out of tokens, or still waiting for its
        # welcome line (lines sent before it wait in the kernel, which pushes back on the sender).
        self.throttled = False
        self.eof = False
        self.closing = False
        self.last_rx = now
        # Why the connection is ending, once that is decided (a key of stats.CLOSE_REASONS, or
        # "refused_<reason>"): counted once, when the socket is closed.
        self.ended = ""

    def __repr__(self) -> str:
        return f"Client(conn={self.conn}, fd={self.fd}, ip={self.ip!r}, queued={self.outlen})"


def reader_of(c: Client, limits: InputLimits) -> LineReader:
    if c.reader is None:
        c.reader = LineReader(limits.max_line_bytes, telnet=limits.telnet_negotiation)
    return c.reader


def bucket_of(c: Client, limits: InputLimits, now: float) -> TokenBucket:
    if c.bucket is None:
        c.bucket = TokenBucket(limits.flood_rate, limits.flood_burst, now)
    return c.bucket


class SharedOut(list[bytes]):
    """Output queued for many clients at once, read-only.

    A broadcast gives every client of the room that had nothing queued the same list, and
    the clients that had one same list queued the same longer one, instead of a list each:
    one list per client per line was most of the worker's garbage, thousands of short-lived
    containers per line, enough to set off full garbage collections that stopped the worker
    for tens of milliseconds in a large room. A client's own output goes into a copy (see
    Output.queue), and the bytes are joined once for all the clients that send them.
    """

    __slots__ = ("joined", "stamp", "lines", "seen_in", "done")

    def __init__(self, chunks: tuple[bytes, ...], lines: int = 0) -> None:
        super().__init__(chunks)
        self.joined: bytes | None = None
        # For the delivery latency: the broker's stamp (monotonic ns) of the oldest line in it, how
        # many lines it holds, and how many clients got it whole in the loop pass `seen_in`.
        self.stamp = 0
        self.lines = lines
        self.seen_in = -1
        self.done = 0

    def join(self) -> bytes:
        if self.joined is None:
            self.joined = self[0] if len(self) == 1 else b"".join(self)
        return self.joined

    def plus(self, data: bytes, lines: int) -> SharedOut:
        """This output followed by `data` (joined first once it is a long run of chunks)."""
        grown = SharedOut((*self, data) if len(self) < 32 else (self.join(), data), self.lines + lines)
        grown.stamp = self.stamp
        return grown
