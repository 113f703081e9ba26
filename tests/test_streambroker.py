"""The multi-host bus process's decisions, without NATS: the stream is a list here.

Every host applies the same batches in the same order and must reach the same
directory; a host that starts from a snapshot taken mid-stream must go on
exactly like one that saw everything; each host delivers only to its own
workers; a host let go and back has its users leave and join again elsewhere.
"""

from __future__ import annotations

import json
import random
from typing import Any

import pytest

from chatcluster import events as E
from chatcluster import wire as W
from chatcluster.broker import BrokerSettings
from chatcluster.streambroker import RULES, StreamBroker


class Host:
    """One host's StreamBroker with what it emitted to its workers and submitted to the stream."""

    def __init__(self, node: str, settings: BrokerSettings | None = None) -> None:
        self.node = node
        self.emitted: list[tuple[str, bytes]] = []
        self.submitted: list[tuple[bytes, bool]] = []
        self.accept = True
        self.b = StreamBroker(self.emit, self.submit, node, settings=settings or BrokerSettings(history_lines=20))

    def emit(self, header: bytes, payload: bytes) -> None:
        self.emitted.append((header[:header.index(b"\0")].decode(), payload))

    def submit(self, payload: bytes, token: object, expires: bool) -> bool:
        if not self.accept and expires:
            return False
        self.submitted.append((payload, expires))
        return True

    def got(self, worker: str) -> list[E.Event]:
        return [ev for w, p in self.emitted if w == worker for ev in W.decode(p)[2]]


def stream_of(hosts: list[Host], entries: list[tuple[str, bytes]]) -> None:
    """Apply the stream (node, payload) on every host, in order, one message per entry."""
    for seq, (node, payload) in enumerate(entries, 1):
        for h in hosts:
            h.b.apply(node, seq, 1000.0 + seq, payload, 0.0)


def state(h: Host) -> dict[str, Any]:
    return json.loads(json.dumps(h.b.state({})))


class Workers:
    """Random bus traffic from workers of several hosts: claims on a small name space, renames, rooms, lines."""

    def __init__(self, nodes: list[str], seed: int) -> None:
        self.rng = random.Random(seed)
        self.workers = [f"w{i}@{n}" for n in nodes for i in (1, 2)]
        self.pseq: dict[tuple[str, str], int] = {}
        self.conns: dict[str, int] = {w: 0 for w in self.workers}

    def batch(self) -> tuple[str, bytes]:
        rng = self.rng
        w = rng.choice(self.workers)
        names = [f"n{i}" for i in range(8)]
        rooms = ["#a", "#b", "#lobby"]
        kind = rng.random()
        route = ""
        if kind < 0.3:
            self.conns[w] += 1
            events: list[E.Event] = [E.Join(self.conns[w], rng.choice(names), 1.0, "10.0.0.1", "", 12, 3)]
        elif kind < 0.4:
            events = [E.Nick(rng.randint(1, max(1, self.conns[w])), rng.choice(names))]
        elif kind < 0.5:
            events = [E.Leave(rng.randint(1, max(1, self.conns[w])), "bye")]
        elif kind < 0.6:
            events = [E.JoinRoom(rng.randint(1, max(1, self.conns[w])), rng.choice(rooms), 2, 3)]
        elif kind < 0.65:
            events = [E.PartRoom(rng.randint(1, max(1, self.conns[w])), rng.choice(rooms), "")]
        elif kind < 0.7:
            events = [E.Msg(rng.randint(1, max(1, self.conns[w])), rng.choice(names), b"psst", b"x")]
        elif kind < 0.75:
            events = [E.Who(rng.randint(1, max(1, self.conns[w])))]
        else:
            route = rng.choice(["#a", "#b", "#lobby"])
            events = [E.Chat(rng.randint(1, max(1, self.conns[w])), b"hello", b"x")]
        n = self.pseq[(w, route)] = self.pseq.get((w, route), 0) + 1
        return w.rpartition("@")[2], W.encode(w, n, events, route)


@pytest.mark.parametrize("seed", range(6))
def test_every_host_reaches_the_same_directory_from_the_same_stream(seed: int) -> None:
    hosts = [Host("a"), Host("b"), Host("c")]
    gen = Workers(["a", "b", "c"], seed)
    entries = [gen.batch() for _ in range(400)]
    for seq, (node, payload) in enumerate(entries, 1):
        for h in hosts:
            h.b.apply(node, seq, 1000.0 + seq, payload, 0.0)
        if seq % 50 == 0:
            first = state(hosts[0])
            assert all(state(h) == first for h in hosts[1:]), f"hosts disagree after sequence {seq}"
    assert len(hosts[0].b.roster) > 0


