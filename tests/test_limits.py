"""The limits that protect everyone, end to end against a running 2-worker cluster.

Each test provokes one limit with real sockets (a client that never reads, a
flooder, too many connections, a silent client, a worker out of descriptors)
and checks three things: the offender is treated as the limit says, every
other client still receives everything, and the workers' memory stays
bounded.
"""

from __future__ import annotations

import random
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import psutil
import pytest
from conftest import Cluster, wait_for
from limits_support import (
    MemoryWatch,
    Reader,
    chat_lines,
    numbers_from,
    pump,
    raw_socket,
    read_to_end,
    recv_until,
)

from chatcluster import chat as C
from chatcluster import events as E
from chatcluster import roster as R

MiB = 1 << 20


def observers(cl: Cluster) -> tuple[Reader, Reader]:
    """Two welcomed clients on different workers, each read continuously on its own thread."""
    a, b = cl.clients_on_distinct_workers(2)
    return Reader(a.sock, a.buf, a.nick), Reader(b.sock, b.buf, b.nick)


# ---------------------------------------------------------------------------
# max_sendq_bytes


def test_client_that_never_reads_is_disconnected_while_the_others_receive_everything(
    make_cluster: Callable[..., Cluster],
) -> None:
    sendq = 256 * 1024
    cl = make_cluster(2, extra=("--flood-rate", "0", "--max-sendq-bytes", str(sendq)))
    a, b = observers(cl)
    pids = sorted(cl.worker_pids())
    slow = raw_socket(cl.port, rcvbuf=4096)
    recv_until(slow, b"Welcome")
    a.wait_line(r"\*\*\* \S+ joined")
    watch = MemoryWatch(pids)

    # Far more than the limit plus every kernel buffer on the way: an unbounded
    # queue would show as tens of MiB in the worker.
    count, size = 40_000, 400
    pumps = [pump(a.sock, a.name, "A", count, size, to=b), pump(b.sock, b.name, "B", count, size, to=a)]
    for p in pumps:
        p.join(150)
    b.wait(lambda lines: b.progress.get((a.name, "A")) == count - 1, 60, "all of A's lines")
    a.wait(lambda lines: a.progress.get((b.name, "B")) == count - 1, 60, "all of B's lines")
    growth = watch.stop()
    pumped = 2 * count * size

    assert numbers_from(b.lines, a.name, "A") == list(range(count))
    assert numbers_from(a.lines, b.name, "B") == list(range(count))
    data, closed = read_to_end(slow)
    assert closed, f"the client that never read is still connected after receiving {len(data)} bytes"
    assert len(data) < pumped // 2
    kicks = [line for line in cl.read_log().splitlines() if "over max_sendq_bytes" in line]
    assert len(kicks) == 1, kicks
    wait_for(lambda: sum(v.dropped for v in cl.stats()) == 1, what="one dropped client in the stats")
    assert sorted(cl.worker_pids()) == pids
    assert growth < 16 * MiB, f"workers grew by {growth / MiB:.1f} MiB while a client did not read"
    a.wait_line(r"\*\*\* \S+ left.*")


def test_a_client_that_reads_keeps_up_with_a_sender_as_fast_as_it_reads(
    make_cluster: Callable[..., Cluster],
) -> None:
    # The limit is on what a client leaves unread, not on how much one pass hands it: the worker
    # may queue up to 2 windows (107 KB) for b in one pass, over the 64 KiB limit, and b must not
    # be dropped for it. The window keeps the sender's lead on what b has read below what the
    # path holds (the send queue limit and the kernel buffers, 64 KiB of them on the server's side
    # since send_buffer_bytes): with a lead of 1,024 lines (430 KB) the test's reader, descheduled
    # for a moment on a busy machine, fell legitimately behind by more than the limit.
    cl = make_cluster(2, extra=("--flood-rate", "0", "--max-sendq-bytes", str(64 * 1024)))
    a, b = observers(cl)
    count = 20_000
    p = pump(a.sock, a.name, "A", count, 400, to=b, window=128)
    p.join(150)
    b.wait(lambda lines: b.progress.get((a.name, "A")) == count - 1, 60, "all of A's lines")
    assert numbers_from(b.lines, a.name, "A") == list(range(count))
    assert sum(v.dropped for v in cl.stats()) == 0


