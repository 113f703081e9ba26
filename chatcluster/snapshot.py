"""The cluster's figures at one moment: what `chatcluster status` prints and `/metrics` exports.

`take()` reads the shared stats file (every worker position's counters and
histograms, the supervisor's header, the broker's block) and asks psutil about
every process of the cluster (CPU time, resident memory, start time). The
`status` command and the metrics endpoint both call it, so they always show
the same numbers: `Snapshot.status()` is the `status --json` document, and
`metrics.families()` turns the same snapshot into Prometheus metrics. It only
reads; it imports neither zmq nor prometheus_client, and talks to no process.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from typing import Any

from . import stats as S
from .paths import MULTIHOST_STATUS, STATS, read_small

ROLES = ("supervisor", "broker", "metrics", "worker")


class SnapshotError(Exception):
    """The running cluster cannot be read; the message says why and what to do."""


@dataclass
class ProcessFigures:
    role: str  # one of ROLES, or "starting" (forked a moment ago, not in the stats file yet)
    pid: int
    slot: int | None  # the worker position, for a worker
    started: float  # unix time
    cpu_seconds: float  # user + system, since the process started
    cpu_percent: float | None  # over the sampling interval of take(), when it sampled
    rss_bytes: int


@dataclass
class RoomTotals:
    """Rooms and their members across the cluster, as totals only (never one figure per room,
    so the number of metric series stays bounded however many rooms users create)."""

    rooms: int
    members: int


@dataclass
class Snapshot:
    supervisor_pid: int
    runtime_dir: str
    taken: float  # CLOCK_MONOTONIC, the clock of every heartbeat
    header: S.Header
    broker: S.BrokerCounters
    positions: list[S.SlotView]  # every worker position the file has seen, live or not
    processes: list[ProcessFigures] = field(default_factory=list)
    # Hook for rooms: filled in once the cluster has rooms (the broker's block is the natural
    # place for the two totals); the metrics then export chatcluster_rooms and
    # chatcluster_room_members. None until then.
    rooms: RoomTotals | None = None
    # A multi-host cluster: the bus process's view of NATS, the stream and the hosts (its
    # RUNTIME_DIR/multihost.json, see multihost.HostBus.status); None on one host.
    nats: dict[str, Any] | None = None

    @property
    def workers(self) -> list[S.SlotView]:
        """The positions with a worker in them now (booting, ready or stopping)."""
        return [v for v in self.positions if v.live]

    def total(self, name: str) -> int:
        """A counter summed over every position: the cluster's total since it started."""
        return int(sum(getattr(v, name) for v in self.positions))

    def heartbeat_age(self, beat: float) -> float:
        return max(0.0, self.taken - beat)

    def status(self) -> dict[str, Any]:
        """The `chatcluster status --json` document."""
        slots = {v.pid: v for v in self.workers if v.pid}
        rows: list[dict[str, Any]] = []
        for p in self.processes:
            row: dict[str, Any] = {
                "role": p.role, "pid": p.pid, "uptime_s": round(max(0.0, time.time() - p.started), 1),
                "cpu_percent": p.cpu_percent, "cpu_seconds": round(p.cpu_seconds, 2), "rss_bytes": p.rss_bytes,
            }
            v = slots.get(p.pid) if p.role == "worker" else None
            if v is not None:
                row["role"] = f"worker {v.worker_no}"
                row.update(self._worker_figures(v))
            elif p.role == "broker" and self.broker.heartbeat:
                row["heartbeat_age_s"] = round(self.heartbeat_age(self.broker.heartbeat), 2)
            rows.append(row)
        order = {"supervisor": 0, "broker": 1, "metrics": 2}
        rows.sort(key=lambda r: (order.get(r["role"], 3), r.get("worker", 1 << 30), r["pid"]))
        workers = [r for r in rows if "worker" in r]
        h = self.header
        return {
            "pid": self.supervisor_pid, "port": h.port, "runtime_dir": self.runtime_dir,
            "generation": h.generation, "workers_wanted": h.target, "workers": len(workers),
            "clients": sum(r["clients"] for r in workers), "connections": sum(r["connections"] for r in workers),
            "processes": rows,
            "totals": self._totals(),
            "restarts": {"worker": {c: getattr(h, f"worker_restarts_{c}") for c in S.RESTART_CAUSES},
                         "broker": h.broker_restarts},
            "reloads": {"succeeded": h.reloads_succeeded, "refused": h.reloads_refused},
            "upgrades": {"succeeded": h.upgrades_succeeded, "refused": h.upgrades_refused,
                         "failed": h.upgrades_failed},
            "supervisor_heartbeat_age_s": round(self.heartbeat_age(h.supervisor_heartbeat), 2),
            "rooms": None if self.rooms is None else {"rooms": self.rooms.rooms, "members": self.rooms.members},
            "broker": None if not self.broker.heartbeat else {
                "heartbeat_age_s": round(self.heartbeat_age(self.broker.heartbeat), 2),
                "batches_in": self.broker.batches_in, "bytes_in": self.broker.bytes_in,
                "batches_out": self.broker.batches_out, "bytes_out": self.broker.bytes_out,
            },
            "nats": self.nats,
        }

    def _worker_figures(self, v: S.SlotView) -> dict[str, Any]:
        return {
            "worker": v.worker_no, "slot": v.index, "generation": v.generation,
            "state": S.STATE_NAMES.get(v.state, "?"), "heartbeat_age_s": round(self.heartbeat_age(v.heartbeat), 2),
            "clients": v.clients, "connections": v.connections, "accepted": v.accepted,
            "messages_in": v.lines_received, "messages_out": v.lines_delivered, "bytes_out": v.bytes_delivered,
            "bus_gaps": v.bus_gaps, "dropped": v.dropped,
            "refused": {r: getattr(v, f"refused_{r}") for r in S.REFUSE_REASONS},
            "disconnects": {r: getattr(v, f"closed_{r}") for r in S.CLOSE_REASONS},
            "bus": {"batches_in": v.bus_batches_in, "bytes_in": v.bus_bytes_in,
                    "batches_out": v.bus_batches_out, "bytes_out": v.bus_bytes_out},
            "delivery_latency": {"count": v.latency.count, "sum_s": round(v.latency_sum, 6)},
            "loop_pass": {"count": v.loop.count, "sum_s": round(v.loop_sum, 6)},
        }

    def _totals(self) -> dict[str, Any]:
        """Counters over every position, those of workers gone included: they never go backwards."""
        return {
            "accepted": self.total("accepted"),
            "refused": {r: self.total(f"refused_{r}") for r in S.REFUSE_REASONS},
            "disconnects": {r: self.total(f"closed_{r}") for r in S.CLOSE_REASONS},
            "messages_in": self.total("lines_received"), "messages_out": self.total("lines_delivered"),
            "bytes_out": self.total("bytes_delivered"), "bus_gaps": self.total("bus_gaps"),
            "dropped": self.total("dropped"),
        }


