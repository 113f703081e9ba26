"""Prometheus metrics: the collector on a real stats file, and /metrics of a real cluster.

The unit tests write figures into a stats file in a temporary directory and
read them back through `snapshot` and `metrics.families`, as the endpoint
does. The end-to-end tests start clusters with `--metrics-listen` on a free
port, drive known traffic with real clients, scrape `/metrics` over HTTP and
parse it with prometheus_client's own parser; `promtool` (Debian's
`prometheus`) checks the output where it is installed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest
from conftest import REPO, TELNET_GREETING, Client, Cluster, free_port, wait_for
from limits_support import Reader as ThreadedReader
from limits_support import pump, raw_socket, read_to_end, recv_until
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import CollectorRegistry

from chatcluster import metrics, snapshot
from chatcluster import stats as S

pytestmark = pytest.mark.timeout(120)

REQUIRED = (
    ("chatcluster_connections_open", "gauge"),
    ("chatcluster_clients", "gauge"),
    ("chatcluster_lines_received", "counter"),
    ("chatcluster_lines_delivered", "counter"),
    ("chatcluster_bytes_delivered", "counter"),
    ("chatcluster_disconnects", "counter"),
    ("chatcluster_refused", "counter"),
    ("chatcluster_bus_gaps", "counter"),
    ("chatcluster_worker_restarts", "counter"),
    ("chatcluster_broker_restarts", "counter"),
    ("chatcluster_delivery_latency_seconds", "histogram"),
    ("chatcluster_loop_pass_seconds", "histogram"),
    ("chatcluster_heartbeat_age_seconds", "gauge"),
)


class Scrape:
    """One parsed /metrics answer: samples by name and labels."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.types: dict[str, str] = {}
        self.samples: list[tuple[str, dict[str, str], float]] = []
        for family in text_string_to_metric_families(text):
            self.types[family.name] = family.type
            self.samples += [(s.name, s.labels, s.value) for s in family.samples]

    def sum(self, name: str, **labels: str) -> float:
        """The sum of `name` over every sample whose labels include `labels`."""
        return sum(v for n, ls, v in self.samples if n == name and labels.items() <= ls.items())

    def by_worker(self, name: str, **labels: str) -> dict[str, float]:
        return {ls["worker"]: v for n, ls, v in self.samples if n == name and labels.items() <= ls.items()}

    def has(self, name: str) -> bool:
        return any(n == name for n, _, _ in self.samples)


def fetch(port: int, path: str = "/metrics") -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def scrape(port: int) -> Scrape:
    status, text = fetch(port)
    assert status == 200, text
    return Scrape(text)


def settled(port: int, cond: Callable[[Scrape], bool], timeout: float = 15.0, what: str = "") -> Scrape:
    """Scrape until `cond` holds (the workers write their figures four times a second)."""
    deadline = time.monotonic() + timeout
    while True:
        last = scrape(port)
        if cond(last):
            return last
        if time.monotonic() > deadline:
            raise AssertionError(f"/metrics never showed {what or 'the expected figures'} within {timeout:.0f} s")
        time.sleep(0.05)


def with_metrics(make_cluster: Callable[..., Cluster], workers: int = 2, *extra: str) -> tuple[Cluster, int]:
    port = free_port()
    cl = make_cluster(workers, extra=("--metrics-listen", f"127.0.0.1:{port}", *extra))
    wait_for(lambda: _answers(port), what="the metrics endpoint to answer")
    return cl, port


def _answers(port: int) -> bool:
    try:
        return fetch(port)[0] == 200
    except OSError:
        return False


def position_of(cl: Cluster, c: Client) -> str:
    """The `worker` label of the worker serving `c`: its position (stats slot)."""
    pid = cl.worker_of(c)
    return str({v.pid: v.index for v in cl.stats()}[pid])


def received_bytes(c: Client) -> int:
    greeting = len(TELNET_GREETING) if c.greeted else 0
    return greeting + sum(len(line.encode()) + 2 for line in c.lines) + len(c.buf)


def header(cl: Cluster) -> S.Header:
    stats = S.StatsFile(os.path.join(cl.runtime_dir, "stats"))
    try:
        return stats.header()
    finally:
        stats.close()


# --- the collector, on a real stats file ----------------------------------------------------------


def exposition(snap: snapshot.Snapshot) -> str:
    class Fixed:
        def collect(self) -> list[metrics.Metric]:
            return metrics.families(snap)

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Fixed())  # type: ignore[arg-type]
    return generate_latest(registry).decode()