def test_a_closing_client_that_never_reads_is_closed_after_a_grace_period(
    make_cluster: Callable[..., Cluster],
) -> None:
    # A sendq far above the kernel buffers, so the output waiting for it stays in the worker.
    cl = make_cluster(2, extra=("--flood-rate", "0", "--max-sendq-bytes", str(64 * MiB)))
    a, b = observers(cl)
    stuck = raw_socket(cl.port, rcvbuf=4096)
    recv_until(stuck, b"Welcome")
    count = 25_000
    p = pump(a.sock, a.name, "Q", count, 400, to=b)
    p.join(120)
    b.wait(lambda lines: b.progress.get((a.name, "Q")) == count - 1, 60, "all of A's lines")
    stuck.sendall(b"/quit\r\n")
    # Its Goodbye waits behind megabytes it does not read: the worker gives up on it.
    wait_for(lambda: "bytes it did not read" in cl.read_log(), 40, "the worker to close the stuck client")
    data, closed = read_to_end(stuck, timeout=60)
    assert closed
    assert len(data) < count * 400
    wait_for(lambda: sum(v.connections for v in cl.stats()) == 2, what="the stuck connection to be gone")


# ---------------------------------------------------------------------------
# Flood control


def test_flooder_is_slowed_down_and_loses_nothing_while_others_are_unaffected(
    make_cluster: Callable[..., Cluster],
) -> None:
    burst, rate, count = 10, 10.0, 80
    cl = make_cluster(2, extra=("--flood-burst", str(burst), "--flood-rate", str(rate)))
    # The flooder and a bystander share a worker; the observer sits on the other one.
    observer, flooder = cl.clients_on_distinct_workers(2)
    bystander = cl.client()
    while cl.worker_of(bystander) != cl.worker_of(flooder):
        bystander.say("/quit")
        bystander = cl.client()
    seen = Reader(observer.sock, observer.buf, observer.nick)
    start = time.monotonic()
    flooder.send(b"".join(chat_lines("F", count, 60)))
    bystander.say("bystander is not held up")
    seen.wait_line(rf"{bystander.nick}: bystander is not held up")
    flood_seen_then = len(numbers_from(seen.lines, flooder.nick, "F"))
    seen.wait(lambda lines: seen.progress.get((flooder.nick, "F")) == count - 1, 60, "all flood lines")
    took = time.monotonic() - start

    assert numbers_from(seen.lines, flooder.nick, "F") == list(range(count))
    assert flood_seen_then < count, "the bystander's line waited behind the whole flood"
    # burst lines at once, then `rate` a second: the rest cannot have come sooner.
    assert took >= (count - burst) / rate * 0.9, f"{count} lines went through in {took:.1f} s"
    flooder.say("still connected")
    seen.wait_line(rf"{flooder.nick}: still connected")


def test_commands_count_against_the_flood_budget(make_cluster: Callable[..., Cluster]) -> None:
    burst, rate, count = 5, 10.0, 25
    cl = make_cluster(2, extra=("--flood-burst", str(burst), "--flood-rate", str(rate)))
    c = cl.client()
    start = time.monotonic()
    c.send("/who\r\n" * count)
    c.wait(lambda lines: sum(1 for line in lines if re.fullmatch(r"\*\*\* \d+ users? online: .*", line)) == count,
           30, f"{count} answers to /who")
    took = time.monotonic() - start
    assert took >= (count - burst) / rate * 0.9, f"{count} commands answered in {took:.1f} s"


