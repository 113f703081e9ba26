"""Rooms under load: many rooms of many users, beside one room of everyone, and where the CPU goes.

Three runs, each on a fresh chatcluster (2 workers, flood control and join
notices off), with USERS = ROOMS x PER_ROOM clients spread over several client
processes and loopback source addresses (127.0.0.2, ...):

  rooms      every user joins one of ROOMS rooms (and stays in #lobby); the
             kernel's SO_REUSEPORT spreads users over the workers, so every
             room has members on both. SENDERS_PER_ROOM users of each room
             talk, RATE lines/s over all rooms, each line delivered to the
             other PER_ROOM - 1 members of its room.
  one room   the same users, nobody joins a room: LOBBY_RATE lines/s in #lobby,
             each delivered to USERS - 1 clients. The default rates give about
             the same deliveries per second as `rooms` (2,000 x 99 vs 20 x 9,999).
  by worker  each user asks /whois where it is, and the rooms are filled with
             users of one worker only. Then RATE/2 lines/s go to the rooms of
             worker 1 only, then of worker 2 only, then to both: each worker's
             CPU follows the traffic of its own members' rooms, because the
             broker sends a room's batches only to the workers with members in it.

Every line is stamped with its send time; one member of each room (and 100
members of #lobby) reads at once and measures latency, the others read about
four times a second (the server cannot tell the difference: its writes land
in the kernel's socket buffers either way). Deliveries are counted by a
marker byte every load line carries once ("@"); what should arrive is
computed from the membership, so anything missing is reported as lost.

    python benchmarks/rooms.py            # 100 rooms x 100 users, 15 s per phase
    python benchmarks/rooms.py --quick    # 10 rooms x 20 users, 3 s per phase

Writes benchmarks/results/rooms.json (rooms-quick.json with --quick).
"""

from __future__ import annotations

import argparse
import errno
import math
import multiprocessing
import multiprocessing.connection as mpc
import os
import re
import select
import socket
import sys
import tempfile
import time
from array import array
from collections import Counter
from typing import Any

import _common
import loadgen
import psutil
from _common import REPO_ROOT, Server, cpu_used, latency_summary, print_table

sys.path.insert(0, str(REPO_ROOT))
from chatcluster import stats as S  # noqa: E402 - the repository's own package, found through REPO_ROOT

MARK = b"@"
STAMP = b"@T"
RECV_BYTES = 64 * 1024
COLD_INTERVAL = 0.25
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)
WELCOME = re.compile(rb"Your nickname is (\S+)\.")
WORKER = re.compile(rb"\*\*\* (\S+) is on worker (w\d+),")


# --------------------------------------------------------------------------- one client process


