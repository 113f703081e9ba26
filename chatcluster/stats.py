"""The shared stats file: every figure of the cluster, in one memory-mapped file, by name.

The file lives in the runtime directory and has three parts, each with exactly
one writer, so nobody ever needs a lock:

- the header, written by the supervisor: its pid, the broker's and the metrics
  endpoint's, the generation, the wanted worker count, its own heartbeat, and
  its counters (worker restarts by cause, broker restarts, reloads and upgrades
  by outcome). `StatsFile.supervisor` reads and writes these fields in place,
  so a count survives the supervisor's re-exec in an upgrade;
- the broker's block: its heartbeat and bus traffic (`BrokerCounters`);
- one slot per worker position (`WorkerCounters`): identity, state, heartbeat,
  gauges, counters and two histograms. A worker counts in memory and writes
  its whole slot with one `pack_into` per heartbeat (`write_slot`).

A slot belongs to a position, not to a process: a worker that replaces a dead
or retired one in the same slot starts from the figures its predecessor left
there (`resume_slot`), so the counters of a position never go backwards and a
dead worker's counts stay in every total, without any folding by the
supervisor and without the torn reads folding would bring. Only the gauges
(clients, connections) start again from zero.

A reader (`chatcluster status`, the metrics endpoint) may see a slot in the
middle of an update: every field is then either its old or its new value,
which for counters, gauges and heartbeats is harmless. Heartbeats are
CLOCK_MONOTONIC, which all processes of the machine share. This module knows
the layout only; it never decides anything.
"""

from __future__ import annotations

import mmap
import os
import struct
import time
from bisect import bisect_left
from dataclasses import dataclass
from typing import Any

from .paths import create_exclusive

MAGIC = b"CCSTATS4"
# Twice the most workers config allows: a generation being replaced and the new one coexist.
SLOTS = 2048

FREE, BOOTING, READY, STOPPING = 0, 1, 2, 3
STATE_NAMES = {FREE: "free", BOOTING: "booting", READY: "ready", STOPPING: "stopping"}

# Upper bounds, in seconds, of the buckets of both histograms (delivery latency and loop pass
# time); a last bucket takes everything above. They are written into the file, so a reader
# never has to assume them. Changing them changes the layout: bump MAGIC.
BUCKETS: tuple[float, ...] = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025,
                              0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
NBUCKETS = len(BUCKETS) + 1

def latency_bucket(seconds: float) -> int:
    """The index of the histogram bucket `seconds` falls in."""
    return bisect_left(BUCKETS, seconds)


# Why a worker refuses a connection, and why a connection ends. Each has a counter in the slot,
# named refused_<reason> / closed_<reason>, and is the `reason` label of the metric.
REFUSE_REASONS = ("server_full", "per_ip", "emfile")
CLOSE_REASONS = ("quit", "reset", "idle", "sendq", "flood", "shutdown", "handoff")
RESTART_CAUSES = ("crash", "heartbeat_timeout", "boot_timeout")

# -- the three records ----------------------------------------------------------------------------
# Each record is declared once, as annotated attributes; its layout in the file follows from the
# declaration (int: 8-byte signed, float: 8-byte double, in declaration order), so adding a figure
# is adding one line (and bumping MAGIC).


