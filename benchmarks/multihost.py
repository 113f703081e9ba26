"""Several hosts, one conversation: latency, fan-out and failover stalls of chatcluster over NATS JetStream.

Real chatcluster hosts (each `python -m chatcluster start --nats-servers ...`
with its own port, runtime directory and node name, `--workers 1` each) on
real nats-server clusters on loopback (the test harness tests/nats_support.py),
driven by the load generator:

- latency: CLIENTS clients spread evenly over 2 hosts (SENDERS of them talk,
  half on each host, RATE lines/s in total, evenly spread), for `--duration`
  seconds; about 100 listeners (half on each host) measure the delay of every
  line. On a single NATS node (R1) and on 3 nodes (R3), beside one host
  without NATS (`--workers 2`, the same number of workers in all).
- fan-out: 2 senders on each host write LINES lines as fast as they can to
  RECEIVERS receivers spread over the 2 hosts (the fanout.py blast, across
  hosts), on 3 nodes (R3), beside one host.
- failover: 3 nodes (R3), 2 hosts, 4 senders (2 per host) at 50 lines/s
  each; after 3 s one NATS node is stopped: the stream leader by kill -9, a
  follower by kill -9, the stream leader by a graceful stop (SIGTERM). The
  stall is the longest pause in the lines arriving at a listener (one per
  host) from that moment on; every line must arrive once, and both listeners
  must see one order. Each case `--repeat` times, each on a fresh cluster.

The machine's load average and how busy it was before each part are recorded
with the figures (2 cores shared with other work: the figures move with it).

    python benchmarks/multihost.py            # ~6 min
    python benchmarks/multihost.py --quick    # smoke run, ~1.5 min
    python benchmarks/multihost.py --only failover --repeat 5

Writes benchmarks/results/multihost.json (multihost-quick.json with --quick).
Needs nats-py and a nats-server of at least 2.11 (bash scripts/test.sh installs both).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import re
import socket
import statistics
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent / "tests"))  # the NATS cluster harness lives with the tests

import _common  # noqa: E402
import loadgen  # noqa: E402
import psutil  # noqa: E402
from _common import Server, print_table  # noqa: E402
from nats_support import NatsCluster, nats_server_binary  # noqa: E402

STREAM = "CHATCLUSTER_main"


class Hosts:
    """The chatcluster hosts (and the NATS nodes) of one run, measured together as one server."""

    kind = "chatcluster"

    def __init__(self, nats: NatsCluster | None, count: int, workers: int, label: str) -> None:
        self.nats = nats
        self.servers: list[Server] = []
        for i in range(count):
            extra: list[str] = []
            if nats is not None:
                extra = ["--nats-servers", ",".join(nats.urls[i % nats.size:] + nats.urls[:i % nats.size]),
                         "--node-name", f"h{i + 1}", "--nats-replicas", str(min(3, nats.size))]
            slug = re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")
            self.servers.append(Server("chatcluster", workers=workers, extra_args=extra,
                                       log_name=f"multihost-{slug}-h{i + 1}"))

    def start(self) -> Hosts:
        try:
            for s in self.servers:
                s.start(ready_timeout=60.0)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for s in self.servers:
            s.stop()

    def nats_procs(self) -> list[psutil.Process]:
        out = []
        for n in self.nats.nodes if self.nats else []:
            if n.alive():
                try:
                    out.append(psutil.Process(n.pid))
                except psutil.Error:
                    pass
        return out

    # What loadgen.run_load and its monitor read of a server: every host's processes, and NATS.
    def cpu_times(self) -> dict[int, tuple[float, float]]:
        out: dict[int, tuple[float, float]] = {}
        for s in self.servers:
            out.update(s.cpu_times())
        out.update(_common.cpu_times_of(self.nats_procs()))
        return out

    def cpu_by_role(self, before: dict[int, float], after: dict[int, float]) -> dict[str, float]:
        nats = {p.pid for p in self.nats_procs()}
        split = {"supervisors": 0.0, "workers": 0.0, "bus": 0.0, "nats": 0.0}
        for s in self.servers:
            workers = {p.pid for p in s.workers_of(s.processes())}
            root = s.proc.pid if s.proc else -1
            for pid in s.cpu_times():
                used = after.get(pid, 0.0) - before.get(pid, 0.0)
                split["supervisors" if pid == root else "workers" if pid in workers else "bus"] += used
        for pid in nats:
            split["nats"] += after.get(pid, 0.0) - before.get(pid, 0.0)
        return split

    def memory(self) -> dict[str, int]:
        out = {"rss": 0, "worker_rss": 0, "processes": 0, "workers": 0}
        for s in self.servers:
            for k, v in s.memory().items():
                out[k] += v
        return out

    def alive(self) -> bool:
        return all(s.alive() for s in self.servers)


def machine_state() -> dict[str, Any]:
    return {"load_average": [round(x, 2) for x in os.getloadavg()], "busy_pct": _common.machine_busy(1.0)}


def plans_for(hosts: Hosts, receivers: int, senders: int, lines_per_sender: int, rate: float, **kw: Any
              ) -> list[loadgen.ClientPlan]:
    """The clients spread evenly over the hosts: receivers, senders and rate alike."""
    out: list[loadgen.ClientPlan] = []
    n = len(hosts.servers)
    for i, s in enumerate(hosts.servers):
        r = receivers // n + (1 if i < receivers % n else 0)
        k = senders // n + (1 if i < senders % n else 0)
        out += loadgen.plan_clients(s.host, s.port, receivers=r, senders=k, lines_per_sender=lines_per_sender,
                                    total_rate=rate * k / senders if rate else 0.0, **kw)
    return out


# -- latency -------------------------------------------------------------------------------------

@contextlib.contextmanager
def hosts_up(label: str, nats_size: int) -> Iterator[Hosts]:
    """2 hosts of 1 worker on a NATS cluster of `nats_size` nodes, or (0) one host of 2 workers; stopped after."""
    nats = NatsCluster(nats_size).start() if nats_size else None
    hosts = Hosts(nats, 2 if nats else 1, 1 if nats else 2, label)
    try:
        hosts.start()
        yield hosts
    finally:
        hosts.stop()
        if nats is not None:
            nats.stop()


def latency_run(label: str, nats_size: int, args: argparse.Namespace) -> dict[str, Any]:
    before = machine_state()
    with hosts_up(label, nats_size) as hosts:
        lines_per_sender = max(1, round(args.rate / args.senders * args.duration))
        plans = plans_for(hosts, args.clients - args.senders, args.senders, lines_per_sender, args.rate,
                          processes=2, hot_receivers=args.hot_receivers // len(hosts.servers),
                          connect_rate=2000.0, sample_every=1, line_bytes=60, cold_interval=0.25,
                          deadline_s=args.duration + 240)
        print(f"latency, {label}: {args.clients:,} clients, {args.senders} senders, {args.rate:g} lines/s "
              f"for {args.duration:g} s ...", flush=True)
        out = loadgen.run_load(plans, server=hosts, connect_timeout=90.0, run_timeout=args.duration + 60.0,  # type: ignore[arg-type]
                               label=label, verbose=True)
    return {**out, "label": label, "machine_before": before}


def fanout_run(label: str, nats_size: int, args: argparse.Namespace) -> dict[str, Any]:
    before = machine_state()
    with hosts_up(f"fanout-{label}", nats_size) as hosts:
        plans = plans_for(hosts, args.receivers, 4, args.lines, 0.0, processes=2, sample_every=10,
                          line_bytes=60, hot_receivers=0, deadline_s=300)
        print(f"fan-out, {label}: 4 senders x {args.lines:,} lines to {args.receivers} receivers ...", flush=True)
        out = loadgen.run_load(plans, server=hosts, connect_timeout=60.0, run_timeout=180.0,  # type: ignore[arg-type]
                               label=label, verbose=True)
    return {**out, "label": label, "machine_before": before}


# -- failover ------------------------------------------------------------------------------------

class Listener(threading.Thread):
    """A plain client that notes when each chat line arrives."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=20)
        self.lines: list[tuple[float, str]] = []
        self.nick = ""
        self.done = threading.Event()
        buf = b""
        while b"Your nickname is" not in buf:
            buf += self.sock.recv(4096)
        self.nick = re.search(rb"Your nickname is (\S+)\.", buf).group(1).decode()  # type: ignore[union-attr]

    def run(self) -> None:
        buf = b""
        self.sock.settimeout(0.5)
        while not self.done.is_set():
            try:
                chunk = self.sock.recv(1 << 16)
            except TimeoutError:
                continue
            except OSError:
                return
            if not chunk:
                return
            now = time.monotonic()
            buf += chunk
            *lines, buf = buf.split(b"\r\n")
            self.lines.extend((now, x.decode(errors="replace")) for x in lines if b": f " in x)