class Clients:
    """The connections of one client process and the commands that drive them (over `ctl`)."""

    def __init__(self, index: int, host: str, port: int, count: int, sources: tuple[str, ...], line_bytes: int,
                 ctl: mpc.Connection) -> None:
        self.index, self.host, self.port, self.count = index, host, port, count
        self.sources = sources
        self.line_bytes = line_bytes
        self.ctl = ctl
        self.socks: list[socket.socket] = []
        self.nicks: list[str] = []
        self.bufs: list[bytes] = []
        self.received = array("q", [0] * count)
        self.hot: set[int] = set()
        self.latencies = array("q")
        self.sent = 0

    # ---- setup

    def connect(self, rate: float) -> None:
        ep = select.epoll()
        pending: dict[int, int] = {}
        socks: list[socket.socket | None] = [None] * self.count
        bufs = [b""] * self.count
        nicks = [""] * self.count
        started = 0
        t0 = time.monotonic()
        done = 0
        while done < self.count:
            while started < self.count and len(pending) < 64 and started < (time.monotonic() - t0) * rate + 1:
                s = socket.socket()
                s.setblocking(False)
                s.setsockopt(socket.SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)
                s.bind((self.sources[started % len(self.sources)], 0))
                err = s.connect_ex((self.host, self.port))
                if err not in (0, errno.EINPROGRESS):
                    raise OSError(err, os.strerror(err))
                socks[started] = s
                pending[s.fileno()] = started
                ep.register(s.fileno(), select.EPOLLIN)
                started += 1
            for fd, _ in ep.poll(0.01):
                i = pending[fd]
                s = socks[i]
                assert s is not None
                try:
                    data = s.recv(4096)
                except BlockingIOError:
                    continue
                if not data:
                    raise ConnectionError("the server closed a connection before its welcome line")
                bufs[i] += data
                m = WELCOME.search(bufs[i])
                if m and b"\n" in bufs[i][m.end():]:
                    nicks[i] = m.group(1).decode()
                    bufs[i] = b""
                    ep.unregister(fd)
                    del pending[fd]
                    done += 1
        ep.close()
        self.socks = [s for s in socks if s is not None]
        self.nicks = nicks
        self.bufs = bufs

    def command_all(self, lines: list[str | None], want: re.Pattern[bytes]) -> list[re.Match[bytes] | None]:
        """Send each connection its line (None: nothing) and wait for the reply matching `want`."""
        ep = select.epoll()
        waiting: dict[int, int] = {}
        for i, line in enumerate(lines):
            if line is None:
                continue
            s = self.socks[i]
            s.setblocking(True)
            s.sendall(line.encode() + b"\r\n")
            s.setblocking(False)
            waiting[s.fileno()] = i
            ep.register(s.fileno(), select.EPOLLIN)
        found: list[re.Match[bytes] | None] = [None] * len(self.socks)
        deadline = time.monotonic() + 300
        while waiting and time.monotonic() < deadline:
            for fd, _ in ep.poll(0.1):
                i = waiting[fd]
                try:
                    data = self.socks[i].recv(RECV_BYTES)
                except BlockingIOError:
                    continue
                self.bufs[i] += data
                m = want.search(self.bufs[i])
                if m and b"\n" in self.bufs[i][m.end():]:
                    found[i] = m
                    self.bufs[i] = b""
                    ep.unregister(fd)
                    del waiting[fd]
        ep.close()
        if waiting:
            raise TimeoutError(f"{len(waiting)} connections got no answer matching {want.pattern!r}")
        return found

    # ---- traffic

    def run(self, t0_ns: int, senders: list[tuple[int, float, int]], hot: list[int]) -> None:
        """senders: (connection, lines/s, lines); receive until told to stop."""
        self.hot = set(hot)
        self.received = array("q", [0] * len(self.socks))
        self.latencies = array("q")
        self.sent = 0
        ep = select.epoll()
        for i in self.hot:
            ep.register(self.socks[i].fileno(), select.EPOLLIN)
        by_fd = {s.fileno(): i for i, s in enumerate(self.socks)}
        ep.register(self.ctl.fileno(), select.EPOLLIN)
        cold = [i for i in range(len(self.socks)) if i not in self.hot]
        # Cold sockets are read in slices, spread over COLD_INTERVAL, so each is read about once
        # per interval and the work is smooth (as loadgen does).
        slice_n = min(len(cold), 256)
        slice_every = COLD_INTERVAL * slice_n / max(1, len(cold))
        next_slice = time.monotonic()
        pos = 0
        pad = b"x" * self.line_bytes
        # Pacing: sender k sends line n at t0 + phase_k + n / rate_k.
        plan = [(i, 1e9 / rate, lines, int(k * 1e9 / max(1.0, rate) / max(1, len(senders))))
                for k, (i, rate, lines) in enumerate(senders)]
        next_line = [0] * len(plan)
        while True:
            now = time.monotonic_ns()
            wait = max(0.0, min(0.01, next_slice - time.monotonic()))
            for k, (i, interval, lines, phase) in enumerate(plan):
                n = next_line[k]
                while n < lines and t0_ns + phase + int(n * interval) <= now:
                    head = b"@T%d,%d,%d:" % (time.monotonic_ns(), i, n)
                    line = (head + pad)[: self.line_bytes - 1] + b"\n"
                    try:
                        self.socks[i].send(line)
                    except BlockingIOError:
                        break
                    n += 1
                    self.sent += 1
                next_line[k] = n
                if n < lines:
                    wait = min(wait, max(0.0, (t0_ns + phase + int(n * interval) - now) / 1e9))
            for fd, _ in ep.poll(wait):
                if fd == self.ctl.fileno():
                    if self.ctl.poll():
                        what, _ = self.ctl.recv()
                        if what == "stop":
                            ep.close()
                            self.drain_all()
                            return
                    continue
                self.read(by_fd[fd], True)
            if cold and time.monotonic() >= next_slice:
                next_slice = time.monotonic() + slice_every
                for _ in range(slice_n):
                    self.read(cold[pos], False)
                    pos = (pos + 1) % len(cold)

    def read(self, i: int, hot: bool) -> None:
        s = self.socks[i]
        while True:
            try:
                data = s.recv(RECV_BYTES)
            except BlockingIOError:
                return
            if not data:
                return
            self.received[i] += data.count(MARK)
            if hot:
                now = time.monotonic_ns()
                start = 0
                while (j := data.find(STAMP, start)) >= 0:
                    end = data.find(b",", j)
                    if end < 0:
                        break
                    try:
                        self.latencies.append(now - int(data[j + 2:end]))
                    except ValueError:
                        pass
                    start = end
            if len(data) < RECV_BYTES:
                return

    def drain_all(self) -> None:
        for i in range(len(self.socks)):
            self.read(i, False)