@pytest.fixture
def two_positions(tmp_path: Path) -> snapshot.Snapshot:
    """Position 0: a worker that died after counting; position 1: its live neighbour."""
    stats = S.StatsFile(str(tmp_path / "stats"), create=True)
    stats.write_header(1000, 1001, 2, 1, 12345)
    stats.supervisor.count_restart("crash")
    stats.supervisor.reloads_succeeded += 2
    stats.begin_slot(0, 1, 2)
    dead = stats.resume_slot(0, 1002, 1, 2, time.time())
    dead.lines_received, dead.bytes_delivered, dead.closed_sendq, dead.clients, dead.connections = 7, 700, 1, 3, 4
    dead.observe_latency(0.003)
    dead.observe_latency(0.2)
    stats.write_slot(0, dead)
    stats.clear(0)
    stats.begin_slot(1, 2, 2)
    live = stats.resume_slot(1, 1003, 2, 2, time.time())
    live.state, live.lines_received, live.refused_per_ip, live.clients, live.connections = S.READY, 5, 2, 1, 2
    live.observe_loop(0.0004)
    stats.write_slot(1, live)
    snap = snapshot.read(stats, str(tmp_path), 1000)
    stats.close()
    return snap


def test_the_names_dashboards_rely_on_are_exported_with_their_types(two_positions: snapshot.Snapshot) -> None:
    scraped = Scrape(exposition(two_positions))
    for name, kind in REQUIRED:
        assert scraped.types.get(name) == kind, f"{name}: {scraped.types.get(name)}"


def test_a_dead_workers_counts_stay_in_the_totals_and_its_gauges_go(two_positions: snapshot.Snapshot) -> None:
    scraped = Scrape(exposition(two_positions))
    assert scraped.by_worker("chatcluster_lines_received_total") == {"0": 7, "1": 5}
    assert scraped.by_worker("chatcluster_bytes_delivered_total") == {"0": 700, "1": 0}
    assert scraped.by_worker("chatcluster_disconnects_total", reason="sendq") == {"0": 1, "1": 0}
    assert scraped.by_worker("chatcluster_refused_total", reason="per_ip") == {"0": 0, "1": 2}
    assert scraped.by_worker("chatcluster_clients") == {"1": 1}
    assert scraped.by_worker("chatcluster_connections_open") == {"1": 2}
    assert set(scraped.by_worker("chatcluster_heartbeat_age_seconds")) == {"1"}
    assert scraped.sum("chatcluster_worker_restarts_total", cause="crash") == 1
    assert scraped.sum("chatcluster_reloads_total", result="succeeded") == 2


def test_histograms_have_cumulative_buckets_ending_at_their_count(two_positions: snapshot.Snapshot) -> None:
    scraped = Scrape(exposition(two_positions))
    buckets = [(ls["le"], v) for n, ls, v in scraped.samples
               if n == "chatcluster_delivery_latency_seconds_bucket" and ls["worker"] == "0"]
    assert [le for le, _ in buckets] == [*(str(b) for b in S.BUCKETS), "+Inf"]
    counts = [v for _, v in buckets]
    assert counts == sorted(counts) and counts[-1] == 2
    assert dict(buckets)["0.0025"] == 0 and dict(buckets)["0.005"] == 1 and dict(buckets)["0.25"] == 2
    assert scraped.sum("chatcluster_delivery_latency_seconds_count", worker="0") == 2
    assert scraped.sum("chatcluster_delivery_latency_seconds_sum", worker="0") == pytest.approx(0.203)
    assert scraped.sum("chatcluster_loop_pass_seconds_count", worker="1") == 1


def test_labels_come_from_small_fixed_sets(two_positions: snapshot.Snapshot) -> None:
    allowed = {"worker", "reason", "cause", "result", "direction", "state", "role", "number", "generation", "le"}
    scraped = Scrape(exposition(two_positions))
    for name, labels, _ in scraped.samples:
        assert set(labels) <= allowed, name
        if "reason" in labels:
            assert labels["reason"] in (*S.REFUSE_REASONS, *S.CLOSE_REASONS)
        if "worker" in labels and name != "chatcluster_process_cpu_seconds_total":
            assert labels["worker"] in {"0", "1"}


def test_rooms_are_exported_as_totals_once_the_snapshot_has_them(two_positions: snapshot.Snapshot) -> None:
    assert not Scrape(exposition(two_positions)).has("chatcluster_rooms")
    two_positions.rooms = snapshot.RoomTotals(rooms=3, members=41)
    scraped = Scrape(exposition(two_positions))
    assert scraped.sum("chatcluster_rooms") == 3 and scraped.sum("chatcluster_room_members") == 41


