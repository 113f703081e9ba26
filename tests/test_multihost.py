"""Several chatcluster hosts sharing one conversation over a real NATS JetStream cluster.

Every test starts real nats-server processes (tests/nats_support.py) and real
chatcluster hosts (separate supervisors, ports and runtime directories), and
talks to them with real sockets. The hosts' clients must see one order,
unique nicknames and the same rooms whatever host they are on, and the
faults (a NATS node killed, a whole host killed, NATS lost) must look to them
as docs/multihost.md says.
"""

from __future__ import annotations

import re
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

pytest.importorskip("nats", reason="nats-py is not installed (pip install 'chatcluster[nats]')")

from conftest import Client, free_port, start_refused, wait_for  # noqa: E402
from multihost_support import Host, assert_one_order, chat_lines  # noqa: E402
from nats_support import NatsCluster, nats_server_binary  # noqa: E402

_binary, _why = nats_server_binary()
pytestmark = [pytest.mark.skipif(_binary is None, reason=_why), pytest.mark.slow, pytest.mark.timeout(240)]

STREAM = "CHATCLUSTER_main"


@pytest.fixture
def make_nats(request: pytest.FixtureRequest) -> Iterator[Callable[..., NatsCluster]]:
    made: list[NatsCluster] = []

    def make(size: int = 3, **kw: Any) -> NatsCluster:
        c = NatsCluster(size, **kw)
        made.append(c)
        try:
            return c.start()
        except BaseException:
            c.stop()
            raise

    yield make
    rep = getattr(request.node, "rep_call", None)
    for c in made:
        if rep is not None and rep.failed:
            sys.stderr.write(f"\n--- NATS logs ---\n{c.logs()}\n")
        c.stop()


@pytest.fixture
def make_host(request: pytest.FixtureRequest) -> Iterator[Callable[..., Host]]:
    made: list[Host] = []

    def make(nats: NatsCluster, node: str, start: bool = True, **kw: Any) -> Host:
        h = Host(nats, node, **kw)
        made.append(h)
        return h.start() if start else h

    yield make
    rep = getattr(request.node, "rep_call", None)
    for h in made:
        if rep is not None and rep.failed:
            sys.stderr.write(f"\n--- host {h.node} (port {h.port}) ---\n{h.read_log()[-8000:]}\n")
        h.stop()


def say_lines(clients: list[Client], tag: str, n: int) -> None:
    """Each client says n numbered lines, all of them at once (one thread per client)."""
    def talk(c: Client) -> None:
        for i in range(n):
            c.say(f"m {tag}{c.nick} {i}")

    threads = [threading.Thread(target=talk, args=(c,)) for c in clients]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def wait_all_lines(clients: list[Client], total: int, n_own: int, timeout: float = 60) -> dict[str, list[str]]:
    """Wait until every client has every line but its own (a sender never sees its own lines)."""
    for c in clients:
        c.wait(lambda lines: len(chat_lines(lines)) >= total - n_own, timeout, f"{total - n_own} chat lines")
    for c in clients:
        c.drain_for_quiet()
    return {c.nick: chat_lines(c.lines) for c in clients}


# -- one conversation ----------------------------------------------------------------------------

def test_every_line_reaches_every_client_on_every_host_once_in_one_order(
        make_nats: Callable[..., NatsCluster], make_host: Callable[..., Host]) -> None:
    nats = make_nats(3)
    a, b = make_host(nats, "a"), make_host(nats, "b")
    clients = [h.client() for h in (a, b, a, b, a, b)]
    for c in clients:  # everyone is known everywhere before the lines start
        c.say("/who")
        c.wait_line(r"\*\*\* 6 users online: .*")
    n = 25
    say_lines(clients, "", n)
    views = wait_all_lines(clients, n * len(clients), n)
    for c in clients:
        expected = {f"{o.nick}: m {o.nick} {i}" for o in clients if o is not c for i in range(n)}
        assert set(views[c.nick]) == expected
        for o in clients:  # each sender's lines in the order it said them
            if o is not c:
                mine = [x for x in views[c.nick] if x.startswith(o.nick + ":")]
                assert mine == [f"{o.nick}: m {o.nick} {i}" for i in range(n)]
    assert_one_order(views)