def client_main(index: int, host: str, port: int, count: int, sources: tuple[str, ...], line_bytes: int,
                rate: float, ctl: mpc.Connection) -> None:
    _common.raise_open_file_limit()
    c = Clients(index, host, port, count, sources, line_bytes, ctl)
    try:
        c.connect(rate)
        ctl.send(("ready", c.nicks))
        while True:
            what, data = ctl.recv()
            if what == "whois":
                found = c.command_all([f"/whois {n}" for n in c.nicks], WORKER)
                ctl.send(("workers", [m.group(2).decode() if m else "" for m in found]))
            elif what == "join":
                want = re.compile(rb"\*\*\* You joined #\S+;")
                c.command_all([f"/join {r}" if r else None for r in data], want)
                ctl.send(("joined", None))
            elif what == "go":
                c.run(data["t0_ns"], data["senders"], data["hot"])
                ctl.send(("result", {"received": c.received.tolist(), "latencies": c.latencies.tobytes(),
                                     "sent": c.sent}))
            elif what == "quit":
                return
    except (EOFError, OSError, TimeoutError, ConnectionError) as exc:
        try:
            ctl.send(("error", f"client process {index}: {exc}"))
        except OSError:
            pass


# --------------------------------------------------------------------------- the parent


class Fleet:
    """The client processes of one run; users are numbered (process, connection)."""

    def __init__(self, server: Server, users: int, processes: int, line_bytes: int, connect_rate: float) -> None:
        per = [users // processes + (1 if k < users % processes else 0) for k in range(processes)]
        addrs = loadgen.source_addresses(max(1, math.ceil(users / loadgen.CONNECTIONS_PER_SOURCE)))
        ctx = multiprocessing.get_context("fork")
        self.procs: list[Any] = []
        self.ctls: list[mpc.Connection] = []
        for k, n in enumerate(per):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=client_main, args=(k, server.host, server.port, n, addrs, line_bytes,
                                                       connect_rate / processes, child), daemon=True)
            p.start()
            child.close()
            self.procs.append(p)
            self.ctls.append(parent)
        self.users: list[tuple[int, int]] = [(k, i) for k, n in enumerate(per) for i in range(n)]
        self.nicks: dict[tuple[int, int], str] = {}
        for k, nicks in enumerate(self.gather("ready", 600)):
            for i, nick in enumerate(nicks):
                self.nicks[(k, i)] = nick

    def gather(self, what: str, timeout: float) -> list[Any]:
        out: list[Any] = [None] * len(self.ctls)
        deadline = time.monotonic() + timeout
        for k, ctl in enumerate(self.ctls):
            if not ctl.poll(max(0.0, deadline - time.monotonic())):
                raise TimeoutError(f"client process {k} did not report {what!r} within {timeout:.0f} s")
            got, data = ctl.recv()
            if got == "error":
                raise RuntimeError(data)
            assert got == what, (got, what)
            out[k] = data
        return out

    def send(self, what: str, per_process: list[Any]) -> None:
        for ctl, data in zip(self.ctls, per_process, strict=True):
            ctl.send((what, data))

    def workers(self) -> dict[tuple[int, int], str]:
        self.send("whois", [None] * len(self.ctls))
        return {(k, i): w for k, ws in enumerate(self.gather("workers", 600)) for i, w in enumerate(ws)}

    def join(self, rooms: dict[tuple[int, int], str]) -> None:
        per = [[rooms.get((k, i), "") for i in range(len([u for u in self.users if u[0] == k]))]
               for k in range(len(self.ctls))]
        self.send("join", per)
        self.gather("joined", 600)

    def close(self) -> None:
        for ctl in self.ctls:
            try:
                ctl.send(("quit", None))
            except OSError:
                pass
        for p in self.procs:
            p.join(5)
            if p.is_alive():
                p.terminate()
                p.join(5)

    def traffic(self, server: Server, groups: list[list[tuple[int, int]]],
                talk: list[tuple[list[tuple[int, int]], float]], duration: float,
                slot_pids: dict[int, str]) -> dict[str, Any]:
        """groups: the members of each room; talk: (senders, lines/s each) for the rooms that talk.

        Every member of a room receives every line of its room's senders but its own.
        """
        senders: dict[tuple[int, int], tuple[float, int]] = {}
        for who, rate in talk:
            for u in who:
                senders[u] = (rate, max(1, round(rate * duration)))
        hot = {g[-1] for g in groups if g}  # one member per room reads at once and measures latency
        if len(groups) == 1:
            hot = set(groups[0][:: max(1, len(groups[0]) // 100)])
        expected = 0
        for g in groups:
            lines = sum(senders[u][1] for u in g if u in senders)
            expected += lines * len(g) - sum(senders[u][1] for u in g if u in senders)
        per_process = [{"t0_ns": 0, "senders": [], "hot": []} for _ in self.ctls]
        for (k, i), (rate, lines) in senders.items():
            per_process[k]["senders"].append((i, rate, lines))
        for k, i in hot:
            per_process[k]["hot"].append(i)
        t0 = time.monotonic_ns() + 200_000_000
        for p in per_process:
            p["t0_ns"] = t0
        cpu0 = server.cpu_times()
        machine0 = _common.machine_cpu()
        load0 = self.cpu_seconds()
        self.send("go", per_process)
        start = time.monotonic()
        time.sleep(duration + 0.2)
        # Let the last lines arrive: stop once nothing more comes for a while (or 10 s have passed).
        time.sleep(min(2.0, duration / 3))
        wall = time.monotonic() - start
        cpu1 = server.cpu_times()
        machine = _common.machine_cpu_used(machine0, _common.machine_cpu())
        load_cpu = self.cpu_seconds() - load0
        self.send("stop", [None] * len(self.ctls))
        results = self.gather("result", 120)
        received = sum(sum(r["received"]) for r in results)
        sent = sum(r["sent"] for r in results)
        lat = array("q")
        for r in results:
            lat.frombytes(r["latencies"])
        by_pid = {p: sum(t) for p, t in cpu1.items()}
        before = {p: sum(t) for p, t in cpu0.items()}
        cpu = cpu_used(before, by_pid)
        per_worker = {name: by_pid.get(pid, 0.0) - before.get(pid, 0.0) for pid, name in slot_pids.items()}
        roles = server.cpu_by_role(before, by_pid)
        return {
            "senders": len(senders), "lines_sent": sent, "expected": expected, "received": received,
            "lost": max(0, expected - received), "wall_s": wall,
            "delivered_per_s": received / duration,
            "latency": latency_summary(lat),
            "server_cpu_pct": 100.0 * cpu / wall,
            "server_cpu_us_per_delivered": 1e6 * cpu / received if received else math.nan,
            "worker_cpu_pct": {w: 100.0 * s / wall for w, s in sorted(per_worker.items())},
            "broker_and_supervisor_cpu_pct": 100.0 * (roles["others"] + roles["main"]) / wall,
            "softirq_pct": 100.0 * machine.get("softirq", 0.0) / wall,
            "loadgen_cpu_pct": 100.0 * load_cpu / wall,
            # The whole machine (all CPUs, in percent of one): what else ran beside server and load.
            "machine_cpu_pct": {k: 100.0 * v / wall for k, v in machine.items()},
        }

    def cpu_seconds(self) -> float:
        total = 0.0
        for p in self.procs:
            try:
                t = psutil.Process(p.pid).cpu_times()
            except psutil.Error:
                continue
            total += t.user + t.system
        return total


def worker_pids(runtime_dir: str) -> dict[int, str]:
    f = S.StatsFile(os.path.join(runtime_dir, "stats"))
    try:
        return {v.pid: f"w{v.worker_no}" for v in f.used() if v.pid}
    finally:
        f.close()


def start_server(args: argparse.Namespace, runtime_dir: str, name: str) -> Server:
    return Server("chatcluster", workers=args.workers, log_name=f"rooms-{name}",
                  extra_args=["--runtime-dir", runtime_dir, "--max-rooms", str(args.rooms + 10)]).start()


def run_rooms(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="cc-rooms-") as rt:
        server = start_server(args, rt, "rooms")
        fleet = None
        try:
            fleet = Fleet(server, args.rooms * args.per_room, args.processes, args.line_bytes, args.connect_rate)
            rooms = {u: f"#r{n % args.rooms}" for n, u in enumerate(fleet.users)}
            fleet.join(rooms)
            groups = [[u for u in fleet.users if rooms[u] == f"#r{r}"] for r in range(args.rooms)]
            per_sender = args.rate / (args.rooms * args.senders_per_room)
            talk = [(g[: args.senders_per_room], per_sender) for g in groups]
            out = fleet.traffic(server, groups, talk, args.duration, worker_pids(rt))
            out["rooms"], out["users"], out["rate"] = args.rooms, len(fleet.users), args.rate
            return out
        finally:
            if fleet:
                fleet.close()
            server.stop()


def run_one_room(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="cc-rooms-") as rt:
        server = start_server(args, rt, "one-room")
        fleet = None
        try:
            fleet = Fleet(server, args.rooms * args.per_room, args.processes, args.line_bytes, args.connect_rate)
            senders = fleet.users[: args.lobby_senders]
            talk = [(senders, args.lobby_rate / len(senders))]
            out = fleet.traffic(server, [fleet.users], talk, args.duration, worker_pids(rt))
            out["rooms"], out["users"], out["rate"] = 1, len(fleet.users), args.lobby_rate
            return out
        finally:
            if fleet:
                fleet.close()
            server.stop()


def run_by_worker(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="cc-rooms-") as rt:
        server = start_server(args, rt, "by-worker")
        fleet = None
        try:
            fleet = Fleet(server, args.rooms * args.per_room, args.processes, args.line_bytes, args.connect_rate)
            where = fleet.workers()
            names = sorted(set(where.values()))
            rooms: dict[tuple[int, int], str] = {}
            groups_of: dict[str, list[list[tuple[int, int]]]] = {w: [] for w in names}
            n = 0
            for w in names:
                mine = [u for u in fleet.users if where[u] == w]
                for start in range(0, len(mine), args.per_room):
                    group = mine[start:start + args.per_room]
                    for u in group:
                        rooms[u] = f"#r{n}"
                    groups_of[w].append(group)
                    n += 1
            fleet.join(rooms)
            pids = worker_pids(rt)
            phases = {}
            # Every talking room gets the rate a room gets in the `rooms` run.
            per_sender = args.rate / args.rooms / args.senders_per_room
            groups = [g for w in names for g in groups_of[w]]
            for label, talking in ([(f"{w}'s rooms only", [w]) for w in names] + [("all rooms", names)]):
                talk = [(g[: args.senders_per_room], per_sender) for w in talking for g in groups_of[w]]
                phases[label] = fleet.traffic(server, groups, talk, args.duration, pids)
                phases[label]["talking_workers"] = talking
            return {"users_per_worker": dict(Counter(where.values())),
                    "rooms_per_worker": {w: len(g) for w, g in groups_of.items()}, "phases": phases}
        finally:
            if fleet:
                fleet.close()
            server.stop()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Rooms: many rooms vs one room, and where each worker's CPU goes.")
    p.add_argument("--rooms", type=int, default=100)
    p.add_argument("--per-room", type=int, default=100)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--rate", type=float, default=2000.0, help="lines/s over all rooms")
    p.add_argument("--senders-per-room", type=int, default=2)
    p.add_argument("--lobby-rate", type=float, default=20.0, help="lines/s in the one-room run")
    p.add_argument("--lobby-senders", type=int, default=20)
    p.add_argument("--duration", type=float, default=15.0, help="seconds of traffic per phase")
    p.add_argument("--line-bytes", type=int, default=60)
    p.add_argument("--processes", type=int, default=0, help="client processes (0: 2, or more if needed)")
    p.add_argument("--connect-rate", type=float, default=2000.0)
    p.add_argument("--runs", default="rooms,one-room,by-worker")
    p.add_argument("--quick", action="store_true", help="10 rooms of 20 users, 3 s per phase")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.rooms, args.per_room, args.duration = 10, 20, 3.0
        args.rate, args.lobby_rate, args.lobby_senders = 200.0, 10.0, 5
    users = args.rooms * args.per_room
    args.processes = args.processes or max(2, math.ceil(users / loadgen.MAX_SOCKETS_PER_PROCESS))
    args.json = args.json or ("rooms-quick" if args.quick else "rooms")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    _common.exit_cleanly_on_sigterm()
    _common.raise_open_file_limit()
    busy = _common.warn_if_busy()
    runs = [r for r in args.runs.split(",") if r]
    results: dict[str, Any] = {}
    for name in runs:
        print(f"{name}: {args.rooms * args.per_room:,} users ...", flush=True)
        results[name] = {"rooms": run_rooms, "one-room": run_one_room, "by-worker": run_by_worker}[name](args)
    rows = []
    for name in ("rooms", "one-room"):
        r = results.get(name)
        if r:
            rows.append((name, [r["rooms"], r["users"], r["rate"], r["lines_sent"], r["expected"], r["lost"],
                                r["delivered_per_s"], r["latency"]["p50_ms"], r["latency"]["p99_ms"],
                                r["server_cpu_pct"], f"{r['server_cpu_us_per_delivered']:.2f}",
                                " / ".join(f"{v:.0f}" for v in r["worker_cpu_pct"].values()),
                                r["broker_and_supervisor_cpu_pct"], r["loadgen_cpu_pct"]]))
    if rows:
        print_table(f"Rooms vs one room ({args.workers} workers, {args.duration:g} s of traffic)", rows,
                    ["run", "rooms", "users", "lines/s", "sent", "expected", "lost", "delivered/s", "p50 ms",
                     "p99 ms", "cpu %", "cpu us/delivered", "worker cpu %", "broker cpu %", "load cpu %"])
    bw = results.get("by-worker")
    if bw:
        rows = []
        for label, r in bw["phases"].items():
            rows.append((label, [r["lines_sent"], r["delivered_per_s"], r["lost"], r["latency"]["p99_ms"],
                                 *[r["worker_cpu_pct"].get(w, math.nan) for w in sorted(bw["rooms_per_worker"])],
                                 r["broker_and_supervisor_cpu_pct"], r["loadgen_cpu_pct"]]))
        print_table(f"Each worker's CPU follows its own members' rooms (rooms per worker: {bw['rooms_per_worker']})",
                    rows, ["traffic in", "sent", "delivered/s", "lost", "p99 ms",
                           *[f"{w} cpu %" for w in sorted(bw["rooms_per_worker"])], "broker cpu %", "load cpu %"])
    path = _common.write_result(args.json, "rooms", busy, {"args": vars(args), "results": results})
    print(f"\nwrote {path}")
    lost = sum(r.get("lost", 0) for n, r in results.items() if n != "by-worker")
    lost += sum(r["lost"] for r in (bw or {}).get("phases", {}).values())
    return 0 if lost == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
