"""The load generator: client processes, each with its own epoll loop, and the code that drives them.

A load is a set of client processes (`ClientPlan` says what one of them does).
Each process opens its share of the connections at a bounded rate with a bounded
number in flight, binding them round-robin to several loopback source addresses
so that no address runs out of ephemeral ports, and waits for every welcome
line. Only when every process reports "ready" does the parent say "go"; the
senders then write their lines (as fast as they can, or paced) and everybody
counts what arrives until it has all it should have, the parent says "stop", or
the process's own deadline passes.

Why the counting is cheap enough not to be the bottleneck:

* Every load line carries the byte `#` exactly once and the server's own lines
  never do, so the lines received in a chunk are `chunk.count(b"#")`: C speed,
  indifferent to how lines are split across reads, and blind to notices.
* Latency is measured on a sample. A sender stamps its line with
  `time.monotonic_ns()` (CLOCK_MONOTONIC, shared by all processes on the
  machine) when the line's sequence number is a multiple of `sample_every`:
  `#T<ns>,<sender>,<seq>:`, otherwise `#-<sender>,<seq>:`. Which lines are
  sampled depends on nothing but the sequence number, so the sample is not
  biased toward fast or slow deliveries. Receivers find stamps with
  `bytes.find`, so the Python cost is per sampled line, not per line.
* Only "hot" receivers (every `hot_every`-th, by global index) measure latency.
  The others only count; with a `cold_interval` they are also "cold": they sit
  in a second epoll set that is drained every `cold_interval` seconds, which
  coalesces many small deliveries into one read. The server cannot tell the
  difference as long as its writes land in socket buffers far from full: at a
  paced rate once a second is fine, a blast needs a few milliseconds (fanout
  uses 2 ms; reading at once would cost a Python call per line against a
  server that sends each line on its own, and take CPU from that server).

The number of lines that should arrive is computed, never observed: every held
receiver should get every line of every held sender, every sender every line but
its own. Whatever is missing at the end is reported as lost.

Run a load against a server that is already running:

    python benchmarks/loadgen.py --port 7000 --receivers 200 --senders 4 --lines 5000
"""

from __future__ import annotations

import argparse
import errno
import math
import multiprocessing
import multiprocessing.connection as mpc
import os
import select
import signal
import socket
import sys
import time
from array import array
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import _common
import psutil
from _common import Server, ServerMonitor, cpu_used, latency_summary

MARK = b"#"
STAMP = b"#T"
# 64 KiB: large enough to take ~1,000 lines per read, small enough to stay
# in malloc's heap (a 256 KiB buffer per read would be an mmap and munmap each).
RECV_BYTES = 64 * 1024
# Sockets per client process: the hard limit on open files is 20,000 and each
# process also needs a few descriptors of its own (epoll sets, the control pipe).
MAX_SOCKETS_PER_PROCESS = 19_000
# Connections per source address. Ports are picked at connect() time
# (IP_BIND_ADDRESS_NO_PORT), so the limit is the ephemeral range per
# (source, destination) pair, about 28,000 by default; stay well below it.
CONNECTIONS_PER_SOURCE = 16_000
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)
_PAD = b"x" * 4096
COLD_SLICE = 256

EPOLLIN, EPOLLOUT = select.EPOLLIN, select.EPOLLOUT
# What a connection is. HOT: a receiver that reads at once and measures latency;
# QUIET: reads at once, only counts; COLD: in the second epoll set, drained every
# cold_interval seconds, only counts.
CONNECTING, WELCOMING, HOT, QUIET, COLD, SENDER = range(6)


def source_addresses(count: int) -> tuple[str, ...]:
    """`count` loopback addresses to bind clients to: 127.0.0.2, 127.0.0.3, ..., 127.0.1.1, ..."""
    addrs = []
    third, fourth = 0, 2
    while len(addrs) < count:
        addrs.append(f"127.0.{third}.{fourth}")
        fourth += 1
        if fourth > 254:
            third, fourth = third + 1, 1
    return tuple(addrs)


@dataclass(frozen=True)
class ClientPlan:
    """What one client process does. Its first connections are its senders."""

    index: int
    host: str
    port: int
    sources: tuple[str, ...]
    senders: tuple[int, ...]  # global ids of the senders this process runs
    receivers: int
    receiver_offset: int  # global index of this process's first receiver
    hot_every: int  # receivers whose global index is a multiple of this read at once
    lines_per_sender: int
    line_bytes: int  # including the final "\n"
    rate_per_sender: float  # lines per second; 0 means as fast as possible
    sender_phase_s: tuple[float, ...]  # when each sender starts, after "go"
    sample_every: int  # lines whose sequence number is a multiple of this carry a timestamp
    connect_rate: float  # new connections per second; 0 means no limit
    max_inflight: int  # connections started but not yet welcomed
    welcome_timeout: float
    max_failures: int  # stop opening connections after this many failed
    cold_interval: float  # 0: the other receivers read at once too (but do not measure)
    hard_deadline: float  # time.monotonic() at which the process gives up and reports

    @property
    def connections(self) -> int:
        return len(self.senders) + self.receivers


