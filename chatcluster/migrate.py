"""Moving a worker's clients to its successor without anyone noticing: the giver and the taker.

During an upgrade every old worker (the giver) hands its listening socket and
its clients to one new worker (the taker) over the `handoff` wire. Nothing may
be lost, repeated or reordered, and the bus order decides where the cut is.

The giver stops accepting and reading, then publishes a HANDOFF marker. When
the marker comes back from the broker, at point P of the one bus order,
everything the giver published for its clients is ordered before P (if a
nickname claim or a held line slipped out after the marker, it marks again),
and its output queues hold exactly what its clients must see up to P. It sends
the clients right then, before it applies anything after P. The taker sees
the same marker at the same point P of its own copy of the order, and from
there keeps a copy of everything it broadcasts (the broker routes to it, from
P on, whatever it routes to the giver, so it gets the traffic of the giver's
rooms too). When the clients arrive, each gets the giver's queue, then what of
that copy was for its rooms (`chat.tail_for`), and joins its rooms: every
message after P comes through the taker, every one up to P through the giver.

The taker publishes ADOPT for each client (the broker's roster moves the
nickname to it) before anything the client says, so the client's next line is
attributed to its new connection everywhere. It answers the giver once its
ADOPTs are back from the broker; only then does the giver exit, so the
supervisor's GONE for it can never remove a moved client. If the giver cannot
reach its successor, or nothing is sent within GIVE_TIMEOUT, it keeps serving
its clients as before. The worker drives this module through the
`worker.HandoffHooks` interface (`HOOKS` here) and never imports it; this
module uses the worker's client setup and teardown (`attach`, `detach`).
"""

from __future__ import annotations

import heapq
import logging
import os
import select
import socket
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from . import chat as C
from . import events as E
from . import stats as S
from .client import Client, bucket_of, reader_of
from .handoff import (
    ACCEPT,
    ACK,
    CLIENTS,
    END,
    FRAME_TARGET,
    HELLO,
    MAX_FDS_PER_FRAME,
    REFUSE,
    ClientState,
    Frame,
    FrameReader,
    HandoffError,
    receive,
    send,
    socket_path,
    state_from_wire,
    state_to_wire,
)
from .rooms import fold

if TYPE_CHECKING:
    from .worker import Worker

log = logging.getLogger("chatcluster.migrate")

CONNECT_TIMEOUT = 5.0
SEND_TIMEOUT = 10.0  # well under worker_timeout: a blocked send must not look like a hung worker
GIVE_TIMEOUT = 20.0  # a giver that has not sent its clients by then keeps serving them
ACK_TIMEOUT = 20.0  # a giver that sent its clients and hears nothing back by then gives up on them


def export_client(w: Worker, c: Client, now: float) -> ClientState:
    """A client's state for the wire. Input held back by flood control is the unparsed rest of a read."""
    user = w.registry.user(c.conn)
    assert user is not None
    out = b"".join(c.out) if c.out else b""
    core = w.core
    return ClientState(conn=c.conn, ip=c.ip, nick=user.nick, since=user.since, reader=reader_of(c, w.settings),
                       bucket=bucket_of(c, w.settings, now),
                       out=out, lines=[], unread=bytes(c.pending), eof=c.eof, idle=max(0.0, now - c.last_rx),
                       rooms=[core.room_name(k) for k in user.rooms],
                       active=core.room_name(user.active) if user.active else "")


# -- the giver: an old worker handing its clients over ---------------------------------------

GREETING, FROZEN, SENT, DONE = "greeting", "frozen", "sent", "done"