def test_status_totals_are_the_sums_of_the_metrics(two_positions: snapshot.Snapshot) -> None:
    scraped = Scrape(exposition(two_positions))
    totals = two_positions.status()["totals"]
    assert totals["messages_in"] == scraped.sum("chatcluster_lines_received_total") == 12
    assert totals["bytes_out"] == scraped.sum("chatcluster_bytes_delivered_total")
    assert totals["disconnects"]["sendq"] == scraped.sum("chatcluster_disconnects_total", reason="sendq")
    assert totals["refused"]["per_ip"] == scraped.sum("chatcluster_refused_total", reason="per_ip")


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool (Debian package prometheus) not installed")
def test_promtool_accepts_the_collectors_output(two_positions: snapshot.Snapshot) -> None:
    two_positions.rooms = snapshot.RoomTotals(rooms=1, members=1)
    result = subprocess.run(["promtool", "check", "metrics"], input=exposition(two_positions), text=True,
                            capture_output=True, timeout=30)
    assert result.returncode == 0 and not result.stdout.strip() and not result.stderr.strip(), result


def test_status_and_metrics_modules_do_not_load_zmq() -> None:
    code = ("import sys; import chatcluster.snapshot, chatcluster.metrics, chatcluster.exporter; "
            "print('zmq' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=30)
    assert out.stdout.strip() == "False", out


# --- deploy/monitoring: what operators install beside Prometheus and Grafana -------------------------

MONITORING = REPO / "deploy" / "monitoring"
needs_promtool = pytest.mark.skipif(shutil.which("promtool") is None,
                                    reason="promtool (Debian package prometheus) not installed")


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["promtool", *args], capture_output=True, text=True, cwd=MONITORING, timeout=60)


@needs_promtool
def test_promtool_accepts_the_alert_rules() -> None:
    result = promtool("check", "rules", "chatcluster-alerts.yml")
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_the_alerts_fire_when_and_only_when_they_should() -> None:
    result = promtool("test", "rules", "chatcluster-alerts.test.yml")
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_promtool_accepts_the_scrape_config() -> None:
    result = promtool("check", "config", "prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def exported_names(snap: snapshot.Snapshot) -> set[str]:
    """Every series name the collector can produce (broker figures and rooms included)."""
    snap.broker.heartbeat = snap.taken
    snap.rooms = snapshot.RoomTotals(rooms=0, members=0)
    names = set()
    for family in metrics.families(snap):
        suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_count", "_sum"]}.get(family.type, [""])
        names |= {family.name + suffix for suffix in suffixes}
    return names


def names_in(text: str) -> set[str]:
    return set(re.findall(r"\bchatcluster_[a-z_]+\b", text))


def test_the_alert_rules_use_only_exported_metrics(two_positions: snapshot.Snapshot) -> None:
    rules = (MONITORING / "chatcluster-alerts.yml").read_text()
    used = names_in(rules)
    assert used and used <= exported_names(two_positions), used - exported_names(two_positions)
    for alert in ("heartbeat_age_seconds", "worker_restarts_total", "bus_gaps_total", 'reason="sendq"',
                  'reason="emfile"', "broker_restarts_total", "broker_heartbeat_age_seconds"):
        assert alert in rules, alert


def test_the_dashboard_queries_only_exported_metrics_of_the_chosen_cluster(
    two_positions: snapshot.Snapshot,
) -> None:
    dashboard = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert exprs and all('instance=~"$instance"' in e for e in exprs)
    used = names_in(" ".join(exprs))
    assert used <= exported_names(two_positions), used - exported_names(two_positions)
    for required in ("chatcluster_clients", "chatcluster_delivery_latency_seconds_bucket",
                     "chatcluster_disconnects_total", "chatcluster_heartbeat_age_seconds"):
        assert required in used
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])


# --- a real cluster ----------------------------------------------------------------------------------