def plan_clients(
    host: str,
    port: int,
    *,
    receivers: int,
    senders: int,
    lines_per_sender: int,
    processes: int = 0,
    sources: int = 0,
    line_bytes: int = 60,
    total_rate: float = 0.0,
    sample_every: int = 1,
    hot_receivers: int = 0,
    connect_rate: float = 0.0,
    max_inflight: int = 64,
    welcome_timeout: float = 20.0,
    max_failures: int = 200,
    cold_interval: float = 0.25,
    deadline_s: float = 600.0,
) -> list[ClientPlan]:
    """Split a load over client processes.

    `total_rate` (lines/s over all senders; 0 = as fast as possible) is spread
    evenly: sender j starts j/total_rate seconds after "go", so the merged stream
    is regular. `hot_receivers` is how many receivers read at once and measure
    latency (0 = all). `connect_rate` is for the whole load.
    """
    total = receivers + senders
    processes = processes or max(1, math.ceil(total / MAX_SOCKETS_PER_PROCESS))
    if math.ceil(total / processes) > MAX_SOCKETS_PER_PROCESS:
        need = math.ceil(total / MAX_SOCKETS_PER_PROCESS)
        raise ValueError(
            f"{total:,} connections over {processes} processes is more than {MAX_SOCKETS_PER_PROCESS:,} "
            f"sockets per process (the open-files limit is 20,000); use --processes {need} or more"
        )
    addrs = source_addresses(sources or max(1, math.ceil(total / CONNECTIONS_PER_SOURCE)))
    hot_every = max(1, receivers // hot_receivers) if hot_receivers else 1
    per_sender_rate = total_rate / senders if (senders and total_rate > 0) else 0.0
    deadline = time.monotonic() + deadline_s
    plans = []
    offset = 0
    for k in range(processes):
        mine = receivers // processes + (1 if k < receivers % processes else 0)
        sender_ids = tuple(range(k, senders, processes))
        plans.append(
            ClientPlan(
                index=k,
                host=host,
                port=port,
                # Rotate so that every process starts on a different address.
                sources=addrs[k % len(addrs) :] + addrs[: k % len(addrs)],
                senders=sender_ids,
                receivers=mine,
                receiver_offset=offset,
                hot_every=hot_every,
                lines_per_sender=lines_per_sender,
                line_bytes=line_bytes,
                rate_per_sender=per_sender_rate,
                sender_phase_s=tuple((j / total_rate) if total_rate > 0 else 0.0 for j in sender_ids),
                sample_every=max(1, sample_every),
                connect_rate=connect_rate / processes if connect_rate else 0.0,
                max_inflight=max_inflight,
                welcome_timeout=welcome_timeout,
                max_failures=max_failures,
                cold_interval=cold_interval,
                hard_deadline=deadline,
            )
        )
        offset += mine
    return plans


# --------------------------------------------------------------------------- one client process


class _Sender:
    __slots__ = ("fd", "sid", "seq", "total", "out", "next_due_ns", "interval_ns", "writing")

    def __init__(self, fd: int, sid: int, total: int) -> None:
        self.fd = fd
        self.sid = sid
        self.seq = 0
        self.total = total
        self.out = b""
        self.next_due_ns = 0
        self.interval_ns = 0
        self.writing = False


class ClientProcess:
    """The epoll loop of one client process. Talks to the parent over `ctl`."""

    def __init__(self, plan: ClientPlan, ctl: mpc.Connection) -> None:
        self.plan = plan
        self.ctl = ctl
        self.ctl_fd = ctl.fileno()
        self.hot = select.epoll()
        self.cold = select.epoll()
        self.hot.register(self.ctl_fd, EPOLLIN)
        self.socks: dict[int, socket.socket] = {}
        self.kind: dict[int, int] = {}
        self.conn_index: dict[int, int] = {}
        self.partial: dict[int, bytes] = {}  # welcome buffers, then tails of hot receivers
        self.started: dict[int, float] = {}  # connect start of those not yet welcomed
        self.senders: dict[int, _Sender] = {}
        self.n_cold = 0
        self.width = plan.line_bytes - 1
        # connecting
        self.next_conn = 0
        self.inflight = 0
        self.tokens = 1.0
        self.last_refill = time.monotonic()
        self.stop_opening = False
        self.first_connect_ns = 0
        self.last_welcome_ns = 0
        self.held_receivers = 0
        self.held_senders = 0
        self.failed = 0
        self.errors: Counter[str] = Counter()
        self.bad_welcome = 0
        self.ready_sent = False
        self.last_welcome_t = time.monotonic()
        self.stalled = False
        # running
        self.go = False
        self.expected = 0
        self.received = 0
        self.closed = 0
        self.first_send_ns = 0
        self.last_send_ns = 0
        self.last_recv_ns = 0
        self.done_ns = 0
        self.latencies = array("q")
        self.stopping = False
        self._next_progress = 0.0
        self._last_progress: tuple[int, int, int] = (-1, -1, -1)

    # ---- main loop

    def run(self) -> None:
        plan = self.plan
        next_cold = time.monotonic()
        next_housekeeping = 0.0
        try:
            while not self.stopping:
                now = time.monotonic()
                if now >= plan.hard_deadline:
                    break
                if not self.ready_sent:
                    self._open_more(now)
                if now >= next_housekeeping:
                    next_housekeeping = now + 0.2
                    self._housekeeping(now)
                timeout = min(0.2, max(0.0, next_cold - now), plan.hard_deadline - now)
                if not self.ready_sent and plan.connect_rate and self.next_conn < plan.connections:
                    timeout = min(timeout, 0.005)
                if self.go and plan.rate_per_sender:
                    due = min((s.next_due_ns for s in self.senders.values() if s.seq < s.total), default=None)
                    if due is not None:
                        timeout = min(timeout, max(0.0, (due - time.monotonic_ns()) / 1e9))
                for fd, ev in self.hot.poll(max(0.0, timeout), 1024):
                    k = self.kind.get(fd)
                    if k == HOT:
                        self._receive(fd, True)
                    elif k == QUIET:
                        self._receive(fd, False)
                    elif k == SENDER:
                        if ev & ~EPOLLOUT:
                            self._receive(fd, False)
                        if ev & EPOLLOUT and fd in self.senders:
                            self._write(self.senders[fd])
                    elif k == CONNECTING:
                        self._connected(fd)
                    elif k == WELCOMING:
                        self._welcome(fd)
                    elif fd == self.ctl_fd:
                        self._control()
                if self.go and plan.rate_per_sender:
                    self._pace()
                if time.monotonic() >= next_cold:
                    self._drain_cold_slice()
                    # Slices are spread over the interval so that every cold socket
                    # is read about once per interval and the work is smooth: a
                    # burst of reads every interval would take the CPU from the
                    # server all at once and show up as its latency.
                    next_cold = time.monotonic() + plan.cold_interval * min(1.0, COLD_SLICE / max(1, self.n_cold))
        finally:
            self._report_result()
            for s in self.socks.values():
                s.close()

    def _housekeeping(self, now: float) -> None:
        for fd, t in list(self.started.items()):
            if now - t > self.plan.welcome_timeout:
                self._fail(fd, f"no welcome within {self.plan.welcome_timeout:.0f} s")
        if not self.stop_opening and self.inflight and now - self.last_welcome_t > self.plan.welcome_timeout:
            # Nobody has been welcomed for a whole welcome timeout: the server
            # takes no more connections (it is full, or hung). Stop opening.
            self.stop_opening = self.stalled = True
        if (
            not self.ready_sent
            and self.inflight == 0
            and (self.stop_opening or self.next_conn >= self.plan.connections)
        ):
            self.ready_sent = True
            self._send(
                "ready",
                {
                    "held_receivers": self.held_receivers,
                    "held_senders": [s.sid for s in self.senders.values()],
                    "failed": self.failed,
                    "errors": dict(self.errors),
                    "bad_welcome": self.bad_welcome,
                    "stalled": self.stalled,
                    "first_connect_ns": self.first_connect_ns,
                    "last_welcome_ns": self.last_welcome_ns,
                },
            )
        if now >= self._next_progress:
            self._next_progress = now + 1.0
            state = (self.held_receivers + self.held_senders, self.received, self.failed)
            if state != self._last_progress:
                self._last_progress = state
                self._send("progress", {"held": state[0], "received": state[1], "failed": state[2]})

    def _send(self, what: str, data: dict[str, Any]) -> None:
        try:
            self.ctl.send((what, data))
        except OSError:
            self.stopping = True  # the parent is gone

    def _control(self) -> None:
        try:
            while self.ctl.poll():
                what, data = self.ctl.recv()
                if what == "go":
                    self._start(data)
                elif what == "enough":
                    self._give_up_connecting()
                elif what == "stop":
                    self.stopping = True
        except (EOFError, OSError):
            self.stopping = True  # the parent is gone: stop, report nothing to no one

    # ---- connecting

    def _open_more(self, now: float) -> None:
        plan = self.plan
        if plan.connect_rate:
            self.tokens = min(
                max(1.0, plan.connect_rate * 0.02), self.tokens + (now - self.last_refill) * plan.connect_rate
            )
            self.last_refill = now
        while (
            not self.stop_opening
            and self.next_conn < plan.connections
            and self.inflight < plan.max_inflight
            and (not plan.connect_rate or self.tokens >= 1.0)
        ):
            i = self.next_conn
            self.next_conn += 1
            self.tokens -= 1.0
            if not self.first_connect_ns:
                self.first_connect_ns = time.monotonic_ns()
            try:
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            except OSError as exc:
                self._count_failure(errno.errorcode.get(exc.errno or 0, str(exc)))
                self.stop_opening = True  # out of descriptors or memory: no point going on
                return
            try:
                sock.setblocking(False)
                sock.setsockopt(socket.SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)
                sock.bind((plan.sources[i % len(plan.sources)], 0))
                rc = sock.connect_ex((plan.host, plan.port))
                if rc not in (0, errno.EINPROGRESS):
                    raise OSError(rc, os.strerror(rc))
            except OSError as exc:
                sock.close()
                self._count_failure(errno.errorcode.get(exc.errno or 0, str(exc)))
                continue
            fd = sock.fileno()
            self.socks[fd] = sock
            self.kind[fd] = CONNECTING
            self.conn_index[fd] = i
            self.started[fd] = now
            self.inflight += 1
            self.hot.register(fd, EPOLLOUT)

    def _give_up_connecting(self) -> None:
        """The parent's connect phase is over: count what is still pending as failed, report ready."""
        self.stop_opening = True
        for fd in list(self.started):
            self._fail(fd, "not welcomed when the connect phase ended")
        self._housekeeping(time.monotonic())

    def _count_failure(self, reason: str) -> None:
        self.failed += 1
        self.errors[reason] += 1
        if self.failed >= self.plan.max_failures:
            self.stop_opening = True

    def _fail(self, fd: int, reason: str) -> None:
        if fd in self.started:
            del self.started[fd]
            self.inflight -= 1
        self._forget(fd)
        self._count_failure(reason)

    def _forget(self, fd: int) -> None:
        kind = self.kind.pop(fd, None)
        if kind == COLD:
            self.n_cold -= 1
        (self.cold if kind == COLD else self.hot).unregister(fd)
        self.partial.pop(fd, None)
        self.conn_index.pop(fd, None)
        self.senders.pop(fd, None)
        self.socks.pop(fd).close()

    def _connected(self, fd: int) -> None:
        err = self.socks[fd].getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self._fail(fd, errno.errorcode.get(err, str(err)))
            return
        self.kind[fd] = WELCOMING
        self.hot.modify(fd, EPOLLIN)

    def _welcome(self, fd: int) -> None:
        try:
            data = os.read(fd, 4096)
        except BlockingIOError:
            return
        except OSError as exc:
            self._fail(fd, errno.errorcode.get(exc.errno or 0, str(exc)))
            return
        if not data:
            self._fail(fd, "closed before the welcome line")
            return
        buf = self.partial.pop(fd, b"") + data
        end = buf.find(b"\n")
        if end < 0:
            if len(buf) > 4096:
                self._fail(fd, "no end of line in the first 4 KiB")
            else:
                self.partial[fd] = buf
            return
        buf = _common.without_greeting(buf)
        end = buf.find(b"\n")
        if not buf.startswith(_common.WELCOME_PREFIX):
            self.bad_welcome += 1
        del self.started[fd]
        self.inflight -= 1
        self.last_welcome_ns = time.monotonic_ns()
        self.last_welcome_t = time.monotonic()
        i = self.conn_index[fd]
        n_senders = len(self.plan.senders)
        if i < n_senders:
            self.kind[fd] = SENDER
            self.senders[fd] = _Sender(fd, self.plan.senders[i], self.plan.lines_per_sender)
            self.held_senders += 1
        else:
            self.held_receivers += 1
            if (self.plan.receiver_offset + i - n_senders) % self.plan.hot_every == 0:
                self.kind[fd] = HOT
            elif not self.plan.cold_interval:
                self.kind[fd] = QUIET
            else:
                self.kind[fd] = COLD
                self.n_cold += 1
                self.hot.unregister(fd)
                self.cold.register(fd, EPOLLIN)
        rest = buf[end + 1 :]
        if rest:
            self._account(fd, rest, self.kind[fd] == HOT)

    # ---- receiving

    def _receive(self, fd: int, parse: bool) -> None:
        try:
            data = os.read(fd, RECV_BYTES)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.closed += 1
            self._forget(fd)
            return
        self._account(fd, data, parse)

    def _account(self, fd: int, data: bytes, parse: bool) -> None:
        now = time.monotonic_ns()
        n = data.count(MARK)
        if n:
            self.received += n
            self.last_recv_ns = now
            if self.go and not self.done_ns and self.received >= self.expected:
                self.done_ns = now
                self._send("done", {"done_ns": now})
        if not parse:
            return
        # Stamps are read from whole lines only: the tail after the last newline
        # waits for the next read, so a stamp split across two reads still counts.
        tail = self.partial.pop(fd, None)
        if tail:
            data = tail + data
        end = data.rfind(b"\n")
        if end < len(data) - 1:
            self.partial[fd] = data[end + 1 :]
        if end < 0:
            return
        find = data.find
        lat = self.latencies
        i = find(STAMP, 0, end)
        while i >= 0:
            j = find(b",", i + 2, end)
            if j < 0:
                break
            try:
                lat.append(now - int(data[i + 2 : j]))
            except ValueError:
                pass
            i = find(STAMP, j, end)

    def _drain_cold_slice(self) -> None:
        """Read up to COLD_SLICE cold sockets that have data (epoll lists them about
        in the order they became readable, so none is left behind).

        A slice takes about a millisecond: draining ten thousand sockets in one
        go would keep the hot receivers waiting for tens of milliseconds and
        add that to the latency they measure.
        """
        for fd, _ev in self.cold.poll(0, COLD_SLICE):
            self._receive(fd, False)

    # ---- sending

    def _start(self, data: dict[str, Any]) -> None:
        total_lines = data["total_lines"]
        own = self.plan.lines_per_sender
        self.expected = self.held_receivers * total_lines + len(self.senders) * (total_lines - own)
        self.go = True
        if self.received >= self.expected:
            self.done_ns = time.monotonic_ns()
            self._send("done", {"done_ns": self.done_ns})
        t0 = data["t0_ns"]
        for s in self.senders.values():
            if self.plan.rate_per_sender:
                j = self.plan.senders.index(s.sid)
                s.interval_ns = int(1e9 / self.plan.rate_per_sender)
                s.next_due_ns = t0 + int(self.plan.sender_phase_s[j] * 1e9)
            else:
                s.writing = True
                self.hot.modify(s.fd, EPOLLIN | EPOLLOUT)

    def _lines(self, s: _Sender, count: int) -> bytes:
        now = time.monotonic_ns()
        if not self.first_send_ns:
            self.first_send_ns = now
        self.last_send_ns = now
        every = self.plan.sample_every
        width = self.width
        parts = []
        for _ in range(count):
            seq = s.seq
            s.seq += 1
            if seq % every == 0:
                head = b"#T%d,%d,%d:" % (now, s.sid, seq)
            else:
                head = b"#-%d,%d:" % (s.sid, seq)
            parts.append(head + _PAD[: width - len(head)] + b"\n")
        return b"".join(parts)

    def _write(self, s: _Sender) -> None:
        """Write what is pending; blasting senders refill 64 lines at a time, up to 16 times."""
        blast = not self.plan.rate_per_sender
        for _ in range(16):
            if not s.out:
                if blast and s.seq < s.total:
                    s.out = self._lines(s, min(64, s.total - s.seq))
                else:
                    break
            try:
                n = os.write(s.fd, s.out)
            except BlockingIOError:
                n = 0
            except OSError:
                self.closed += 1
                self._forget(s.fd)
                return
            s.out = s.out[n:]
            if s.out:
                break
        want = bool(s.out) or (blast and s.seq < s.total)
        if want != s.writing:
            s.writing = want
            self.hot.modify(s.fd, EPOLLIN | EPOLLOUT if want else EPOLLIN)

    def _pace(self) -> None:
        now = time.monotonic_ns()
        for s in list(self.senders.values()):
            if s.seq >= s.total or now < s.next_due_ns:
                continue
            due = min(s.total - s.seq, 1 + (now - s.next_due_ns) // s.interval_ns)
            s.next_due_ns += due * s.interval_ns
            s.out += self._lines(s, due)
            if not s.writing:
                self._write(s)

    def _report_result(self) -> None:
        self._send(
            "result",
            {
                "held_receivers": self.held_receivers,
                "held_senders": self.held_senders,
                "failed": self.failed,
                "errors": dict(self.errors),
                "bad_welcome": self.bad_welcome,
                "closed": self.closed,
                "expected": self.expected,
                "received": self.received,
                "sent": sum(s.seq for s in self.senders.values()),
                "first_send_ns": self.first_send_ns,
                "last_send_ns": self.last_send_ns,
                "last_recv_ns": self.last_recv_ns,
                "done_ns": self.done_ns,
                "latencies": self.latencies.tobytes(),
            },
        )


def _client_main(plan: ClientPlan, ctl: mpc.Connection) -> None:
    # Ctrl-C goes to the whole process group; the parent decides when we stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _common.raise_open_file_limit()
    ClientProcess(plan, ctl).run()


# --------------------------------------------------------------------------- the parent side


@dataclass
class _Child:
    plan: ClientPlan
    proc: Any
    conn: mpc.Connection
    ready: dict[str, Any] | None = None
    progress: dict[str, Any] = field(default_factory=dict)
    done_ns: int = 0
    result: dict[str, Any] | None = None
    gone: bool = False


class Load:
    """The client processes of one load, driven phase by phase by the parent.

    Use as a context manager: leaving it stops every client process it started
    (SIGTERM to each PID, SIGKILL if one lingers).
    """

    def __init__(self, plans: list[ClientPlan], *, verbose: bool = False, label: str = "load") -> None:
        self.plans = plans
        self.verbose = verbose
        self.label = label
        self.children: list[_Child] = []
        self._next_print = time.monotonic() + 2.0  # short loads print no progress
        self.t_go_ns = 0

    def __enter__(self) -> Load:
        ctx = multiprocessing.get_context("fork")
        for plan in self.plans:
            parent_end, child_end = ctx.Pipe()
            proc = ctx.Process(target=_client_main, args=(plan, child_end), name=f"loadgen-{plan.index}")
            proc.daemon = True
            proc.start()
            child_end.close()
            self.children.append(_Child(plan, proc, parent_end))
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for c in self.children:
            if c.proc.is_alive():
                c.proc.terminate()
        for c in self.children:
            c.proc.join(5)
            if c.proc.is_alive():
                c.proc.kill()
                c.proc.join(5)
            c.conn.close()

    # ---- messages

    def _pump(self, timeout: float) -> None:
        live = [c.conn for c in self.children if not c.gone]
        if not live:
            time.sleep(timeout)
            return
        for conn in mpc.wait(live, timeout):
            child = next(c for c in self.children if c.conn is conn)
            try:
                while conn.poll():
                    what, data = conn.recv()
                    if what == "ready":
                        child.ready = data
                    elif what == "progress":
                        child.progress = data
                    elif what == "done":
                        child.done_ns = data["done_ns"]
                    elif what == "result":
                        child.result = data
            except (EOFError, OSError):
                child.gone = True

    def _print_progress(self, phase: str) -> None:
        if not self.verbose or time.monotonic() < self._next_print:
            return
        self._next_print = time.monotonic() + 2.0
        held = sum(c.progress.get("held", 0) for c in self.children)
        received = sum(c.progress.get("received", 0) for c in self.children)
        failed = sum(c.progress.get("failed", 0) for c in self.children)
        want = sum(p.connections for p in self.plans)
        print(
            f"  [{self.label}] {phase}: {held:,}/{want:,} connected, {failed:,} failed, {received:,} lines received",
            file=sys.stderr,
            flush=True,
        )

    def _wait(self, until: Callable[[], bool], deadline: float, tick: Callable[[], None] | None, phase: str) -> bool:
        while not until():
            if time.monotonic() >= deadline:
                return False
            if all(c.gone for c in self.children):
                return until()
            self._pump(min(0.25, max(0.0, deadline - time.monotonic())))
            if tick:
                tick()
            self._print_progress(phase)
        return True

    # ---- phases

    def wait_ready(self, deadline: float, tick: Callable[[], None] | None = None) -> bool:
        """Wait until every process has opened its connections and seen the welcomes.

        At the deadline, processes still connecting are told to give up on
        what is pending (it counts as failed) and report what they hold.
        """

        def all_ready() -> bool:
            return all(c.ready is not None or c.gone for c in self.children)

        if self._wait(all_ready, deadline, tick, "connecting"):
            return True
        for c in self.children:
            if c.ready is None and not c.gone:
                try:
                    c.conn.send(("enough", {}))
                except OSError:
                    c.gone = True
        self._wait(all_ready, time.monotonic() + 30.0, tick, "connecting")
        return False

    def cpu_seconds(self) -> float:
        """User + system CPU seconds used so far by the client processes."""
        total = 0.0
        for c in self.children:
            try:
                t = psutil.Process(c.proc.pid).cpu_times()
            except psutil.Error:
                continue
            total += t.user + t.system
        return total

    def held_senders(self) -> list[int]:
        return sorted(sid for c in self.children if c.ready for sid in c.ready["held_senders"])

    def go(self, lines_per_sender: int) -> int:
        """Start the senders; returns the expected number of deliveries."""
        senders = len(self.held_senders())
        total_lines = senders * lines_per_sender
        self.t_go_ns = time.monotonic_ns() + 20_000_000  # every process starts its pacing on the same tick
        for c in self.children:
            if not c.gone:
                try:
                    c.conn.send(("go", {"t0_ns": self.t_go_ns, "total_lines": total_lines}))
                except OSError:
                    c.gone = True
        held_receivers = sum(c.ready["held_receivers"] for c in self.children if c.ready)
        return held_receivers * total_lines + senders * (total_lines - lines_per_sender)

    def wait_done(self, deadline: float, tick: Callable[[], None] | None = None) -> bool:
        """Wait until every process has received all it should (or the deadline)."""
        return self._wait(lambda: all(c.done_ns or c.gone for c in self.children), deadline, tick, "running")

    def stop(self, timeout: float = 60.0) -> list[dict[str, Any]]:
        """Tell every process to stop and collect what each of them counted."""
        for c in self.children:
            if not c.gone:
                try:
                    c.conn.send(("stop", {}))
                except OSError:
                    c.gone = True
        self._wait(
            lambda: all(c.result is not None or c.gone for c in self.children),
            time.monotonic() + timeout,
            None,
            "stopping",
        )
        return [c.result for c in self.children if c.result is not None]


def summarize(
    plans: list[ClientPlan], ready: list[dict[str, Any] | None], results: list[dict[str, Any]], expected: int
) -> dict[str, Any]:
    """Add up what the client processes reported into the figures of one run."""
    errors: Counter[str] = Counter()
    for r in results:
        errors.update(r["errors"])
    received = sum(r["received"] for r in results)
    first_send = min((r["first_send_ns"] for r in results if r["first_send_ns"]), default=0)
    finishes = [r["done_ns"] or r["last_recv_ns"] for r in results if r["done_ns"] or r["last_recv_ns"]]
    last_recv = max(finishes, default=0)
    seconds = (last_recv - first_send) / 1e9 if first_send and last_recv > first_send else math.nan
    connect_starts = [r["first_connect_ns"] for r in ready if r and r["first_connect_ns"]]
    connect_ends = [r["last_welcome_ns"] for r in ready if r and r["last_welcome_ns"]]
    connect_s = (max(connect_ends) - min(connect_starts)) / 1e9 if connect_starts and connect_ends else math.nan
    lat = array("q")
    for r in results:
        lat.frombytes(r["latencies"])
    held = sum(r["held_receivers"] + r["held_senders"] for r in results)
    received_counted = min(received, expected)
    return {
        "clients_requested": sum(p.connections for p in plans),
        "clients_held": held,
        "connect_failed": sum(r["failed"] for r in results),
        "connect_errors": dict(errors),
        "bad_welcome": sum(r["bad_welcome"] for r in results),
        "closed_by_server": sum(r["closed"] for r in results),
        "connect_s": connect_s,
        "senders": sum(r["held_senders"] for r in results),
        "lines_sent": sum(r["sent"] for r in results),
        "expected": expected,
        "received": received,
        "lost": expected - received_counted,
        "extra": max(0, received - expected),
        "first_send_ns": first_send,
        "last_recv_ns": last_recv,
        "seconds": seconds,
        "lines_per_s": received_counted / seconds if seconds and seconds > 0 else math.nan,
        "latency": latency_summary(lat),
    }


def run_load(
    plans: list[ClientPlan],
    *,
    server: Server | None = None,
    connect_timeout: float = 120.0,
    run_timeout: float = 120.0,
    label: str = "load",
    verbose: bool = False,
    before_go: Callable[[Load], dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Connect, send, count; with the server's CPU and memory if `server` is given.

    Server CPU is measured from "go" until the last process has all its lines
    (or `run_timeout` passes); that is the window the per-message cost uses.
    """
    monitor = ServerMonitor(server) if server else None
    tick = monitor.tick if monitor else None
    lines_per_sender = plans[0].lines_per_sender
    extra: dict[str, Any] = {}
    with Load(plans, verbose=verbose, label=label) as load:
        connected = load.wait_ready(time.monotonic() + connect_timeout, tick)
        if before_go:
            extra = before_go(load)
        cpu0 = server.cpu_times() if server else {}
        load_cpu0 = load.cpu_seconds()
        machine0 = _common.machine_cpu()
        expected = load.go(lines_per_sender)
        t0 = time.monotonic()
        finished = load.wait_done(time.monotonic() + run_timeout, tick)
        wall = time.monotonic() - t0
        cpu1 = server.cpu_times() if server else {}
        load_cpu = load.cpu_seconds() - load_cpu0
        machine = _common.machine_cpu_used(machine0, _common.machine_cpu())
        if monitor:
            monitor._next = 0.0
            monitor.tick()
        results = load.stop()
        ready = [c.ready for c in load.children]
    out = summarize(plans, ready, results, expected)
    out["all_connected_in_time"] = connected
    out["finished_in_time"] = finished
    out["run_wall_s"] = wall
    out["loadgen_cpu_s"] = load_cpu
    out["loadgen_cpu_pct"] = 100.0 * load_cpu / wall if wall > 0 else math.nan
    out["client_processes"] = len(plans)
    # The whole machine in the same window, in percent of one CPU: what else ran, and the
    # kernel's share (softirq: loopback TCP receive and acknowledgement work, see machine_cpu_used).
    out["machine_cpu_pct"] = {k: 100.0 * v / wall for k, v in machine.items() if wall > 0}
    out["source_addresses"] = len(plans[0].sources)
    out.update(extra)
    if server:
        user = cpu_used({p: t[0] for p, t in cpu0.items()}, {p: t[0] for p, t in cpu1.items()})
        system = cpu_used({p: t[1] for p, t in cpu0.items()}, {p: t[1] for p, t in cpu1.items()})
        cpu = user + system
        sent = out["lines_sent"]
        out["server"] = server.kind
        out["server_alive"] = server.alive()
        out["server_cpu_s"] = cpu
        out["server_cpu_user_s"] = user
        out["server_cpu_system_s"] = system
        out["server_cpu_by_role_s"] = server.cpu_by_role(
            {p: sum(t) for p, t in cpu0.items()}, {p: sum(t) for p, t in cpu1.items()}
        )
        out["server_cpu_pct"] = 100.0 * cpu / wall if wall > 0 else math.nan
        out["server_cpu_us_per_line"] = 1e6 * cpu / out["received"] if out["received"] else math.nan
        out["server_user_us_per_line"] = 1e6 * user / out["received"] if out["received"] else math.nan
        out["server_system_us_per_line"] = 1e6 * system / out["received"] if out["received"] else math.nan
        # Per line sent: what one message costs the server, however many receive it.
        out["server_cpu_us_per_message"] = 1e6 * cpu / sent if sent else math.nan
        out["softirq_us_per_line"] = (
            1e6 * machine.get("softirq", 0.0) / out["received"] if out["received"] else math.nan
        )
        out["server_peak_rss"] = monitor.peak_rss if monitor else 0
        out["server_peak_worker_rss"] = monitor.peak_worker_rss if monitor else 0
        out["server_processes"] = server.memory()["processes"]
    return out


# --------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run one load against a chat server that is already running.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--receivers", type=int, default=200)
    parser.add_argument("--senders", type=int, default=4)
    parser.add_argument("--lines", type=int, default=5000, help="lines per sender")
    parser.add_argument("--line-bytes", type=int, default=60, help="bytes per line including the newline")
    parser.add_argument("--rate", type=float, default=0.0, help="lines/s over all senders; 0 = as fast as possible")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--sources", type=int, default=0, help="source addresses 127.0.0.2...; 0 = enough")
    parser.add_argument("--sample-every", type=int, default=50)
    parser.add_argument("--hot-receivers", type=int, default=0, help="receivers that measure latency; 0 = all")
    parser.add_argument("--connect-rate", type=float, default=2000.0, help="new connections/s; 0 = no limit")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds for each of connect and run")
    parser.add_argument("--json", default="loadgen", help="name of the results file")
    args = parser.parse_args(argv)
    if args.line_bytes < 48:
        parser.error("--line-bytes must be at least 48: a line carries a timestamp and a sequence number")
    _common.raise_open_file_limit()
    plans = plan_clients(
        args.host,
        args.port,
        receivers=args.receivers,
        senders=args.senders,
        lines_per_sender=args.lines,
        processes=args.processes,
        sources=args.sources,
        line_bytes=args.line_bytes,
        total_rate=args.rate,
        sample_every=args.sample_every,
        hot_receivers=args.hot_receivers,
        connect_rate=args.connect_rate,
        deadline_s=2 * args.timeout + 60,
    )
    out = run_load(plans, connect_timeout=args.timeout, run_timeout=args.timeout, verbose=True)
    lat = out["latency"]
    _common.print_table(
        f"load against {args.host}:{args.port}",
        [
            (
                "load",
                [
                    out["clients_held"],
                    out["expected"],
                    out["received"],
                    out["lost"],
                    out["lines_per_s"],
                    lat["p50_ms"],
                    lat["p99_ms"],
                    lat["max_ms"],
                ],
            )
        ],
        ["", "clients", "expected", "received", "lost", "lines/s", "p50 ms", "p99 ms", "max ms"],
    )
    path = _common.write_json(args.json, {"args": vars(args), "machine": _common.machine_info(), "result": out})
    print(f"\nwrote {path}")
    return 0 if out["lost"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
