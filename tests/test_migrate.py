"""Specification of chatcluster.migrate: the cut in the bus order when a worker hands its clients over.

Two real workers live in this test process, on a real broker process and real
sockets, and the test turns their loops by hand. That is what makes the rare
interleavings reproducible: here the new worker reads the bus past the cut
point, and delivers lines sequenced after it, before the clients themselves
arrive. A client must still get every line exactly once and in order.
"""

from __future__ import annotations

import os
import random
import select
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Client
from worker_support import Rig, rig_in, turn, until

from chatcluster import migrate
from chatcluster import worker as W


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    with rig_in(tmp_path) as r:
        yield r


def test_lines_sequenced_between_the_cut_and_the_adoption_reach_the_moved_clients(rig: Rig) -> None:
    old = rig.worker(1)
    new = rig.worker(2, succeeds=("w1", os.getpid()))  # our own pid: the predecessor never "exits"
    a = rig.client(old)
    b = rig.client(old)
    a.say("before the cut")
    until(lambda: f"{a.nick}: before the cut" in b.lines, old, clients=[b])
    # The old worker offers its listener; the new one takes it.
    old.handoff_requested = True
    until(lambda: new.listener is not None, old, new)
    # A client of the new worker, accepted on the listener that came over.
    t = rig.client(new)
    assert t.sock.getsockname() in {c.sock.getpeername() for c in new.registry.clients()}
    # The old worker freezes, marks the cut, and when its marker comes back sends its clients away.
    giver = old.handoff
    assert isinstance(giver, migrate.Giver)
    until(lambda: giver.state == migrate.SENT, old, clients=[a, b])
    assert not old.registry.clients()
    # The new worker reads the bus past the cut point, delivering a line said after it, before
    # it reads the clients waiting on its handoff socket.
    taker = new.handoff
    assert isinstance(taker, migrate.Taker)
    t.say("after the cut")
    until(lambda: taker.copy, new, handoff=False, clients=[t])
    assert not taker.installed and taker.marks
    # Now it takes them: each gets what the room got since the cut, then everything live.
    until(lambda: taker.installed, new)
    t.say("after the adoption")
    until(lambda: old.stop is not None and new.handoff is None, old, new, clients=[a, b, t])
    for c in (a, b):
        until(lambda c=c: f"{t.nick}: after the adoption" in c.lines, new, clients=[c])
        chat = [x for x in c.lines if ": " in x and not x.startswith("***")]
        expected = [f"{t.nick}: after the cut", f"{t.nick}: after the adoption"]
        if c is b:
            expected.insert(0, f"{a.nick}: before the cut")
        assert chat == expected, c.lines
    # The nicknames moved with them: the next line of `a` comes from the new worker, under its name.
    a.say("from the new worker")
    until(lambda: f"{a.nick}: from the new worker" in b.lines and f"{a.nick}: from the new worker" in t.lines,
          new, clients=[b, t])
    for c in (a, b, t):  # the roster (the broker's) has every one of them on the new worker
        a.say(f"/whois {c.nick}")
        until(lambda c=c: any(x.startswith(f"*** {c.nick} is on worker w2,") for x in a.lines), new, clients=[a])


def test_a_giver_that_cannot_reach_its_successor_keeps_serving(rig: Rig) -> None:
    old = rig.worker(1)
    a = rig.client(old)
    b = rig.client(old)
    old.handoff_requested = True  # nobody listens at handoff-w1
    turn(old)
    assert old.handoff is None and old.listener is not None and not old.frozen
    a.say("still served")
    until(lambda: f"{a.nick}: still served" in b.lines, old, clients=[b])
    c = rig.client(old)  # and still accepting
    assert c.nick


def begin_handoff(old: W.Worker, new: W.Worker) -> migrate.Giver:
    """Start `old` handing over to `new`: its HELLO goes out with the listener, which `new` takes."""
    old.handoff_requested = True
    turn(old)
    giver = old.handoff
    assert isinstance(giver, migrate.Giver)
    until(lambda: new.listener is not None, new)
    return giver


def test_a_successor_that_goes_away_before_the_clients_are_sent_leaves_them_with_the_giver(rig: Rig) -> None:
    old = rig.worker(1)
    new = rig.worker(2, succeeds=("w1", os.getpid()))
    a = rig.client(old)
    b = rig.client(old)
    giver = begin_handoff(old, new)
    until(lambda: select.select([giver.sock], [], [], 0)[0], timeout=5)
    giver.on_fd(giver.sock.fileno())  # ACCEPT: frozen, its marker not published yet
    assert old.frozen
    new.handoff.close()  # the successor dies before the clients are sent
    until(lambda: old.handoff is None, old)
    assert not old.frozen and old.listener is not None
    b.say("resumed")
    until(lambda: f"{b.nick}: resumed" in a.lines, old, clients=[a])