def test_metrics_count_connections_lines_and_bytes_exactly(make_cluster: Callable[..., Cluster]) -> None:
    cl, port = with_metrics(make_cluster, 2, "--flood-rate", "0", "--no-announce-joins")
    a, b, c = cl.client(), cl.client(), cl.client()
    said = {a: [f"a{i}" for i in range(4)], b: [f"b{i}" for i in range(3)], c: []}
    # One sender after the other: lines of two senders of one worker that share a bus batch reach
    # each other outside the broadcast, which lines_delivered does not count yet.
    for line in said[a]:
        a.say(line)
    b.wait_line(rf"{a.nick}: a3")
    for line in said[b]:
        b.say(line)
    a.wait_line(rf"{b.nick}: b2")
    c.wait(lambda lines: len([x for x in lines if ": " in x]) == 7, what="all seven lines")
    where = {x: position_of(cl, x) for x in (a, b, c)}
    positions = {str(v.index) for v in cl.stats()}

    def expect(per_client: Callable[[Client], int]) -> dict[str, float]:
        out: dict[str, float] = {pos: 0 for pos in positions}
        for x, pos in where.items():
            out[pos] += per_client(x)
        return out

    def matches(s: Scrape) -> bool:
        return (s.by_worker("chatcluster_lines_received_total") == expect(lambda x: len(said[x]))
                and s.by_worker("chatcluster_lines_delivered_total") == expect(lambda x: 7 - len(said[x]))
                and s.by_worker("chatcluster_bytes_delivered_total") == expect(received_bytes)
                and s.by_worker("chatcluster_connections_accepted_total") == expect(lambda x: 1)
                and s.by_worker("chatcluster_connections_open") == expect(lambda x: 1)
                and s.by_worker("chatcluster_clients") == expect(lambda x: 1))

    settled(port, matches, what="3 connections, 7 lines received, 14 delivered, every byte the clients got")
    a.say("/quit")
    a.wait_closed()
    gone = {a}

    def after_quit(s: Scrape) -> bool:
        return (s.by_worker("chatcluster_bytes_delivered_total") == expect(received_bytes)
                and s.by_worker("chatcluster_connections_open") == expect(lambda x: x not in gone)
                and s.by_worker("chatcluster_connections_accepted_total") == expect(lambda x: 1))

    final = settled(port, after_quit, what="the goodbye's bytes and one connection fewer")
    assert a.lines[-1] == "*** Goodbye"
    assert final.sum("chatcluster_bus_gaps_total") == 0
    assert final.sum("chatcluster_workers", state="ready") == 2 and final.sum("chatcluster_generation") == 1


