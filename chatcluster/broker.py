"""The bus broker: one process that gives every batch its place in the one order, routes it, and keeps the
directory (roster and rooms) and the rooms' history.

Workers PUSH batches to the broker; it stamps each with its epoch, a global
sequence number and, per receiving worker, that worker's own sequence number,
and PUBlishes a copy to each worker that needs it under the worker's own topic.
A batch of one room's chat lines (its route, in the header) goes, undecoded,
to the workers with members in that room (and back to its publisher); the
broker only appends its bytes to the room's history. Every other batch goes
to every worker: one that holds requests (claims, departures, joins, /who) is
decoded and decided in order by the directory (`directory.Directory`), and
each worker gets the verdicts meant for it, under the publisher's own name
and number, so each worker's copy of that route stays densely numbered. A
message it cannot read, or an event whose decision fails, is dropped, logged
and counted: it must never take the broker down, since every restarted broker
would meet it again when the workers resend. `Broker` is pure apart from
`emit` and the history writer it is given; `run_broker` is the process.
"""

from __future__ import annotations

import logging
import os
import random
import signal
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import zmq

from . import events as E
from . import roster as R
from . import stats as S
from .bus import Endpoints
from .chat import format_line
from .directory import ALL, BROKER, Decided, Directory
from .history import History
from .settings import read_live_config
from .wire import FLAG_ROSTER, HEADER, UNREADABLE_PAYLOAD, Head, decode, encode, peek, topic

log = logging.getLogger("chatcluster.broker")

RESYNC_WAIT = 1.0  # seconds a restarted broker waits for the live workers to resync
SUBSCRIBER_WAIT = 1.0  # seconds a broker waits for the known workers' SUB sockets
NUDGE_EVERY = 0.1  # least seconds between two "new epoch" pings to unadmitted workers
COMPLAIN_EVERY = 1.0  # least seconds between two log lines about unreadable input
BEAT_EVERY = 0.25  # seconds between two heartbeats in the stats file
_PACK = HEADER.pack
MAX_ROUTES = 50_000  # rooms whose numbering is remembered before those of rooms gone are forgotten


@dataclass(frozen=True)
class BrokerSettings:
    """What the broker reads of the configuration (RUNTIME_DIR/config.json); none of it changes live."""

    default_room: str = "#lobby"
    history_lines: int = 50
    history_max_bytes: int = 64 << 20
    history_db: str = ""

    @classmethod
    def from_values(cls, values: dict[str, Any]) -> BrokerSettings:
        known = {k: values[k] for k in ("default_room", "history_lines", "history_max_bytes", "history_db")
                 if k in values}
        return cls(**known)


class HistorySink(Protocol):
    """Where the broker hands the history to keep on disk (histdb.Writer); never blocks."""

    def batch(self, key: str, ts: float, payload: bytes) -> None: ...

    def replace(self, key: str, lines: list[tuple[float, bytes]]) -> None: ...


def decode_lines(payload: bytes) -> list[bytes]:
    """The lines of a room's chat batch, as its members see them (with CRLF)."""
    _, _, events = decode(payload)
    return [line for ev in events if (line := format_line(ev))]