def failover_run(case: str, args: argparse.Namespace) -> dict[str, Any]:
    before = machine_state()
    nats = NatsCluster(3).start()
    hosts = Hosts(nats, 2, 1, f"failover-{case}")
    listeners: list[Listener] = []
    senders: list[socket.socket] = []
    try:
        hosts.start()
        ports = [s.port for s in hosts.servers]
        listeners = [Listener(p) for p in ports]
        senders = [socket.create_connection(("127.0.0.1", ports[i % 2]), timeout=20) for i in range(4)]
        for x in listeners:
            x.start()
        time.sleep(1.0)  # everyone's welcome is through
        per_sender = 50.0
        total_s = args.failover_seconds
        stop_at = 3.0
        sent = 0
        t0 = time.monotonic()
        stopped_at = 0.0
        victim = ""
        i = 0
        while time.monotonic() - t0 < total_s:
            if not stopped_at and time.monotonic() - t0 >= stop_at:
                leader = nats.stream_leader(STREAM)
                node = leader if case != "follower-kill" else next(n for n in nats.nodes if n is not leader)
                victim = node.name
                stopped_at = time.monotonic()
                if case == "leader-stop":
                    threading.Thread(target=node.stop, daemon=True).start()
                else:
                    node.kill()
            for j, s in enumerate(senders):
                s.sendall(f"f {j} {i}\r\n".encode())
                sent += 1
            i += 1
            time.sleep(max(0.0, t0 + i / per_sender - time.monotonic()))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and any(len(x.lines) < sent for x in listeners):
            time.sleep(0.1)
        time.sleep(0.5)  # anything doubled would arrive now
        views = [[text for _, text in x.lines] for x in listeners]
        stalls = []
        for x in listeners:
            ts = [stopped_at] + [t for t, _ in x.lines if t >= stopped_at]
            stalls.append(max((b - a for a, b in zip(ts, ts[1:], strict=False)), default=math.nan))
        return {"case": case, "victim": victim, "sent": sent, "received": [len(v) for v in views],
                "each_once": all(len(v) == len(set(v)) == sent for v in views), "one_order": views[0] == views[1],
                "stall_s": max(stalls), "stall_by_listener_s": stalls, "machine_before": before}
    finally:
        for x in listeners:
            x.done.set()
            x.sock.close()
        for s in senders:
            s.close()
        hosts.stop()
        nats.stop()