class Giver:
    """The old worker's side: hand the listener and every client to `taker`, then let the worker exit."""

    def __init__(self, w: Worker, sock: socket.socket, now: float) -> None:
        self.w = w
        self.sock = sock
        self.reader = FrameReader()
        self.state = GREETING
        self.deadline = now + GIVE_TIMEOUT
        self.token = 0
        self.marker_out = False  # the current marker has been published
        self.clean = True  # nothing for the clients was published after the current marker
        self.listener: socket.socket | None = None  # ours, kept until the taker has the clients
        self.saved_timers: list[Any] = []
        self.given: list[tuple[int, socket.socket]] = []  # (conn, socket) sent, kept open until ACK
        self.taker = ""
        self.fds = {sock.fileno()}

    @classmethod
    def start(cls, w: Worker) -> Giver | None:
        """Connect to the successor and offer the listening socket; None if there is nobody to give to."""
        path = socket_path(w.runtime_dir, w.worker_id)
        if w.stop is not None:
            log.warning("worker %d: asked to hand over its clients while stopping; ignored", w.worker_no)
            return None
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.settimeout(CONNECT_TIMEOUT)
        try:
            sock.connect(path)
            listener = [w.listener.fileno()] if w.listener is not None else []
            send(sock, HELLO, {"worker": w.worker_id, "generation": w.generation, "listener": bool(listener)},
                 listener)
        except OSError as exc:
            sock.close()
            log.error("worker %d: cannot reach its successor at %s (%s); it keeps serving its clients",
                      w.worker_no, path, exc.strerror or exc)
            return None
        sock.setblocking(False)
        giver = cls(w, sock, time.monotonic())
        w.ep.register(sock.fileno(), select.EPOLLIN)
        log.info("worker %d: handing over to its successor, %d clients", w.worker_no, len(w.registry))
        return giver

    # -- events from the worker ---------------------------------------------------------------

    def on_fd(self, fd: int) -> None:
        try:
            frames, ended = receive(self.sock, self.reader)
        except (HandoffError, OSError) as exc:
            frames, ended = [], True
            log.error("worker %d: handoff connection failed: %s", self.w.worker_no, exc)
        for frame in frames:
            for fd_ in frame.fds:
                os.close(fd_)  # the taker sends none; never leak one
            if frame.kind == ACCEPT and self.state == GREETING:
                self.taker = str(frame.body.get("worker", "?"))
                self.freeze()
            elif frame.kind == REFUSE:
                self.resume(f"the successor refused: {frame.body.get('reason', 'no reason given')}")
                return
            elif frame.kind == ACK and self.state == SENT:
                self.done(int(frame.body.get("adopted", 0)))
                return
        if ended and self.state != DONE:
            if self.state == SENT:
                self.lost("the successor closed the connection before adopting them")
            else:
                self.resume("the successor closed the connection")

    def tick(self, now: float) -> None:
        if self.state in (GREETING, FROZEN):
            if self.w.stop_signal or self.w.stop is not None:
                self.resume("the worker was told to stop")
            elif now > self.deadline:
                self.resume(f"no handoff point within {GIVE_TIMEOUT:.0f} s")
        elif self.state == SENT and now > self.deadline:
            self.lost(f"no answer from {self.taker} within {ACK_TIMEOUT:.0f} s")

    def begin(self) -> None:
        pass  # connected and greeted in start()

    def published(self, events: list[E.Event]) -> None:
        """Every batch the worker publishes: anything for the clients after the marker spoils the cut."""
        if self.state != FROZEN:
            return
        for ev in events:
            if type(ev) is E.Handoff and ev.token == self.token:
                self.marker_out = True
                self.clean = True
            elif self.marker_out and type(ev) is not E.Ping and type(ev) is not E.Handoff:
                self.clean = False

    def after_batch(self, publisher: str, events: list[E.Event]) -> None:
        """Called after the worker applied a bus batch; our marker coming back is the cut point P."""
        if self.state != FROZEN or publisher != self.w.worker_id or not self.marker_out:
            return
        if not any(type(ev) is E.Handoff and ev.token == self.token for ev in events):
            return
        w = self.w
        settled = all(u.state == C.ACTIVE and not u.claiming for u in w.registry.users())
        quiet = all(type(ev) is E.Ping for ev in w.outgoing)
        if self.clean and settled and quiet:
            self.give()
        else:
            # A claim or a line was published after the marker (a nickname taken, a backlog
            # replayed): it would land after P. Cut again after it.
            self.mark()

    # -- steps --------------------------------------------------------------------------------

    def freeze(self) -> None:
        """The successor has the listener: stop accepting and reading, and mark the cut in the bus order."""
        w = self.w
        self.listener = w.unlisten()
        w.frozen = True
        # Flood-control timers would feed held lines to the chat core; they resume with the taker.
        self.saved_timers, w.timers = w.timers, []
        self.state = FROZEN
        self.mark()

    def mark(self) -> None:
        self.token += 1
        self.marker_out = False
        self.clean = True
        self.w.outgoing.append(E.Handoff(self.taker, self.token))

    def give(self) -> None:
        w = self.w
        now = time.monotonic()
        states: list[dict[str, Any]] = []
        socks: list[socket.socket] = []
        for c in list(w.registry.clients()):
            if c.closing or w.registry.user(c.conn) is None:
                continue  # leaving anyway: it is flushed and closed here
            states.append(state_to_wire(export_client(w, c, now), now))
            socks.append(c.sock)
            self.given.append((c.conn, c.sock))
            # Gone from here without a Leave: it lives on at the taker. The socket stays open
            # until the taker has it, so its number is not reused meanwhile.
            w.detach(c)
            w.core.forget(c.conn)
            c.closing = True
        try:
            self.sock.settimeout(SEND_TIMEOUT)
            for batch in batches(states):
                send(self.sock, CLIENTS, {"clients": states[batch]}, [s.fileno() for s in socks[batch]])
            send(self.sock, END, {"token": self.token, "count": len(states)})
            self.sock.setblocking(False)
        except OSError as exc:
            self.state = SENT
            self.lost(f"sending them failed: {exc}")
            return
        self.state = SENT
        self.deadline = now + ACK_TIMEOUT
        queued = sum(len(st["out"]) * 3 // 4 for st in states)
        log.info("worker %d: sent %d clients (%d bytes of output queued) to %s", w.worker_no, len(states), queued,
                 self.taker)

    def done(self, adopted: int) -> None:
        w = self.w
        self.close_given()
        log.info("worker %d: %s adopted %d clients; exiting", w.worker_no, self.taker, adopted)
        w.counters.closed_handoff += adopted
        self.finish()
        w.exit_after_handoff()  # only clients already leaving remain

    def resume(self, why: str) -> None:
        """Nothing was handed over: serve the clients as before."""
        w = self.w
        log.error("worker %d: handing over its clients failed (%s); it keeps serving them", w.worker_no, why)
        if self.listener is not None:
            w.listen(self.listener)
            self.listener = None
        w.timers.extend(self.saved_timers)
        heapq.heapify(w.timers)
        w.frozen = False
        self.finish()
        for c in list(w.registry.clients()):
            if c in w.registry and not c.closing and not c.throttled:
                w.read(c)  # edges that came while frozen were not acted on

    def lost(self, why: str) -> None:
        """The clients were sent but not adopted: they are gone; say so in the roster."""
        w = self.w
        log.error("worker %d: handing over failed after its clients were sent (%s); %d clients are "
                  "disconnected", w.worker_no, why, len(self.given))
        for conn, _ in self.given:
            w.outgoing.append(E.Leave(conn, "connection lost"))
        self.close_given()
        self.finish()
        w.exit_after_handoff()

    def close_given(self) -> None:
        for _, sock in self.given:
            sock.close()
        self.given = []
        if self.listener is not None:
            self.listener.close()
            self.listener = None

    def finish(self) -> None:
        self.state = DONE
        try:
            self.w.ep.unregister(self.sock.fileno())
        except OSError:
            pass
        self.sock.close()
        self.reader.close()
        self.fds = set()
        if self.w.handoff is self:
            self.w.handoff = None


def batches(states: list[dict[str, Any]]) -> list[slice]:
    """Split the clients into messages of at most MAX_FDS_PER_FRAME sockets and about FRAME_TARGET bytes."""
    out: list[slice] = []
    start = size = 0
    for i, st in enumerate(states):
        if i > start and (i - start == MAX_FDS_PER_FRAME or size >= FRAME_TARGET):
            out.append(slice(start, i))
            start, size = i, 0
        size += len(st["out"]) + len(st["unread"]) + 512
    if start < len(states):
        out.append(slice(start, len(states)))
    return out


# -- the taker: a new worker adopting its predecessor's clients -------------------------------


class Taker:
    """The new worker's side: adopt the listener and the clients of worker `source`."""

    def __init__(self, w: Worker, source: str, source_pid: int) -> None:
        self.w = w
        self.source = source
        self.source_pid = source_pid
        self.path = socket_path(w.runtime_dir, source)
        self.server: socket.socket | None = None
        self.conn: socket.socket | None = None
        self.pidfd = -1
        self.reader = FrameReader()
        self.got_listener = False
        self.incoming: list[tuple[ClientState, int]] = []
        self.end_token: int | None = None
        self.marks: dict[int, int] = {}  # marker token -> position in `copy` where it was seen
        self.copy: list[C.Broadcast] = []  # what was broadcast since the first marker
        self.awaiting: set[int] = set()  # conns whose ADOPT has not come back yet
        self.installed = False
        self.adopted = 0
        self.fds: set[int] = set()

    def boot(self) -> None:
        """Listen for the predecessor and watch it: if it exits without handing over, listen ourselves."""
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        server.bind(self.path)
        server.listen(4)
        self.server = server
        self._watch(server.fileno())
        log.info("worker %d: waiting for %s to hand over its listening socket and its clients", self.w.worker_no,
                 self.source)
        try:
            self.pidfd = os.pidfd_open(self.source_pid)
        except ProcessLookupError:
            self.source_gone()
            return
        except OSError as exc:  # a kernel before 5.3: look for the predecessor in tick() instead
            log.info("worker %d: no pidfd (%s); checking on %s every tick", self.w.worker_no, exc, self.source)
            return
        self._watch(self.pidfd)

    def _watch(self, fd: int) -> None:
        self.w.ep.register(fd, select.EPOLLIN)
        self.fds.add(fd)

    def _unwatch(self, fd: int) -> None:
        if fd in self.fds:
            self.fds.discard(fd)
            try:
                self.w.ep.unregister(fd)
            except OSError:
                pass

    # -- events from the worker ---------------------------------------------------------------

    def on_fd(self, fd: int) -> None:
        if self.server is not None and fd == self.server.fileno():
            self.accept()
        elif self.conn is not None and fd == self.conn.fileno():
            self.read()
        elif fd == self.pidfd:
            self.source_gone()

    def accept(self) -> None:
        assert self.server is not None
        try:
            conn, _ = self.server.accept()
        except (BlockingIOError, InterruptedError):
            return
        if self.conn is not None:
            conn.close()  # one predecessor, one connection
            return
        conn.setblocking(False)
        self.conn = conn
        self._watch(conn.fileno())

    def read(self) -> None:
        assert self.conn is not None
        try:
            frames, ended = receive(self.conn, self.reader)
        except (HandoffError, OSError) as exc:
            log.error("worker %d: handoff from %s failed: %s", self.w.worker_no, self.source, exc)
            frames, ended = [], True
        for i, frame in enumerate(frames):
            try:
                self.handle(frame)
            except HandoffError as exc:
                log.error("worker %d: handoff from %s failed: %s", self.w.worker_no, self.source, exc)
                for rest in frames[i + 1:]:
                    for fd in rest.fds:
                        os.close(fd)
                ended = True
                break
        if ended and self.conn is not None:
            self.drop_connection("the predecessor closed the connection")

    def handle(self, frame: Frame) -> None:
        w = self.w
        if frame.kind == HELLO:
            problem = None
            if frame.body.get("worker") != self.source:
                problem = f"expected worker {self.source}, got {frame.body.get('worker')!r}"
            elif not w.core.ready:
                problem = "not ready"
            if problem or self.got_listener:
                for fd in frame.fds:
                    os.close(fd)
                self.reply(REFUSE, {"reason": problem or "already adopting"})
                return
            if frame.fds:
                listener = socket.socket(fileno=frame.fds[0])
                for fd in frame.fds[1:]:
                    os.close(fd)
                listener.setblocking(False)
                if w.listener is None:
                    w.listen(listener)
                else:
                    listener.close()  # it opened its own after all; one is enough
            self.got_listener = True
            self.reply(ACCEPT, {"worker": w.worker_id})
        elif frame.kind == CLIENTS:
            clients = frame.body.get("clients")
            if not isinstance(clients, list) or len(clients) != len(frame.fds):
                for fd in frame.fds:
                    os.close(fd)
                raise HandoffError("a handoff message's clients and descriptors do not match")
            now = time.monotonic()
            for d, fd in zip(clients, frame.fds, strict=True):
                try:
                    self.incoming.append((state_from_wire(d, now, w.settings.telnet_negotiation), fd))
                except HandoffError as exc:
                    log.error("worker %d: dropping a client from %s: %s", w.worker_no, self.source, exc)
                    os.close(fd)
        elif frame.kind == END:
            self.end_token = int(frame.body.get("token", -1))
            self.maybe_install()
        else:
            for fd in frame.fds:
                os.close(fd)

    def reply(self, kind: str, body: Mapping[str, Any]) -> None:
        assert self.conn is not None
        try:
            self.conn.setblocking(True)
            self.conn.settimeout(SEND_TIMEOUT)
            send(self.conn, kind, body)
            self.conn.setblocking(False)
        except OSError as exc:
            log.error("worker %d: cannot answer %s: %s", self.w.worker_no, self.source, exc)

    def collect(self, b: C.Broadcast) -> None:
        """A broadcast after a marker: the adopted clients in its rooms must get it too."""
        self.copy.append(b)

    def begin(self) -> None:
        self.boot()

    def published(self, events: list[E.Event]) -> None:
        pass  # what we publish is ordered after the cut point anyway

    def tick(self, now: float) -> None:
        # The giver keeps the time (it resumes or gives up, and we see the connection end); we
        # only look for a predecessor that died, when there is no pidfd to tell us.
        if self.pidfd < 0 and self.server is not None:
            try:
                os.kill(self.source_pid, 0)
            except ProcessLookupError:
                self.source_gone()
            except PermissionError:
                pass

    def after_batch(self, publisher: str, events: list[E.Event]) -> None:
        w = self.w
        if publisher == self.source and not self.installed:
            for ev in events:
                if type(ev) is E.Handoff and ev.new_worker == w.worker_id:
                    self.marks[int(ev.token)] = len(self.copy)
                    w.collecting(self.collect)
            self.maybe_install()
        elif publisher == w.worker_id and self.awaiting:
            for ev in events:
                if type(ev) is E.Adopted and ev.conn in self.awaiting:
                    self.awaiting.discard(ev.conn)
                    if not ev.accepted:  # the chat core has the client claim a new name
                        log.warning("worker %d: the roster refused the adoption of conn %d; it gets a new "
                                    "nickname", w.worker_no, ev.conn)
            if not self.awaiting and self.installed:
                self.finish_ok()

    def maybe_install(self) -> None:
        if self.installed or self.end_token is None or self.end_token not in self.marks:
            return
        self.install(self.copy[self.marks[self.end_token]:])

    def install(self, tail: list[C.Broadcast]) -> None:
        """Make every received client ours: its queue, then what its rooms got since P, then live."""
        w = self.w
        self.installed = True
        self.copy = []
        w.collecting(None)
        default = w.registry.default
        now = time.monotonic()
        placed: list[tuple[Client, ClientState]] = []
        s = w.settings
        for st, fd in self.incoming:
            c = w.attach(socket.socket(fileno=fd), st.ip, now, reader=st.reader, bucket=st.bucket)
            c.last_rx = now - st.idle
            st.reader.max_line_bytes = s.max_line_bytes
            st.bucket.configure(s.flood_rate, s.flood_burst)
            conn = c.conn
            w.core.adopt(conn, st.ip, st.since, st.nick, st.rooms, st.active, origin=(self.source, st.conn))
            w.registry.enter(c)
            user = w.registry.user(conn)
            assert user is not None
            names = {fold(name): name for name in st.rooms}
            origin = C.transit_key(self.source, st.conn)  # picks out the private lines sent to it meanwhile
            data = st.out + C.tail_for(tail, user.rooms, user.active, names, default, origin)
            if data:
                w.output.queue(c, data)
            # Published before anything the client says: the roster moves the name first.
            w.outgoing.append(E.Adopt(self.source, st.conn, conn))
            self.awaiting.add(conn)
            placed.append((c, st))
        self.incoming = []
        self.adopted = len(placed)
        log.info("worker %d: adopted %d clients from %s (%d bytes of room traffic since the cut)", w.worker_no,
                 len(placed), self.source, sum(len(b.data) for b in tail))
        for c, st in placed:
            c.eof = st.eof
            resume_input(w, c, st)
        if not self.awaiting:
            self.finish_ok()

    def finish_ok(self) -> None:
        self.w.beat(S.READY)  # the supervisor counts the clients kept as soon as the giver exits
        if self.conn is not None:
            self.reply(ACK, {"adopted": self.adopted})
        self.close()

    def drop_connection(self, why: str) -> None:
        """The predecessor went away before handing its clients over: it keeps them, or they are gone."""
        if self.installed:
            return
        if self.incoming or self.end_token is not None:
            log.error("worker %d: %s in the middle of the handoff; %d clients not adopted",
                      self.w.worker_no, why, len(self.incoming))
        for _, fd in self.incoming:
            os.close(fd)
        self.incoming = []
        self.close()

    def source_gone(self) -> None:
        w = self.w
        if not self.got_listener and w.listener is None:
            log.warning("worker %d: %s exited without handing over; listening on a new socket",
                        w.worker_no, self.source)
            w.listen()
            self.got_listener = True
        if not self.installed:
            self.drop_connection(f"{self.source} exited")
        else:
            self.close()

    def close(self) -> None:
        w = self.w
        for fd in list(self.fds):
            self._unwatch(fd)
        if self.conn is not None:
            self.conn.close()
            self.conn = None
        if self.server is not None:
            self.server.close()
            self.server = None
            try:
                os.unlink(self.path)
            except OSError:
                pass
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1
        self.reader.close()
        if w.collect == self.collect:
            w.collecting(None)
        if w.handoff is self:
            w.handoff = None


def resume_input(w: Worker, c: Client, st: ClientState) -> None:
    """Go on with the input where the predecessor stopped: parsed lines, unparsed bytes, then the socket.

    The unparsed bytes go through read() like any other input, so flood control carries on
    with the tokens the client brought along.
    """
    if st.lines:
        w.process(c, list(st.lines))
    if c in w.registry and not c.closing:
        c.pending = st.unread
        w.read(c)


class Hooks:
    """migrate's side of worker.HandoffHooks."""

    def giver(self, worker: Worker) -> Giver | None:
        return Giver.start(worker)

    def taker(self, worker: Worker, source: str, source_pid: int) -> Taker:
        return Taker(worker, source, source_pid)


HOOKS = Hooks()
