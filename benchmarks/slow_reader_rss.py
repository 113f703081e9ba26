"""Slow reader: the server's memory while one client never reads and the others chat flat out.

Starts its own cluster (`python -m chatcluster start --workers 2 --flood-rate 0`
on a free loopback port), connects a few chatters that read everything and
send numbered lines as fast as the others receive them, and one client with a
4 KiB receive buffer that reads its welcome line and then nothing. A server
with an unbounded output queue grows by everything the room says; chatcluster
disconnects the non-reader once more than max_sendq_bytes is waiting for it.
Each time that happens a new non-reader takes its place, so for the whole run
there is always one.

Once a second the script prints the resident memory of the server's processes
(workers, broker, supervisor) and what went through, then a summary: the
workers' RSS at the start, its peak and its end, the non-readers disconnected,
and whether every chatter received every line of every other chatter.

    python benchmarks/slow_reader_rss.py                   # 20 s, 4 chatters
    python benchmarks/slow_reader_rss.py --duration 60 --max-sendq-bytes 4194304

The cluster is stopped at the end (SIGTERM, then SIGKILL to its session).
"""

from __future__ import annotations

import argparse
import os
import re
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from chatcluster import stats as S  # noqa: E402 - the repository's own package, found through REPO

MiB = 1 << 20
KICK = "over max_sendq_bytes"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Cluster:
    """The server under test, in its own session so that stopping it stops all of it."""

    def __init__(self, workers: int, max_sendq: int | None) -> None:
        self.port = free_port()
        self.runtime_dir = tempfile.mkdtemp(prefix="cc-slowreader-")
        self.log_path = os.path.join(self.runtime_dir, "server.log")
        args = [sys.executable, "-m", "chatcluster", "start", "--workers", str(workers), "--host", "127.0.0.1",
                "--port", str(self.port), "--runtime-dir", self.runtime_dir, "--flood-rate", "0",
                "--no-announce-joins"]
        if max_sendq is not None:
            args += ["--max-sendq-bytes", str(max_sendq)]
        self.log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(args, cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"the cluster exited with {self.proc.returncode}:\n{self.read_log()[-3000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=2) as s:
                    if s.recv(4096).startswith(b"*** Welcome"):
                        return
            except OSError:
                pass
            time.sleep(0.1)
        raise SystemExit(f"the cluster did not welcome a client within {timeout:.0f} s:\n{self.read_log()[-3000:]}")

    def processes(self) -> tuple[list[psutil.Process], list[psutil.Process]]:
        """(all of the server's processes, its workers), the workers found in the stats file."""
        try:
            top = psutil.Process(self.proc.pid)
            procs = [top, *top.children(recursive=True)]
        except psutil.Error:
            return [], []
        try:
            stats = S.StatsFile(os.path.join(self.runtime_dir, "stats"))
        except (OSError, ValueError):
            return procs, []
        try:
            pids = {v.pid for v in stats.used() if v.pid}
        finally:
            stats.close()
        return procs, [p for p in procs if p.pid in pids]

    def read_log(self) -> str:
        try:
            return Path(self.log_path).read_text(errors="replace")
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the session started above: our processes only
        except ProcessLookupError:
            pass
        self.proc.wait(10)
        self.log.close()
        shutil.rmtree(self.runtime_dir, ignore_errors=True)


def rss(procs: list[psutil.Process]) -> int:
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


@dataclass
class Chatter:
    """A client that reads everything and sends numbered lines, a window ahead of its reader."""

    sock: socket.socket
    nick: str
    tag: bytes
    sent: int = 0
    received: int = 0
    buf: bytes = b""
    seen: dict[bytes, int] = field(default_factory=dict)  # highest number received per sender nick


def welcome(port: int, rcvbuf: int | None = None) -> tuple[socket.socket, str]:
    sock = socket.socket()
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(10)
    sock.connect(("127.0.0.1", port))
    data = b""
    while b"\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            raise SystemExit("the server closed a new connection before its welcome line")
        data += chunk
    m = re.match(rb"\*\*\* Welcome to chatcluster! Your nickname is (\S+)\.", data)
    if not m:
        raise SystemExit(f"unexpected first line {data[:200]!r}")
    return sock, m.group(1).decode()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=20.0, help="seconds of chat (default 20)")
    parser.add_argument("--chatters", type=int, default=4, help="clients that chat and read (default 4)")
    parser.add_argument("--line-bytes", type=int, default=200, help="bytes per chat line (default 200)")
    parser.add_argument("--window", type=int, default=400, help="lines a chatter may be ahead of its reader")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--max-sendq-bytes", type=int, default=None, help="passed to the server (default: its own)")
    args = parser.parse_args(argv)
    if args.chatters < 2:
        parser.error("--chatters must be at least 2: each chatter's lines are counted by another")
    if not 0 < args.duration <= 3600:
        parser.error("--duration must be between 0 and 3600 seconds")

    cluster = Cluster(args.workers, args.max_sendq_bytes)
    try:
        cluster.wait_ready()
        return run(cluster, args)
    finally:
        cluster.stop()


