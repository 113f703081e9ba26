"""A worker's output queues: what each client of a room receives, in which order, however the
worker shares and slices the work.

A worker gives the clients that had the same output queued one shared list per broadcast,
copies it before adding a client's own output, and serves a large room in slices between
which more output can arrive. These tests drive a real Worker (not booted: no listener, no
broker) with clients on real socket pairs and read what reaches the other ends.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from chatcluster import chat as C
from chatcluster import config
from chatcluster import stats as S
from chatcluster import worker as W


@pytest.fixture
def worker(tmp_path: Path) -> Iterator[W.Worker]:
    stats = S.StatsFile(str(tmp_path / "stats"), create=True)
    w = W.Worker(config.load(), 1, "w1", 0, 1, str(tmp_path), stats)
    try:
        yield w
    finally:
        for c in list(w.registry.clients()):
            c.sock.close()
        w.bus.close()
        w.ctx.term()
        w.ep.close()


Peers = dict[int, socket.socket]


def join(w: W.Worker, count: int) -> Peers:
    """`count` clients in the room (conn 1..count); returns the other end of each, by conn."""
    peers: Peers = {}
    for conn in range(1, count + 1):
        ours, theirs = socket.socketpair()
        ours.setblocking(False)
        theirs.setblocking(False)
        c = w.attach(ours, "127.0.0.1", 0.0)
        assert c.conn == conn
        w.registry.enter(c)
        peers[conn] = theirs
    return peers


def received(peer: socket.socket) -> bytes:
    data = b""
    while True:
        try:
            chunk = peer.recv(65536)
        except BlockingIOError:
            return data
        if not chunk:
            return data
        data += chunk


def flush_all(w: W.Worker) -> None:
    while w.output.dirty:
        w.output.flush_dirty(W.FLUSH_SLICE)


def test_a_clients_own_output_goes_between_the_broadcasts_around_it_and_to_it_alone(worker: W.Worker) -> None:
    peers = join(worker, 3)
    worker.apply([C.Broadcast(b"one\r\n")])
    worker.output.queue(worker.registry.by_conn(1), b"only for 1\r\n")
    worker.apply([C.Broadcast(b"two\r\n", frozenset({2}))])
    flush_all(worker)
    assert received(peers[1]) == b"one\r\nonly for 1\r\ntwo\r\n"
    assert received(peers[2]) == b"one\r\n"
    assert received(peers[3]) == b"one\r\ntwo\r\n"


def test_a_room_larger_than_a_slice_gets_every_line_in_order_when_lines_arrive_between_slices(
    worker: W.Worker,
) -> None:
    peers = join(worker, W.FLUSH_SLICE + 10)
    worker.apply([C.Broadcast(b"first\r\n")])
    worker.output.flush_dirty(W.FLUSH_SLICE)
    served = [conn for conn, peer in peers.items() if received(peer) == b"first\r\n"]
    assert served == list(range(1, W.FLUSH_SLICE + 1))  # one slice, in room order
    worker.apply([C.Broadcast(b"second\r\n")])
    flush_all(worker)
    for conn, peer in peers.items():
        expected = b"second\r\n" if conn in served else b"first\r\nsecond\r\n"
        assert received(peer) == expected, conn


def test_many_broadcasts_in_one_pass_reach_every_client_once_and_in_order(worker: W.Worker) -> None:
    peers = join(worker, 5)
    lines = [b"line %d\r\n" % i for i in range(100)]
    for i, line in enumerate(lines):
        # Client 3 misses every tenth line (as a sender misses its own) and gets a notice of its own at 50.
        worker.apply([C.Broadcast(line, frozenset({3}) if i % 10 == 0 else C.EMPTY)])
        if i == 50:
            worker.output.queue(worker.registry.by_conn(3), b"notice\r\n")
    flush_all(worker)
    everything = b"".join(lines)
    for conn in (1, 2, 4, 5):
        assert received(peers[conn]) == everything
    mine = [line for i, line in enumerate(lines) if i % 10]
    assert received(peers[3]) == b"".join(mine[:45]) + b"notice\r\n" + b"".join(mine[45:])
