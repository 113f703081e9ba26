"""The bus process of a host in a multi-host cluster: the local ZeroMQ bus on one side, the NATS stream on the other.

With `nats_servers` set, the supervisor runs this in the bus process instead
of `broker.run_broker`. One asyncio loop holds everything: the workers' PULL
socket and the XPUB socket they subscribe to (their FDs through
`loop.add_reader`, drained as edge-triggered ZeroMQ FDs must be), the
supervisor's control pipe, and a `natsbridge.Bridge` to the shared JetStream
stream. What the local workers publish goes to the stream; what the stream
holds, from every host, is applied in stream order by a
`streambroker.StreamBroker` and delivered to the local workers. The workers
stay plain epoll loops and never see NATS.

Besides: a snapshot of the shared state is written to the KV bucket by one
host (the live host with the smallest name) every SNAPSHOT_EVERY seconds of
stream time, and read by a host that starts later, which then reads the
history back from the stream; the link's state is told to every client once
when it goes and once when it comes back (after LINK_GRACE, so a reconnect
to another NATS node is no news); and RUNTIME_DIR/multihost.json says, every
second, where this host stands (for `chatcluster status` and /metrics).
Needs nats-py, which only this process imports.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import time
import zlib
from collections.abc import Sequence
from typing import Any

import zmq

from . import events as E
from . import hosts as H
from . import natsbridge as NB
from . import paths
from . import stats as S
from .broker import BEAT_EVERY, SUBSCRIBER_WAIT, BrokerSettings, take_batches
from .bus import Endpoints
from .config import nats_urls
from .procs import EXIT_BOOT_FAILED
from .settings import read_live_config
from .streambroker import HISTORY_REPLAY_MAX, StreamBroker

log = logging.getLogger("chatcluster.multihost")

SNAPSHOT_EVERY = 10.0  # seconds of stream time between two snapshots of the shared state
STATUS_EVERY = 1.0  # seconds between two updates of multihost.json
GONE_GRACE = 0.1  # seconds between the supervisor's word that a worker is gone and acting on it
LINK_GRACE = 2.0  # a link down for less than this (a reconnect to another node) is not told to users
LINK_DOWN = "the link to the other servers is down; what you type is held and delivered when it is back"
LINK_BACK = "the link to the other servers is back"


class NodeNameTaken(NB.NatsError):
    """Another host runs under this host's node_name: restarting cannot fix it."""


def nats_settings(values: dict[str, Any]) -> NB.NatsSettings:
    """The bridge's settings from the configuration's values."""
    def opt(name: str) -> str | None:
        return str(values[name]) or None

    return NB.NatsSettings(
        servers=nats_urls(values["nats_servers"]), node_name=values["node_name"], cluster=values["nats_cluster"],
        replicas=int(values["nats_replicas"]), max_age=float(values["nats_max_age"]),
        max_bytes=int(values["nats_max_bytes"]), user=opt("nats_user"), password_file=opt("nats_password_file"),
        creds_file=opt("nats_creds_file"), nkey_seed_file=opt("nats_nkey_seed_file"), ca_file=opt("nats_ca_file"),
        cert_file=opt("nats_cert_file"), key_file=opt("nats_key_file"),
        outbox_max_age=float(values["nats_hold_seconds"]))


def check_reachable(values: dict[str, Any]) -> None:
    """Connect to NATS and make sure of the stream, then go: NatsError (one line) if that fails.

    `chatcluster start` calls it before the supervisor starts anything, so that an unreachable
    NATS or refused credentials are one line and exit status 1, not a bus process that dies.
    """
    NB.quiet_asyncio()
    asyncio.run(NB.probe(nats_settings(values)))


def encode_snapshot(state: dict[str, Any]) -> bytes:
    return zlib.compress(json.dumps(state, separators=(",", ":")).encode(), 1)