def test_a_claim_published_after_the_marker_moves_the_cut_to_a_later_marker(rig: Rig) -> None:
    old = rig.worker(1)
    new = rig.worker(2, succeeds=("w1", os.getpid()))
    a = rig.client(old)
    b = rig.client(old)
    giver = begin_handoff(old, new)
    taker = new.handoff
    assert isinstance(taker, migrate.Taker)
    t = rig.client(new)
    u = rig.client(new)
    # Both workers draw the same random nickname for their next client; the new worker's claim
    # is ordered first, so the old worker's is refused and it claims another one: after its marker.
    old.core.rng, new.core.rng = random.Random(7), random.Random(7)
    e = Client(rig.port)
    rig.clients.append(e)
    until(lambda: any("Welcome" in x for x in e.lines), new, clients=[e])
    d = Client(rig.port)
    rig.clients.append(d)
    until(lambda: select.select([old.listener], [], [], 0)[0], timeout=5)
    old.accept()  # d: its JOIN claims e's nickname
    until(lambda: select.select([giver.sock], [], [], 0)[0], timeout=5)
    giver.on_fd(giver.sock.fileno())  # ACCEPT: freeze, first marker after d's JOIN
    assert giver.state == migrate.FROZEN and giver.token == 1
    old.publish()
    until(lambda: 1 in taker.marks, new)  # the first marker is in the order
    t.say("between the markers")
    until(lambda: f"{t.nick}: between the markers" in u.lines, new, clients=[u])
    until(lambda: giver.state == migrate.SENT, old, clients=[a, b, d])
    assert giver.token == 2, "the refused claim should have moved the cut"
    until(lambda: taker.installed and new.handoff is None, new, old)
    t.say("after")
    for c in (a, b, d):
        until(lambda c=c: f"{t.nick}: after" in c.lines, new, clients=[c])
    for c in (a, b):
        assert [x for x in c.lines if x.startswith(f"{t.nick}: ")] == [f"{t.nick}: between the markers",
                                                                       f"{t.nick}: after"], c.lines
    welcomes = [x for x in d.lines if "Welcome" in x]
    assert len(welcomes) == 1 and e.lines[0] != welcomes[0], d.lines


def test_clients_are_sent_in_messages_of_bounded_descriptors_and_size() -> None:
    small = [{"out": "", "unread": ""}] * 450
    assert [(s.start, s.stop) for s in migrate.batches(small)] == [(0, 200), (200, 400), (400, 450)]
    big = [{"out": "x" * (3 << 20), "unread": ""}] * 7  # 3 MiB of queued output each
    sizes = [s.stop - s.start for s in migrate.batches(big)]
    assert sum(sizes) == 7 and max(sizes) == 3  # about FRAME_TARGET (8 MiB) per message
    assert migrate.batches([]) == []
    huge = [{"out": "x" * (64 << 20), "unread": ""}]  # one client over the target still goes, alone
    assert [(s.start, s.stop) for s in migrate.batches(huge)] == [(0, 1)]


def test_moved_clients_get_what_their_rooms_got_after_the_cut_each_as_its_rooms_say(rig: Rig) -> None:
    old = rig.worker(1)
    a = rig.client(old)  # talks in #x
    b = rig.client(old)  # in #x, talks in the lobby
    listener = old.unlisten()
    assert listener is not None
    listener.close()
    third = rig.worker(3)
    z = rig.client(third)  # talks in #x from a worker that takes no part in the handoff
    old.listen()
    new = rig.worker(2, succeeds=("w1", os.getpid()))
    everyone = (old, new, third)
    for c in (a, b, z):
        c.say("/join #x")
        until(lambda c=c: any(x.startswith("*** You joined #x") for x in c.lines), *everyone, clients=[c])
    b.say("/join #lobby")
    until(lambda: "*** Now talking in #lobby" in b.lines, *everyone, clients=[b])
    z.say("before the cut")
    until(lambda: f"#x {z.nick}: before the cut" in b.lines and f"{z.nick}: before the cut" in a.lines, *everyone,
          clients=[a, b])
    giver = begin_handoff(old, new)
    until(lambda: giver.state == migrate.SENT, old, third, clients=[a, b])
    taker = new.handoff
    assert isinstance(taker, migrate.Taker)
    # The broker routes #x to the successor from the cut on, though it has no member there yet.
    z.say("after the cut")
    until(lambda: taker.copy, new, third, handoff=False, clients=[z])
    assert not taker.installed
    until(lambda: taker.installed, new)
    z.say("live")
    until(lambda: f"#x {z.nick}: live" in b.lines and f"{z.nick}: live" in a.lines, new, third, old,
          clients=[a, b])
    assert [x for x in a.lines if z.nick in x and ": " in x] == [f"{z.nick}: {t}" for t in
                                                                  ("before the cut", "after the cut", "live")]
    assert [x for x in b.lines if z.nick in x and ": " in x] == [f"#x {z.nick}: {t}" for t in
                                                                  ("before the cut", "after the cut", "live")]
    a.say("from the new worker")  # still talking in #x
    until(lambda: f"{a.nick}: from the new worker" in z.lines, new, third, clients=[z])
