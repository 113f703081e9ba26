"""The event loop of one worker process: accept, read, write, and the bus; I/O, not policy.

One `select.epoll` watches the worker's own SO_REUSEPORT listening socket
(level-triggered, so a pending connection is never forgotten), its clients
(edge-triggered for reading and writing, registered once), and the bus
socket's FD. Each pass of the loop reads the readable clients, hands their
lines to the chat core (`chat`), publishes what they said as one bus batch,
drains the bus, and gives the clients with pending output one `send()` each.
The rules live elsewhere, each in a module of its own: the chat rules in
`chat`, carrying out their effects in `dispatch`, output queues and the send
queue limit in `output`, descriptor exhaustion in `shedding`, the phases of a
stop in `stopping`, the settings in `settings`, and who is connected in
`registry`. Handing clients over in an upgrade is `migrate`'s, which plugs in
through the `HandoffHooks` it implements; this module does not import it.
"""

from __future__ import annotations

import errno
import heapq
import logging
import os
import select
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any, Protocol

import zmq

from . import chat as C
from . import dispatch
from . import events as E
from . import stats as S
from .backpressure import Backpressure
from .bus import BusClient, Endpoints
from .client import Client, bucket_of, reader_of
from .config import Config
from .output import Output
from .procs import EXIT_BOOT_FAILED
from .protocol import Line, LineReader, Notice, TokenBucket, encode_line, encode_notice
from .registry import Registry
from .settings import LiveSettings, read_live_config
from .shedding import LISTEN_PAUSE, Shedder
from .stopping import SHUTDOWN_LINE, Stop
from .telnet import greeting as telnet_greeting
from .wire import GAP, Outbox

log = logging.getLogger("chatcluster.worker")

RECV_SIZE = 65536
UNLIMITED = sys.maxsize  # the line budget without flood control
# Bytes read from one client per loop pass. A client that sends as fast as TCP allows would
# otherwise be read until EAGAIN, which may never come: its worker's loop would stop serving
# everyone else (and its heartbeat). A client with input left over goes on the `ready` list
# and is read again in the next pass, after the others (edge-triggered epoll will not say it
# again); TCP pushes back on it meanwhile.
READ_BUDGET = RECV_SIZE
HEAVY_LEAST = 4096  # a heavy sender waits until its share allows at least this much
LAGGING = 2.0  # a client behind for longer than this is a slow reader, not a sign of congestion
ACCEPTS_PER_WAKE = 256
BUS_BATCHES_PER_PASS = 512
# Clients given their output per loop pass. A broadcast to a large room is sent in slices, and
# between two slices the loop reads its clients and drains the bus: a line said meanwhile is
# published at once and joins the output of the clients not served yet, instead of waiting
# for the whole room to be served first (which made latency a multiple of the room's size).
FLUSH_SLICE = 256
HEARTBEAT_EVERY = 0.25
PING_EVERY = 0.5
PRUNE_EVERY = 10.0
# A closing client gets this long to take what is queued for it: one that never reads
# must not keep its descriptor for ever.
CLOSE_LINGER = 10.0

EPOLLIN, EPOLLOUT, EPOLLET = select.EPOLLIN, select.EPOLLOUT, select.EPOLLET
EPOLLERR, EPOLLHUP, EPOLLRDHUP = select.EPOLLERR, select.EPOLLHUP, select.EPOLLRDHUP
CLIENT_EVENTS = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET
READ_EVENTS = EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR

IDLE_LINE = encode_line("*** Error: disconnected: idle for too long")


class Handoff(Protocol):
    """A giver or a taker of an upgrade (see migrate), as the loop drives it."""

    fds: set[int]

    def begin(self) -> None: ...

    def on_fd(self, fd: int) -> None: ...

    def tick(self, now: float) -> None: ...

    def published(self, events: list[E.Event]) -> None: ...

    def after_batch(self, publisher: str, events: list[E.Event]) -> None: ...


class HandoffHooks(Protocol):
    """How an upgrade plugs into the worker: implemented by migrate, passed in by the process entry."""

    def giver(self, worker: Worker) -> Handoff | None:
        """Hand everything to our successor (USR2); None if there is nobody to hand to."""

    def taker(self, worker: Worker, source: str, source_pid: int) -> Handoff:
        """At boot: take over the listener and clients of worker `source` (pid `source_pid`)."""