class Broker:
    """Sequence and route every batch, keep the directory and decide on it, answer HELLOs, rebuild after
    a restart, keep the rooms' history.

    Pure apart from `emit(header, payload)`, which publishes one stamped message (the header
    starts with the receiving worker's topic), and `sink`, the history writer.

    Why a restarted broker admits publishers one by one: a new broker starts with an empty
    directory and knows nothing of the old order. Each worker, on seeing the new epoch, sends an
    unnumbered control batch (RESYNC of its clients and their rooms, its copies of the rooms'
    history, HELLO) and then everything it published but never saw come back, in the original
    numbering. The broker drops a worker's numbered batches until that control batch has
    arrived (whatever was queued before it is in the resend anyway), so every worker's traffic
    in the new epoch starts from its RESYNC. For a short resync phase the broker sequences only
    control batches and holds everything else; when every live worker has resynced (or the
    phase times out), it answers the waiting HELLOs with snapshots (which tell each worker
    which of its clients kept their names) and releases the held traffic. So every claim after
    a restart is decided against a complete roster, and no chat line reaches a worker before
    its snapshot. A worker that has not resynced by then gets every batch until it does: the
    broker does not know which rooms it needs, and the worker counts what it could not show.
    """

    def __init__(self, emit: Callable[[bytes, bytes], None], workers: Sequence[str], now: float,
                 settings: BrokerSettings | None = None, clock: Callable[[], float] = time.time,
                 sink: HistorySink | None = None) -> None:
        self.emit = emit
        self.settings = settings = settings or BrokerSettings()
        self.clock = clock
        self.sink = sink
        self.unreadable = 0  # messages and events dropped because they could not be read or decided
        self.unknown = 0  # events of kinds this code does not know, passed on as they came
        self.last_complaint = -COMPLAIN_EVERY
        self.epoch = random.getrandbits(63) or 1
        self.gseq = 0
        self.wseq: dict[str, int] = {}
        self.topics: dict[str, bytes] = {}
        self.directory = Directory(settings.default_room)
        self.history = History(settings.history_lines, settings.history_max_bytes, decode_lines)
        self.admitted: set[str] = set()
        self.dead: set[str] = set()
        self.known: set[str] = set(workers)  # workers that may be listening (for the "new broker" pings)
        self.late: set[str] = set()  # live workers that missed the resync: they get everything
        # The resync phase: the live workers of the cluster the old broker served.
        self.expected = set(workers)
        self.phase_ends = now + RESYNC_WAIT if self.expected else 0.0
        self.held: list[bytes] = []
        self.waiting: list[tuple[str, int]] = []  # HELLOs to answer when the phase ends
        self.last_nudge = -NUDGE_EVERY
        # route -> {publisher: its last batch of the route we passed on}: where a worker that starts
        # receiving a room picks up each publisher's numbering (see events.Seed). Complete unless
        # routes were forgotten (`forgot`), after which an unknown route is "not known".
        self.route_seqs: dict[str, dict[str, int]] = {}
        self.forgot = False

    @property
    def roster(self) -> R.Roster:
        return self.directory.roster

    @property
    def resyncing(self) -> bool:
        return bool(self.phase_ends)

    # -- what metrics read ------------------------------------------------------------------------

    @property
    def rooms_total(self) -> int:
        """Rooms that exist now (the default room always does)."""
        return len(self.directory.rooms)

    @property
    def memberships_total(self) -> int:
        """(client, room) memberships now: the sum of every room's member count."""
        return self.directory.rooms.memberships

    def counters(self) -> dict[str, int]:
        h = self.history
        return {"rooms": self.rooms_total, "memberships": self.memberships_total, "users": len(self.roster),
                "history_rooms": len(h.rooms), "history_bytes": h.nbytes, "history_evicted": h.evicted,
                "unreadable": self.unreadable, "unknown": self.unknown}

    # -- sending ----------------------------------------------------------------------------------

    def everyone(self) -> set[str]:
        return self.admitted | self.late

    def send_to(self, workers: Iterable[str], payload: bytes) -> None:
        """One message, with its place in the order, to each of `workers` (under each one's topic)."""
        self.gseq += 1
        epoch, gseq, wseq, topics, emit, pack = self.epoch, self.gseq, self.wseq, self.topics, self.emit, _PACK
        sent = time.monotonic_ns()  # for the delivery latency the workers measure
        for w in workers:
            t = topics.get(w)
            if t is None:
                t = topics[w] = topic(w)
            n = wseq[w] = wseq.get(w, 0) + 1
            emit(t + pack(epoch, gseq, n, sent), payload)  # = wire.stamp(t, epoch, gseq, n, sent)

    def nudge(self, now: float) -> None:
        """Tell workers that have not noticed yet that there is a new broker."""
        if now - self.last_nudge >= NUDGE_EVERY:
            self.last_nudge = now
            self.send_to(sorted((self.known | self.expected) - self.admitted - self.dead),
                         encode(BROKER, 0, [E.Ping()]))

    def subscribed(self, worker: str) -> None:
        """A worker's SUB socket subscribed to its topic (an XPUB notice)."""
        if worker not in self.dead:
            self.known.add(worker)

    def snapshot(self, worker: str, nonce: int) -> None:
        self.send_to((worker,), encode(BROKER, 0, [self.roster.snapshot_for(worker, nonce)]))

    def complain(self, now: float, what: str, *args: Any) -> None:
        self.unreadable += 1
        if now - self.last_complaint >= COMPLAIN_EVERY:
            self.last_complaint = now
            log.error("broker: " + what + " (%d dropped so far)", *args, self.unreadable)

    # -- receiving --------------------------------------------------------------------------------

    def head_of(self, payload: bytes, now: float) -> Head | None:
        """A worker's batch header, or None: unreadable (counted, logged) or from a worker that died."""
        try:
            head = peek(payload)
        except UNREADABLE_PAYLOAD as exc:
            self.complain(now, "dropped an unreadable bus message: %s", exc)
            return None
        # A dead worker's last batches: its clients are gone already.
        return None if head.publisher in self.dead else head

    def receive(self, payload: bytes, now: float) -> None:
        head = self.head_of(payload, now)
        if head is None:
            return
        publisher = head.publisher
        if head.pseq == 0:
            self.admitted.add(publisher)
            self.known.add(publisher)
            self.expected.discard(publisher)
            self.late.discard(publisher)
        elif publisher not in self.admitted:
            self.nudge(now)  # dropped: the worker sends it again after its RESYNC
            return
        elif self.phase_ends:  # resyncing
            self.held.append(payload)
            return
        if not head.flags & FLAG_ROSTER:
            route = head.route
            if route:
                # A room's chat lines: passed on as they came, never decoded, to the workers with
                # members in the room; its history keeps the bytes.
                targets = self.directory.audience(route)
                if publisher not in targets or self.late:
                    targets = targets | {publisher} | self.late
                self.send_to(targets, payload)
                seqs = self.route_seqs.get(route)
                if seqs is None:
                    seqs = self.route_seqs[route] = {}
                    if len(self.route_seqs) > MAX_ROUTES:
                        self.forget_routes()
                seqs[publisher] = head.pseq
                if self.history.max_lines > 0:
                    ts = self.clock()
                    self.history.add(route, ts, head.nevents, payload)
                    if self.sink is not None:
                        self.sink.batch(route, ts, payload)
            else:
                self.send_to(self.everyone(), payload)
        else:
            # The verdicts take the requests' places, under the publisher's name and number,
            # so receivers still check that batch's place in the publisher's sequence.
            try:
                publisher, _, events = decode(payload)
            except UNREADABLE_PAYLOAD as exc:
                self.complain(now, "dropped an unreadable batch of %s: %s", publisher, exc)
                return
            self.deliver(publisher, head.pseq, self.decide(publisher, events, now))
            for ev in events:
                if type(ev) is E.Hello:
                    if self.resyncing:
                        self.waiting.append((publisher, ev.nonce))
                    else:
                        self.snapshot(publisher, ev.nonce)
        if self.resyncing and not self.expected:
            self.end_resync(now)

    def deliver(self, publisher: str, pseq: int, decided: Decided) -> None:
        """Each worker gets the verdicts meant for it (possibly none: the batch keeps its number)."""
        if all(targets is ALL for _, targets in decided):
            self.send_to(self.everyone(), encode(publisher, pseq, [ev for ev, _ in decided]))
            return
        by_choice: dict[tuple[int, ...], list[str]] = {}
        for w in self.everyone():
            choice = tuple(i for i, (_, targets) in enumerate(decided) if targets is ALL or w in targets)
            by_choice.setdefault(choice, []).append(w)
        for choice, workers in by_choice.items():
            self.send_to(workers, encode(publisher, pseq, [decided[i][0] for i in choice]))

    def decide(self, publisher: str, events: list[E.Event], now: float) -> Decided:
        """The directory's verdicts for one batch; an event that cannot be read or decided is dropped."""
        decided: Decided = []
        for ev in events:
            kind = type(ev)
            if kind is E.Malformed:
                self.complain(now, "dropped a malformed event from %s: %r", publisher, ev)
                continue
            if kind is E.Unknown:
                self.unknown += 1  # newer code's event: the workers may know it
                decided.append((ev, ALL))
                continue
            try:
                if kind is E.HistoryCopy:
                    self.take_history(ev)
                out = self.directory.decide(publisher, ev)
            except Exception as exc:  # noqa: BLE001 (one bad event must not stop the order)
                self.complain(now, "dropped an event from %s that could not be decided: %r (%s)", publisher, ev,
                              exc)
                continue
            for d, targets in out:
                if type(d) is E.Seed:
                    d = self.seeded(d, targets)
                decided.append((d, targets))
            if kind is E.Numbering:
                for route, pseq in ev.routes:
                    seqs = self.route_seqs.setdefault(str(route), {})
                    seqs[publisher] = max(seqs.get(publisher, 0), int(pseq))
        return decided

    def seeded(self, d: E.Seed, targets: frozenset[str] | None) -> E.Seed:
        """A worker starts receiving the room's traffic: it gets the room's history, for its copy, and
        where each publisher's numbering of the room stands."""
        lines = self.history.lines(d.room) if self.history.max_lines > 0 else []
        seqs = self.route_seqs.get(d.room)
        known = seqs is not None or not self.forgot
        return E.Seed(d.room, lines, sorted((seqs or {}).items()) if known else None)

    def forget_routes(self) -> None:
        """Too many rooms' numbering remembered: forget that of the rooms that are gone."""
        rooms = self.directory.rooms
        for route in [r for r in self.route_seqs if rooms.get(r) is None]:
            del self.route_seqs[route]
        self.forgot = True

    def take_history(self, ev: E.HistoryCopy) -> None:
        """A worker's copies of its rooms' history, after a restart: keep the ones that reach further."""
        if self.history.max_lines <= 0:
            return
        for key, lines in ev.rooms:
            if self.history.merge(str(key), lines) and self.sink is not None:
                self.sink.replace(str(key), self.history.lines(str(key)))

    def end_resync(self, now: float) -> None:
        if self.expected:
            log.warning("broker: no resync from %s within %.1f s; going on without (they get all traffic "
                        "until they resync)", ", ".join(sorted(self.expected)), RESYNC_WAIT)
        self.late = set(self.expected) - self.dead
        self.phase_ends = 0.0
        self.expected.clear()
        waiting, self.waiting = self.waiting, []
        for worker, nonce in waiting:
            self.snapshot(worker, nonce)
        held, self.held = self.held, []
        for payload in held:
            self.receive(payload, now)
        log.info("broker: roster rebuilt, %d users in %d rooms", len(self.roster), self.rooms_total)

    def gone(self, worker: str, now: float) -> None:
        self.dead.add(worker)
        self.admitted.discard(worker)
        self.expected.discard(worker)
        self.late.discard(worker)
        self.known.discard(worker)
        decided = self.directory.decide(BROKER, E.Gone(worker))
        self.send_to(self.everyone(), encode(BROKER, 0, [ev for ev, _ in decided]))
        for seqs in self.route_seqs.values():
            seqs.pop(worker, None)
        self.wseq.pop(worker, None)
        self.topics.pop(worker, None)
        if self.resyncing and not self.expected:
            self.end_resync(now)

    def tick(self, now: float) -> None:
        if self.resyncing and now >= self.phase_ends:
            self.end_resync(now)