def test_flooder_is_pushed_back_by_tcp_and_costs_the_worker_no_memory(
    make_cluster: Callable[..., Cluster],
) -> None:
    cl = make_cluster(2, extra=("--flood-burst", "5", "--flood-rate", "1"))
    a, b = observers(cl)
    flooder = cl.client()
    watch = MemoryWatch(cl.worker_pids())
    # Send without blocking until the kernel refuses: the server must have stopped reading.
    flooder.sock.setblocking(False)
    blob = b"flood\r\n" * (1 << 16)
    sent = 0
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            sent += flooder.sock.send(blob)
        except BlockingIOError:
            # Stopped for a moment; still refused a little later means the window stays shut.
            time.sleep(0.5)
            try:
                sent += flooder.sock.send(blob)
            except BlockingIOError:
                break
    else:
        pytest.fail(f"the server kept reading a flooder: {sent} bytes accepted in 30 s")
    a.sock.sendall(b"others still chat\r\n")
    b.wait_line(rf"{a.name}: others still chat")
    growth = watch.stop()
    assert growth < 8 * MiB, f"workers grew by {growth / MiB:.1f} MiB for one flooder"
    assert sent < 64 * MiB


def test_flood_rate_zero_turns_flood_control_off(make_cluster: Callable[..., Cluster]) -> None:
    # At the default 5 lines/s, 300 lines would take a minute; unlimited they are all in at once.
    cl = make_cluster(2, extra=("--flood-rate", "0"))
    a, b = observers(cl)
    count = 300
    a.sock.sendall(b"".join(chat_lines("Z", count, 60)))
    b.wait(lambda lines: b.progress.get((a.name, "Z")) == count - 1, 20, "all lines without flood control")
    assert numbers_from(b.lines, a.name, "Z") == list(range(count))


# ---------------------------------------------------------------------------
# max_clients and max_clients_per_ip


class BusOrder:
    """Pure ChatCores of several workers and one bus order between them."""

    def __init__(self, settings: C.ChatSettings, workers: int) -> None:
        self.cores = [C.ChatCore(f"w{i + 1}", settings, rng=random.Random(i)) for i in range(workers)]
        self.effects: dict[str, list[Any]] = {core.worker_id: [] for core in self.cores}
        self.queue: list[tuple[str, list[tuple[Any, ...]]]] = []
        self.roster = R.Roster()  # the broker's
        for core in self.cores:
            core.hello()
            core.on_bus("broker", [E.Snapshot(core.worker_id, core.nonce, [])])

    def publish(self, core: C.ChatCore, effects: list[Any]) -> None:
        self.effects[core.worker_id] += effects
        events = [e.event for e in effects if isinstance(e, C.Publish)]
        if events:
            self.queue.append((core.worker_id, events))

    def deliver_all(self) -> None:
        while self.queue:
            publisher, events = self.queue.pop(0)
            events = self.roster.decide_batch(publisher, events)
            for core in self.cores:
                self.publish(core, core.on_bus(publisher, events))

    def sent(self, worker: str, conn: int) -> bytes:
        return b"".join(e.data for e in self.effects[worker] if isinstance(e, C.Send) and e.conn == conn)

    def entered(self, worker: str, conn: int) -> bool:
        return C.Enter(conn) in self.effects[worker]


@pytest.mark.parametrize(
    ("settings", "error"),
    [
        (C.ChatSettings(max_clients_per_ip=1), b"*** Error: too many connections from your address\r\n"),
        (C.ChatSettings(max_clients=1), b"*** Error: server full\r\n"),
    ],
    ids=["per-ip", "max-clients"],
)
def test_connections_admitted_at_once_on_two_workers_are_decided_in_bus_order(
    settings: C.ChatSettings, error: bytes
) -> None:
    bus = BusOrder(settings, 2)
    w1, w2 = bus.cores
    # Both workers admit a client from one address before either JOIN is on the bus.
    bus.publish(w1, w1.connect(1, "10.0.0.1", 0.0))
    bus.publish(w2, w2.connect(1, "10.0.0.1", 0.0))
    bus.deliver_all()
    assert bus.entered("w1", 1)
    assert not bus.entered("w2", 1)
    assert bus.sent("w2", 1) == error
    assert C.Close(1) in bus.effects["w2"]
    assert len(bus.roster) == 1 and bus.roster.per_ip == {"10.0.0.1": 1}
    assert "w2" not in bus.roster.shards and 1 not in bus.cores[1].local