class Worker:
    def __init__(self, cfg: Config, worker_no: int, worker_id: str, slot: int, generation: int,
                 runtime_dir: str, stats: S.StatsFile, succeeds: tuple[str, int] | None = None,
                 hooks: HandoffHooks | None = None) -> None:
        self.settings = LiveSettings(cfg)
        self.worker_no = worker_no
        self.worker_id = worker_id
        self.slot = slot
        self.generation = generation
        self.runtime_dir = runtime_dir
        self.stats = stats
        self.started = time.time()
        # This worker's figures, written to its stats slot by beat(): they count on from what the
        # workers before it in the same slot counted, so the cluster's counters never go backwards.
        self.counters = stats.resume_slot(slot, os.getpid(), worker_no, generation, self.started)
        self.ctx: zmq.Context[Any] = zmq.Context()
        self.bus = BusClient(self.ctx, Endpoints.in_dir(runtime_dir), worker_id, self.counters)
        self.registry: Registry[Client, C.LocalUser] = Registry(self.settings.default_room)
        self.core = C.ChatCore(worker_id, self.settings, registry=self.registry)
        self.output = Output(self.registry, self.settings, self.close, worker_no, self.counters)
        self.shedder = Shedder(worker_no, self.counters)
        self.ep = select.epoll()
        self.listener: socket.socket | None = None
        self.outgoing = Outbox()  # what this loop pass publishes, by route
        self.timers: list[tuple[float, int]] = []  # (when, conn) for throttled clients
        self.ready: list[Client] = []  # clients that used their read budget with input left over
        self.ready_conns: set[int] = set()
        self.parked: list[Client] = []  # heavy senders waiting for their share (see backpressure)
        self.backpressure = Backpressure(worker_id)
        self.heavy: set[int] = set()  # conns of clients that used their whole read budget last time
        self.pass_left = 0  # bytes all clients together may still be read for in this pass
        self.bus_behind_since = 0.0  # when the bus was last left undrained at the end of a pass (0: drained)
        self.lingering: list[tuple[float, int]] = []  # (deadline, conn) for closing clients
        self.listen_resume = 0.0  # when a listener paused by the shedder polls again
        self.last_publish = 0.0
        self.last_beat = 0.0
        self.last_hello = 0.0
        self.last_prune = 0.0
        self.stop: Stop | None = None
        self.stop_signal = 0
        self.reload_pending = False
        self.parent_pid = os.getppid()
        self.config_version = 0  # the supervisor's reload count we last applied, shown in our stats slot
        # Upgrades (see migrate.py): `succeeds` is the (id, pid) of the worker whose listener and
        # clients this one takes over; `handoff` is the giver or taker while that goes on.
        self.succeeds = succeeds
        self.hooks = hooks
        self.handoff: Handoff | None = None
        self.handoff_requested = False
        self.frozen = False  # a giver past its cut point: read nothing more
        self.collect: Callable[[C.Broadcast], None] | None = None  # a taker copying its rooms' traffic
        self.sink = _Sink(self)
        self.greeting = telnet_greeting(cfg.telnet_negotiation)

    # -- boot ---------------------------------------------------------------------------------

    def boot(self, timeout: float = 15.0) -> None:
        """Prove the bus path end to end (Hello, answered in order), then open the listening socket."""
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
        if self.succeeds is not None and self.hooks is not None:
            # An upgrade: the predecessor hands us its listening socket (its queue of waiting
            # connections with it), then its clients.
            self.handoff = self.hooks.taker(self, *self.succeeds)
            self.handoff.begin()
        else:
            self.listen()
        self.ep.register(self.bus.fd, EPOLLIN | EPOLLET)
        self.beat(S.READY)
        log.info("worker %d (%s) ready on %s:%d", self.worker_no, self.worker_id, self.settings.host,
                 self.settings.port)

    def open_listener(self) -> socket.socket:
        host, port = self.settings.host, self.settings.port
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            sock.close()
            hint = ("; another program holds the port: stop it or choose another with --port"
                    if exc.errno == errno.EADDRINUSE else "")
            log.error("worker %d cannot listen on %s:%d: %s%s", self.worker_no, host, port, exc.strerror, hint)
            raise SystemExit(EXIT_BOOT_FAILED) from None
        sock.listen(self.settings.backlog)
        sock.setblocking(False)
        return sock

    def listen(self, sock: socket.socket | None = None) -> None:
        """Accept on `sock` (a listener handed over by a predecessor), or on a new one of our own."""
        self.listener = sock if sock is not None else self.open_listener()
        self.ep.register(self.listener.fileno(), EPOLLIN)

    def unlisten(self) -> socket.socket | None:
        """Stop accepting; the listener is returned, not closed (a giver hands it on)."""
        sock, self.listener = self.listener, None
        if sock is not None:
            self.ep.unregister(sock.fileno())
        return sock

    # -- the loop -----------------------------------------------------------------------------

    def run(self) -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, self._on_stop_signal)
        signal.signal(signal.SIGQUIT, self._on_stop_signal)
        signal.signal(signal.SIGHUP, self._on_reload_signal)
        signal.signal(signal.SIGUSR2, self._on_handoff_signal)
        self.boot()
        while not self.step(self._poll_timeout()):
            pass
        self.finish()

    def step(self, timeout: float, serve_handoff: bool = True) -> bool:
        """One pass of the loop; True when the worker has stopped. (`serve_handoff=False` leaves the
        upgrade's sockets unread for a pass, which is how tests reproduce rare interleavings.)"""
        try:
            events = self.ep.poll(timeout)
        except InterruptedError:
            events = []
        began = time.monotonic()
        self.output.pass_no += 1
        self.pass_left = self.backpressure.pass_budget()
        by_fd = self.registry.fd_index.get
        output = self.output
        for fd, ev in events:
            c = by_fd(fd)
            if c is None:
                # The listener can change hands during an upgrade: compare with the current one.
                if self.listener is not None and fd == self.listener.fileno():
                    self.accept()
                elif serve_handoff and self.handoff is not None and fd in self.handoff.fds:
                    self.handoff.on_fd(fd)
                continue
            if ev & READ_EVENTS and not c.throttled:
                self.read(c)
            if ev & EPOLLOUT and c.out is not None and by_fd(c.fd) is c:
                output.flush(c)
        if self.ready:
            self.read_leftovers()
        if self.outgoing:
            self.publish()
        if self.bus.readable():
            self.handle_bus()
        if self.outgoing:
            self.publish()
        if output.dirty:
            output.flush_dirty(FLUSH_SLICE)
        now = time.monotonic()
        if self.timers and self.timers[0][0] <= now:
            self.run_timers(now)
        if self.bus.readable():
            if not self.bus_behind_since:
                self.bus_behind_since = now
        else:
            self.bus_behind_since = 0.0
        if self.output.stuck or self.parked or self.bus_behind_since or self.backpressure.active:
            self.update_pressure(now)
        self.housekeeping(now)
        if self.stop_signal:
            self.begin_stop(now)
        self.output.settle()
        self.counters.observe_loop(time.monotonic() - began)
        return self.stop is not None and self.stop.over(now, len(self.registry))

    def _poll_timeout(self) -> float:
        # Work left over from the last pass is never left waiting for an event that will not come.
        if self.ready and not self.backpressure.calm:
            return 0.001  # the pass's read budget is small under pressure: let the clients drain a little
        if self.output.dirty or self.outgoing or self.ready or self.bus.readable():
            return 0.0
        timeout = 0.01 if self.parked else HEARTBEAT_EVERY  # parked senders get their share soon
        if self.timers:
            timeout = min(timeout, max(0.0, self.timers[0][0] - time.monotonic()))
        return timeout

    def _on_stop_signal(self, signum: int, _frame: Any) -> None:
        self.stop_signal = signum

    def _on_reload_signal(self, _signum: int, _frame: Any) -> None:
        self.reload_pending = True

    def _on_handoff_signal(self, _signum: int, _frame: Any) -> None:
        self.handoff_requested = True  # an upgrade: hand everything to our successor

    # -- clients: setup and teardown ----------------------------------------------------------

    def attach(self, sock: socket.socket, ip: str, now: float, reader: LineReader | None = None,
               bucket: TokenBucket | None = None) -> Client:
        """Make a connected socket one of our clients: accepted here, or handed over by a predecessor
        with its line reader and flood-control bucket."""
        sock.setblocking(False)
        # A telnet Synch is sent as urgent data: inline, it stays in the byte stream (and the telnet
        # layer drops its DM) instead of Linux taking one byte out of the next line.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_OOBINLINE, 1)
        c = Client(sock, self.registry.new_conn(), sys.intern(ip), reader, bucket, now)
        self.registry.add(c)
        self.ep.register(c.fd, CLIENT_EVENTS)
        return c

    def detach(self, c: Client) -> bool:
        """Take a client out of every structure of the worker; False if it was not ours any more.

        The socket is left open for the caller: close() closes it, a giver hands it on (its number
        must not be reused while the successor does not have it yet).
        """
        if not self.registry.remove(c):
            return False
        self.heavy.discard(c.conn)
        self.ready_conns.discard(c.conn)
        # Unregister before close: epoll tracks the open file, not the number, so an fd closed
        # while registered could keep reporting events under a number the kernel reuses.
        try:
            self.ep.unregister(c.fd)
        except OSError:
            pass
        self.output.forget(c)
        return True

    def close(self, c: Client, reason: str) -> None:
        """The connection is over: forget it, close the socket, and let the chat core tell the others."""
        if not self.detach(c):
            return
        why = c.ended or ("reset" if reason == "connection lost" else
                          "shutdown" if reason == "server shutting down" else "quit")
        if why.startswith("refused_"):
            setattr(self.counters, why, getattr(self.counters, why) + 1)
        else:
            setattr(self.counters, "closed_" + why, getattr(self.counters, "closed_" + why) + 1)
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
        self.apply(self.core.disconnect(c.conn, reason))

    def close_when_sent(self, c: Client) -> None:
        """Close `c` once its queued output is sent, or after CLOSE_LINGER seconds at most."""
        c.closing = True
        self.registry.leave_room(c.conn)
        if c.out is None:
            self.close(c, "")
        else:
            heapq.heappush(self.lingering, (time.monotonic() + CLOSE_LINGER, c.conn))

    def accept(self) -> None:
        assert self.listener is not None
        s = self.settings
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
                    if not self.shedder.shed_one(self.listener, exc, now):
                        # Nothing to free: rest the listener rather than spin on a connection we cannot take.
                        self.ep.modify(self.listener.fileno(), 0)
                        self.listen_resume = now + LISTEN_PAUSE
                    return
                if exc.errno in (errno.ECONNABORTED, errno.EPROTO, errno.EPERM):
                    continue
                raise
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if s.send_buffer_bytes:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, s.send_buffer_bytes)
            if s.tcp_keepalive:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, s.keepalive_idle)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, s.keepalive_interval)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, s.keepalive_count)
            c = self.attach(sock, addr[0], now)
            c.throttled = True  # until its welcome line: see entered()
            if self.greeting:
                self.output.queue(c, self.greeting)  # IAC DO BINARY, CR NUL: before anything else
            self.counters.accepted += 1
            if self.stop is not None:
                c.ended = "shutdown"
                self.output.queue(c, SHUTDOWN_LINE)
                c.closing = True
                continue
            self.apply(self.core.connect(c.conn, c.ip, wall))

    # -- clients: input -----------------------------------------------------------------------

    def read(self, c: Client) -> None:
        """Read until EAGAIN, parsing no more lines than the client's flood budget allows.

        A client out of tokens keeps the unparsed rest of its last read in `pending` (at most
        RECV_SIZE bytes) and is not read again until its timer fires, so TCP pushes back on
        it and none of its lines is lost or reordered. Every line counts, commands too.
        """
        if c.closing or c.throttled or self.frozen or (self.stop is not None and self.stop.draining):
            return
        s = self.settings
        limited = s.flood_rate > 0
        reader = reader_of(c, s)
        recv = c.sock.recv
        # A heavy sender (one that used its whole budget last time) gets what the heavy senders'
        # share allows now (see backpressure); everyone else a full budget.
        heavy = c.conn in self.heavy
        budget_left = min(READ_BUDGET, self.backpressure.allowance(time.monotonic())) if heavy else READ_BUDGET
        if heavy and budget_left < HEAVY_LEAST:
            self.read_later(c)
            return
        # What all clients together may still send in this pass (much less under pressure).
        if self.pass_left <= 0:
            self.read_later(c)
            return
        budget_left = min(budget_left, self.pass_left)
        while True:
            if c.pending:
                data, c.pending = c.pending, b""
            elif budget_left <= 0:
                if self.pass_left > 0:
                    self.heavy.add(c.conn)  # it used its own budget, not just the pass's
                self.read_later(c)  # its turn is over for this pass; the rest waits in the kernel
                return
            else:
                try:
                    data = recv(RECV_SIZE if budget_left >= RECV_SIZE else budget_left)
                except BlockingIOError:
                    self.heavy.discard(c.conn)
                    break
                except OSError:
                    self.close(c, "connection lost")
                    return
                if not data:
                    c.eof = True
                    break
                budget_left -= len(data)
                self.pass_left -= len(data)
                if heavy:
                    self.backpressure.spend(len(data))
                c.last_rx = time.monotonic()
            now = time.monotonic()
            budget = bucket_of(c, s, now).available(now) if limited else UNLIMITED
            if budget == 0:
                c.pending = data
                c.throttled = True
                heapq.heappush(self.timers, (now + bucket_of(c, s, now).wait(now), c.conn))
                return
            events, used, reply = reader.receive(data, budget)
            if reply:
                # Telnet answers go before the events: a hint must follow the WILL TIMING-MARK, or
                # the client throws it away with everything before the mark.
                self.output.queue(c, reply)
            if used < len(data):
                c.pending = data[used:]
            if events:
                self.process(c, events)
                if c.closing or c not in self.registry:
                    return
        if c.eof:
            self.end_of_input(c)

    def read_later(self, c: Client) -> None:
        """Read `c` again in a later pass: the next one, or, for a heavy sender without a share
        left, once the share allows (parked off the ready list, so the loop does not spin)."""
        if c.conn in self.ready_conns:
            return
        self.ready_conns.add(c.conn)
        if c.conn in self.heavy and self.backpressure.allowance(time.monotonic()) < HEAVY_LEAST:
            self.parked.append(c)
        else:
            self.ready.append(c)

    def read_leftovers(self) -> None:
        """Read the clients that had input left at the end of their turn, in the order they came."""
        ready, self.ready = self.ready, []
        for c in ready:
            self.ready_conns.discard(c.conn)
        for c in ready:
            if c in self.registry and not c.throttled:
                self.read(c)

    def process(self, c: Client, events: list[Any]) -> None:
        """Hand parsed lines to the chat core; read() parsed no more than there are tokens for."""
        core = self.core
        conn = c.conn
        now = time.monotonic()
        s = self.settings
        bucket = bucket_of(c, s, now) if s.flood_rate > 0 else None
        for ev in events:
            if bucket is not None:
                bucket.take(now)
            if type(ev) is Notice:
                self.output.queue(c, encode_notice(ev))  # for this client alone (AYT, the Ctrl-C hint)
                continue
            if type(ev) is Line:
                if not ev.text.strip():
                    continue
                self.counters.lines_received += 1
                self.apply(core.line(conn, ev.text, time.time()))
            else:
                self.apply(core.line_too_long(conn, ev.limit))
            if c.closing or c not in self.registry:
                return

    def end_of_input(self, c: Client) -> None:
        """The client shut its side: its lines are handled; send what is queued, then close."""
        c.ended = c.ended or "quit"
        self.registry.leave_room(c.conn)
        self.apply(self.core.disconnect(c.conn, ""))
        if self.registry.user(c.conn) is not None:
            return  # some of its lines wait for the bus (a /nick in flight): the core closes it after them
        self.close_when_sent(c)

    def run_timers(self, now: float) -> None:
        while self.timers and self.timers[0][0] <= now:
            _, conn = heapq.heappop(self.timers)
            c = self.registry.by_conn(conn)
            if c is None or not c.throttled:
                continue
            c.throttled = False
            # The edge that said "readable" was consumed while throttled: read now.
            self.read(c)

    # -- the chat core's effects (through _Sink, see dispatch) ---------------------------------

    def apply(self, effects: list[C.Effect]) -> None:
        dispatch.apply(effects, self.registry, self.sink)

    def broadcast(self, b: C.Broadcast, recipients: Iterable[tuple[int, Client]]) -> None:
        self.output.broadcast(b.data, b.exclude, recipients)
        if self.collect is not None:
            self.collect(b)  # clients on their way here from our predecessor get it too

    def collecting(self, collect: Callable[[C.Broadcast], None] | None) -> None:
        """A taker copies what is broadcast to its rooms for the clients on their way here (see migrate)."""
        self.collect = collect
        self.core.collecting = collect is not None

    def entered(self, c: Client) -> None:
        if c.throttled and not c.pending:
            # Welcomed: read what it sent meanwhile (accept() held it back).
            heapq.heappush(self.timers, (time.monotonic(), c.conn))

    def bus_restarted(self, control: list[E.Event]) -> None:
        resent = self.bus.restarted(control)
        log.warning("worker %d: bus broker restarted; resyncing the roster, resent %d batches",
                    self.worker_no, resent)
        self.last_hello = time.monotonic()

    def bus_trouble(self, kind: str, text: str) -> None:
        if kind == GAP:
            self.counters.bus_gaps += 1
        log.warning("worker %d: bus %s detected: %s", self.worker_no, kind, text)

    def batch_done(self, publisher: str, events: list[E.Event], effects: list[C.Effect]) -> None:
        if len(effects) > 1 and publisher == self.worker_id:
            self.log_refusals(effects)
        if publisher != self.worker_id:
            for ev in events:
                if type(ev) is E.Pressure:
                    self.backpressure.heard(ev, time.monotonic())
                elif type(ev) is E.Gone:
                    self.backpressure.gone(ev.worker)
        if self.handoff is not None:
            self.handoff.after_batch(publisher, events)  # an upgrade's cut point?

    # -- bus ----------------------------------------------------------------------------------

    def publish(self) -> None:
        events = self.bus.publish_all(self.outgoing)
        self.last_publish = time.monotonic()
        if self.handoff is not None:
            self.handoff.published(events)

    def leave_bus(self) -> None:
        """No bus any more (the supervisor, and with it our broker, is gone): see BusClient.detach."""
        try:
            self.ep.unregister(self.bus.fd)
        except OSError:
            pass
        self.bus.detach()

    def handle_bus(self) -> None:
        core = self.core
        budget = self.backpressure.bus_budget()
        for _ in range(8):
            if budget <= 0:
                break  # the rest in the next pass (the loop polls with timeout 0 meanwhile)
            self.bus.oldest_stamp = 0
            items = self.bus.drain(BUS_BATCHES_PER_PASS, budget)
            if not items:
                break
            self.output.stamp = self.bus.oldest_stamp
            budget -= self.bus.drained_bytes
            undelivered, unreadable = core.undelivered, core.unreadable
            core.clock = time.time()  # the time of the lines, for the rooms' history
            dispatch.feed_bus(core, items, self.registry, self.sink, self.bus.order)
            if core.undelivered > undelivered:
                self.counters.bus_gaps += core.undelivered - undelivered
                log.warning("worker %d: bus gap detected: %d events arrived before the roster snapshot "
                            "and were not delivered", self.worker_no, core.undelivered - undelivered)
            if core.unreadable > unreadable:
                log.warning("worker %d: %d bus events of a kind or shape this code does not know were "
                            "ignored", self.worker_no, core.unreadable - unreadable)

    def log_refusals(self, effects: list[C.Effect]) -> None:
        """Log each client the broker refused by a client limit (max_clients, max_clients_per_ip):
        its error line followed by its Close."""
        for before, e in zip(effects, effects[1:], strict=False):
            if type(e) is C.Close and e.why.startswith("refused_") and type(before) is C.Send:
                c = self.registry.by_conn(e.conn)
                log.info("worker %d: refusing %s (conn %d): %s", self.worker_no, c.ip if c else "?", e.conn,
                         before.data.decode(errors="replace").strip())

    # -- housekeeping, reload, stop -----------------------------------------------------------

    def update_pressure(self, now: float) -> None:
        """Tell the cluster whether our clients keep up; give parked heavy senders their turn."""
        stuck = self.output.lagging_bytes(now, LAGGING) if self.output.stuck else 0
        behind = now - self.bus_behind_since if self.bus_behind_since else 0.0
        for ev in self.backpressure.tick(now, stuck, behind):
            self.outgoing.append(ev)
        if self.parked and self.backpressure.allowance(now) >= HEAVY_LEAST:
            parked, self.parked = self.parked, []
            for c in parked:
                self.ready_conns.discard(c.conn)
                if c in self.registry:
                    self.read_later(c)

    def housekeeping(self, now: float) -> None:
        while self.lingering and self.lingering[0][0] <= now:
            _, conn = heapq.heappop(self.lingering)
            c = self.registry.by_conn(conn)
            if c is not None and c.closing:
                log.info("worker %d: closing %s (conn %d) with %d bytes it did not read", self.worker_no,
                         c.ip, c.conn, c.outlen)
                self.close(c, "")
        if self.listen_resume and now >= self.listen_resume and self.listener is not None:
            self.listen_resume = 0.0
            self.ep.modify(self.listener.fileno(), EPOLLIN)
        if now - self.last_beat >= HEARTBEAT_EVERY:
            self.beat(S.STOPPING if self.stop is not None else S.READY)
            if self.settings.idle_timeout > 0:
                self.reap_idle(now)
            if self.stop is None and os.getppid() != self.parent_pid:
                # Killed outright, the supervisor cannot stop us: do it ourselves, or we would
                # hold the port and keep serving without anyone watching.
                log.error("worker %d: the supervisor (pid %d) is gone; leaving the bus and stopping",
                          self.worker_no, self.parent_pid)
                self.leave_bus()
                self.stop_signal = signal.SIGTERM
        if self.core.syncing and now - self.last_hello > 1.0:
            self.bus.send_control([self.core.hello()])
            self.last_hello = now
        if now - self.last_prune >= PRUNE_EVERY:
            self.last_prune = now
            self.bus.order.prune(self.registry.gens())  # the numbering of rooms we have left
            self.core.prune_history()
        if now - self.last_publish >= PING_EVERY and self.stop is None:
            self.outgoing.append(E.Ping())
        if self.outgoing:
            self.publish()
        if self.reload_pending:
            self.reload_pending = False
            self.reload()
        if self.handoff_requested:
            self.handoff_requested = False
            if self.handoff is None and self.hooks is not None:
                self.handoff = self.hooks.giver(self)
        if self.handoff is not None:
            self.handoff.tick(now)
        if self.stop is not None and self.stop.time_for_goodbye(now, not self.bus.order.unacked):
            self.say_goodbye()

    def reap_idle(self, now: float) -> None:
        limit = self.settings.idle_timeout
        for c in [c for c in self.registry.clients() if now - c.last_rx > limit and not c.closing]:
            log.info("worker %d: disconnecting %s (conn %d): idle for %.0f s", self.worker_no, c.ip,
                     c.conn, now - c.last_rx)
            self.registry.leave_room(c.conn)
            c.ended = "idle"
            self.output.queue(c, IDLE_LINE)
            self.apply(self.core.disconnect(c.conn, "idle"))
            self.close_when_sent(c)

    def beat(self, state: int) -> None:
        self.last_beat = time.monotonic()
        k = self.counters
        k.state, k.heartbeat, k.config_version = state, self.last_beat, self.config_version
        k.clients, k.connections = self.registry.room_size(), len(self.registry)
        self.stats.write_slot(self.slot, k)

    def reload(self) -> None:
        """Apply the live settings the supervisor wrote to RUNTIME_DIR/config.json."""
        try:
            values, version, path = read_live_config(self.runtime_dir)
        except (OSError, ValueError) as exc:
            log.error("worker %d: cannot read the running configuration for reload: %s", self.worker_no, exc)
            return
        live = self.settings.reload(values, path)
        s = self.settings
        # A new buffer size for the sockets already open too (0, autotuning, cannot be handed
        # back to a socket whose size was once set: it applies to new connections only).
        sndbuf = s.send_buffer_bytes if "send_buffer_bytes" in live else 0
        for c in self.registry.clients():
            if c.reader is not None:
                c.reader.max_line_bytes = s.max_line_bytes
            if c.bucket is not None:
                c.bucket.configure(s.flood_rate, s.flood_burst)
            if sndbuf:
                try:
                    c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
                except OSError:
                    pass  # a connection being reset: it is closed soon enough
        logging.getLogger("chatcluster").setLevel(s.log_level.upper())
        log.info("worker %d: reloaded %s", self.worker_no, ", ".join(sorted(live)) or "nothing changed")
        self.config_version = version
        self.beat(S.STOPPING if self.stop is not None else S.READY)  # tells the supervisor at once

    def begin_stop(self, now: float) -> None:
        """TERM: a graceful stop within graceful_timeout; QUIT: the same within a second (see stopping)."""
        signum, self.stop_signal = self.stop_signal, 0
        if self.stop is not None:
            self.stop.hurry(signum, now, self.settings.graceful_timeout)
            return
        self.stop = Stop(signum, now, self.settings.graceful_timeout)
        log.info("worker %d stopping (%s), %d clients, %.1f s to drain", self.worker_no,
                 signal.Signals(signum).name, len(self.registry), self.stop.deadline - now)
        listener = self.unlisten()
        if listener is not None:
            listener.close()
        self.outgoing.append(E.Ping())  # the marker: when it is back, the bus has caught up
        self.publish()
        self.beat(S.STOPPING)

    def exit_after_handoff(self) -> None:
        """An upgrade took our clients: flush the ones that were leaving anyway, then exit."""
        self.stop = Stop.after_handoff(time.monotonic(), self.settings.graceful_timeout)

    def say_goodbye(self) -> None:
        for c in list(self.registry.clients()):
            self.registry.leave_room(c.conn)
            self.apply(self.core.disconnect(c.conn, "server shutting down"))
            if not c.closing:
                c.ended = "shutdown"
                self.output.queue(c, SHUTDOWN_LINE)
                c.closing = True
        if self.outgoing:
            self.publish()
        self.output.flush_dirty()

    def finish(self) -> None:
        for c in list(self.registry.clients()):
            self.close(c, "server shutting down")
        if self.outgoing:
            self.publish()
        self.beat(S.FREE)  # the final figures, and the slot is free
        self.bus.close()
        self.ctx.term()
        self.shedder.close()
        log.info("worker %d exits", self.worker_no)


