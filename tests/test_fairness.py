"""One client sending as fast as TCP allows must not stop its worker from serving everyone else.

With flood control off (`flood_rate = 0`, as on trusted networks and in the
benchmarks), a worker reads each client for one budget per loop pass and
comes back to the rest in the next pass; without that, it read one fast
sender until EAGAIN, which never came: its other clients went silent and its
heartbeat stopped until the supervisor killed it.
"""

from __future__ import annotations

import re
import socket
import threading
import time
from collections.abc import Callable

import pytest
from conftest import Cluster, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

BLAST_MIN = 3.0  # seconds the blast lasts at least: twice the worker_timeout below
BLAST_MAX = 20.0


class CountingReader:
    """Reads a client on a thread: counts the blaster's numbered lines (checking their order) and keeps the rest."""

    def __init__(self, sock: socket.socket, blaster: str, name: str) -> None:
        self.sock, self.name = sock, name
        self.prefix = f"{blaster}: B ".encode()
        self.next = 0  # the number of the next blast line expected
        self.disorder = 0
        self.lines: list[str] = []
        self.stop = False
        self.buf = b""
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        self.sock.settimeout(0.2)
        while not self.stop:
            try:
                chunk = self.sock.recv(1 << 20)
            except TimeoutError:
                continue
            except OSError:
                return
            if not chunk:
                return
            *complete, self.buf = (self.buf + chunk).split(b"\r\n")
            for line in complete:
                if line.startswith(self.prefix):
                    if int(line[len(self.prefix):len(self.prefix) + 8]) != self.next:
                        self.disorder += 1
                    self.next += 1
                else:
                    self.lines.append(line.decode("utf-8", "replace"))

    def wait(self, cond: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
        wait_for(cond, timeout, f"{self.name}: {what} (last lines {self.lines[-3:]})")

    def close(self) -> None:
        self.stop = True
        self.thread.join(5)


class Blaster:
    """Sends numbered lines as fast as the socket takes them, on a thread, until told to stop."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.sent = 0
        self.done = threading.Event()
        self.stop_at = time.monotonic() + BLAST_MAX
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        pad = b" " + b"x" * 50 + b"\r\n"
        try:
            while time.monotonic() < self.stop_at:
                chunk = b"".join(b"B %08d" % (self.sent + i) + pad for i in range(2000))
                self.sock.sendall(chunk)
                self.sent += 2000
        finally:
            self.done.set()


def test_a_client_sending_as_fast_as_tcp_allows_does_not_silence_its_worker(
    make_cluster: Callable[..., Cluster],
) -> None:
    cl = make_cluster(2, extra=("--flood-rate", "0", "--worker-timeout", "1.5", "--no-announce-joins"))
    a, b = cl.clients_on_distinct_workers(2)
    home = cl.worker_of(a)
    blaster = None
    for _ in range(100):
        c = cl.client()
        if cl.worker_of(c) == home:
            blaster = c
            break
        c.say("/quit")
    assert blaster is not None, "no client landed on the first client's worker"
    pids = sorted(cl.worker_pids())
    ra, rb = CountingReader(a.sock, blaster.nick, "a"), CountingReader(b.sock, blaster.nick, "b")
    rblast = CountingReader(blaster.sock, "-", "blaster")  # reads what others say, so it never blocks
    blast = Blaster(blaster.sock)
    began = time.monotonic()
    blast.thread.start()
    try:
        ra.wait(lambda: ra.next > 1000, "blast lines arriving")
        # While the blast goes on, a client on the blaster's own worker and one on the other
        # worker still talk to each other, both ways.
        a.say("honest from the blaster's worker")
        rb.wait(lambda: f"{a.nick}: honest from the blaster's worker" in rb.lines, "a's line")
        b.say("honest from the other worker")
        ra.wait(lambda: f"{b.nick}: honest from the other worker" in ra.lines, "b's line")
        assert not blast.done.is_set(), "the blast ended before the honest lines got through"
        # Keep it up past the heartbeat timeout: a worker that stopped beating would be killed now.
        blast.stop_at = max(began + BLAST_MIN, time.monotonic())
        blast.done.wait(BLAST_MAX + 5)
        # Every line of the blast reaches both, in order.
        ra.wait(lambda: ra.next == blast.sent, f"all {blast.sent} blast lines")
        rb.wait(lambda: rb.next == blast.sent, f"all {blast.sent} blast lines")
        assert ra.disorder == rb.disorder == 0
    finally:
        blast.stop_at = 0
        blast.done.wait(10)
        for r in (ra, rb, rblast):
            r.close()
    assert sorted(cl.worker_pids()) == pids, "a worker was replaced"
    assert not re.search(r"no heartbeat|not reading fast enough", cl.read_log())