class HostBus:
    """One host's bus process in a multi-host cluster (see the module docstring)."""

    def __init__(self, runtime_dir: str, control_fd: int, workers: Sequence[str], stats: S.StatsFile | None,
                 values: dict[str, Any]) -> None:
        self.runtime_dir = runtime_dir
        self.control_fd = control_fd
        self.workers = list(workers)
        self.stats = stats
        self.values = values
        self.ns = nats_settings(values)
        self.node = self.ns.node_name
        self.counters = stats.broker_counters() if stats is not None else S.BrokerCounters()
        self.counters.pid, self.counters.started = os.getpid(), time.time()
        self.stopping = asyncio.Event()
        self.link_down = False  # users were told the link is down
        self.link_check: asyncio.TimerHandle | None = None
        self.writing: asyncio.Task[bool] | None = None  # a snapshot being written
        self.snapshot_seq = 0  # the sequence of the snapshot this host started from, or last wrote
        self.started_after = 0
        self.last_stream_seq = 0
        self.control_buf = b""
        self.orphaned = False  # the supervisor is gone: nobody will tell us which workers are
        self.bridge = NB.Bridge(self.ns, on_state=self.on_state, on_handed_back=self.on_handed_back)
        self.broker: StreamBroker | None = None
        self.tasks: list[asyncio.Task[Any]] = []

    # -- the process ------------------------------------------------------------------------------

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.stopping.set)
        self.beat()
        await self.bridge.connect()
        await self.bridge.ensure_stream()
        self.store = await NB.SnapshotStore.open(self.bridge)
        # The sockets are bound before the stream is read back, so the workers' HELLOs wait in them.
        endpoints = Endpoints.in_dir(self.runtime_dir)
        self.ctx: zmq.Context[Any] = zmq.Context()
        self.pull = self.ctx.socket(zmq.PULL)
        self.pull.setsockopt(zmq.RCVHWM, 0)
        self.pull.bind(endpoints.inbound)
        self.pub = self.ctx.socket(zmq.XPUB)
        self.pub.setsockopt(zmq.SNDHWM, 0)
        self.pub.setsockopt(zmq.XPUB_VERBOSE, 1)
        self.pub.bind(endpoints.outbound)
        settings = BrokerSettings.from_values(self.values)
        broker = self.broker = StreamBroker(self.emit, self.bridge.submit, self.node, self.workers, settings)
        after = await self.start_point()
        self.started_after = after
        self.bridge.hello = lambda: broker.hello(self.live_workers())
        self.bridge.begin()
        await self.wait_for_subscribers()
        self.beat()
        log.info("bus process of host %s up (epoch %x), reading the stream %s after sequence %d%s", self.node,
                 broker.epoch, self.ns.stream, after,
                 f", {len(self.workers)} workers to resync" if self.workers else "")
        if self.workers:
            broker.nudge(time.monotonic())
        loop.add_reader(self.fd(self.pull), self.on_pull)
        loop.add_reader(self.fd(self.pub), self.on_pub)
        loop.add_reader(self.control_fd, self.on_control)
        self.tasks = [asyncio.create_task(self.consume(after), name="stream-reader"),
                      asyncio.create_task(self.beating(), name="beat")]
        stop = asyncio.create_task(self.stopping.wait())
        reader = self.tasks[0]
        await asyncio.wait([stop, reader], return_when=asyncio.FIRST_COMPLETED)
        if reader.done() and not self.stopping.is_set():
            reader.result()  # the reader ended on its own: its error ends the process
        # Told to stop while workers of ours still run (a TERM to the whole process group, as
        # `kill -- -PGID` sends): they are saying goodbye to their users through the stream, so
        # it goes on serving them until the supervisor has reaped them all (GONE for each).
        deadline = time.monotonic() + float(self.values.get("graceful_timeout", 10.0)) + 1.0
        while self.local_workers() and not self.orphaned and not reader.done() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await self.close()

    async def close(self) -> None:
        loop = asyncio.get_running_loop()
        for fd in (self.fd(self.pull), self.fd(self.pub), self.control_fd):
            loop.remove_reader(fd)
        self.on_pull()  # the workers' last batches (their users' departures) go out before the bye
        await self.bridge.close(say_bye=True)
        for t in self.tasks:
            t.cancel()
        self.pull.close(0)
        self.pub.close(0)
        self.ctx.term()

    async def start_point(self) -> int:
        """Where to read the stream from: after the newest snapshot (loaded), or its start, or its end."""
        assert self.broker is not None
        first, last = await self.bridge.stream_bounds()
        snap = await self.store.read()
        if snap is not None:
            seq, data = snap
            if seq >= first - 1:
                st = json.loads(zlib.decompress(data))
                try:
                    self.broker.load(st)
                except ValueError as exc:
                    raise NB.NatsError(f"{exc}; this host cannot join the cluster {self.ns.cluster}") from None
                self.bridge.book = H.HostBook.restore(st["book"])
                self.snapshot_seq = seq
                frm = max(int(st["history_from"]), first, seq - HISTORY_REPLAY_MAX, 1)
                if self.broker.history.max_lines > 0 and frm <= seq:
                    n = await self.replay_history(frm, seq)
                    log.info("read back %d batches of the stream (sequences %d-%d) for the rooms' history", n,
                             frm, seq)
                log.info("starting from the snapshot after sequence %d: %d users in %d rooms", seq,
                         len(self.broker.roster), len(self.broker.directory.rooms))
                return seq
            log.error("the newest snapshot (after sequence %d) is older than the stream's first message (%d): "
                      "messages between were removed (nats_max_age, nats_max_bytes); starting from it anyway",
                      seq, first)
            return seq
        if first <= 1:
            return 0  # nothing was ever removed: the whole stream, from its start, is the state
        log.warning("no snapshot of the shared state and the stream's start is gone (it begins at %d): "
                    "starting after %d with an empty directory", first, last)
        return last

    async def replay_history(self, first: int, last: int) -> int:
        assert self.broker is not None
        n, seq, part = 0, -1, 0
        async for b in self.bridge.scan(first, last):
            part = part + 1 if b.seq == seq else 0
            seq = b.seq
            self.broker.replay_history(b.seq, b.ts, b.data, part)
            n += 1
        return n

    async def wait_for_subscribers(self) -> None:
        """After a restart of this process the workers' SUB sockets reconnect on their own; waiting for them
        before the first message keeps the restart from opening a slow-joiner gap."""
        assert self.broker is not None
        deadline = time.monotonic() + SUBSCRIBER_WAIT
        subscribed: set[str] = set()
        while self.workers and time.monotonic() < deadline:
            subscribed |= self.drain_subscriptions()
            if set(self.workers) <= subscribed:
                break
            await asyncio.sleep(0.02)

    @staticmethod
    def fd(sock: zmq.Socket[Any]) -> int:
        """A ZeroMQ socket's FD, edge-triggered: after a wake-up, EVENTS says what there is."""
        return int(sock.getsockopt(zmq.FD))

    def drain_subscriptions(self) -> set[str]:
        got: set[str] = set()
        while int(self.pub.getsockopt(zmq.EVENTS)) & zmq.POLLIN:
            msg = self.pub.recv()
            if msg[:1] == b"\x01" and msg.endswith(b"\0"):
                name = msg[1:-1].decode(errors="replace")
                got.add(name)
                if self.broker is not None:
                    self.broker.subscribed(name)
        return got

    def local_workers(self) -> set[str]:
        """Our workers not yet reported gone by the supervisor."""
        b = self.broker
        return set() if b is None else (b.listening | b.admitted) - b.dead

    def live_workers(self) -> list[str]:
        b = self.broker
        if b is None:
            return list(self.workers)
        return sorted(w for w in (b.known | b.listening | b.admitted) - b.dead if b.is_local(w))

    # -- the local bus ----------------------------------------------------------------------------

    def emit(self, header: bytes, payload: bytes) -> None:
        if len(payload) < 8192:
            self.pub.send(header + payload)
        else:
            self.pub.send(header, zmq.SNDMORE)
            self.pub.send(payload, copy=False)
        self.counters.batches_out += 1
        self.counters.bytes_out += len(payload)

    def on_pull(self) -> None:
        assert self.broker is not None
        if take_batches(self.pull, self.broker, self.counters):
            asyncio.get_running_loop().call_soon(self.on_pull)  # more waiting: after the others' turn

    def on_pub(self) -> None:
        self.drain_subscriptions()

    def on_control(self) -> None:
        try:
            chunk = os.read(self.control_fd, 65536)
        except BlockingIOError:
            return
        if not chunk:
            log.info("supervisor went away; bus process exits")
            self.orphaned = True
            self.stopping.set()
            asyncio.get_running_loop().remove_reader(self.control_fd)
            return
        self.control_buf += chunk
        while b"\n" in self.control_buf:
            line, self.control_buf = self.control_buf.split(b"\n", 1)
            word, _, arg = line.decode().partition(" ")
            if word == "GONE" and self.broker is not None:
                # What the worker sent before it exited (its users' goodbyes) may still be on its way
                # through the ipc socket, which the pipe can overtake: take it first, then let it go.
                self.on_pull()
                asyncio.get_running_loop().call_later(GONE_GRACE, self.worker_gone, arg)

    def worker_gone(self, worker: str) -> None:
        assert self.broker is not None
        self.on_pull()
        self.broker.gone(worker, time.monotonic())

    # -- the stream -------------------------------------------------------------------------------

    async def consume(self, after: int) -> None:
        broker = self.broker
        assert broker is not None
        seq, part = -1, 0
        async for item in self.bridge.read(after, marks=True):
            now = time.monotonic()
            if isinstance(item, NB.Batch):
                part = part + 1 if item.seq == seq else 0
                seq = item.seq
                broker.apply(item.node, item.seq, item.ts, item.data, now, part)
            elif isinstance(item, NB.Mark):
                broker.applied, broker.stream_ts = item.seq, item.ts
                if broker.snapshot_due(item.ts, SNAPSHOT_EVERY) and self.writes_snapshots():
                    self.write_snapshot()
            elif isinstance(item, NB.HostHello):
                log.info("host %s is up (incarnation %s, at sequence %d)", item.node, item.incarnation, item.seq)
                broker.host_hello(item.node, item.data, now)
            elif isinstance(item, H.HostGone):
                log.info("host %s (incarnation %s) is gone at sequence %d: %s", item.node, item.incarnation,
                         item.seq, item.reason)
                ours = item.node == self.node and item.incarnation == self.bridge.incarnation
                if ours and item.reason == "restarted":
                    raise NodeNameTaken(f"another host publishes under this host's node_name {self.node!r}; give "
                                        "each host a node_name of its own (--node-name)")
                broker.host_gone(item.node, item.reason, now)
            elif isinstance(item, NB.Gap):
                log.warning("stream sequences %d-%d never arrived", item.first, item.last)
                broker.tell(E.StreamGap(f"stream sequences {item.first}-{item.last} never arrived"))
            elif isinstance(item, H.LostMessages):
                text = f"messages {item.first}-{item.last} of host {item.node} never reached the stream"
                log.warning("%s", text)
                broker.tell(E.StreamGap(text))

    def writes_snapshots(self) -> bool:
        """The live host with the smallest name writes them (every host agrees who that is)."""
        hosts = self.bridge.book.hosts
        return bool(hosts) and min(hosts) == self.node

    def write_snapshot(self) -> None:
        assert self.broker is not None
        if self.writing is not None and not self.writing.done():
            return  # the last one is still being written: this one is skipped, the next is due soon
        # Taken here, between two stream messages, so that it is the state after exactly this
        # sequence; encoded in a thread, so that a large roster does not hold up the chat for long.
        state = self.broker.state(self.bridge.book.snapshot())
        seq = int(state["seq"])

        async def write() -> bool:
            started = time.monotonic()
            data = await asyncio.to_thread(encode_snapshot, state)
            took = time.monotonic() - started
            if took > 0.1:
                log.info("the snapshot after sequence %d (%d users, %d bytes) took %.0f ms to encode", seq,
                         len(state["members"]), len(data), took * 1000)
            try:
                done = await self.store.write(seq, data)
            except Exception as exc:  # noqa: BLE001 (the next one is due in SNAPSHOT_EVERY seconds)
                log.warning("could not write the snapshot after sequence %d: %s", seq, NB._explain(exc))
                return False
            if done:
                self.snapshot_seq = seq
            return done

        self.writing = asyncio.create_task(write(), name="snapshot")

    def on_state(self, state: str, detail: str) -> None:
        """The link's state: users hear of it once when it goes (for longer than LINK_GRACE), once when back."""
        loop = asyncio.get_running_loop()
        if state in (NB.DISCONNECTED, NB.STALLED):
            if not self.link_down and self.link_check is None:
                self.link_check = loop.call_later(LINK_GRACE, self.still_down)
        elif state == NB.CONNECTED:
            if self.link_check is not None:
                self.link_check.cancel()
                self.link_check = None
            if self.link_down:
                self.link_down = False
                if self.broker is not None:
                    self.broker.tell(E.Notice(LINK_BACK))

    def still_down(self) -> None:
        self.link_check = None
        if self.bridge.state in (NB.DISCONNECTED, NB.STALLED) and not self.link_down:
            self.link_down = True
            log.warning("the link to NATS is down (%s); users are told", self.bridge.state)
            if self.broker is not None:
                self.broker.tell(E.Notice(LINK_DOWN))

    def on_handed_back(self, tokens: list[object], why: str) -> None:
        log.warning("%d batches were not delivered to the stream: %s", len(tokens), why)
        if self.broker is not None:
            self.broker.handed_back(tokens)

    # -- heartbeat and status ---------------------------------------------------------------------

    def beat(self) -> None:
        self.counters.heartbeat = time.monotonic()
        if self.broker is not None:
            self.counters.rooms, self.counters.members = self.broker.rooms_total, self.broker.memberships_total
        if self.stats is not None:
            self.stats.write_broker(self.counters)

    async def beating(self) -> None:
        next_status = 0.0
        while True:
            await asyncio.sleep(BEAT_EVERY)
            self.beat()
            # ZeroMQ's FDs are edge-triggered and sending on XPUB may swallow an edge: look anyway.
            self.on_pull()
            self.on_pub()
            now = time.monotonic()
            if now >= next_status:
                next_status = now + STATUS_EVERY
                await self.write_status()

    async def write_status(self) -> None:
        try:
            self.last_stream_seq = await asyncio.wait_for(self.bridge.stream_last_seq(), 1.0)
        except Exception:  # noqa: BLE001 (NATS away: the last figure known stands)
            pass
        try:
            paths.atomic_write(os.path.join(self.runtime_dir, paths.MULTIHOST_STATUS),
                               json.dumps(self.status()), fsync=False)
        except OSError as exc:
            log.debug("cannot write %s: %s", paths.MULTIHOST_STATUS, exc)

    def status(self) -> dict[str, Any]:
        b, br = self.broker, self.bridge
        assert b is not None
        last = max(self.last_stream_seq, b.applied)
        url = br.nc.connected_url.geturl() if br.nc is not None and br.nc.connected_url else None
        hosts = []
        for node, h in sorted(br.book.hosts.items()):
            applied = b.applied if node == self.node else br.applied.get(node, 0)
            hosts.append({"node": node, "incarnation": h.incarnation, "applied_seq": applied,
                          "lag": max(0, last - applied), "self": node == self.node})
        st = br.stats
        return {
            "node": self.node, "cluster": self.ns.cluster, "stream": self.ns.stream, "replicas": self.ns.replicas,
            "state": br.state, "link_down_told": self.link_down, "url": url, "servers": list(self.ns.servers),
            "incarnation": br.incarnation, "stream_last_seq": last, "applied_seq": b.applied,
            "lag": max(0, last - b.applied), "acked_seq": st.last_acked_seq, "outbox": br.pending,
            "published": st.published, "publish_retries": st.publish_retries, "handed_back": st.handed_back,
            "undelivered": b.undelivered, "gaps": st.gaps, "consumer_resets": st.consumer_resets,
            "longest_ack_wait_s": round(st.longest_ack_wait, 3), "snapshot_seq": self.snapshot_seq,
            "started_after": self.started_after, "users": len(b.roster), "rooms": len(b.directory.rooms),
            "listening": sorted(b.listening), "hosts": hosts, "updated": time.time(),
        }


def run_host_bus(runtime_dir: str, control_fd: int, workers: Sequence[str] = (),
                 stats: S.StatsFile | None = None) -> None:
    """The bus process of a multi-host cluster; `workers` are the live workers when it replaces a dead one."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the supervisor's to handle
    NB.quiet_asyncio()
    values, _, _ = read_live_config(runtime_dir)
    os.set_blocking(control_fd, False)
    bus = HostBus(runtime_dir, control_fd, workers, stats, values)
    try:
        asyncio.run(bus.run())
    except NodeNameTaken as exc:
        # Restarting would only take the name back from the other host, which would then do the
        # same: this host stops instead (the supervisor halts on this status).
        log.error("%s", exc)
        os._exit(EXIT_BOOT_FAILED)
    except NB.NatsError as exc:
        log.error("%s", exc)
        os._exit(1)
    except Exception:  # noqa: BLE001 (the supervisor starts another; the log says why this one ended)
        log.exception("the bus process failed")
        os._exit(70)
    os._exit(0)