def test_a_nickname_claimed_at_once_from_two_hosts_has_one_winner(
        make_nats: Callable[..., NatsCluster], make_host: Callable[..., Host]) -> None:
    nats = make_nats(3)
    a, b = make_host(nats, "a"), make_host(nats, "b")
    on_a, on_b = [a.client() for _ in range(3)], [b.client() for _ in range(3)]
    watcher = a.client()
    for rnd in range(6):
        name = f"Race{rnd}"
        racers = on_a + on_b
        barrier = threading.Barrier(len(racers))

        def claim(c: Client, barrier: threading.Barrier, name: str) -> None:
            barrier.wait()
            c.say(f"/nick {name}")

        threads = [threading.Thread(target=claim, args=(c, barrier, name)) for c in racers]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        won = []
        for c in racers:
            m = c.wait_line(rf"\*\*\* (You are now known as {name}|Error: nickname {name} is already taken)")
            if m.group(1).startswith("You"):
                won.append(c)
        assert len(won) == 1, f"round {rnd}: {len(won)} winners"
        winner = won[0]
        old = winner.nick
        winner.nick = name
        for c in [watcher, *racers]:
            if c is not winner:
                c.wait_line(rf"\*\*\* {re.escape(old)} is now known as {name}")
    watcher.say("/who")
    listing = watcher.wait_line(r"\*\*\* 7 users online: (.*)").group(1).split(", ")
    assert len(listing) == len(set(listing)) == 7


def test_who_whois_msg_and_rooms_work_across_hosts(
        make_nats: Callable[..., NatsCluster], make_host: Callable[..., Host]) -> None:
    nats = make_nats(1)
    a, b = make_host(nats, "a"), make_host(nats, "b")
    ann, bob = a.client(), b.client()
    ann.say("/nick Ann")
    ann.wait_line(r"\*\*\* You are now known as Ann")
    bob.say("/nick Bob")
    bob.wait_line(r"\*\*\* You are now known as Bob")
    bob.say("/who")
    bob.wait_line(r"\*\*\* 2 users online: Ann, Bob")
    bob.say("/whois Ann")
    bob.wait_line(r"\*\*\* Ann is on worker w\d+@a, connected since .*")
    bob.say("/msg Ann psst")
    ann.wait_line(r"\*Bob\* psst")
    bob.wait_line(r"-> \*Ann\* psst")
    # A room made on one host, joined from the other: lines go both ways, the rest stay out.
    ann.say("/join #ops")
    ann.wait_line(r"\*\*\* You joined #ops; 1 user here: Ann")
    bob.say("/join #OPS")
    bob.wait_line(r"\*\*\* You joined #ops; 2 users here: Ann, Bob")
    ann.wait_line(r"\*\*\* Bob joined #ops")
    cy = a.client()
    bob.say("in ops")
    ann.wait_line(r"Bob: in ops")
    ann.say("/rooms")
    ann.wait_line(r"\*\*\* 2 rooms: #lobby \(3\), #ops \(2\)")
    cy.say("/who #ops")
    cy.wait_line(r"\*\*\* 2 users in #ops: Ann, Bob")
    bob.say("/part #ops")
    ann.wait_line(r"\*\*\* Bob left #ops")
    time.sleep(0.3)
    cy.drain_for_quiet()
    assert not any("in ops" in x for x in cy.lines), "a client outside the room got its lines"


def test_a_host_that_starts_later_knows_the_users_and_replays_the_history(
        make_nats: Callable[..., NatsCluster], make_host: Callable[..., Host]) -> None:
    nats = make_nats(1)
    a = make_host(nats, "a")
    ann = a.client()
    ann.say("/nick Ann")
    ann.wait_line(r"\*\*\* You are now known as Ann")
    ann.say("/join #dev")
    ann.wait_line(r"\*\*\* You joined #dev; .*")
    for i in range(5):
        ann.say(f"dev line {i}")
    watcher = a.client()
    ann.say("/join #lobby")  # talk in the lobby again: the watcher sees it, so it has gone through
    ann.say("lobby line")
    watcher.wait_line(r"Ann: lobby line")
    time.sleep(11)  # a snapshot is written every 10 s of stream time: the late host starts from one
    b = make_host(nats, "b")
    bob = b.client()
    bob.say("/who")
    bob.wait_line(r"\*\*\* 3 users online: .*Ann.*")
    bob.say("/join #dev")
    bob.wait_line(r"\*\*\* You joined #dev; 2 users here: Ann, \S+")
    for i in range(5):
        bob.wait_line(rf"\[\d\d:\d\d\] Ann: dev line {i}")
    ann.wait_line(rf"\*\*\* {bob.nick} joined #dev")
    bob.say("hi from b")
    ann.wait_line(rf"#dev {bob.nick}: hi from b")


# -- hosts that die ------------------------------------------------------------------------------