def test_status_json_and_metrics_show_the_same_numbers(make_cluster: Callable[..., Cluster]) -> None:
    cl, port = with_metrics(make_cluster, 2, "--flood-rate", "0")
    a, b = cl.client(), cl.client()
    for i in range(5):
        a.say(f"line {i}")
    b.wait_line(rf"{a.nick}: line 4")
    settled(port, lambda s: s.sum("chatcluster_lines_received_total") == 5, what="the five lines")
    # The cluster is idle now: both readings see the same counters.
    run = subprocess.run([sys.executable, "-m", "chatcluster", "status", "--json", "--port", str(cl.port),
                          "--runtime-dir", cl.runtime_dir], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert run.returncode == 0, run.stderr
    status = json.loads(run.stdout)
    scraped = scrape(port)
    totals = status["totals"]
    assert totals["messages_in"] == scraped.sum("chatcluster_lines_received_total") == 5
    assert totals["messages_out"] == scraped.sum("chatcluster_lines_delivered_total")
    assert totals["bytes_out"] == scraped.sum("chatcluster_bytes_delivered_total") > 0
    assert totals["accepted"] == scraped.sum("chatcluster_connections_accepted_total") == 2
    assert status["connections"] == scraped.sum("chatcluster_connections_open") == 2
    assert status["clients"] == scraped.sum("chatcluster_clients") == 2
    workers = {str(p["slot"]): p for p in status["processes"] if "slot" in p}
    assert {w: p["messages_in"] for w, p in workers.items()} == scraped.by_worker("chatcluster_lines_received_total")
    roles = [p["role"] for p in status["processes"]]
    assert roles[:3] == ["supervisor", "broker", "metrics"]
    assert scraped.sum("chatcluster_process_resident_memory_bytes", role="metrics") > 0


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool (Debian package prometheus) not installed")
def test_promtool_accepts_a_live_clusters_metrics(make_cluster: Callable[..., Cluster]) -> None:
    cl, port = with_metrics(make_cluster, 2)
    cl.client().say("something")
    _, text = fetch(port)
    result = subprocess.run(["promtool", "check", "metrics"], input=text, text=True, capture_output=True,
                            timeout=30)
    assert result.returncode == 0 and not result.stdout.strip() and not result.stderr.strip(), result


def test_only_metrics_is_served_and_anything_else_is_not_found(make_cluster: Callable[..., Cluster]) -> None:
    _, port = with_metrics(make_cluster, 1)
    status, body = fetch(port, "/")
    assert status == 404 and "/metrics" in body
    assert fetch(port, "/metrics/extra")[0] == 404
    status, body = fetch(port, "/metrics")
    assert status == 200 and "# TYPE chatcluster_clients gauge" in body


def test_no_endpoint_unless_metrics_listen_is_set(make_cluster: Callable[..., Cluster]) -> None:
    cl = make_cluster(1)
    assert header(cl).exporter_pid == 0
    assert len(psutil.Process(cl.pid).children()) == 2  # the broker and the worker, nothing else


@pytest.mark.parametrize(
    ("listen", "message"),
    [
        ("9464", "metrics_listen must be HOST:PORT with a port from 1 to 65535"),
        ("::1:9464", "an IPv6 address needs brackets"),
        ("192.0.2.1:9464", "192.0.2.1 is not an address of this machine; choose another with --metrics-listen"),
    ],
)
def test_an_unusable_metrics_address_stops_start_with_one_line(
    make_cluster: Callable[..., Cluster], listen: str, message: str,
) -> None:
    cl = make_cluster(1, extra=("--metrics-listen", listen), start=False)
    cl.start(wait=False)
    assert cl.wait_exit(30) == 2
    lines = cl.read_log().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("chatcluster: error: ") and message in lines[0], lines


def test_a_metrics_port_in_use_stops_start_with_one_line(make_cluster: Callable[..., Cluster]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cl = make_cluster(1, extra=("--metrics-listen", f"127.0.0.1:{port}"), start=False)
        cl.start(wait=False)
        assert cl.wait_exit(30) == 2
    lines = cl.read_log().strip().splitlines()
    assert lines == [f"chatcluster: error: --metrics-listen 127.0.0.1:{port}: port {port} is in use by another "
                     f"program; choose another with --metrics-listen"]


def test_a_killed_endpoint_is_restarted_and_the_cluster_serves_on(make_cluster: Callable[..., Cluster]) -> None:
    cl, port = with_metrics(make_cluster, 2)
    old = header(cl).exporter_pid
    assert old and psutil.Process(old).ppid() == cl.pid
    os.kill(old, signal.SIGKILL)
    wait_for(lambda: header(cl).exporter_pid not in (0, old) and _answers(port), what="a new metrics endpoint")
    assert f"metrics endpoint (pid {old}) was killed by SIGKILL; restarting it" in cl.read_log()
    a, b = cl.client(), cl.client()
    a.say("still here")
    b.wait_line(rf"{a.nick}: still here")


def test_counters_of_a_killed_worker_stay_in_its_positions_series(make_cluster: Callable[..., Cluster]) -> None:
    cl, port = with_metrics(make_cluster, 2, "--flood-rate", "0")
    a, b = cl.client(), cl.client()
    for i in range(6):
        a.say(f"before {i}")
    b.wait_line(rf"{a.nick}: before 5")
    pos = position_of(cl, a)
    before = settled(port, lambda s: s.by_worker("chatcluster_lines_received_total").get(pos) == 6,
                     what="the six lines on the sender's position")
    victim = cl.worker_of(a)
    numbers = before.by_worker("chatcluster_worker_info")
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: len(cl.worker_pids()) == 2 and victim not in cl.worker_pids(), what="a replacement worker")
    after = settled(port, lambda s: s.sum("chatcluster_worker_restarts_total", cause="crash") == 1
                    and len(s.by_worker("chatcluster_worker_info")) == 2, what="the restart counted")
    for name in ("chatcluster_lines_received_total", "chatcluster_lines_delivered_total",
                 "chatcluster_bytes_delivered_total", "chatcluster_connections_accepted_total"):
        for worker, value in before.by_worker(name).items():
            assert after.by_worker(name)[worker] >= value, (name, worker)
    assert after.by_worker("chatcluster_lines_received_total")[pos] == 6
    assert after.sum("chatcluster_lines_received_total") == 6
    infos = {ls["worker"]: ls["number"] for n, ls, _ in after.samples if n == "chatcluster_worker_info"}
    assert set(infos) == set(numbers)  # the replacement took the dead worker's position
    assert after.sum("chatcluster_worker_restarts_total", cause="heartbeat_timeout") == 0


def test_a_worker_killed_for_its_heartbeat_is_counted_so(make_cluster: Callable[..., Cluster]) -> None:
    cl, port = with_metrics(make_cluster, 2, "--worker-timeout", "1")
    victim = cl.worker_pids()[0]
    os.kill(victim, signal.SIGSTOP)
    try:
        settled(port, lambda s: s.sum("chatcluster_worker_restarts_total", cause="heartbeat_timeout") == 1,
                what="one restart for a missing heartbeat")
    finally:
        with_suppressed_lookup(lambda: os.kill(victim, signal.SIGCONT))
    wait_for(lambda: len(cl.worker_pids()) == 2 and victim not in cl.worker_pids(), what="a replacement worker")
    assert scrape(port).sum("chatcluster_worker_restarts_total", cause="crash") == 0


def with_suppressed_lookup(action: Callable[[], None]) -> None:
    try:
        action()
    except ProcessLookupError:
        pass


def test_a_broker_restart_is_counted(make_cluster: Callable[..., Cluster]) -> None:
    cl, port = with_metrics(make_cluster, 2)
    broker = header(cl).broker_pid
    os.kill(broker, signal.SIGKILL)
    settled(port, lambda s: s.sum("chatcluster_broker_restarts_total") == 1, what="one broker restart")
    wait_for(lambda: header(cl).broker_pid not in (0, broker), what="a new broker")


def test_reloads_are_counted_by_result(make_cluster: Callable[..., Cluster], tmp_path: Path) -> None:
    config = tmp_path / "chatcluster.toml"
    config.write_text("[chat]\nannounce_joins = true\n")
    port = free_port()
    cl = make_cluster(1, config=str(config), extra=("--metrics-listen", f"127.0.0.1:{port}"))
    wait_for(lambda: _answers(port), what="the metrics endpoint")
    cl.signal(signal.SIGHUP)
    settled(port, lambda s: s.sum("chatcluster_reloads_total", result="succeeded") == 1, what="one reload")
    config.write_text("[chat]\nannounce_joins = maybe\n")
    cl.signal(signal.SIGHUP)
    last = settled(port, lambda s: s.sum("chatcluster_reloads_total", result="refused") == 1,
                   what="one refused reload")
    assert last.sum("chatcluster_reloads_total", result="succeeded") == 1


@pytest.mark.slow
def test_an_upgrade_replaces_the_endpoint_and_keeps_the_counts(make_cluster: Callable[..., Cluster]) -> None:
    cl, port = with_metrics(make_cluster, 2, "--flood-rate", "0")
    a, b = cl.client(), cl.client()
    for i in range(3):
        a.say(f"before {i}")
    b.wait_line(rf"{a.nick}: before 2")
    before = settled(port, lambda s: s.sum("chatcluster_lines_received_total") == 3, what="three lines")
    old = header(cl).exporter_pid
    run = subprocess.run([sys.executable, "-m", "chatcluster", "upgrade", "--port", str(cl.port),
                          "--runtime-dir", cl.runtime_dir], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert run.returncode == 0, run.stderr
    after = settled(port, lambda s: s.sum("chatcluster_generation") == 2
                    and s.sum("chatcluster_upgrades_total", result="succeeded") == 1, what="generation 2")
    assert header(cl).exporter_pid not in (0, old)
    assert after.sum("chatcluster_lines_received_total") == 3
    assert after.sum("chatcluster_bytes_delivered_total") >= before.sum("chatcluster_bytes_delivered_total")
    a.say("after")
    b.wait_line(rf"{a.nick}: after")
    settled(port, lambda s: s.sum("chatcluster_lines_received_total") == 4, what="the line after the upgrade")


@pytest.mark.slow
def test_hanging_and_slow_scrapers_never_hold_up_the_supervisor(make_cluster: Callable[..., Cluster]) -> None:
    cl, port = with_metrics(make_cluster, 2)
    silent = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(8)]  # never ask
    slow = socket.socket()
    slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
    slow.connect(("127.0.0.1", port))
    slow.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
    stop = threading.Event()

    def trickle() -> None:  # one byte at a time, slowly
        while not stop.is_set():
            try:
                slow.settimeout(1)
                if not slow.recv(1):
                    return
            except OSError:
                return
            time.sleep(0.05)

    reader = threading.Thread(target=trickle, daemon=True)
    reader.start()
    try:
        assert scrape(port).sum("chatcluster_workers", state="ready") == 2  # others are still served
        victim = cl.worker_pids()[0]
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: len(cl.worker_pids()) == 2 and victim not in cl.worker_pids(), what="a replacement")
        exporter = header(cl).exporter_pid
        cl.signal(signal.SIGTERM)
        assert cl.wait_exit(15) == 0  # within graceful_timeout (10 s) and its margin
        assert not psutil.pid_exists(exporter) or psutil.Process(exporter).status() == psutil.STATUS_ZOMBIE
    finally:
        stop.set()
        for s in (*silent, slow):
            s.close()
        reader.join(5)


