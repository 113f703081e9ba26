"""The event loop of one worker process: sockets in, sockets out, nothing else.

One `select.epoll` watches the worker's own SO_REUSEPORT listening socket
(level-triggered, so a pending connection is never forgotten), its clients
(edge-triggered for reading and writing, registered once), and the bus
socket's FD. Each pass of the loop reads every readable client until EAGAIN,
hands the lines to `ChatCore`, publishes what the clients said as one bus
batch, drains the bus, and finally gives every client with pending output a
single `send()` of everything queued for it. Chat rules live in `chat`; this
module only moves bytes and enforces the per-connection limits.
"""

from __future__ import annotations

import errno
import heapq
import json
import logging
import os
import select
import signal
import socket
import sys
import time
from collections.abc import Callable
from typing import Any

import zmq

from . import chat as C
from . import migrate
from . import stats as S
from .bus import GAP, REPLAY, RESTARTED, BusClient, Endpoints
from .config import Config
from .protocol import DEFAULT_MAX_LINE_BYTES, Line, LineReader, TokenBucket, encode_line
from .roster import PING

log = logging.getLogger("chatcluster.worker")

RECV_SIZE = 65536
UNLIMITED = sys.maxsize  # the read budget without flood control
ACCEPTS_PER_WAKE = 256
BUS_BATCHES_PER_PASS = 512
# Clients given their output per loop pass. A broadcast to a large room is sent in slices, and
# between two slices the loop reads its clients and drains the bus: a line said meanwhile is
# published at once and joins the output of the clients not served yet, instead of waiting
# for the whole room to be served first (which made latency a multiple of the room's size).
FLUSH_SLICE = 256
HEARTBEAT_EVERY = 0.25
PING_EVERY = 0.5
EXIT_BOOT_FAILED = 3
# A closing client gets this long to take what is queued for it: one that never reads
# must not keep its descriptor for ever.
CLOSE_LINGER = 10.0
# How long the listener rests when a connection can be neither accepted nor shed.
LISTEN_PAUSE = 0.1

EPOLLIN, EPOLLOUT, EPOLLET = select.EPOLLIN, select.EPOLLOUT, select.EPOLLET
EPOLLERR, EPOLLHUP, EPOLLRDHUP = select.EPOLLERR, select.EPOLLHUP, select.EPOLLRDHUP
CLIENT_EVENTS = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET
READ_EVENTS = EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR

SHUTDOWN_LINE = encode_line("*** Server is shutting down")
SLOW_READER_LINE = b"\r\n" + encode_line("*** Error: disconnected: you are not reading fast enough")
IDLE_LINE = encode_line("*** Error: disconnected: idle for too long")


class Client:
    """One connection, kept small while idle (most of them are): `out` is None while nothing
    is queued, and the line reader and flood-control bucket are made when first needed, with
    the settings in `Client.limits` (the worker sets them at start and on reload)."""

    __slots__ = ("sock", "fd", "conn", "ip", "_reader", "_bucket", "out", "outlen", "pending",
                 "throttled", "eof", "closing", "last_rx")

    # (max_line_bytes, flood_rate, flood_burst) for readers and buckets made from now on.
    limits: tuple[int, float, int] = (DEFAULT_MAX_LINE_BYTES, 0.0, 1)

    def __init__(self, sock: socket.socket, conn: int, ip: str, reader: LineReader | None,
                 bucket: TokenBucket | None, now: float) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.conn = conn
        self.ip = ip
        self._reader = reader
        self._bucket = bucket
        self.out: list[bytes] | None = None
        self.outlen = 0
        self.pending = b""  # bytes read but not parsed yet: the client is out of flood-control tokens
        # Not read until a timer in Worker.timers fires: out of tokens, or still waiting for its
        # welcome line (lines sent before it wait in the kernel, which pushes back on the sender).
        self.throttled = False
        self.eof = False
        self.closing = False
        self.last_rx = now

    @property
    def reader(self) -> LineReader:
        if self._reader is None:
            self._reader = LineReader(self.limits[0])
        return self._reader

    @reader.setter
    def reader(self, reader: LineReader) -> None:
        self._reader = reader

    @property
    def bucket(self) -> TokenBucket:
        if self._bucket is None:
            self._bucket = TokenBucket(self.limits[1], self.limits[2], time.monotonic())
        return self._bucket

    @bucket.setter
    def bucket(self, bucket: TokenBucket) -> None:
        self._bucket = bucket