def connect_and_classify(port: int, source: str | None = None) -> tuple[str, socket.socket]:
    sock = raw_socket(port, source=source)
    return first_answer(sock), sock


def first_answer(sock: socket.socket) -> str:
    line = recv_until(sock, b"\r\n").split(b"\r\n")[0].decode()
    if line.startswith("*** Welcome"):
        return "welcome"
    if line == "*** Error: server full":
        return "full"
    if line == "*** Error: too many connections from your address":
        return "per-ip"
    raise AssertionError(f"unexpected first line {line!r}")


def test_max_clients_holds_across_workers_even_for_simultaneous_connections(
    make_cluster: Callable[..., Cluster],
) -> None:
    limit = 4
    cl = make_cluster(2, extra=("--max-clients", str(limit)))
    socks = [raw_socket(cl.port) for _ in range(12)]  # all connected before any is answered
    answers = [first_answer(s) for s in socks]
    assert answers.count("welcome") == limit, answers
    assert answers.count("full") == len(socks) - limit, answers
    for s, a in zip(socks, answers, strict=True):
        if a == "full":
            assert read_to_end(s)[1], "a refused connection was left open"
    # A place frees up when someone leaves.
    keep = [s for s, a in zip(socks, answers, strict=True) if a == "welcome"]
    keep[0].close()
    wait_for(lambda: connect_and_classify(cl.port)[0] == "welcome", what="a place after a client left")


def admitted(port: int, source: str) -> socket.socket:
    """A welcomed connection from `source`, once the address has a free place (a LEAVE takes
    a bus round trip to reach the broker's roster)."""
    found: list[socket.socket] = []

    def attempt() -> bool:
        answer, sock = connect_and_classify(port, source)
        if answer == "welcome":
            found.append(sock)
            return True
        sock.close()
        return False

    wait_for(attempt, what=f"a place for {source}")
    return found[0]


def test_max_clients_per_ip_counts_connections_on_every_worker(make_cluster: Callable[..., Cluster]) -> None:
    cl = make_cluster(2, extra=("--max-clients-per-ip", "2"))

    def worker(sock: socket.socket) -> int:
        return cl.worker_of(SimpleNamespace(sock=sock))  # type: ignore[arg-type]

    first = admitted(cl.port, "127.0.0.2")
    second = admitted(cl.port, "127.0.0.2")
    while worker(second) == worker(first):
        second.close()
        second = admitted(cl.port, "127.0.0.2")
    # One member per worker: each worker alone is under the limit, the cluster is at it.
    refused = [connect_and_classify(cl.port, "127.0.0.2")[0] for _ in range(6)]
    assert refused == ["per-ip"] * 6
    assert connect_and_classify(cl.port, "127.0.0.3")[0] == "welcome"
    first.close()
    admitted(cl.port, "127.0.0.2")


def test_max_clients_per_ip_holds_for_simultaneous_connections(make_cluster: Callable[..., Cluster]) -> None:
    cl = make_cluster(2, extra=("--max-clients-per-ip", "3"))
    socks = [raw_socket(cl.port, source="127.0.0.4") for _ in range(12)]
    others = [raw_socket(cl.port, source="127.0.0.5") for _ in range(3)]
    answers = [first_answer(s) for s in socks]
    assert answers.count("welcome") == 3, answers
    assert answers.count("per-ip") == 9, answers
    assert [first_answer(s) for s in others] == ["welcome"] * 3


# ---------------------------------------------------------------------------
# Idle timeout and TCP keepalive


def test_idle_timeout_disconnects_silent_clients_only(make_cluster: Callable[..., Cluster]) -> None:
    idle = 3.0
    cl = make_cluster(2, extra=("--idle-timeout", str(idle)))
    active, silent = cl.client(), cl.client()
    watcher = Reader(active.sock, active.buf, active.nick)
    start = time.monotonic()
    n = 0
    while not silent.closed:
        active.say(f"tick {n}")
        n += 1
        silent._pump(0.25)
        assert time.monotonic() - start < idle + 15, "the silent client was never disconnected"
    took = time.monotonic() - start
    assert silent.lines[-1] == "*** Error: disconnected: idle for too long"
    assert took >= idle * 0.9
    watcher.wait_line(rf"\*\*\* {silent.nick} left \(idle\)")
    active.say("still here")
    other = cl.client()
    other.wait_line(rf"{active.nick}: still here")