@pytest.mark.parametrize("seed", range(6))
def test_a_host_started_from_a_snapshot_goes_on_exactly_like_one_that_saw_everything(seed: int) -> None:
    gen = Workers(["a", "b"], seed)
    entries = [gen.batch() for _ in range(500)]
    whole = Host("a")
    for w in ("w1@a", "w2@a"):
        whole.b.listen(w)
    cut = 200
    stream_of([whole], entries[:cut])
    snap = json.loads(json.dumps(whole.b.state({"book": 1})))
    late = Host("a")
    late.b.load(snap)
    for w in ("w1@a", "w2@a"):
        late.b.listen(w)
    whole.emitted.clear()
    for seq, (node, payload) in enumerate(entries[cut:], cut + 1):
        for h in (whole, late):
            h.b.apply(node, seq, 1000.0 + seq, payload, 0.0)
    # (Where each one's history can be read back from differs: the late one read none back here.)
    assert dict(state(late), history_from=0) == dict(state(whole), history_from=0)
    # What each delivered to each of its workers, verdicts and routing alike (Seeds carry each one's
    # own history). Per worker: one batch for two workers may go out to them in either order (a set).
    def delivered(h: Host) -> dict[str, list[list[E.Event]]]:
        out: dict[str, list[list[E.Event]]] = {}
        for w, p in h.emitted:
            out.setdefault(w, []).append([ev for ev in W.decode(p)[2] if type(ev) is not E.Seed])
        return out
    assert delivered(late) == delivered(whole)


def test_a_host_delivers_only_to_its_own_workers_and_routes_rooms() -> None:
    a, b = Host("a"), Host("b")
    for h, ws in ((a, ("w1@a", "w2@a")), (b, ("w1@b",))):
        for w in ws:
            h.b.listen(w)
    entries = [
        ("a", W.encode("w1@a", 1, [E.Join(1, "Ann", 1.0, "1.1.1.1")])),
        ("b", W.encode("w1@b", 1, [E.Join(1, "Bob", 1.0, "1.1.1.2")])),
        ("b", W.encode("w1@b", 2, [E.JoinRoom(1, "#ops", 5, 50)])),
        ("b", W.encode("w1@b", 1, [E.Chat(1, b"in ops", b"Bob")], "#ops")),
        ("a", W.encode("w1@a", 1, [E.Chat(1, b"in lobby", b"Ann")], "#lobby")),
        ("b", W.encode("w1@b", 3, [E.Msg(1, "Ann", b"psst", b"Bob")])),
    ]
    stream_of([a, b], entries)
    assert {w for w, _ in a.emitted} <= {"w1@a", "w2@a"} and {w for w, _ in b.emitted} == {"w1@b"}
    assert not any(type(ev) is E.Chat and ev.text == b"in ops" for ev in a.got("w1@a")), "a room nobody here is in"
    assert any(type(ev) is E.Chat and ev.text == b"in ops" for ev in b.got("w1@b")), "its own batch comes back"
    assert any(type(ev) is E.Chat and ev.text == b"in lobby" for ev in b.got("w1@b"))
    assert [ev for ev in a.got("w1@a") if type(ev) is E.Private] == [E.Private("w1@a", 1, b"Bob", b"psst")]
    assert not any(type(ev) is E.Private for ev in a.got("w2@a") + b.got("w1@b"))


def test_a_batch_of_another_hosts_worker_is_refused_both_ways() -> None:
    a = Host("a")
    a.b.receive(W.encode("w1@b", 0, [E.Hello(5)]), 0.0)
    assert a.submitted == [] and a.b.foreign == 1
    a.b.apply("b", 1, 1.0, W.encode("w1@a", 1, [E.Join(1, "Ann", 1.0, "x")]), 0.0)
    assert len(a.b.roster) == 0 and a.b.foreign == 2


def test_local_batches_go_to_the_stream_lines_expiring_requests_not() -> None:
    a = Host("a")
    a.b.receive(W.encode("w1@a", 0, [E.Resync([]), E.HistoryCopy([("#x", [])]), E.Hello(7)]), 0.0)
    a.b.receive(W.encode("w1@a", 1, [E.Chat(1, b"hi", b"Ann")], "#lobby"), 0.0)
    a.b.receive(W.encode("w1@a", 1, [E.Nick(1, "Ann")]), 0.0)
    (control, c_exp), (line, l_exp), (req, r_exp) = a.submitted
    assert [type(ev) for ev in W.decode(control)[2]] == [E.Resync, E.Hello], "history comes from the stream"
    assert (c_exp, l_exp, r_exp) == (False, True, False)


def test_a_refused_line_is_reported_to_its_sender_and_forgotten() -> None:
    a = Host("a")
    a.b.listen("w1@a")
    a.b.receive(W.encode("w1@a", 0, [E.Hello(7)]), 0.0)
    a.accept = False
    a.b.receive(W.encode("w1@a", 4, [E.Chat(3, b"hi", b"Ann"), E.Chat(5, b"yo", b"Bo")], "#lobby"), 0.0)
    assert a.got("w1@a") == [E.Undelivered("w1@a", [("#lobby", 4)], [3, 5])]
    assert a.b.undelivered == 1


