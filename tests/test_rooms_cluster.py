"""Rooms, private lines and history end to end: real clusters, real clients on different workers.

Every client is placed on a worker of its own where the test needs it
(`clients_on_distinct_workers`, checked with psutil), so what one sees of
another always crossed the bus. History is checked across the death of a
worker, of the broker, and (with `history_db`) a full stop and start.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from chat_support import LOST, broker_pid, new_broker
from conftest import REPO, Client, Cluster, wait_for
from worker_support import rig_in, until

pytestmark = pytest.mark.timeout(90)

Make = Callable[..., Cluster]
STAMP = r"\[\d\d:\d\d\] "


def named(clients: list[Client], *nicks: str) -> list[Client]:
    for c, nick in zip(clients, nicks, strict=True):
        c.say(f"/nick {nick}")
        c.wait_line(rf"\*\*\* You are now known as {nick}")
        c.nick = nick
    return clients


def join(c: Client, room: str, users: int) -> None:
    c.say(f"/join {room}")
    c.wait_line(rf"\*\*\* You joined (?i:{re.escape(room)}); {users} users? here: .*")  # shown as first made


def after(c: Client, pattern: str) -> list[str]:
    """The lines received after the last one matching `pattern` (waits for it)."""
    c.wait_line(pattern)
    rx = re.compile(pattern)
    last = max(i for i, x in enumerate(c.lines) if rx.fullmatch(x))
    return c.lines[last + 1:]


def test_rooms_across_workers(make_cluster: Make) -> None:
    cl = make_cluster(3)
    ann, bob, cy = named(cl.clients_on_distinct_workers(3), "ann", "bob", "cy")
    join(ann, "#Rust", 1)
    join(bob, "#rust", 2)
    ann.wait_line(r"\*\*\* bob joined #Rust")
    # Lines of the active room arrive as before, those of another room with its name in front.
    cy.say("lobby line")
    ann.wait_line("#lobby cy: lobby line")
    bob.say("rust line")
    ann.wait_line("bob: rust line")
    assert "bob: rust line" not in cy.lines and "#Rust bob: rust line" not in cy.lines
    # /who, /who #ROOM, /rooms, /whois
    ann.say("/who")
    ann.wait_line(r"\*\*\* 2 users in #Rust: ann, bob")
    cy.say("/who #RUST")
    cy.wait_line(r"\*\*\* 2 users in #Rust: ann, bob")
    cy.say("/rooms")
    cy.wait_line(r"\*\*\* 2 rooms: #lobby \(3\), #Rust \(2\)")
    cy.say("/whois bob")
    cy.wait_line(r"\*\*\* bob is on worker w\d+, connected since .* UTC \(\d+s ago\), in #lobby, #Rust")
    # Back to the lobby, then out of #Rust.
    ann.say("/join #lobby")
    ann.wait_line(r"\*\*\* Now talking in #lobby")
    bob.say("rust again")
    ann.wait_line("#Rust bob: rust again")
    ann.say("/part #Rust off to lunch")
    bob.wait_line(r"\*\*\* ann left #Rust \(off to lunch\)")
    ann.wait_line(r"\*\*\* You left #Rust")
    bob.say("/part")  # its active room; it is still in #lobby
    bob.wait_line(r"\*\*\* You left #Rust; now talking in #lobby")
    cy.say("/rooms")
    cy.wait_line(r"\*\*\* 1 room: #lobby \(3\)")


def test_two_rooms_never_meet_and_a_member_of_both_sees_each_once(make_cluster: Make) -> None:
    cl = make_cluster(3)
    ann, bob, both = named(cl.clients_on_distinct_workers(3), "ann", "bob", "both")
    join(ann, "#a", 1)
    join(bob, "#b", 1)
    join(both, "#a", 2)
    join(both, "#b", 2)  # talks in #b now
    for c in (ann, bob):
        c.say("/part #lobby")
        c.wait_line(r"\*\*\* You left #lobby")
    for i in range(5):
        ann.say(f"a{i}")
        bob.say(f"b{i}")
    both.wait_line("#a ann: a4")
    both.wait_line("bob: b4")
    got = [x for x in both.lines if re.fullmatch(r"(#a ann: a\d|bob: b\d)", x)]
    assert sorted(got) == sorted([f"#a ann: a{i}" for i in range(5)] + [f"bob: b{i}" for i in range(5)])
    bob.say("/who")
    bob.wait_line(r"\*\*\* 2 users in #b: bob, both")
    assert not any("ann:" in x for x in bob.lines) and not any("bob:" in x for x in ann.lines)


def test_a_private_line_across_workers(make_cluster: Make) -> None:
    cl = make_cluster(3)
    ann, bob, cy = named(cl.clients_on_distinct_workers(3), "ann", "Bob", "cy")
    ann.say("/msg bob only for you")
    bob.wait_line(r"\*ann\* only for you")
    ann.wait_line(r"-> \*Bob\* only for you")
    ann.say("/msg nobody hi")
    ann.wait_line(r"\*\*\* Error: no such user nobody")
    cy.say("/who")
    cy.wait_line(r"\*\*\* 3 users online: .*")
    assert not any("only for you" in x for x in cy.lines)


def test_a_rename_is_seen_once_by_someone_in_two_shared_rooms(make_cluster: Make) -> None:
    cl = make_cluster(2)
    ann, bob = named(cl.clients_on_distinct_workers(2), "ann", "bob")
    for room, n in (("#x", 1), ("#y", 1)):
        join(ann, room, n)
    join(bob, "#x", 2)
    join(bob, "#y", 2)
    ann.say("/nick anna")
    bob.wait_line(r"\*\*\* ann is now known as anna")
    ann.say("/quit")
    bob.wait_line(r"\*\*\* anna left")
    assert bob.lines.count("*** ann is now known as anna") == 1
    assert bob.lines.count("*** anna left") == 1


def test_history_on_join_in_order_with_times_and_limited(make_cluster: Make) -> None:
    cl = make_cluster(2, extra=("--history-lines", "3", "--flood-rate", "0"))
    ann, bob = named(cl.clients_on_distinct_workers(2), "ann", "bob")
    join(ann, "#h", 1)
    for i in range(5):
        ann.say(f"h{i}")
    ann.say("/me is done")
    ann.say("/who")
    ann.wait_line(r"\*\*\* 1 user in #h: ann")  # everything before this is in the order
    bob.say("/join #h")
    bob.wait_line(r"\*\*\* You joined #h; 2 users here: ann, bob")
    bob.wait(lambda lines: len(after(bob, r"\*\*\* You joined #h; .*")) >= 3, what="three lines of history")
    got = after(bob, r"\*\*\* You joined #h; .*")[:3]
    assert [re.sub(STAMP, "", x) for x in got] == ["ann: h3", "ann: h4", "* ann is done"]
    assert all(re.match(STAMP, x) for x in got)
    ann.say("live")
    bob.wait_line("ann: live")


def test_history_survives_kill_9_of_a_worker(make_cluster: Make) -> None:
    cl = make_cluster(2)
    ann, bob = named(cl.clients_on_distinct_workers(2), "ann", "bob")
    join(ann, "#h", 1)  # ann is the room's only member: its lines live on in the broker alone
    ann.say("said before the crash")
    ann.say("/who")
    ann.wait_line(r"\*\*\* 1 user in #h: ann")
    os.kill(cl.worker_of(ann), signal.SIGKILL)
    bob.wait_line(r"\*\*\* ann left \(connection lost\)")
    cl.wait_ready(2)
    bob.say("/join #h")
    bob.wait_line(r"\*\*\* You joined #h; 1 user here: bob")
    bob.wait(lambda _: any("said before the crash" in x for x in after(bob, r"\*\*\* You joined #h; .*")),
             what="the history of #h")
    assert re.fullmatch(STAMP + "ann: said before the crash", after(bob, r"\*\*\* You joined #h; .*")[0])


@pytest.mark.slow
def test_history_survives_kill_9_of_the_broker(make_cluster: Make) -> None:
    cl = make_cluster(2)
    ann, bob, cy = named(cl.clients_on_distinct_workers(2) + [cl.client()], "ann", "bob", "cy")
    join(ann, "#h", 1)
    join(bob, "#h", 2)
    ann.say("kept by the workers")
    bob.wait_line("ann: kept by the workers")
    old = broker_pid(cl)
    os.kill(old, signal.SIGKILL)
    new_broker(cl, old)
    wait_for(lambda: "roster rebuilt" in cl.read_log(), what="the new broker to rebuild")
    cy.say("/join #h")
    cy.wait_line(r"\*\*\* You joined #h; 3 users here: ann, bob, cy")
    cy.wait_line(STAMP + "ann: kept by the workers")
    ann.say("after the restart")
    cy.wait_line("ann: after the restart")
    bob.wait_line("ann: after the restart")
    assert not any(LOST in c.lines for c in (ann, bob, cy))


@pytest.mark.slow
def test_history_db_keeps_history_across_a_full_stop_and_start(make_cluster: Make, tmp_path: Path) -> None:
    db = str(tmp_path / "history.db")
    cl = make_cluster(2, extra=("--history-db", db))
    (ann,) = named([cl.client()], "ann")
    join(ann, "#h", 1)
    for i in range(3):
        ann.say(f"persisted {i}")
    ann.say("/who")
    ann.wait_line(r"\*\*\* 1 user in #h: ann")
    cl.signal(signal.SIGTERM)
    assert cl.wait_exit() == 0
    cl2 = make_cluster(2, extra=("--history-db", db))  # another port: the first one may be in TIME-WAIT
    (bob,) = named([cl2.client()], "bob")
    bob.say("/join #h")
    bob.wait_line(STAMP + "ann: persisted 2")
    got = after(bob, r"\*\*\* You joined #h; 1 user here: bob")
    assert [re.sub(STAMP, "", x) for x in got[:3]] == [f"ann: persisted {i}" for i in range(3)]


def test_a_worker_with_no_member_in_a_busy_room_receives_none_of_its_traffic(tmp_path: Path) -> None:
    with rig_in(tmp_path) as rig:
        w1 = rig.worker(1)
        talker, listener = rig.client(w1), rig.client(w1)
        w2 = rig.worker(2)
        listening = w1.unlisten()
        assert listening is not None
        listening.close()  # the next client can only land on w2
        quiet = rig.client(w1, w2)
        assert len(w1.registry) == 2 and len(w2.registry) == 1
        for c in (talker, listener):
            c.say("/join #busy")
            until(lambda c=c: any(x.startswith("*** You joined #busy") for x in c.lines), w1, w2, clients=[c])
        for i in range(50):
            talker.say(f"busy {i}")
        until(lambda: "busy 49" in "".join(listener.lines), w1, w2, clients=[listener])
        quiet.say("from the lobby")
        until(lambda: any(x.endswith("from the lobby") for x in talker.lines), w1, w2, clients=[talker])
        assert w1.bus.order.routes["#busy"] >= 1 and w1.bus.order.routes["#lobby"] >= 1
        assert w2.bus.order.routes["#busy"] == 0  # not one batch of the busy room reached w2
        assert w2.bus.order.routes["#lobby"] >= 1
        assert not any("busy" in x for x in quiet.lines)


@pytest.mark.slow
@pytest.mark.timeout(200)
def test_rooms_and_history_survive_an_upgrade(make_cluster: Make) -> None:
    cl = make_cluster(2)
    ann, bob = named(cl.clients_on_distinct_workers(2), "ann", "bob")
    join(ann, "#x", 1)
    join(bob, "#x", 2)
    bob.say("/join #lobby")
    bob.wait_line(r"\*\*\* Now talking in #lobby")
    ann.say("before the upgrade")
    bob.wait_line("#x ann: before the upgrade")
    done = subprocess.run([sys.executable, "-m", "chatcluster", "upgrade", "--port", str(cl.port), "--runtime-dir",
                           cl.runtime_dir], capture_output=True, text=True, cwd=REPO, timeout=150)
    assert done.returncode == 0, done.stderr
    ann.say("after the upgrade")  # still talking in #x, now through a new worker
    bob.wait_line("#x ann: after the upgrade")
    ann.say("/who")
    ann.wait_line(r"\*\*\* 2 users in #x: ann, bob")
    (cy,) = named([cl.client()], "cy")
    cy.say("/join #x")
    cy.wait_line(r"\*\*\* You joined #x; 3 users here: ann, bob, cy")
    cy.wait_line(STAMP + "ann: after the upgrade")
    got = [re.sub(STAMP, "", x) for x in after(cy, r"\*\*\* You joined #x; .*")[:2]]
    assert got == ["ann: before the upgrade", "ann: after the upgrade"]
    assert not any(LOST in c.lines for c in (ann, bob, cy))


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_private_lines_sent_through_upgrades_all_arrive_once_in_order(make_cluster: Make) -> None:
    # While a client is handed to its successor, the roster still has it at the old worker until
    # the successor's ADOPT: a /msg decided in that window used to be confirmed to its sender and
    # shown to nobody. A steady stream of them through a few upgrades lands in every window.
    cl = make_cluster(2, extra=("--flood-rate", "0"))
    sender, recipient = named(cl.clients_on_distinct_workers(2), "sender", "recipient")
    stop = threading.Event()
    sent: list[int] = []

    def stream() -> None:
        i = 0
        while not stop.is_set():
            sender.send(f"/msg recipient n{i}\r\n")
            sent.append(i)
            i += 1
            stop.wait(0.002)

    thread = threading.Thread(target=stream)
    thread.start()
    try:
        for _ in range(3):
            done = subprocess.run([sys.executable, "-m", "chatcluster", "upgrade", "--port", str(cl.port),
                                   "--runtime-dir", cl.runtime_dir], capture_output=True, text=True, cwd=REPO,
                                  timeout=150)
            assert done.returncode == 0, done.stderr
    finally:
        stop.set()
        thread.join()
    last = sent[-1]
    sender.wait_line(rf"-> \*recipient\* n{last}", timeout=30)
    recipient.wait_line(rf"\*sender\* n{last}", timeout=30)
    got = [int(m.group(1)) for x in recipient.lines if (m := re.fullmatch(r"\*sender\* n(\d+)", x))]
    confirmed = [int(m.group(1)) for x in sender.lines if (m := re.fullmatch(r"-> \*recipient\* n(\d+)", x))]
    assert confirmed == sent
    assert got == sent, f"missing {sorted(set(sent) - set(got))[:10]}"