def server_side_timers(port: int) -> list[str]:
    out = subprocess.run(["ss", "-tnoH", "state", "established", f"( sport = :{port} )"],
                         capture_output=True, text=True, check=True).stdout
    return [line for line in out.splitlines() if line.strip()]


@pytest.mark.skipif(shutil.which("ss") is None, reason="needs ss (iproute2)")
def test_tcp_keepalive_is_on_by_default_with_the_configured_idle_time(make_cluster: Callable[..., Cluster]) -> None:
    cl = make_cluster(2, extra=("--keepalive-idle", "4000"))
    cl.client()
    lines = wait_for(lambda: server_side_timers(cl.port), what="the server side of the connection")
    assert all("timer:(keepalive," in line for line in lines), lines
    # 4000 s is 1 h 6 min: the first probe is that far away.
    assert all(re.search(r"timer:\(keepalive,(66min|65min)", line) for line in lines), lines


@pytest.mark.skipif(shutil.which("ss") is None, reason="needs ss (iproute2)")
def test_tcp_keepalive_can_be_turned_off(make_cluster: Callable[..., Cluster]) -> None:
    cl = make_cluster(2, extra=("--no-tcp-keepalive",))
    cl.client()
    lines = wait_for(lambda: server_side_timers(cl.port), what="the server side of the connection")
    assert not any("keepalive" in line for line in lines), lines


# ---------------------------------------------------------------------------
# Out of file descriptors


def welcomed_or_shed(sock: socket.socket) -> str:
    """'welcome' for a welcome line, 'shed' when the server closes the connection without a word."""
    data = b""
    sock.settimeout(15)
    while b"\r\n" not in data:
        try:
            chunk = sock.recv(4096)
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            assert data == b"", f"a shed connection received {data!r}"
            return "shed"
        data += chunk
    assert data.startswith(b"*** Welcome"), data
    return "welcome"


def test_worker_out_of_descriptors_sheds_new_connections_and_keeps_serving(
    make_cluster: Callable[..., Cluster],
) -> None:
    cl = make_cluster(2)
    a, b = observers(cl)
    pids = sorted(cl.worker_pids())
    for pid in pids:
        proc = psutil.Process(pid)
        _, hard = proc.rlimit(psutil.RLIMIT_NOFILE)
        proc.rlimit(psutil.RLIMIT_NOFILE, (proc.num_fds() + 3, hard))
    start = time.monotonic()
    extra = [raw_socket(cl.port) for _ in range(30)]
    answers = [welcomed_or_shed(s) for s in extra]
    assert "shed" in answers and "welcome" in answers, answers
    # Everyone already connected is still served, both ways, across workers.
    a.sock.sendall(b"while shedding\r\n")
    b.sock.sendall(b"me too\r\n")
    b.wait_line(rf"{a.name}: while shedding")
    a.wait_line(rf"{b.name}: me too")
    assert sorted(cl.worker_pids()) == pids
    elapsed = time.monotonic() - start
    for pid in pids:
        warnings = [line for line in cl.read_log().splitlines() if f"[{pid}]" in line and "accept failed" in line]
        assert len(warnings) <= elapsed + 1, warnings
    assert any("accept failed (Too many open files)" in line for line in cl.read_log().splitlines())
    shed = answers.count("shed")
    wait_for(lambda: sum(v.dropped for v in cl.stats()) == shed, what=f"{shed} dropped connections in the stats")
    # Descriptors free up as connections close; new ones are accepted again.
    for s in extra:
        s.close()
    wait_for(lambda: connect_and_classify(cl.port)[0] == "welcome", what="a welcome once descriptors were free")