class SharedOut(list[bytes]):
    """Output queued for many clients at once, read-only.

    A broadcast gives every client of the room that had nothing queued the same list, and
    the clients that had one same list queued the same longer one, instead of a list each:
    one list per client per line was most of the worker's garbage, thousands of short-lived
    containers per line, enough to set off full garbage collections that stopped the worker
    for tens of milliseconds in a large room. A client's own output goes into a copy (see
    Worker.queue), and the bytes are joined once for all the clients that send them.
    """

    __slots__ = ("joined",)

    def __init__(self, chunks: tuple[bytes, ...]) -> None:
        super().__init__(chunks)
        self.joined: bytes | None = None

    def join(self) -> bytes:
        if self.joined is None:
            self.joined = self[0] if len(self) == 1 else b"".join(self)
        return self.joined

    def plus(self, data: bytes) -> SharedOut:
        """This output followed by `data` (joined first once it is a long run of chunks)."""
        return SharedOut((*self, data) if len(self) < 32 else (self.join(), data))


class Worker:
    def __init__(self, cfg: Config, worker_no: int, worker_id: str, slot: int, generation: int,
                 runtime_dir: str, stats: S.StatsFile, succeeds: tuple[str, int] | None = None) -> None:
        self.cfg = cfg
        Client.limits = (cfg.max_line_bytes, cfg.flood_rate, cfg.flood_burst)
        self.worker_no = worker_no
        self.worker_id = worker_id
        self.slot = slot
        self.generation = generation
        self.runtime_dir = runtime_dir
        self.stats = stats
        self.ctx: zmq.Context[Any] = zmq.Context()
        self.bus = BusClient(self.ctx, Endpoints.in_dir(runtime_dir), worker_id)
        self.core = C.ChatCore(worker_id, self._chat_settings(cfg))
        self.ep = select.epoll()
        self.listener: socket.socket | None = None
        self.clients: dict[int, Client] = {}  # by fd
        self.by_conn: dict[int, Client] = {}
        self.room: dict[int, Client] = {}  # clients that have their welcome line, by conn
        self.dirty: list[Client] = []
        self.outgoing: list[tuple[Any, ...]] = []
        self.timers: list[tuple[float, int]] = []  # (when, conn) for throttled clients
        self.lingering: list[tuple[float, int]] = []  # (deadline, conn) for closing clients
        self.listen_resume = 0.0  # when a listener paused by shed_connection() polls again
        self.next_conn = 1
        self.started = time.time()
        self.last_publish = 0.0
        self.last_beat = 0.0
        self.last_hello = 0.0
        self.last_emfile_log = 0.0
        self.stopping: float | None = None  # deadline of a graceful stop
        self.stop_signal = 0
        self.draining_until: float | None = None  # first phase of a stop: let the bus catch up
        self.reload_pending = False
        self.parent_pid = os.getppid()
        self.config_version = 0  # the supervisor's reload count we last applied, shown in our stats slot
        # Upgrades (see migrate.py): `succeeds` is the (id, pid) of the worker whose listener and
        # clients this one takes over; `handoff` is the giver or taker while that goes on.
        self.succeeds = succeeds
        self.handoff: migrate.Giver | migrate.Taker | None = None
        self.handoff_requested = False
        self.frozen = False  # a giver past its cut point: read nothing more
        self.collect: Callable[[bytes], None] | None = None  # a taker copying the room's traffic
        # This worker's figures, written to its stats slot by beat(): they count on from what the
        # workers before it in the same slot counted, so the cluster's counters never go backwards.
        self.counters = stats.resume_slot(slot, os.getpid(), worker_no, generation, self.started)
        # One descriptor held in reserve: when accept() fails with EMFILE, closing it lets us
        # accept and immediately close the waiting connection instead of spinning on it.
        self.spare_fd: int | None = os.open(os.devnull, os.O_RDONLY)

    @staticmethod
    def _chat_settings(cfg: Config) -> C.ChatSettings:
        return C.ChatSettings(welcome=cfg.welcome, announce_joins=cfg.announce_joins,
                              max_clients=cfg.max_clients, max_clients_per_ip=cfg.max_clients_per_ip)

    # -- boot ---------------------------------------------------------------------------------

    def boot(self, timeout: float = 15.0) -> None:
        """Prove the bus path end to end (HELLO, answered in order), then open the listening socket."""
        self.beat(S.BOOTING)
        deadline = time.monotonic() + timeout
        while not self.core.ready:
            now = time.monotonic()
            if now > deadline:
                raise SystemExit(f"worker {self.worker_no}: the bus broker did not answer within "
                                 f"{timeout:.0f} s; check that the broker process is running")
            if now - self.last_hello > 0.2:
                self.bus.send_control([self.core.hello()])
                self.last_hello = now
            if self.bus.sub.poll(50, zmq.POLLIN):
                self.handle_bus()
        if self.succeeds is not None:
            # An upgrade: the predecessor hands us its listening socket (its queue of waiting
            # connections with it), then its clients.
            self.handoff = migrate.Taker(self, *self.succeeds)
            self.handoff.boot()
        else:
            self.listener = self.open_listener()
            self.ep.register(self.listener.fileno(), EPOLLIN)
        self.ep.register(self.bus.fd, EPOLLIN | EPOLLET)
        self.beat(S.READY)
        log.info("worker %d (%s) ready on %s:%d", self.worker_no, self.worker_id, self.cfg.host, self.cfg.port)

    def open_listener(self) -> socket.socket:
        family = socket.AF_INET6 if ":" in self.cfg.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            sock.bind((self.cfg.host, self.cfg.port))
        except OSError as exc:
            sock.close()
            hint = ("; another program holds the port: stop it or choose another with --port"
                    if exc.errno == errno.EADDRINUSE else "")
            log.error("worker %d cannot listen on %s:%d: %s%s", self.worker_no, self.cfg.host,
                      self.cfg.port, exc.strerror, hint)
            raise SystemExit(EXIT_BOOT_FAILED) from None
        sock.listen(self.cfg.backlog)
        sock.setblocking(False)
        return sock

    # -- the loop -----------------------------------------------------------------------------

    def run(self) -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, self._on_stop_signal)
        signal.signal(signal.SIGQUIT, self._on_stop_signal)
        signal.signal(signal.SIGHUP, self._on_reload_signal)
        signal.signal(signal.SIGUSR2, self._on_handoff_signal)
        self.boot()
        poll = self.ep.poll
        clients = self.clients
        while True:
            timeout = self._poll_timeout()
            try:
                events = poll(timeout)
            except InterruptedError:
                events = []
            for fd, ev in events:
                c = clients.get(fd)
                if c is None:
                    # The listener can change hands during an upgrade: compare with the current one.
                    if self.listener is not None and fd == self.listener.fileno():
                        self.accept()
                    elif self.handoff is not None and fd in self.handoff.fds:
                        self.handoff.on_fd(fd)
                    continue
                if ev & READ_EVENTS and not c.throttled:
                    self.read(c)
                if ev & EPOLLOUT and c.out is not None and c.fd in clients:
                    self.flush(c)
            if self.outgoing:
                self.publish()
            if self.bus.readable():
                self.handle_bus()
            if self.outgoing:
                self.publish()
            if self.dirty:
                self.flush_dirty(FLUSH_SLICE)
            now = time.monotonic()
            if self.timers and self.timers[0][0] <= now:
                self.run_timers(now)
            self.housekeeping(now)
            if self.stop_signal:
                self.begin_stop(now)
            if self.stopping is not None and (not self.clients or now >= self.stopping):
                break
        self.finish()

    def _poll_timeout(self) -> float:
        timeout = HEARTBEAT_EVERY
        if self.timers:
            timeout = min(timeout, max(0.0, self.timers[0][0] - time.monotonic()))
        if self.dirty or self.outgoing:
            timeout = 0.0
        return timeout

    def _on_stop_signal(self, signum: int, _frame: Any) -> None:
        self.stop_signal = signum

    def _on_reload_signal(self, _signum: int, _frame: Any) -> None:
        self.reload_pending = True

    def _on_handoff_signal(self, _signum: int, _frame: Any) -> None:
        self.handoff_requested = True  # an upgrade: hand everything to our successor

    # -- clients ------------------------------------------------------------------------------

    def accept(self) -> None:
        assert self.listener is not None
        cfg = self.cfg
        # One reading of the clocks for the whole batch: idle clients then share these floats.
        now = time.monotonic()
        wall = time.time()
        for _ in range(ACCEPTS_PER_WAKE):
            try:
                sock, addr = self.listener.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    self.shed_connection(exc)
                    return
                if exc.errno in (errno.ECONNABORTED, errno.EPROTO, errno.EPERM):
                    continue
                raise
            self.counters.accepted += 1
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if cfg.tcp_keepalive:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, cfg.keepalive_idle)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, cfg.keepalive_interval)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, cfg.keepalive_count)
            conn = self.next_conn
            self.next_conn += 1
            c = Client(sock, conn, sys.intern(addr[0]), None, None, now)
            c.throttled = True  # until its welcome line: see Enter in apply()
            self.clients[c.fd] = c
            self.by_conn[conn] = c
            self.ep.register(c.fd, CLIENT_EVENTS)
            if self.stopping is not None:
                self.queue(c, SHUTDOWN_LINE)
                c.closing = True
                continue
            self.apply(self.core.connect(conn, c.ip, wall))

    def shed_connection(self, exc: OSError) -> None:
        """Out of descriptors: refuse one waiting connection cleanly and keep serving.

        The listener is level-triggered, so a connection left in the accept queue would wake
        every poll and the loop would spin. Closing the spare descriptor makes room to accept
        it and close it at once (the client sees the connection closed), one per pass, and
        the listener goes on accepting normally as soon as descriptors are free again.
        """
        now = time.monotonic()
        if now - self.last_emfile_log >= 1.0:
            log.warning("worker %d: accept failed (%s); shedding new connections until "
                        "descriptors free up", self.worker_no, exc.strerror)
            self.last_emfile_log = now
        assert self.listener is not None
        if self.spare_fd is None:
            self.spare_fd = _open_spare()
        shed = False
        if self.spare_fd is not None:
            os.close(self.spare_fd)
            self.spare_fd = None
            try:
                sock, _ = self.listener.accept()
                sock.close()
                shed = True
                self.counters.dropped += 1
            except OSError:
                pass
            self.spare_fd = _open_spare()
        if not shed:
            # Nothing to free (ENOBUFS, ENOMEM, or another descriptor took the spare's place):
            # rest the listener briefly rather than spin on a connection we cannot take.
            self.ep.modify(self.listener.fileno(), 0)
            self.listen_resume = now + LISTEN_PAUSE

    def read(self, c: Client) -> None:
        """Read until EAGAIN, parsing no more lines than the client's flood budget allows.

        A client out of tokens keeps the unparsed rest of its last read in `pending` (at most
        RECV_SIZE bytes) and is not read again until its timer fires, so TCP pushes back on
        it and none of its lines is lost or reordered. Every line counts, commands too.
        """
        if c.closing or c.throttled or self.draining_until is not None or self.frozen:
            return
        limited = self.cfg.flood_rate > 0
        recv = c.sock.recv
        while True:
            if c.pending:
                data, c.pending = c.pending, b""
            else:
                try:
                    data = recv(RECV_SIZE)
                except BlockingIOError:
                    break
                except OSError:
                    self.close(c, "connection lost")
                    return
                if not data:
                    c.eof = True
                    break
                c.last_rx = time.monotonic()
            now = time.monotonic()
            budget = c.bucket.available(now) if limited else UNLIMITED
            if budget == 0:
                c.pending = data
                c.throttled = True
                heapq.heappush(self.timers, (now + c.bucket.wait(now), c.conn))
                return
            events, used = c.reader.feed_some(data, budget)
            if used < len(data):
                c.pending = data[used:]
            if events:
                self.process(c, events)
                if c.fd not in self.clients or c.closing:
                    return
        if c.eof:
            self.end_of_input(c)

    def process(self, c: Client, events: list[Any]) -> None:
        """Hand parsed lines to the chat core; read() parsed no more than there are tokens for."""
        core = self.core
        conn = c.conn
        now = time.monotonic()
        limited = self.cfg.flood_rate > 0
        for ev in events:
            if limited:
                c.bucket.take(now)
            if type(ev) is Line:
                if not ev.text.strip():
                    continue
                self.counters.lines_received += 1
                self.apply(core.line(conn, ev.text, time.time()))
            else:
                self.apply(core.line_too_long(conn, ev.limit))
            if c.closing or c.fd not in self.clients:
                return

    def end_of_input(self, c: Client) -> None:
        """The client shut its side: its lines are handled; send what is queued, then close."""
        self.room.pop(c.conn, None)
        self.apply(self.core.disconnect(c.conn, ""))
        if c.conn in self.core.local:
            return  # some of its lines wait for the bus (a /nick in flight): the core closes it after them
        self.close_when_sent(c)

    def run_timers(self, now: float) -> None:
        while self.timers and self.timers[0][0] <= now:
            _, conn = heapq.heappop(self.timers)
            c = self.by_conn.get(conn)
            if c is None or not c.throttled:
                continue
            c.throttled = False
            # The edge that said "readable" was consumed while throttled: read now.
            self.read(c)

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
        if c.outlen > self.cfg.max_sendq_bytes and not c.closing:
            self.enforce_sendq(c)

    def apply(self, effects: list[C.Effect]) -> None:
        for e in effects:
            t = type(e)
            if t is C.Broadcast:
                data = e.data  # type: ignore[union-attr]
                exclude = e.exclude  # type: ignore[union-attr]
                dirty = self.dirty
                n = len(data)
                count = 0
                limit = self.cfg.max_sendq_bytes
                over: list[Client] | None = None
                fresh: SharedOut | None = None  # for the clients that had nothing queued
                grown: dict[int, tuple[SharedOut, SharedOut]] = {}  # id(shared) -> (it, it + data)
                for conn, c in self.room.items():
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
                self.counters.lines_delivered += count * data.count(b"\n")  # a broadcast may carry a run of lines
                if over is not None:
                    for slow in over:
                        self.enforce_sendq(slow)
                if self.collect is not None:
                    self.collect(data)  # clients on their way here from our predecessor get it too
            elif t is C.Publish:
                self.outgoing.append(e.event)  # type: ignore[union-attr]
            elif t is C.Send:
                c = self.by_conn.get(e.conn)  # type: ignore[union-attr]
                if c is not None:
                    self.queue(c, e.data)  # type: ignore[union-attr]
            elif t is C.Enter:
                c = self.by_conn.get(e.conn)  # type: ignore[union-attr]
                if c is not None:
                    self.room[c.conn] = c
                    if c.throttled and not c.pending:
                        # Welcomed: read what it sent meanwhile (accept() held it back).
                        heapq.heappush(self.timers, (time.monotonic(), c.conn))
            elif t is C.Close:
                c = self.by_conn.get(e.conn)  # type: ignore[union-attr]
                if c is not None:
                    self.close_when_sent(c)

    def close_when_sent(self, c: Client) -> None:
        """Close `c` once its queued output is sent, or after CLOSE_LINGER seconds at most."""
        c.closing = True
        self.room.pop(c.conn, None)
        if c.out is None:
            self.close(c, "")
        else:
            heapq.heappush(self.lingering, (time.monotonic() + CLOSE_LINGER, c.conn))

    def enforce_sendq(self, c: Client) -> None:
        """More than max_sendq_bytes is queued for `c`: send what the kernel takes, kick if still over.

        Checked as output is queued, not only when the kernel refuses some, so one loop pass
        can never queue much more than the limit for a client that does not read; trying the
        socket first spares a client that reads but was handed a large batch at once.
        """
        if c.out is not None and c.fd in self.clients and c.outlen > self.cfg.max_sendq_bytes:
            self.flush(c)

    def flush_dirty(self, limit: int = 0) -> None:
        """Send what is queued for the dirty clients: all of them, or the first `limit` (in order)."""
        dirty = self.dirty
        if limit and len(dirty) > limit:
            batch = dirty[:limit]
            del dirty[:limit]
        else:
            batch, self.dirty = dirty, []
        for c in batch:
            if c.out is not None and c.fd in self.clients:
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
        self.counters.bytes_delivered += sent
        if sent == len(data):
            c.out = None
            c.outlen = 0
            if c.closing:
                self.close(c, "")
            return
        # The kernel buffer is full: keep the rest; EPOLLOUT (edge) says when to go on.
        c.out = [data[sent:]]
        c.outlen = len(data) - sent
        if c.outlen > self.cfg.max_sendq_bytes and not c.closing:
            self.kick_slow_reader(c)

    def kick_slow_reader(self, c: Client) -> None:
        log.warning("worker %d: disconnecting %s (conn %d): %d bytes unsent, over max_sendq_bytes=%d",
                    self.worker_no, c.ip, c.conn, c.outlen, self.cfg.max_sendq_bytes)
        self.counters.dropped += 1
        try:
            c.sock.send(SLOW_READER_LINE)
        except OSError:
            pass
        self.close(c, "not reading fast enough")

    def close(self, c: Client, reason: str) -> None:
        if self.clients.pop(c.fd, None) is None:
            return
        # Unregister before close: epoll tracks the open file, not the number, so an fd closed
        # while registered could keep reporting events under a number the kernel reuses.
        try:
            self.ep.unregister(c.fd)
        except OSError:
            pass
        if not c.eof:
            # close() with unread input sends a reset, and a reset discards what is still on its
            # way to the client (a shutdown notice, a goodbye): read the input away first.
            for _ in range(16):
                try:
                    if not c.sock.recv(RECV_SIZE):
                        break
                except OSError:
                    break
        c.sock.close()
        c.out = None
        self.by_conn.pop(c.conn, None)
        self.room.pop(c.conn, None)
        self.apply(self.core.disconnect(c.conn, reason))

    # -- bus ----------------------------------------------------------------------------------

    def publish(self) -> None:
        events, self.outgoing = self.outgoing, []
        self.bus.publish(events)
        self.last_publish = time.monotonic()
        if self.handoff is not None:
            self.handoff.published(events)

    def handle_bus(self) -> None:
        for _ in range(8):
            items = self.bus.drain(BUS_BATCHES_PER_PASS)
            if not items:
                break
            undelivered = self.core.undelivered
            for publisher, payload in items:
                if publisher == RESTARTED:
                    resent = self.bus.restarted(self.core.bus_restarted())
                    log.warning("worker %d: bus broker restarted; resyncing the roster, resent %d batches",
                                self.worker_no, resent)
                    self.last_hello = time.monotonic()
                elif publisher == GAP:
                    log.warning("worker %d: bus gap detected: %s", self.worker_no, payload)
                    self.counters.bus_gaps += 1
                    if self.core.ready:
                        # Told before the lines that follow the gap, once per broker epoch.
                        self.apply(self.core.messages_lost())
                elif publisher == REPLAY:
                    self.apply(self.core.on_bus(payload[0], payload[1], replay=True))
                else:
                    effects = self.core.on_bus(publisher, payload)
                    if len(effects) > 1 and publisher == self.worker_id:
                        self.log_refusals(effects)
                    self.apply(effects)
                    if self.handoff is not None:
                        self.handoff.after_batch(publisher, payload)  # an upgrade's cut point?
            if self.core.undelivered > undelivered:
                self.counters.bus_gaps += self.core.undelivered - undelivered
                log.warning("worker %d: bus gap detected: %d events arrived before the roster snapshot "
                            "and were not delivered", self.worker_no, self.core.undelivered - undelivered)

    def log_refusals(self, effects: list[C.Effect]) -> None:
        """Log each client the broker refused by a client limit (max_clients, max_clients_per_ip):
        its error line followed by its Close."""
        for before, e in zip(effects, effects[1:], strict=False):
            if (type(e) is C.Close and type(before) is C.Send and before.conn == e.conn
                    and before.data.startswith(b"*** Error: ")):
                c = self.by_conn.get(e.conn)
                log.info("worker %d: refusing %s (conn %d): %s", self.worker_no, c.ip if c else "?", e.conn,
                         before.data.decode(errors="replace").strip())

    # -- housekeeping, reload, stop -----------------------------------------------------------

    def housekeeping(self, now: float) -> None:
        while self.lingering and self.lingering[0][0] <= now:
            _, conn = heapq.heappop(self.lingering)
            c = self.by_conn.get(conn)
            if c is not None and c.closing:
                log.info("worker %d: closing %s (conn %d) with %d bytes it did not read", self.worker_no,
                         c.ip, c.conn, c.outlen)
                self.close(c, "")
        if self.listen_resume and now >= self.listen_resume and self.listener is not None:
            self.listen_resume = 0.0
            self.ep.modify(self.listener.fileno(), EPOLLIN)
        if now - self.last_beat >= HEARTBEAT_EVERY:
            self.beat(S.STOPPING if self.stopping is not None else S.READY)
            if self.cfg.idle_timeout > 0:
                self.reap_idle(now)
            if self.stopping is None and os.getppid() != self.parent_pid:
                # Killed outright, the supervisor cannot stop us: do it ourselves, or we would
                # hold the port and keep serving without anyone watching.
                log.error("worker %d: the supervisor (pid %d) is gone; stopping", self.worker_no, self.parent_pid)
                self.stop_signal = signal.SIGTERM
        if self.core.syncing and now - self.last_hello > 1.0:
            self.bus.send_control([self.core.hello()])
            self.last_hello = now
        if now - self.last_publish >= PING_EVERY and self.stopping is None:
            self.outgoing.append((PING,))
        if self.outgoing:
            self.publish()
        if self.reload_pending:
            self.reload_pending = False
            self.reload()
        if self.handoff_requested:
            self.handoff_requested = False
            if self.handoff is None:
                self.handoff = migrate.Giver.start(self)
        if self.handoff is not None:
            self.handoff.tick(now)
        if self.draining_until is not None and (not self.bus.order.unacked or now >= self.draining_until):
            self.say_goodbye()

    def reap_idle(self, now: float) -> None:
        limit = self.cfg.idle_timeout
        for c in [c for c in self.clients.values() if now - c.last_rx > limit and not c.closing]:
            log.info("worker %d: disconnecting %s (conn %d): idle for %.0f s", self.worker_no, c.ip,
                     c.conn, now - c.last_rx)
            self.room.pop(c.conn, None)
            self.queue(c, IDLE_LINE)
            self.apply(self.core.disconnect(c.conn, "idle"))
            self.close_when_sent(c)

    def beat(self, state: int) -> None:
        self.last_beat = time.monotonic()
        k = self.counters
        k.state, k.heartbeat, k.config_version = state, self.last_beat, self.config_version
        k.clients, k.connections = len(self.room), len(self.clients)
        self.stats.write_slot(self.slot, k)

    def reload(self) -> None:
        """Apply live settings written by the supervisor to RUNTIME_DIR/config.json."""
        path = os.path.join(self.runtime_dir, "config.json")
        try:
            with open(path) as fh:
                doc = json.load(fh)
            values, version = doc["values"], int(doc["version"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.error("worker %d: cannot read %s for reload: %s", self.worker_no, path, exc)
            return
        new = Config(values={**self.cfg.values, **values}, source=path)
        live, _restart = self.cfg.live_changes(new)
        self.cfg = Config(values={**self.cfg.values, **live}, source=path)
        self.core.settings = self._chat_settings(self.cfg)
        Client.limits = (self.cfg.max_line_bytes, self.cfg.flood_rate, self.cfg.flood_burst)
        for c in self.clients.values():
            if c._reader is not None:
                c._reader.max_line_bytes = self.cfg.max_line_bytes
            if c._bucket is not None:
                c._bucket.configure(self.cfg.flood_rate, self.cfg.flood_burst)
        logging.getLogger("chatcluster").setLevel(self.cfg.log_level.upper())
        log.info("worker %d: reloaded %s", self.worker_no, ", ".join(sorted(live)) or "nothing changed")
        self.config_version = version
        self.beat(S.STOPPING if self.stopping is not None else S.READY)  # tells the supervisor at once

    def begin_stop(self, now: float) -> None:
        """TERM: a graceful stop within graceful_timeout; QUIT: the same within a second.

        First phase: stop accepting and reading, and wait until a marker published now comes
        back from the bus. Every batch sequenced before it (lines other workers' clients sent
        before the stop among them) is then queued for our clients. Second phase
        (`say_goodbye`): they leave the room, get the notice after their pending output, and
        are closed once it is all sent.
        """
        signum, self.stop_signal = self.stop_signal, 0
        grace = self.cfg.graceful_timeout if signum == signal.SIGTERM else 1.0
        # The supervisor kills what is left `grace` seconds after its signal: be done before it.
        deadline = now + max(grace - 0.5, grace * 0.75)
        if self.stopping is not None:
            self.stopping = min(self.stopping, deadline)
            if self.draining_until is not None:
                self.draining_until = min(self.draining_until, now + (deadline - now) / 2)
            return
        self.stopping = deadline
        log.info("worker %d stopping (%s), %d clients, %.1f s to drain", self.worker_no,
                 signal.Signals(signum).name, len(self.clients), deadline - now)
        if self.listener is not None:
            self.ep.unregister(self.listener.fileno())
            self.listener.close()
            self.listener = None
        self.draining_until = now + min(1.0, (deadline - now) / 2)
        self.outgoing.append((PING,))
        self.publish()
        self.beat(S.STOPPING)

    def say_goodbye(self) -> None:
        self.draining_until = None
        for c in list(self.clients.values()):
            self.room.pop(c.conn, None)
            self.apply(self.core.disconnect(c.conn, "server shutting down"))
            if not c.closing:
                self.queue(c, SHUTDOWN_LINE)
                c.closing = True
        if self.outgoing:
            self.publish()
        self.flush_dirty()

    def finish(self) -> None:
        for c in list(self.clients.values()):
            self.close(c, "server shutting down")
        if self.outgoing:
            self.publish()
        self.beat(S.FREE)  # the final figures, and the slot is free
        self.bus.close()
        self.ctx.term()
        log.info("worker %d exits", self.worker_no)


def _open_spare() -> int | None:
    try:
        return os.open(os.devnull, os.O_RDONLY)
    except OSError:
        return None


def main(cfg: Config, worker_no: int, worker_id: str, slot: int, generation: int, runtime_dir: str,
         stats: S.StatsFile, succeeds: tuple[str, int] | None = None) -> int:
    worker = Worker(cfg, worker_no, worker_id, slot, generation, runtime_dir, stats, succeeds)
    worker.run()
    return 0
