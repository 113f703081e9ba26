"""Prometheus metrics of the cluster: one snapshot turned into metric families.

`ClusterCollector` is a prometheus_client custom collector. At every scrape it
takes one `snapshot.take()` (the figures `chatcluster status --json` prints)
and `families()` turns it into metric families named by Prometheus
conventions: the `chatcluster_` prefix, `_total` on counters, base units
(`_seconds`, `_bytes`). Per-worker figures carry a `worker` label holding the
worker's position (its stats slot), which a replacement worker takes over
together with its counters, so the series of a position never goes backwards
and the number of series stays bounded by the positions ever used; the
worker's number, as in the log, is on `chatcluster_worker_info`. Every other
label takes its values from a small fixed set (reason, cause, result,
direction, role); nothing a user chooses, no nickname and no room, is ever a
label. This module builds metrics only: serving them is `exporter`'s job.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from . import snapshot
from . import stats as S

PREFIX = "chatcluster_"


def _counter(name: str, doc: str, labels: Iterable[str] = ()) -> CounterMetricFamily:
    return CounterMetricFamily(PREFIX + name, doc, labels=list(labels))


def _gauge(name: str, doc: str, labels: Iterable[str] = ()) -> GaugeMetricFamily:
    return GaugeMetricFamily(PREFIX + name, doc, labels=list(labels))


def _histogram(name: str, doc: str, views: list[S.SlotView], pick: str) -> HistogramMetricFamily:
    family = HistogramMetricFamily(PREFIX + name, doc, labels=["worker"])
    for v in views:
        h: S.Histogram = getattr(v, pick)
        buckets = [(floatToGoString(bound), float(n)) for bound, n in h.cumulative()]
        family.add_metric([str(v.index)], buckets, h.sum)
    return family


# Per-position counters: (metric name without _total, slot field, help).
WORKER_COUNTERS = (
    ("connections_accepted", "accepted", "Client connections accepted."),
    ("lines_received", "lines_received", "Lines received from clients (empty lines not counted)."),
    ("lines_delivered", "lines_delivered", "Lines queued for delivery to clients, one per recipient."),
    ("bytes_delivered", "bytes_delivered", "Bytes handed to the kernel for clients."),
    ("bus_gaps", "bus_gaps", "Gaps seen in the bus order: batches or events that never arrived."),
)


def families(snap: snapshot.Snapshot) -> list[Metric]:
    """Every metric family of the cluster, from one snapshot."""
    out: list[Metric] = []
    positions, live = snap.positions, snap.workers

    # -- per worker: gauges of the workers running now ---------------------------------------------
    info = _gauge("worker_info", "The worker in each position: its number (as in the log), generation "
                  "and state; always 1.", ["worker", "number", "generation", "state"])
    conns = _gauge("connections_open", "Open client connections, welcomed or not.", ["worker"])
    clients = _gauge("clients", "Welcomed clients (in the chat).", ["worker"])
    age = _gauge("heartbeat_age_seconds", "Seconds since the worker last wrote its heartbeat.", ["worker"])
    for v in live:
        w = str(v.index)
        info.add_metric([w, str(v.worker_no), str(v.generation), S.STATE_NAMES.get(v.state, "?")], 1)
        conns.add_metric([w], v.connections)
        clients.add_metric([w], v.clients)
        age.add_metric([w], snap.heartbeat_age(v.heartbeat))
    out += [info, conns, clients, age]

    # -- per worker position: counters, kept when the worker is replaced ---------------------------
    for name, fieldname, doc in WORKER_COUNTERS:
        family = _counter(name, doc, ["worker"])
        for v in positions:
            family.add_metric([str(v.index)], getattr(v, fieldname))
        out.append(family)
    refused = _counter("refused", "Connections refused, by reason: server_full (max_clients), per_ip "
                       "(max_clients_per_ip), emfile (out of file descriptors).", ["worker", "reason"])
    closed = _counter("disconnects", "Client connections closed, by reason.", ["worker", "reason"])
    batches = _counter("bus_batches", "Bus batches the worker published to the broker or received from it.",
                       ["worker", "direction"])
    bus_bytes = _counter("bus_bytes", "Bytes of bus batches the worker published or received.",
                         ["worker", "direction"])
    for v in positions:
        w = str(v.index)
        for r in S.REFUSE_REASONS:
            refused.add_metric([w, r], getattr(v, f"refused_{r}"))
        for r in S.CLOSE_REASONS:
            closed.add_metric([w, r], getattr(v, f"closed_{r}"))
        batches.add_metric([w, "published"], v.bus_batches_out)
        batches.add_metric([w, "received"], v.bus_batches_in)
        bus_bytes.add_metric([w, "published"], v.bus_bytes_out)
        bus_bytes.add_metric([w, "received"], v.bus_bytes_in)
    out += [refused, closed, batches, bus_bytes]
    out.append(_histogram("delivery_latency_seconds", "Seconds from the broker's stamp on a batch to the "
                          "send() that handed its line to the kernel.", positions, "latency"))
    out.append(_histogram("loop_pass_seconds", "Seconds of work in one pass of a worker's event loop "
                          "(the wait for events not included).", positions, "loop"))

    # -- the cluster -------------------------------------------------------------------------------
    h = snap.header
    gen = _gauge("generation", "Generation of the workers serving now; each upgrade adds one.")
    gen.add_metric([], h.generation)
    wanted = _gauge("workers_wanted", "Workers the supervisor keeps running.")
    wanted.add_metric([], h.target)
    states = _gauge("workers", "Workers running, by state.", ["state"])
    for state in (S.BOOTING, S.READY, S.STOPPING):
        states.add_metric([S.STATE_NAMES[state]], sum(1 for v in live if v.state == state))
    restarts = _counter("worker_restarts", "Workers replaced after they died (crash) or were killed for a "
                        "missing heartbeat (heartbeat_timeout) or for hanging at boot (boot_timeout).", ["cause"])
    for cause in S.RESTART_CAUSES:
        restarts.add_metric([cause], getattr(h, f"worker_restarts_{cause}"))
    broker_restarts = _counter("broker_restarts", "Bus broker restarts after it died.")
    broker_restarts.add_metric([], h.broker_restarts)
    reloads = _counter("reloads", "Configuration reloads (HUP), by result.", ["result"])
    reloads.add_metric(["succeeded"], h.reloads_succeeded)
    reloads.add_metric(["refused"], h.reloads_refused)
    upgrades = _counter("upgrades", "Upgrades (USR2), by result: refused before anything changed, failed "
                        "with the old workers serving on, or succeeded.", ["result"])
    upgrades.add_metric(["succeeded"], h.upgrades_succeeded)
    upgrades.add_metric(["refused"], h.upgrades_refused)
    upgrades.add_metric(["failed"], h.upgrades_failed)
    sup_age = _gauge("supervisor_heartbeat_age_seconds", "Seconds since the supervisor's loop last ran.")
    sup_age.add_metric([], snap.heartbeat_age(h.supervisor_heartbeat))
    out += [gen, wanted, states, restarts, broker_restarts, reloads, upgrades, sup_age]

    b = snap.broker
    if b.heartbeat:  # written by the broker itself; absent rather than a made-up zero before it does
        broker_age = _gauge("broker_heartbeat_age_seconds", "Seconds since the bus broker last wrote its "
                            "heartbeat.")
        broker_age.add_metric([], snap.heartbeat_age(b.heartbeat))
        broker_batches = _counter("broker_batches", "Batches the broker received from workers or published "
                                  "to them.", ["direction"])
        broker_batches.add_metric(["received"], b.batches_in)
        broker_batches.add_metric(["published"], b.batches_out)
        broker_bytes = _counter("broker_bytes", "Bytes the broker received or published.", ["direction"])
        broker_bytes.add_metric(["received"], b.bytes_in)
        broker_bytes.add_metric(["published"], b.bytes_out)
        out += [broker_age, broker_batches, broker_bytes]

    out += room_families(snap)
    out += nats_families(snap)

    # -- processes ---------------------------------------------------------------------------------
    cpu = _counter("process_cpu_seconds", "CPU time (user and system) of each process of the cluster.",
                   ["role", "worker"])
    rss = _gauge("process_resident_memory_bytes", "Resident memory of each process of the cluster.",
                 ["role", "worker"])
    start = _gauge("process_start_time_seconds", "Start time of each process, in seconds since the epoch.",
                   ["role", "worker"])
    for p in snap.processes:
        if p.role not in snapshot.ROLES:
            continue  # a process forked a moment ago: not in the stats file yet
        labels = [p.role, "" if p.slot is None else str(p.slot)]
        cpu.add_metric(labels, p.cpu_seconds)
        rss.add_metric(labels, p.rss_bytes)
        start.add_metric(labels, p.started)
    out += [cpu, rss, start]
    return out


def room_families(snap: snapshot.Snapshot) -> list[Metric]:
    """Rooms and their members, as cluster totals, once the cluster has rooms (see Snapshot.rooms)."""
    if snap.rooms is None:
        return []
    rooms = _gauge("rooms", "Rooms that exist now.")
    rooms.add_metric([], snap.rooms.rooms)
    members = _gauge("room_members", "Room memberships now, summed over all rooms.")
    members.add_metric([], snap.rooms.members)
    return [rooms, members]


NATS_STATES = ("connecting", "connected", "disconnected", "stalled", "closed")


def nats_families(snap: snapshot.Snapshot) -> list[Metric]:
    """A multi-host cluster's link to NATS, the shared stream and each host's lag (see Snapshot.nats).

    The `host` label holds a host's node_name: chosen by the operator, one per host of the cluster.
    """
    n = snap.nats
    if not n:
        return []
    state = _gauge("nats_connection_state", "The link to NATS: 1 for the state it is in now.", ["state"])
    for name in NATS_STATES:
        state.add_metric([name], 1 if n.get("state") == name else 0)
    last = _gauge("stream_last_sequence", "The shared stream's last sequence number.")
    last.add_metric([], n.get("stream_last_seq", 0))
    applied = _gauge("stream_applied_sequence", "The last stream sequence each host has applied, as it last "
                     "said.", ["host"])
    lag = _gauge("stream_lag_messages", "Stream messages each host has not applied yet.", ["host"])
    for h in n.get("hosts", []):
        applied.add_metric([str(h.get("node"))], h.get("applied_seq", 0))
        lag.add_metric([str(h.get("node"))], h.get("lag", 0))
    hosts = _gauge("hosts_up", "Hosts of the multi-host cluster that are up, in the stream's order.")
    hosts.add_metric([], len(n.get("hosts", [])))
    waiting = _gauge("stream_outbox_batches", "Batches of this host waiting to be acknowledged by the stream.")
    waiting.add_metric([], n.get("outbox", 0))
    retries = _counter("stream_publish_retries", "Publishes to the stream tried again (timeouts, elections).")
    retries.add_metric([], n.get("publish_retries", 0))
    undelivered = _counter("stream_undelivered_batches", "Batches of this host that never reached the stream "
                           "(held longer than nats_hold_seconds); their senders were told.")
    undelivered.add_metric([], n.get("undelivered", 0))
    gaps = _counter("stream_gaps", "Gaps in the stream's sequence (messages removed before this host read them).")
    gaps.add_metric([], n.get("gaps", 0))
    return [state, last, applied, lag, hosts, waiting, retries, undelivered, gaps]


class ClusterCollector(Collector):
    """A prometheus_client collector that reads the running cluster at every scrape."""

    def __init__(self, runtime_dir: str, supervisor_pid: int, stats: S.StatsFile | None = None) -> None:
        self.runtime_dir = runtime_dir
        self.supervisor_pid = supervisor_pid
        self.stats = stats  # a mapping kept open (see snapshot.take), or None to open the file each time

    def collect(self) -> Iterator[Metric]:
        yield from families(snapshot.take(self.runtime_dir, self.supervisor_pid, mapped=self.stats))