def run(cluster: Cluster, args: argparse.Namespace) -> int:
    sel = selectors.DefaultSelector()
    chatters: list[Chatter] = []
    for i in range(args.chatters):
        sock, nick = welcome(cluster.port)
        sock.setblocking(False)
        chatter = Chatter(sock, nick, f"C{i}".encode())
        chatters.append(chatter)
        sel.register(sock, selectors.EVENT_READ, chatter)
    non_reader, _ = welcome(cluster.port, rcvbuf=4096)
    kicks_seen = 0

    pad = b"x" * max(1, args.line_bytes - 24)
    per_sender = {c.nick.encode(): c for c in chatters}
    rx = re.compile(rb"(\S+): C\d+ (\d{8}) ")

    def read_ready(timeout: float) -> None:
        for key, _ in sel.select(timeout):
            c: Chatter = key.data
            try:
                chunk = c.sock.recv(1 << 18)
            except BlockingIOError:
                continue
            if not chunk:
                raise SystemExit(f"the server closed chatter {c.nick}; see {cluster.log_path}")
            c.buf += chunk
            end = c.buf.rfind(b"\r\n")
            if end < 0:
                continue
            complete, c.buf = c.buf[:end], c.buf[end + 2:]
            c.received += complete.count(b"\r\n") + 1
            # Progress per sender: the last line of each sender in this chunk is enough.
            for nick in per_sender:
                at = complete.rfind(b"\n" + nick + b": ")
                if at < 0 and complete.startswith(nick + b": "):
                    at = -1
                elif at < 0:
                    continue
                m = rx.match(complete, at + 1)
                if m:
                    c.seen[nick] = int(m.group(2))

    def reader_of(c: Chatter) -> Chatter:
        return chatters[(chatters.index(c) + 1) % len(chatters)]

    procs, workers = cluster.processes()
    start_rss = rss(workers)
    peak = start_rss
    print(f"cluster on 127.0.0.1:{cluster.port}: {len(workers)} workers, {args.chatters} chatters, "
          f"one client that never reads (SO_RCVBUF 4096), lines of {args.line_bytes} bytes, "
          f"flood control off, max_sendq_bytes {args.max_sendq_bytes or 'default (1 MiB)'}")
    print(f"{'t (s)':>6} {'workers RSS':>12} {'all RSS':>10} {'lines/s sent':>13} {'MiB/s to each':>14} "
          f"{'non-readers kicked':>19}")
    t0 = time.monotonic()
    next_report = t0 + 1.0
    last_sent = 0
    while True:
        now = time.monotonic()
        if now - t0 >= args.duration:
            break
        for c in chatters:
            ahead = c.sent - reader_of(c).seen.get(c.nick.encode(), -1)
            if ahead < args.window:
                n = args.window // 2
                data = b"".join(b"%s %08d %s\r\n" % (c.tag, c.sent + k, pad) for k in range(n))
                try:
                    c.sock.setblocking(True)
                    c.sock.sendall(data)
                finally:
                    c.sock.setblocking(False)
                c.sent += n
        read_ready(0.0 if any(c.sent - reader_of(c).seen.get(c.nick.encode(), -1) < args.window
                              for c in chatters) else 0.05)
        if now >= next_report:
            procs, workers = cluster.processes()
            w, a = rss(workers), rss(procs)
            peak = max(peak, w)
            kicks = cluster.read_log().count(KICK)
            if kicks > kicks_seen:
                # The non-reader was disconnected: another one takes its place.
                kicks_seen = kicks
                non_reader.close()
                non_reader, _ = welcome(cluster.port, rcvbuf=4096)
            total_sent = sum(c.sent for c in chatters)
            rate = total_sent - last_sent
            last_sent = total_sent
            print(f"{now - t0:6.0f} {w / MiB:9.1f} MiB {a / MiB:6.1f} MiB {rate:13,d} "
                  f"{rate * args.line_bytes * (args.chatters - 1) / args.chatters / MiB:14.1f} {kicks:19d}",
                  flush=True)
            next_report += 1.0

    # Let every line in flight arrive (each chatter gets every other chatter's lines), then count.
    total_sent = sum(c.sent for c in chatters)
    expected = total_sent * (args.chatters - 1)
    deadline = time.monotonic() + 30
    while sum(c.received for c in chatters) < expected and time.monotonic() < deadline:
        read_ready(0.1)
    delivered = sum(c.received for c in chatters)
    procs, workers = cluster.processes()
    end_rss = rss(workers)
    peak = max(peak, end_rss)
    kicks = cluster.read_log().count(KICK)
    pushed = total_sent * args.line_bytes
    non_reader.close()
    for c in chatters:
        c.sock.close()

    print()
    print(f"chat lines sent: {total_sent:,} ({pushed / MiB:,.0f} MiB said in the room, each line to "
          f"{args.chatters - 1} chatters and the non-reader)")
    print(f"lines delivered to chatters: {delivered:,} of {expected:,}"
          + ("" if delivered >= expected else f"  ** {expected - delivered:,} MISSING **"))
    print(f"non-readers disconnected for not reading: {kicks}")
    print(f"workers' RSS: start {start_rss / MiB:.1f} MiB, peak {peak / MiB:.1f} MiB, end {end_rss / MiB:.1f} MiB "
          f"(peak growth {(peak - start_rss) / MiB:+.1f} MiB)")
    ok = delivered >= expected and kicks >= 1
    if not ok:
        print("FAILED: " + ("lines were lost" if delivered < expected else "the non-reader was never disconnected"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