class WorkerCounters:
    """Everything one worker publishes in its slot, counted in memory between heartbeats.

    The worker increments the attributes (`counters.lines_received += 1`), records histogram
    observations with `observe_latency` / `observe_loop`, sets `state` and `heartbeat`, and
    writes the lot with `StatsFile.write_slot`, one `pack_into`.
    """

    # Identity and gauges. The supervisor writes these (up to config_version) when it hands the
    # slot to a new worker and when it frees it; everything else only the worker writes.
    pid: int
    state: int
    worker_no: int
    generation: int
    started: float  # unix time
    heartbeat: float  # CLOCK_MONOTONIC
    clients: int  # welcomed clients
    connections: int  # every open client connection, welcomed or not
    config_version: int  # the supervisor's reload count the worker last applied
    # Counters: they only grow, over every worker that held the slot.
    accepted: int
    refused_server_full: int
    refused_per_ip: int
    refused_emfile: int
    closed_quit: int
    closed_reset: int
    closed_idle: int
    closed_sendq: int
    closed_flood: int
    closed_shutdown: int
    closed_handoff: int
    lines_received: int
    lines_delivered: int
    bytes_delivered: int
    bus_batches_in: int
    bus_bytes_in: int
    bus_batches_out: int
    bus_bytes_out: int
    bus_gaps: int
    dropped: int  # clients cut for sendq plus connections shed on EMFILE, as `status` has always shown
    latency_sum: float
    loop_sum: float
    # Histograms: observations per bucket (not cumulative), NBUCKETS each.
    latency: list[int]
    loop: list[int]

    __slots__ = tuple(__annotations__)

    def __init__(self) -> None:
        for name, code in _SLOT_FIELDS:
            setattr(self, name, 0.0 if code == "d" else 0)
        self.latency = [0] * NBUCKETS
        self.loop = [0] * NBUCKETS

    def observe_latency(self, seconds: float) -> None:
        """One line handed to the kernel `seconds` after the broker stamped its batch."""
        self.latency[bisect_left(BUCKETS, seconds)] += 1
        self.latency_sum += seconds

    def observe_loop(self, seconds: float) -> None:
        """One pass of the event loop took `seconds` (from the end of the wait to the next wait)."""
        self.loop[bisect_left(BUCKETS, seconds)] += 1
        self.loop_sum += seconds

    def pack_args(self) -> list[Any]:
        args = [getattr(self, name) for name in _SCALARS]
        args += self.latency
        args += self.loop
        return args

    @classmethod
    def unpack(cls, values: tuple[Any, ...]) -> WorkerCounters:
        k = cls()
        n = len(_SCALARS)
        for name, value in zip(_SCALARS, values[:n], strict=True):
            setattr(k, name, value)
        k.latency = list(values[n:n + NBUCKETS])
        k.loop = list(values[n + NBUCKETS:])
        return k


class _InPlace:
    """A header field read and written directly in its record's buffer."""

    def __init__(self, offset: int, code: str) -> None:
        self.field = struct.Struct("=" + code)
        self.offset = offset

    def __get__(self, rec: Header, owner: type) -> Any:
        return self.field.unpack_from(rec.buf, self.offset)[0]

    def __set__(self, rec: Header, value: Any) -> None:
        self.field.pack_into(rec.buf, self.offset, value)


class Header:
    """The supervisor's record, read and written in place in the buffer it is given.

    `StatsFile.supervisor` is one over the live mapping, where the supervisor writes: a count
    (`stats.supervisor.reloads_refused += 1`) is in the file at once, so nothing is lost when the
    supervisor re-executes itself in an upgrade. `StatsFile.header()` is one over a copy: a
    reading that does not change under the reader.
    """

    supervisor_pid: int
    broker_pid: int
    exporter_pid: int  # the metrics endpoint's process; 0 when there is none
    generation: int
    target: int  # workers wanted
    port: int
    supervisor_heartbeat: float  # CLOCK_MONOTONIC, at every pass of the supervisor's loop
    worker_restarts_crash: int
    worker_restarts_heartbeat_timeout: int
    worker_restarts_boot_timeout: int
    broker_restarts: int
    reloads_succeeded: int
    reloads_refused: int
    upgrades_succeeded: int
    upgrades_refused: int
    upgrades_failed: int

    def __init__(self, buf: mmap.mmap | bytearray) -> None:
        self.buf = buf

    def count_restart(self, cause: str) -> None:
        """A worker is being replaced; `cause` is one of RESTART_CAUSES."""
        name = f"worker_restarts_{cause}"
        setattr(self, name, getattr(self, name) + 1)


@dataclass
class BrokerCounters:
    """The broker's block. The broker counts in memory and writes it with `StatsFile.write_broker`;
    a restarted broker starts from what its predecessor left (`StatsFile.broker_counters`)."""

    pid: int = 0
    started: float = 0.0  # unix time
    heartbeat: float = 0.0  # CLOCK_MONOTONIC; 0 until a broker writes its block
    batches_in: int = 0
    bytes_in: int = 0
    batches_out: int = 0
    bytes_out: int = 0
    # Appended after the fields above, in the header's spare room, so files of earlier releases
    # keep their layout: a broker that never wrote them leaves rooms_known at 0.
    rooms: int = 0  # rooms that exist now
    room_members: int = 0  # (client, room) memberships now
    rooms_known: int = 0  # 1 once a broker that counts rooms has written the two above


def _fields(annotations: dict[str, Any]) -> tuple[tuple[str, str], ...]:
    codes = {"int": "q", "float": "d"}
    return tuple((name, codes[kind]) for name, kind in annotations.items() if kind in codes)