def read_settings(runtime_dir: str) -> BrokerSettings:
    """The broker's settings from the running configuration the supervisor wrote (defaults without one)."""
    try:
        values, _, _ = read_live_config(runtime_dir)
    except (OSError, ValueError):
        return BrokerSettings()
    return BrokerSettings.from_values(values)


PULL_TURN = 1000  # worker batches taken from the PULL socket before the broker looks at its other work


def take_batches(pull: zmq.Socket[bytes], broker: Broker, counters: S.BrokerCounters) -> bool:
    """Up to PULL_TURN worker batches from the PULL socket into `broker`, counted; whether more may wait."""
    for _ in range(PULL_TURN):
        try:
            payload = pull.recv(zmq.NOBLOCK, copy=True)
        except zmq.Again:
            return False
        counters.batches_in += 1
        counters.bytes_in += len(payload)
        broker.receive(payload, time.monotonic())
    return True


def run_broker(runtime_dir: str, control_fd: int, workers: Sequence[str] = (),
               stats: S.StatsFile | None = None) -> None:
    """The broker process. `workers` are the live workers when this broker replaces a dead one.

    With `stats` it beats and counts its traffic in the stats file's broker block, where the
    supervisor watches the heartbeat (a broker that stops beating is killed and replaced).
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the supervisor's to handle
    stopping: list[int] = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(1))
    counters = stats.broker_counters() if stats is not None else S.BrokerCounters()
    counters.pid, counters.started = os.getpid(), time.time()

    def beat() -> None:
        counters.heartbeat = time.monotonic()
        if stats is not None:
            stats.write_broker(counters)

    beat()
    settings = read_settings(runtime_dir)
    writer = None
    loaded: list[tuple[str, list[tuple[float, bytes]]]] = []
    if settings.history_db and settings.history_lines > 0:
        from . import histdb  # only with history_db: nothing else touches the disk

        loaded = histdb.load(settings.history_db, settings.history_lines)
        # Forked before any ZeroMQ context exists: the writer must not share one.
        writer = histdb.Writer.start(settings.history_db, settings.history_lines, settings.history_max_bytes,
                                     close=(control_fd,))
    endpoints = Endpoints.in_dir(runtime_dir)
    ctx: zmq.Context[Any] = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    pull.setsockopt(zmq.RCVHWM, 0)
    pull.bind(endpoints.inbound)
    pub = ctx.socket(zmq.XPUB)
    pub.setsockopt(zmq.SNDHWM, 0)
    pub.setsockopt(zmq.XPUB_VERBOSE, 1)  # one notice per subscriber, not one per topic
    pub.bind(endpoints.outbound)
    subscribers: list[str] = []

    def notice(msg: bytes) -> None:
        if msg[:1] == b"\x01" and msg.endswith(b"\0"):
            subscribers.append(msg[1:-1].decode(errors="replace"))

    # After a broker restart the workers' SUB sockets reconnect on their own; waiting for them
    # before the first message keeps the restart from opening a slow-joiner gap.
    deadline = time.monotonic() + SUBSCRIBER_WAIT
    while len(subscribers) < len(workers) and time.monotonic() < deadline:
        if pub.poll(20, zmq.POLLIN):
            notice(pub.recv())
    beat()

    def emit(header: bytes, payload: bytes) -> None:
        if len(payload) < 8192:
            pub.send(header + payload)  # one frame: one send per worker (see bus.BusClient.drain)
        else:
            pub.send(header, zmq.SNDMORE)
            pub.send(payload, copy=False)
        counters.batches_out += 1
        counters.bytes_out += len(payload)

    broker = Broker(emit, workers, time.monotonic(), settings, sink=writer)
    for key, lines in loaded:
        broker.history.load(key, lines)
    for w in subscribers:
        broker.subscribed(w)
    log.info("broker up (epoch %x)%s%s", broker.epoch,
             f", rebuilding the roster from {len(workers)} workers" if workers else "",
             f", {len(loaded)} rooms of history from {settings.history_db}" if settings.history_db else "")
    if workers:
        broker.nudge(time.monotonic())

    poller = zmq.Poller()
    poller.register(pull, zmq.POLLIN)
    poller.register(pub, zmq.POLLIN)
    poller.register(control_fd, zmq.POLLIN)
    # SIGTERM only queues a stop; this pipe wakes the poll so that the stop is not a second late.
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w)
    poller.register(wake_r, zmq.POLLIN)
    control_buf = b""
    writing = False
    next_beat = 0.0
    while not stopping:
        if writer is not None and writer.pending != writing:
            writing = writer.pending
            if writing:
                poller.register(writer.fd, zmq.POLLOUT)
            else:
                poller.unregister(writer.fd)
        for sock, _ in poller.poll(50 if broker.resyncing else BEAT_EVERY * 1000):
            if sock is pull:
                take_batches(pull, broker, counters)
            elif sock is pub:
                while pub.poll(0, zmq.POLLIN):
                    msg = pub.recv()
                    if msg[:1] == b"\x01" and msg.endswith(b"\0"):
                        broker.subscribed(msg[1:-1].decode(errors="replace"))
            elif sock == wake_r:
                os.read(wake_r, 512)
            elif sock == control_fd:
                chunk = os.read(control_fd, 65536)
                if not chunk:
                    log.info("supervisor went away; broker exits")
                    stopping.append(1)
                    break
                control_buf += chunk
                while b"\n" in control_buf:
                    line, control_buf = control_buf.split(b"\n", 1)
                    word, _, arg = line.decode().partition(" ")
                    if word == "GONE":
                        broker.gone(arg, time.monotonic())
        now = time.monotonic()
        broker.tick(now)
        if now >= next_beat:
            next_beat = now + BEAT_EVERY
            counters.rooms, counters.members = broker.rooms_total, broker.memberships_total
            beat()
        if writer is not None and writer.pending:
            writer.flush()
    if writer is not None:
        writer.close(timeout=1.5)  # what it has goes to disk before the supervisor's 2 s are up
    os._exit(0)