def read(stats: S.StatsFile, runtime_dir: str, supervisor_pid: int) -> Snapshot:
    """The stats file's figures alone, without looking at any process."""
    header = stats.header()
    broker = stats.broker_counters()
    return Snapshot(supervisor_pid=supervisor_pid, runtime_dir=runtime_dir, taken=time.monotonic(),
                    header=header, broker=broker, positions=stats.positions(),
                    rooms=RoomTotals(broker.rooms, broker.members) if broker.heartbeat else None,
                    nats=read_multihost(runtime_dir, header.broker_pid))


def read_multihost(runtime_dir: str, broker_pid: int) -> dict[str, Any] | None:
    """What a multi-host bus process last said of NATS and the hosts, or None (one host, or not written yet).

    The file is rewritten every second; `age_s` says how old it is, so a bus process that stopped
    writing (hung, or replaced and its successor not yet connected) shows as such.
    """
    path = os.path.join(runtime_dir, MULTIHOST_STATUS)
    data = read_small(path, 1 << 20)
    if data is None:
        return None
    try:
        doc = json.loads(data)
    except ValueError:
        return None
    if not isinstance(doc, dict):
        return None
    doc["age_s"] = round(max(0.0, time.time() - float(doc.get("updated", 0.0))), 1)
    doc["bus_pid"] = broker_pid
    return doc


def open_stats(runtime_dir: str, supervisor_pid: int) -> S.StatsFile:
    path = os.path.join(runtime_dir, STATS)
    try:
        return S.StatsFile(path)
    except FileNotFoundError:
        raise SnapshotError(f"chatcluster (pid {supervisor_pid}) is running but there is no stats file {path}; "
                            f"pass the --runtime-dir it was started with, or, if a tmp cleaner deleted it, "
                            f"restart the cluster to see its status") from None
    except (OSError, ValueError) as exc:
        raise SnapshotError(f"chatcluster (pid {supervisor_pid}) is running but its stats file cannot be read "
                            f"({exc}); pass the --runtime-dir it was started with, or run as its user") from None


def take(runtime_dir: str, supervisor_pid: int, sample: float = 0.0, mapped: S.StatsFile | None = None) -> Snapshot:
    """Every figure of the running cluster, and every process with its resources.

    With `sample` > 0 it also measures each process's CPU percentage over that many seconds
    (what a person at `chatcluster status` wants); the metrics endpoint passes 0 and exports
    the CPU seconds counter instead, from which Prometheus computes rates. `mapped` is a stats
    file already open (the metrics endpoint has the one its supervisor had when it forked it,
    which outlives the file's name being deleted); otherwise it is opened by name.
    """
    import psutil

    stats = mapped if mapped is not None else open_stats(runtime_dir, supervisor_pid)
    try:
        try:
            sup = psutil.Process(supervisor_pid)
            procs = [sup, *sup.children(recursive=True)]
        except psutil.Error as exc:
            raise SnapshotError(f"cannot inspect chatcluster (pid {supervisor_pid}): {exc}") from None
        if sample > 0:
            for p in procs:
                try:
                    p.cpu_percent(None)  # the first call starts the measurement
                except psutil.Error:
                    pass
            time.sleep(sample)
        snap = read(stats, runtime_dir, supervisor_pid)
    finally:
        if mapped is None:
            stats.close()
    slots = {v.pid: v for v in snap.workers if v.pid}
    roles = {supervisor_pid: "supervisor", snap.header.broker_pid: "broker", snap.header.exporter_pid: "metrics"}
    for p in procs:
        v = slots.get(p.pid)
        role = roles.get(p.pid) or ("worker" if v is not None else "starting")
        try:
            with p.oneshot():
                cpu = p.cpu_times()
                snap.processes.append(ProcessFigures(
                    role=role, pid=p.pid, slot=v.index if v is not None else None, started=p.create_time(),
                    cpu_seconds=cpu.user + cpu.system, cpu_percent=p.cpu_percent(None) if sample > 0 else None,
                    rss_bytes=p.memory_info().rss))
        except psutil.Error:
            continue  # exited meanwhile
    return snap
