"""Every way a connection can end leaves no trace of it in the worker.

A client lives in one `Registry` (by descriptor, by number, the room, its chat
state). These tests end connections in every way the worker knows (quit, end
of input, reset, send queue cut, idle timeout, refusal by a limit, handoff to
a successor, shutdown) on a real worker with a real broker and real sockets,
and then ask the registry which of its maps still mention the connection.
"""

from __future__ import annotations

import os
import signal
import socket
import struct
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import Client
from worker_support import Rig, rig_in, until

from chatcluster import worker as W
from chatcluster.registry import Registry

pytestmark = pytest.mark.timeout(60)


class Conn:
    fd: int
    conn: int

    def __init__(self, fd: int, conn: int) -> None:
        self.fd, self.conn = fd, conn


def conn_of(w: W.Worker, c: Client) -> int:
    """The worker's connection number for the client `c`."""
    mine = c.sock.getsockname()
    for sc in w.registry.clients():
        try:
            if sc.sock.getpeername() == mine:
                return sc.conn
        except OSError:
            continue
    raise AssertionError("the client is not connected to this worker")


def gone(w: W.Worker, conn: int) -> Callable[[], bool]:
    return lambda: w.registry.traces(conn) == []


def welcomed(rig: Rig, w: W.Worker) -> tuple[Client, int]:
    c = rig.client(w)
    return c, conn_of(w, c)


# -- the registry itself ---------------------------------------------------------------------


def test_a_removed_connection_leaves_the_room_and_both_indexes_but_its_chat_state_stays_until_dropped() -> None:
    r: Registry[Conn, str] = Registry()
    c = Conn(10, r.new_conn())
    r.add(c)
    r.enter(c)
    r.set_user(c.conn, "state")
    assert r.traces(c.conn) == ["by_fd", "by_conn", "room", "users"]
    assert r.remove(c)
    assert r.traces(c.conn) == ["users"]
    assert r.drop_user(c.conn) == "state"
    assert r.traces(c.conn) == [] and len(r) == 0 and r.room_size() == 0


def test_a_descriptor_number_reused_by_another_connection_is_not_removed_by_the_old_one() -> None:
    r: Registry[Conn, str] = Registry()
    old = Conn(10, r.new_conn())
    r.add(old)
    assert r.remove(old)
    new = Conn(10, r.new_conn())
    r.add(new)
    assert not r.remove(old) and new in r and old not in r
    assert new.conn != old.conn  # numbers are never reused


def test_registering_a_connection_twice_is_refused() -> None:
    r: Registry[Conn, str] = Registry()
    c = Conn(3, r.new_conn())
    r.add(c)
    with pytest.raises(ValueError, match="registered already"):
        r.add(c)


def test_only_a_registered_connection_enters_the_room() -> None:
    r: Registry[Conn, str] = Registry()
    c = Conn(3, r.new_conn())
    r.enter(c)
    assert r.room_size() == 0


# -- a real worker ---------------------------------------------------------------------------


def test_quit_leaves_no_trace(tmp_path: Path) -> None:
    with rig_in(tmp_path) as rig:
        w = rig.worker(1)
        c, conn = welcomed(rig, w)
        c.say("/quit bye")
        until(gone(w, conn), w, clients=[c])
        c.wait_closed()


def test_end_of_input_leaves_no_trace(tmp_path: Path) -> None:
    with rig_in(tmp_path) as rig:
        w = rig.worker(1)
        c, conn = welcomed(rig, w)
        c.say("last words")
        c.sock.shutdown(socket.SHUT_WR)
        until(gone(w, conn), w, clients=[c])


def test_a_reset_leaves_no_trace(tmp_path: Path) -> None:
    with rig_in(tmp_path) as rig:
        w = rig.worker(1)
        c, conn = welcomed(rig, w)
        c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        c.close()  # RST
        until(gone(w, conn), w)


def test_a_reader_cut_for_its_send_queue_leaves_no_trace(tmp_path: Path) -> None:
    with rig_in(tmp_path, max_sendq_bytes=4096, max_line_bytes=65536) as rig:
        w = rig.worker(1)
        slow = Client(rig.port)
        slow.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        rig.clients.append(slow)
        until(lambda: any("Welcome" in x for x in slow.lines), w, clients=[slow])
        conn = conn_of(w, slow)
        talker = rig.client(w)
        line = "x" * 60000 + "\r\n"
        for _ in range(1000):  # up to 60 MB, far more than the kernel buffers; slow never reads
            talker.send(line)
            w.step(0)
            if not w.registry.traces(conn):
                break
        until(gone(w, conn), w, clients=[talker])
        assert w.counters.dropped == 1 and w.counters.closed_sendq == 1


def test_an_idle_client_leaves_no_trace(tmp_path: Path) -> None:
    with rig_in(tmp_path, idle_timeout=0.5) as rig:
        w = rig.worker(1)
        c, conn = welcomed(rig, w)
        until(gone(w, conn), w, clients=[c])
        c.wait_line(r"\*\*\* Error: disconnected: idle for too long")


def test_a_client_refused_by_a_limit_leaves_no_trace(tmp_path: Path) -> None:
    with rig_in(tmp_path, max_clients_per_ip=1) as rig:
        w = rig.worker(1)
        rig.client(w)
        refused = Client(rig.port)
        rig.clients.append(refused)
        until(lambda: any("too many connections" in x for x in refused.lines), w, clients=[refused])
        until(lambda: len(w.registry) == 1 and len(w.registry.users()) == 1, w, clients=[refused])
        refused.wait_closed()


def test_clients_handed_to_a_successor_leave_no_trace_in_the_giver(tmp_path: Path) -> None:
    with rig_in(tmp_path) as rig:
        old = rig.worker(1)
        new = rig.worker(2, succeeds=("w1", os.getpid()))
        a, conn_a = welcomed(rig, old)
        b, conn_b = welcomed(rig, old)
        old.handoff_requested = True
        until(lambda: old.stop is not None and new.handoff is None, old, new, clients=[a, b])
        assert old.registry.traces(conn_a) == [] and old.registry.traces(conn_b) == []
        assert len(old.registry) == 0 and not old.registry.users()
        assert len(new.registry) == 2 and new.registry.room_size() == 2


def test_a_shutdown_leaves_no_trace(tmp_path: Path) -> None:
    with rig_in(tmp_path) as rig:
        w = rig.worker(1)
        clients = [welcomed(rig, w) for _ in range(3)]
        w.stop_signal = signal.SIGTERM
        until(lambda: w.stop is not None and w.stop.over(time.monotonic(), len(w.registry)), w,
              clients=[c for c, _ in clients])
        rig.workers.remove(w)
        w.finish()
        for _, conn in clients:
            assert w.registry.traces(conn) == []
        assert not w.registry.users()