def test_a_killed_host_has_its_users_leave_everywhere_else_within_10_s(
        make_nats: Callable[..., NatsCluster], make_host: Callable[..., Host]) -> None:
    nats = make_nats(3)
    a, b, c = make_host(nats, "a"), make_host(nats, "b"), make_host(nats, "c")
    victims = [b.client() for _ in range(3)]
    for v, name in zip(victims, ("Vic0", "Vic1", "Vic2"), strict=True):
        v.say(f"/nick {name}")
        v.wait_line(rf"\*\*\* You are now known as {name}")
    on_a, on_c = a.client(), c.client()
    on_a.say("/who")
    on_a.wait_line(r"\*\*\* 5 users online: .*")
    b.kill9()
    killed = time.monotonic()
    for o in (on_a, on_c):
        for name in ("Vic0", "Vic1", "Vic2"):
            o.wait_line(rf"\*\*\* {name} left \(connection lost\)", timeout=15)
    took = time.monotonic() - killed
    assert took < 10, f"the users of the killed host left after {took:.1f} s"
    sys.stderr.write(f"\nkill -9 of a whole host: its users left elsewhere after {took:.1f} s\n")
    on_a.say("/nick Vic1")  # the name is free again
    on_a.wait_line(r"\*\*\* You are now known as Vic1")
    on_c.say("/who")
    on_c.wait_line(r"\*\*\* 2 users online: \S+, Vic1|\*\*\* 2 users online: Vic1, \S+")


def test_a_host_stopped_gracefully_lets_its_users_go_at_once(
        make_nats: Callable[..., NatsCluster], make_host: Callable[..., Host]) -> None:
    nats = make_nats(1)
    a, b = make_host(nats, "a"), make_host(nats, "b")
    bob, ann = b.client(), a.client()
    ann.wait_line(rf"\*\*\* {bob.nick} joined|\S+")
    ann.say("/who")
    ann.wait_line(r"\*\*\* 2 users online: .*")
    b.stop()
    ann.wait_line(rf"\*\*\* {bob.nick} left( \(.*\))?", timeout=8)


def test_a_killed_bus_process_is_replaced_and_the_host_keeps_its_users(
        make_nats: Callable[..., NatsCluster], make_host: Callable[..., Host]) -> None:
    import os
    import signal

    nats = make_nats(1)
    a, b = make_host(nats, "a"), make_host(nats, "b")
    bob, ann = b.client(), a.client()
    bob.say("/nick Bob")
    bob.wait_line(r"\*\*\* You are now known as Bob")
    ann.wait_line(r"\*\*\* \S+ is now known as Bob")
    old = b.broker_pid()
    os.kill(old, signal.SIGKILL)
    wait_for(lambda: b.broker_pid() not in (0, old), 20, "a new bus process on host b")
    bob.say("after the restart")
    ann.wait_line(r"Bob: after the restart", timeout=20)
    ann.say("/who")
    ann.wait_line(r"\*\*\* 2 users online: \S+, Bob|\*\*\* 2 users online: Bob, \S+")
    assert not any("Bob left" in x for x in ann.lines), ann.lines


# -- NATS trouble --------------------------------------------------------------------------------

def test_nats_unreachable_at_start_is_one_line_naming_the_url() -> None:
    url = f"nats://127.0.0.1:{free_port()}"
    p = start_refused("--nats-servers", url, "--port", str(free_port()), "--host", "127.0.0.1",
                      "--runtime-dir", f"/tmp/cc-refused-{free_port()}")
    assert p.returncode == 1
    assert p.stderr.count("\n") == 1, p.stderr
    assert url in p.stderr and "connection refused" in p.stderr, p.stderr


def test_kill9_of_the_stream_leader_under_chat_loses_and_doubles_nothing(
        make_nats: Callable[..., NatsCluster], make_host: Callable[..., Host]) -> None:
    nats = make_nats(3)
    a, b = make_host(nats, "a"), make_host(nats, "b")
    clients = [a.client(), b.client(), a.client(), b.client()]
    for c in clients:
        c.say("/who")
        c.wait_line(r"\*\*\* 4 users online: .*")
    n = 60
    killed: list[float] = []

    def talk(c: Client) -> None:
        for i in range(n):
            if i == n // 3 and c is clients[0]:
                nats.stream_leader(STREAM).kill()
                killed.append(time.monotonic())
            c.say(f"m {c.nick} {i}")
            time.sleep(0.03)

    threads = [threading.Thread(target=talk, args=(c,)) for c in clients]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    views = wait_all_lines(clients, n * len(clients), n, timeout=90)
    for c in clients:
        assert len(views[c.nick]) == n * (len(clients) - 1)
    assert_one_order(views)
    sys.stderr.write(f"\nstream leader kill -9 under chat: every line once, one order "
                     f"(leader killed {killed[0] - time.monotonic():.1f} s ago)\n")