class _Sink:
    """The worker as the dispatch.Sink of its chat core's effects and of the bus's markers.

    A separate object because the Sink's names mean other things on the worker: `publish`
    there sends the pending batch, `close` closes a connection at once.
    """

    __slots__ = ("w",)

    def __init__(self, w: Worker) -> None:
        self.w = w

    def publish(self, event: E.Event, route: str) -> None:
        self.w.outgoing.append(event, route)

    def send(self, c: Client, data: bytes) -> None:
        self.w.output.queue(c, data)

    def broadcast(self, b: C.Broadcast, recipients: Iterable[tuple[int, Client]]) -> None:
        self.w.broadcast(b, recipients)

    def entered(self, c: Client) -> None:
        self.w.entered(c)

    def close(self, c: Client, why: str) -> None:
        if not c.ended:
            c.ended = why
        self.w.close_when_sent(c)

    def bus_restarted(self, control: list[E.Event]) -> None:
        self.w.bus_restarted(control)

    def bus_trouble(self, kind: str, text: str) -> None:
        self.w.bus_trouble(kind, text)

    def batch_done(self, publisher: str, events: list[E.Event], effects: list[C.Effect]) -> None:
        self.w.batch_done(publisher, events, effects)


def main(cfg: Config, worker_no: int, worker_id: str, slot: int, generation: int, runtime_dir: str,
         stats: S.StatsFile, succeeds: tuple[str, int] | None = None, hooks: HandoffHooks | None = None) -> int:
    worker = Worker(cfg, worker_no, worker_id, slot, generation, runtime_dir, stats, succeeds, hooks)
    worker.run()
    return 0