def test_a_host_let_go_has_its_users_leave_and_join_again_when_back() -> None:
    a, b = Host("a"), Host("b")
    a.b.listen("w1@a")
    stream_of([a, b], [
        ("a", W.encode("w1@a", 1, [E.Join(1, "Ann", 1.0, "x")])),
        ("b", W.encode("w1@b", 1, [E.Join(1, "Bob", 1.0, "y")])),
        ("b", W.encode("w1@b", 1, [E.Chat(1, b"one", b"Bob")], "#lobby")),
    ])
    a.emitted.clear()
    for h in (a, b):
        h.b.host_gone("b", "lease", 0.0)  # b was silent too long
    assert a.got("w1@a") == [E.Quit(1, "Bob", "connection lost", ["#lobby"])], "a Quit: the numbering is kept"
    assert a.b.roster.holder("Bob") is None
    assert a.b.route_seqs["#lobby"]["w1@b"] == 1
    # b is back: a new incarnation names its live worker, which resyncs its user.
    a.emitted.clear()
    hello = json.dumps({"workers": ["w1@b"], "rules": RULES, "wire": W.WIRE_VERSION,
                        "default_room": "#lobby"}).encode()
    for h in (a, b):
        h.b.host_hello("b", hello, 0.0)
    assert a.got("w1@a") == [], "its live worker is kept"
    stream_of([a, b], [("b", W.encode("w1@b", 0, [E.Resync([("w1@b", 1, "Bob", 1.0, "y")]), E.Hello(9)]))])
    assert E.Joined(1, "Bob", "") in a.got("w1@a")
    assert a.b.roster.holder("Bob") is not None and not a.b.let_go


def test_a_host_started_again_makes_the_others_forget_its_old_workers() -> None:
    a = Host("a")
    a.b.listen("w1@a")
    stream_of([a], [("b", W.encode("w1@b", 1, [E.Join(1, "Bob", 1.0, "y")])),
                    ("b", W.encode("w1@b", 1, [E.Chat(1, b"one", b"Bob")], "#lobby"))])
    a.emitted.clear()
    a.b.host_gone("b", "restarted", 0.0)
    assert a.got("w1@a") == [], "a restart waits for its hello, which says who lives on"
    a.b.host_hello("b", json.dumps({"workers": []}).encode(), 0.0)
    assert E.Lost("w1@b", [("Bob", ["#lobby"])]) in a.got("w1@a")
    assert "w1@b" not in a.b.route_seqs.get("#lobby", {})


def test_a_host_with_other_rules_cannot_start_from_the_snapshot() -> None:
    a = Host("a")
    st = a.b.state({})
    other = Host("b", BrokerSettings(default_room="#main"))
    with pytest.raises(ValueError, match="default_room"):
        other.b.load(st)
    with pytest.raises(ValueError, match="other rules"):
        Host("c").b.load(dict(st, rules=RULES + 1))


_REPLAY = """
import hashlib, json, sys
sys.path.insert(0, sys.argv[1])
from test_streambroker import Host, Workers, W, E, state
seed, node = int(sys.argv[2]), sys.argv[3]
gen = Workers(["a", "b", "c"], seed)
h = Host(node)
for w in ("w1@" + node, "w2@" + node):
    h.b.listen(w)
for seq in range(1, 401):
    origin, payload = gen.batch()
    h.b.apply(origin, seq, 1000.0 + seq, payload, 0.0)
    if seq == 250:
        h.b.host_gone("c", "lost", 0.0)  # a host let go: its users leave, in some order
per_worker = {}
for w, p in h.emitted:
    per_worker.setdefault(w, []).append(repr([ev for ev in W.decode(p)[2] if type(ev) is not E.Seed]))
print(hashlib.sha256(json.dumps([state(h), per_worker], sort_keys=True).encode()).hexdigest())
"""


@pytest.mark.parametrize("seed", range(3))
def test_hosts_in_processes_with_different_hash_seeds_decide_alike(seed: int) -> None:
    # Real hosts are separate Python processes, each with its own string hash seed: any decision
    # or announcement that followed the iteration order of a set would differ between hosts,
    # which one process (as in the tests above) cannot show.
    import os
    import subprocess
    import sys

    here = os.path.dirname(os.path.abspath(__file__))
    digests = set()
    for hash_seed in ("1", "2", "3", "4"):
        out = subprocess.run([sys.executable, "-c", _REPLAY, here, str(seed), "a"], capture_output=True, text=True,
                             timeout=60, env={**os.environ, "PYTHONHASHSEED": hash_seed},
                             cwd=os.path.dirname(here))
        assert out.returncode == 0, out.stderr
        digests.add(out.stdout.strip())
    assert len(digests) == 1, "the same stream led to different decisions under different hash seeds"