def recv_until_or_closed(sock: socket.socket, marker: bytes) -> bytes:
    """What arrives until `marker`, or b"" when the server closes the connection first."""
    data = b""
    sock.settimeout(15)
    while marker not in data:
        try:
            chunk = sock.recv(4096)
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            return b""
        data += chunk
    return data


def closed_now(c: Client) -> bool:
    c.drain_for_quiet()
    return c.closed


# --- figures the workers and the broker do not count yet ---------------------------------------------
# What /metrics shows of each reason a worker counts, end to end.



def quickly(port: int, cond: Callable[[Scrape], bool], what: str) -> Scrape:
    """The event has happened (seen by a client): the next few heartbeats must show it."""
    return settled(port, cond, timeout=3.0, what=what)


@pytest.mark.slow
def test_a_quit_is_counted_as_a_quit_disconnect(make_cluster: Callable[..., Cluster]) -> None:
    cl, port = with_metrics(make_cluster, 2)
    a = cl.client()
    pos = position_of(cl, a)
    a.say("/quit bye")
    a.wait_closed()
    quickly(port, lambda s: s.by_worker("chatcluster_disconnects_total", reason="quit").get(pos) == 1
            and s.sum("chatcluster_disconnects_total") == 1, "one quit")


@pytest.mark.slow
def test_a_reset_connection_is_counted_as_a_reset(make_cluster: Callable[..., Cluster]) -> None:
    cl, port = with_metrics(make_cluster, 1)
    a = cl.client()
    a.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    a.sock.close()  # with linger 0: a RST, not a FIN
    settled(port, lambda s: s.sum("chatcluster_connections_open") == 0, what="the connection gone")
    quickly(port, lambda s: s.sum("chatcluster_disconnects_total", reason="reset") == 1, "one reset")