# -- layout ---------------------------------------------------------------------------------------
_HEADER_FIELDS = _fields(Header.__annotations__)
_HEADER = struct.Struct("=" + "".join(code for _, code in _HEADER_FIELDS))
_HEADER_AT = len(MAGIC)
_BOUNDS = struct.Struct(f"=q{len(BUCKETS)}d")
_BOUNDS_AT = _HEADER_AT + _HEADER.size
_BROKER_FIELDS = _fields(BrokerCounters.__annotations__)
_BROKER = struct.Struct("=" + "".join(code for _, code in _BROKER_FIELDS))
_BROKER_AT = 384
HEADER_SIZE = 512

_SLOT_FIELDS = _fields(WorkerCounters.__annotations__)
_SCALARS = tuple(name for name, _ in _SLOT_FIELDS)
_LIVE_FIELDS = _SLOT_FIELDS[: _SCALARS.index("config_version") + 1]  # what the supervisor writes
_LIVE = struct.Struct("=" + "".join(code for _, code in _LIVE_FIELDS))
SLOT = struct.Struct("=" + "".join(code for _, code in _SLOT_FIELDS) + f"{NBUCKETS}q{NBUCKETS}q")
COUNTER_NAMES = tuple(name for name, code in _SLOT_FIELDS[len(_LIVE_FIELDS):] if code == "q")
_STATE_AT = 8 * _SCALARS.index("state")  # every field is 8 bytes: scans read one field of each slot
_WORKER_NO_AT = 8 * _SCALARS.index("worker_no")
_FIELD = struct.Struct("=q")
SIZE = HEADER_SIZE + SLOTS * SLOT.size

_offset = _HEADER_AT
for _name, _code in _HEADER_FIELDS:
    setattr(Header, _name, _InPlace(_offset, _code))
    _offset += 8
assert _BOUNDS_AT + _BOUNDS.size <= _BROKER_AT and _BROKER_AT + _BROKER.size <= HEADER_SIZE
assert {f"refused_{r}" for r in REFUSE_REASONS} | {f"closed_{r}" for r in CLOSE_REASONS} <= set(COUNTER_NAMES)
assert {f"worker_restarts_{c}" for c in RESTART_CAUSES} <= set(Header.__annotations__)


@dataclass
class Histogram:
    """A histogram as read from the file: counts per bucket (not cumulative), their sum."""

    bounds: tuple[float, ...]
    counts: list[int]  # len(bounds) + 1: the last is everything above the last bound
    sum: float

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> list[tuple[float, int]]:
        """(upper bound, observations up to it), ending with (inf, all): Prometheus' `le` buckets."""
        out, running = [], 0
        for bound, n in zip((*self.bounds, float("inf")), self.counts, strict=True):
            running += n
            out.append((bound, running))
        return out


class SlotView:
    """One worker position as read from the file: every figure of `WorkerCounters` by name."""

    def __init__(self, index: int, counters: WorkerCounters, bounds: tuple[float, ...]) -> None:
        self.index = index
        self.counters = counters
        self.bounds = bounds

    def __getattr__(self, name: str) -> Any:
        # pid, state, clients, lines_received, closed_sendq, ... straight from the counters.
        if name in _SCALARS:
            return getattr(self.counters, name)
        raise AttributeError(name)

    @property
    def live(self) -> bool:
        return bool(self.counters.state != FREE)

    # The names the slot's figures had before they were named like the metrics.
    @property
    def lines_in(self) -> int:
        return self.counters.lines_received

    @property
    def lines_out(self) -> int:
        return self.counters.lines_delivered

    @property
    def bytes_out(self) -> int:
        return self.counters.bytes_delivered

    @property
    def gaps(self) -> int:
        return self.counters.bus_gaps

    @property
    def latency(self) -> Histogram:
        return Histogram(self.bounds, self.counters.latency, self.counters.latency_sum)

    @property
    def loop(self) -> Histogram:
        return Histogram(self.bounds, self.counters.loop, self.counters.loop_sum)