# -- main ----------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="chatcluster across hosts over NATS JetStream: latency, fan-out, "
                                            "failover stalls.")
    p.add_argument("--only", default="latency,fanout,failover", help="comma-separated parts to run")
    p.add_argument("--clients", type=int, default=1000)
    p.add_argument("--senders", type=int, default=10)
    p.add_argument("--rate", type=float, default=200.0, help="lines per second over all senders")
    p.add_argument("--duration", type=float, default=15.0, help="seconds of traffic per latency run")
    p.add_argument("--hot-receivers", type=int, default=100)
    p.add_argument("--receivers", type=int, default=200, help="fan-out receivers")
    p.add_argument("--lines", type=int, default=5000, help="fan-out lines per sender")
    p.add_argument("--repeat", type=int, default=3, help="failover runs per case")
    p.add_argument("--failover-seconds", type=float, default=15.0)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.clients, args.senders, args.rate, args.duration = 200, 4, 100.0, 4.0
        args.receivers, args.lines, args.repeat, args.failover_seconds = 50, 1000, 1, 12.0
    args.json = args.json or ("multihost-quick" if args.quick else "multihost")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    binary, why = nats_server_binary()
    if binary is None:
        print(f"cannot run: {why}", file=sys.stderr)
        return 2
    _common.exit_cleanly_on_sigterm()
    _common.raise_open_file_limit()
    busy_before = _common.warn_if_busy()
    parts = set(args.only.split(","))
    out: dict[str, Any] = {"args": vars(args)}
    if "latency" in parts:
        runs = [latency_run("one host, no NATS", 0, args), latency_run("2 hosts, 1 NATS node (R1)", 1, args),
                latency_run("2 hosts, 3 NATS nodes (R3)", 3, args)]
        out["latency"] = runs
        print_table("Latency: clients spread over the hosts", [
            (r["label"], [r["clients_held"], r["expected"], r["lost"], r["latency"]["p50_ms"], r["latency"]["p99_ms"],
                          r["latency"]["max_ms"], r["server_cpu_pct"], r["machine_before"]["load_average"][0],
                          r["machine_before"]["busy_pct"]]) for r in runs],
            ["setting", "clients", "expected", "lost", "p50 ms", "p99 ms", "max ms", "server cpu %", "load 1m",
             "busy % before"])
    if "fanout" in parts:
        runs = [fanout_run("one host, no NATS", 0, args), fanout_run("2 hosts, 3 NATS nodes (R3)", 3, args)]
        out["fanout"] = runs
        print_table("Fan-out blast across hosts", [
            (r["label"], [r["expected"], r["lost"], r["lines_per_s"], r["latency"]["p50_ms"], r["latency"]["p99_ms"],
                          r["server_cpu_pct"], r["machine_before"]["load_average"][0]]) for r in runs],
            ["setting", "expected", "lost", "lines/s delivered", "p50 ms", "p99 ms", "server cpu %", "load 1m"])
    if "failover" in parts:
        cases: dict[str, list[dict[str, Any]]] = {}
        for case in ("leader-kill", "follower-kill", "leader-stop"):
            cases[case] = []
            for i in range(args.repeat):
                print(f"failover, {case}, run {i + 1} of {args.repeat} ...", flush=True)
                try:
                    cases[case].append(failover_run(case, args))
                except (RuntimeError, OSError, AssertionError) as exc:
                    print(f"failover, {case}, run {i + 1}: could not be measured: {exc}", file=sys.stderr)
                    out.setdefault("failures", []).append({"case": case, "run": i + 1, "error": str(exc)[-2000:]})
        out["failover"] = cases
        rows = []
        for case, runs in cases.items():
            if not runs:
                continue
            stalls = [r["stall_s"] for r in runs]
            rows.append((case, [min(stalls), statistics.median(stalls), max(stalls),
                                all(r["each_once"] for r in runs), all(r["one_order"] for r in runs),
                                ", ".join(f"{r['machine_before']['load_average'][0]:.1f}" for r in runs)]))
        print_table("Failover: chat stall at the listeners (s)", rows,
                    ["case", "min", "median", "max", "every line once", "one order", "load 1m per run"])
    path = _common.write_result(args.json, "multihost", busy_before, out)
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