@pytest.mark.slow
def test_an_idle_client_cut_is_counted_as_idle(make_cluster: Callable[..., Cluster]) -> None:
    cl, port = with_metrics(make_cluster, 1, "--idle-timeout", "0.5")
    a = cl.client()
    a.wait_line(r"\*\*\* Error: disconnected: idle for too long")
    a.wait_closed()
    quickly(port, lambda s: s.sum("chatcluster_disconnects_total", reason="idle") == 1, "one idle cut")


@pytest.mark.slow
def test_a_client_cut_for_its_sendq_is_counted_as_sendq(make_cluster: Callable[..., Cluster]) -> None:
    cl, port = with_metrics(make_cluster, 2, "--flood-rate", "0", "--max-sendq-bytes", str(64 * 1024))
    a, b = cl.clients_on_distinct_workers(2)
    slow = raw_socket(cl.port, rcvbuf=4096)
    recv_until(slow, b"Welcome")
    receiver = ThreadedReader(b.sock, b.buf, b.nick)
    sender = pump(a.sock, a.nick, "S", 20_000, 400, to=receiver)
    sender.join(120)
    _, closed = read_to_end(slow, timeout=60)
    assert closed
    wait_for(lambda: sum(v.dropped for v in cl.stats()) == 1, what="the cut in the stats")
    receiver.stop()
    quickly(port, lambda s: s.sum("chatcluster_disconnects_total", reason="sendq") == 1, "one sendq cut")


@pytest.mark.slow
def test_clients_of_a_retired_worker_are_counted_as_shutdown(make_cluster: Callable[..., Cluster]) -> None:
    cl, port = with_metrics(make_cluster, 2)
    clients = cl.clients_on_distinct_workers(2)
    settled(port, lambda s: s.sum("chatcluster_connections_open") == 2, what="only the two placed clients left")
    cl.signal(signal.SIGTTOU)  # one worker fewer: its client is told and disconnected
    wait_for(lambda: any(closed_now(c) for c in clients), what="one client cut")
    quickly(port, lambda s: s.sum("chatcluster_disconnects_total", reason="shutdown") == 1, "one shutdown")


@pytest.mark.slow
def test_a_refusal_for_a_full_server_is_counted(make_cluster: Callable[..., Cluster]) -> None:
    cl, port = with_metrics(make_cluster, 2, "--max-clients", "1")
    cl.client()
    refused = cl.client(welcome=False)
    refused.wait_line(r"\*\*\* Error: server full")
    refused.wait_closed()
    quickly(port, lambda s: s.sum("chatcluster_refused_total", reason="server_full") == 1
            and s.sum("chatcluster_disconnects_total") == 0, "one server_full refusal")