class StatsFile:
    def __init__(self, path: str, create: bool = False) -> None:
        self.path = path
        if create:
            # A new file, never an existing one opened: anything planted at the name is replaced.
            fd = create_exclusive(path, 0o600, os.O_RDWR)
            os.ftruncate(fd, SIZE)
        else:
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW)
        try:
            if os.fstat(fd).st_size < SIZE:
                raise ValueError(f"{path} is not a chatcluster stats file of this version")
            self.mem = mmap.mmap(fd, SIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        if create:
            _BOUNDS.pack_into(self.mem, _BOUNDS_AT, len(BUCKETS), *BUCKETS)
            self.mem[: len(MAGIC)] = MAGIC
        elif self.mem[: len(MAGIC)] != MAGIC:
            self.mem.close()
            raise ValueError(f"{path} is not a chatcluster stats file of this version")
        n, *bounds = _BOUNDS.unpack_from(self.mem, _BOUNDS_AT)
        self.bounds: tuple[float, ...] = tuple(bounds[:n])
        self.supervisor = Header(self.mem)

    # -- the header (supervisor) ------------------------------------------------------------------

    def write_header(self, supervisor_pid: int, broker_pid: int, generation: int, target: int, port: int) -> None:
        """The supervisor's identity fields, and its heartbeat (now)."""
        h = self.supervisor
        h.supervisor_pid, h.broker_pid, h.generation, h.target, h.port = (
            supervisor_pid, broker_pid, generation, target, port)
        h.supervisor_heartbeat = time.monotonic()

    def header(self) -> Header:
        """A copy of the header, to read."""
        return Header(bytearray(self.mem[:HEADER_SIZE]))

    # -- the broker's block -----------------------------------------------------------------------

    def broker_counters(self) -> BrokerCounters:
        """What the broker block holds: a (re)started broker counts on from here."""
        return BrokerCounters(*_BROKER.unpack_from(self.mem, _BROKER_AT))

    def write_broker(self, counters: BrokerCounters) -> None:
        _BROKER.pack_into(self.mem, _BROKER_AT, *(getattr(counters, name) for name, _ in _BROKER_FIELDS))

    # -- worker slots -----------------------------------------------------------------------------

    def _at(self, index: int) -> int:
        return HEADER_SIZE + index * SLOT.size

    def begin_slot(self, index: int, worker_no: int, generation: int) -> None:
        """The supervisor hands slot `index` to a new worker (not forked yet: pid 0, booting).

        The figures the slot holds stay: the new worker counts on from them.
        """
        _, _, _, _, _, _, _, _, version = _LIVE.unpack_from(self.mem, self._at(index))
        now = time.monotonic()
        _LIVE.pack_into(self.mem, self._at(index), 0, BOOTING, worker_no, generation, time.time(), now, 0, 0, version)

    def resume_slot(self, index: int, pid: int, worker_no: int, generation: int, started: float) -> WorkerCounters:
        """A worker takes slot `index`: its counters start from the position's figures so far."""
        k = self.read(index).counters
        k.pid, k.state, k.worker_no, k.generation, k.started = pid, BOOTING, worker_no, generation, started
        k.heartbeat = time.monotonic()
        k.clients = k.connections = 0
        return k

    def write_slot(self, index: int, counters: WorkerCounters) -> None:
        SLOT.pack_into(self.mem, self._at(index), *counters.pack_args())

    def read(self, index: int) -> SlotView:
        return SlotView(index, WorkerCounters.unpack(SLOT.unpack_from(self.mem, self._at(index))), self.bounds)

    def clear(self, index: int) -> None:
        """The slot's worker is gone: no pid, free, no clients; the position keeps its counters."""
        _, _, no, generation, started, heartbeat, _, _, version = _LIVE.unpack_from(self.mem, self._at(index))
        _LIVE.pack_into(self.mem, self._at(index), 0, FREE, no, generation, started, heartbeat, 0, 0, version)

    def used(self) -> list[SlotView]:
        """The slots with a worker in them (booting, ready or stopping)."""
        mem, field, size = self.mem, _FIELD.unpack_from, SLOT.size
        return [self.read(i) for i in range(SLOTS) if field(mem, HEADER_SIZE + i * size + _STATE_AT)[0] != FREE]

    def positions(self) -> list[SlotView]:
        """Every slot a worker ever had since the file was created: live ones and those whose
        worker is gone, whose counts still belong in every total."""
        mem, field, size = self.mem, _FIELD.unpack_from, SLOT.size
        return [self.read(i) for i in range(SLOTS) if field(mem, HEADER_SIZE + i * size + _WORKER_NO_AT)[0] != 0]

    def close(self) -> None:
        self.mem.close()

