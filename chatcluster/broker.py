"""The bus broker: one process that gives every batch its place in the one order and keeps the roster.

Workers PUSH batches to the broker; it stamps each with its epoch and a global
sequence number and PUBlishes it to every worker. The broker alone keeps the
cluster roster: it decodes the batches that hold roster requests (claims,
departures, /who), decides each in order (`roster.Roster.decide`) and sends
the batch on with the verdicts in place of the requests, under the
publisher's own name and number; chat-only batches pass without being
decoded. A message it cannot read, or an event whose decision fails, is
dropped, logged and counted: it must never take the broker down, since every
restarted broker would meet it again when the workers resend. `Broker` is
pure apart from `emit`; `run_broker` is the process around it.
"""

from __future__ import annotations

import logging
import os
import random
import signal
import time
from collections.abc import Callable, Sequence
from typing import Any

import zmq

from . import events as E
from . import roster as R
from . import stats as S
from .bus import Endpoints
from .wire import FLAG_ROSTER, HEADER, UNREADABLE_PAYLOAD, decode, encode, peek

log = logging.getLogger("chatcluster.broker")

BROKER = "broker"  # the publisher name of what the broker itself puts in the stream
RESYNC_WAIT = 1.0  # seconds a restarted broker waits for the live workers to resync
SUBSCRIBER_WAIT = 1.0  # seconds a broker waits for the known workers' SUB sockets
NUDGE_EVERY = 0.1  # least seconds between two "new epoch" pings to unadmitted workers
COMPLAIN_EVERY = 1.0  # least seconds between two log lines about unreadable input
BEAT_EVERY = 0.25  # seconds between two heartbeats in the stats file


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
        self.unreadable = 0  # messages and events dropped because they could not be read or decided
        self.unknown = 0  # events of kinds this code does not know, passed on as they came
        self.last_complaint = -COMPLAIN_EVERY
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
        self.emit(HEADER.pack(self.epoch, self.gseq, time.monotonic_ns()), payload)

    def nudge(self, now: float) -> None:
        """Tell workers that have not noticed yet that there is a new broker."""
        if now - self.last_nudge >= NUDGE_EVERY:
            self.last_nudge = now
            self.send(encode(BROKER, 0, [E.Ping()]))

    def snapshot(self, worker: str, nonce: int) -> None:
        self.send(encode(BROKER, 0, [self.roster.snapshot_for(worker, nonce)]))

    def complain(self, now: float, what: str, *args: Any) -> None:
        self.unreadable += 1
        if now - self.last_complaint >= COMPLAIN_EVERY:
            self.last_complaint = now
            log.error("broker: " + what + " (%d dropped so far)", *args, self.unreadable)

    def receive(self, payload: bytes, now: float) -> None:
        try:
            flags, pseq, publisher, _ = peek(payload)
        except UNREADABLE_PAYLOAD as exc:
            self.complain(now, "dropped an unreadable bus message: %s", exc)
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
            try:
                publisher, _, events = decode(payload)
            except UNREADABLE_PAYLOAD as exc:
                self.complain(now, "dropped an unreadable batch of %s: %s", publisher, exc)
                return
            self.send(encode(publisher, pseq, self.decide(publisher, events, now)))
            for ev in events:
                if type(ev) is E.Hello:
                    if self.resyncing:
                        self.waiting.append((publisher, ev.nonce))
                    else:
                        self.snapshot(publisher, ev.nonce)
        if self.resyncing and not self.expected:
            self.end_resync(now)

    def decide(self, publisher: str, events: list[E.Event], now: float) -> list[E.Event]:
        """The roster's verdicts for one batch; an event that cannot be read or decided is dropped."""
        decided: list[E.Event] = []
        for ev in events:
            kind = type(ev)
            if kind is E.Malformed:
                self.complain(now, "dropped a malformed event from %s: %r", publisher, ev)
                continue
            if kind is E.Unknown:
                self.unknown += 1  # newer code's event: the workers may know it
                decided.append(ev)
                continue
            try:
                d = self.roster.decide(publisher, ev)
            except Exception as exc:  # noqa: BLE001 (one bad event must not stop the order)
                self.complain(now, "dropped an event from %s that could not be decided: %r (%s)", publisher, ev,
                              exc)
                continue
            if d is not None:
                decided.append(d)
        return decided

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
        self.send(encode(BROKER, 0, self.roster.decide_batch(BROKER, [E.Gone(worker)])))
        if self.resyncing and not self.expected:
            self.end_resync(now)

    def tick(self, now: float) -> None:
        if self.resyncing and now >= self.phase_ends:
            self.end_resync(now)


def run_broker(runtime_dir: str, control_fd: int, workers: Sequence[str] = (),
               stats: S.StatsFile | None = None) -> None:
    """The broker process. `workers` are the live workers when this broker replaces a dead one.

    With `stats` it beats and counts its traffic in the stats file's broker block, where the
    supervisor watches the heartbeat (a broker that stops beating is killed and replaced).
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the supervisor's to handle
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    counters = stats.broker_counters() if stats is not None else S.BrokerCounters()
    counters.pid, counters.started = os.getpid(), time.time()

    def beat() -> None:
        counters.heartbeat = time.monotonic()
        if stats is not None:
            stats.write_broker(counters)

    beat()
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
    beat()

    def emit(header: bytes, payload: bytes) -> None:
        pub.send(header, zmq.SNDMORE)
        pub.send(payload, copy=len(payload) < 8192)
        counters.batches_out += 1
        counters.bytes_out += len(payload)

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
    next_beat = 0.0
    while True:
        for sock, _ in poller.poll(50 if broker.resyncing else BEAT_EVERY * 1000):
            if sock is pull:
                for _ in range(1000):
                    try:
                        payload = pull.recv(zmq.NOBLOCK, copy=True)
                    except zmq.Again:
                        break
                    counters.batches_in += 1
                    counters.bytes_in += len(payload)
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
        now = time.monotonic()
        broker.tick(now)
        if now >= next_beat:
            next_beat = now + BEAT_EVERY
            beat()