@pytest.mark.slow
def test_a_refusal_for_too_many_clients_from_one_address_is_counted(make_cluster: Callable[..., Cluster]) -> None:
    cl, port = with_metrics(make_cluster, 2, "--max-clients-per-ip", "1")
    cl.client()
    refused = cl.client(welcome=False)
    refused.wait_line(r"\*\*\* Error: too many connections from your address")
    refused.wait_closed()
    quickly(port, lambda s: s.sum("chatcluster_refused_total", reason="per_ip") == 1, "one per_ip refusal")


@pytest.mark.slow
def test_connections_shed_out_of_descriptors_are_counted_as_emfile(make_cluster: Callable[..., Cluster]) -> None:
    cl, port = with_metrics(make_cluster, 1)
    (pid,) = cl.worker_pids()
    proc = psutil.Process(pid)
    _, hard = proc.rlimit(psutil.RLIMIT_NOFILE)
    proc.rlimit(psutil.RLIMIT_NOFILE, (proc.num_fds() + 3, hard))
    extra = [raw_socket(cl.port) for _ in range(10)]
    try:
        # A shed connection is closed without a word; an accepted one gets its welcome.
        shed = sum(1 for s in extra if not recv_until_or_closed(s, b"\r\n"))
        assert shed >= 1
        quickly(port, lambda s: s.sum("chatcluster_refused_total", reason="emfile") == shed, f"{shed} sheds")
    finally:
        for s in extra:
            s.close()


@pytest.mark.slow
def test_delivered_lines_are_timed_from_the_bus_stamp(make_cluster: Callable[..., Cluster]) -> None:
    cl, port = with_metrics(make_cluster, 2, "--flood-rate", "0")
    a, b = cl.client(), cl.client()
    for i in range(5):
        a.say(f"timed {i}")
    b.wait_line(rf"{a.nick}: timed 4")
    quickly(port, lambda s: s.sum("chatcluster_delivery_latency_seconds_count") >= 5
            and 0 < s.sum("chatcluster_delivery_latency_seconds_sum") < 5 * 10, "five timed deliveries")


@pytest.mark.slow
def test_every_loop_pass_is_timed(make_cluster: Callable[..., Cluster]) -> None:
    cl, port = with_metrics(make_cluster, 2)
    a = cl.client()
    a.say("hello")
    quickly(port, lambda s: all(v > 0 for v in s.by_worker("chatcluster_loop_pass_seconds_count").values()),
            "loop passes on every worker")


@pytest.mark.slow
def test_bus_traffic_is_counted_both_ways(make_cluster: Callable[..., Cluster]) -> None:
    cl, port = with_metrics(make_cluster, 2)
    a = cl.client()
    a.say("hello")
    for name in ("chatcluster_bus_batches_total", "chatcluster_bus_bytes_total"):
        for direction in ("published", "received"):
            quickly(port, lambda s, n=name, d=direction: all(v > 0 for v in s.by_worker(n, direction=d).values()),
                    f"{name} {direction}")


@pytest.mark.slow
def test_the_broker_reports_its_heartbeat_and_traffic(make_cluster: Callable[..., Cluster]) -> None:
    cl, port = with_metrics(make_cluster, 2)
    cl.client().say("hello")
    quickly(port, lambda s: s.has("chatcluster_broker_heartbeat_age_seconds")
            and s.sum("chatcluster_broker_heartbeat_age_seconds") < 5
            and s.sum("chatcluster_broker_batches_total", direction="received") > 0, "the broker's figures")


@pytest.mark.slow
def test_rooms_and_members_are_cluster_totals(make_cluster: Callable[..., Cluster]) -> None:
    cl, port = with_metrics(make_cluster, 2)
    a, b = cl.client(), cl.client()
    a.say("/join #alpha")
    a.wait_line(r"\*\*\* You joined #alpha.*")
    b.say("/join #beta")
    b.wait_line(r"\*\*\* You joined #beta.*")
    # #lobby (both), #alpha and #beta: 3 rooms, 4 memberships; one series each, whatever the rooms.
    scrape = quickly(port, lambda s: s.sum("chatcluster_rooms") == 3 and s.sum("chatcluster_room_members") == 4,
                     "3 rooms and 4 memberships")
    assert [ls for n, ls, _ in scrape.samples if n in ("chatcluster_rooms", "chatcluster_room_members")] == [{}, {}]
    status = json.loads(subprocess.run(
        [sys.executable, "-m", "chatcluster", "status", "--json", "--runtime-dir", cl.runtime_dir,
         "--port", str(cl.port)], capture_output=True, text=True, check=True, cwd=REPO).stdout)
    assert status["rooms"] == {"rooms": 3, "members": 4}
