"""Several chatcluster hosts sharing one conversation over a real NATS JetStream cluster.

Every test starts real nats-server processes (tests/nats_support.py) and real
chatcluster hosts (separate supervisors, ports and runtime directories), and
talks to them with real sockets. The hosts' clients must see one order,
unique nicknames and the same rooms whatever host they are on, and the
faults (a NATS node killed, a whole host killed, NATS lost) must look to them
as docs/multihost.md says.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

pytest.importorskip("nats", reason="nats-py is not installed (pip install 'chatcluster[nats]')")

from conftest import REPO, Client, free_port, start_refused, wait_for  # noqa: E402
from multihost_support import Host, assert_one_order, chat_lines, hosts_for  # noqa: E402
from nats_support import NatsCluster, clusters_for, nats_server_binary  # noqa: E402

_binary, _why = nats_server_binary()
pytestmark = [pytest.mark.skipif(_binary is None, reason=_why), pytest.mark.slow, pytest.mark.timeout(240)]

STREAM = "CHATCLUSTER_main"


@pytest.fixture
def make_nats(request: pytest.FixtureRequest) -> Iterator[Callable[..., NatsCluster]]:
    yield from clusters_for(request, 3)


@pytest.fixture
def make_host(request: pytest.FixtureRequest) -> Iterator[Callable[..., Host]]:
    yield from hosts_for(request)


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
    ann.say("/join #lobby")
    ann.say("after ops")  # one order: the lobby line comes after everything said in #ops
    cy.wait_line(r"Ann: after ops")
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
    # A snapshot is written every 10 s of stream time: the late host must start from one taken
    # after every line above (multihost.json is rewritten every second).
    asked = time.time()
    now = wait_for(lambda: (m := a.multihost()) is not None and m["updated"] > asked and m, 15,
                   "host a's status written after the lobby line")
    assert isinstance(now, dict)
    wait_for(lambda: (a.multihost() or {}).get("snapshot_seq", 0) >= now["applied_seq"], 30,
             "a snapshot taken after the lobby line")
    b = make_host(nats, "b")
    bob = b.client()
    bob.say("/who")
    bob.wait_line(r"\*\*\* 3 users online: .*Ann.*")
    bob.say("/join #dev")
    them = f"(Ann, {re.escape(bob.nick)}|{re.escape(bob.nick)}, Ann)"  # sorted: a guest name may come first
    bob.wait_line(rf"\*\*\* You joined #dev; 2 users here: {them}")
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


def test_a_killed_host_started_again_under_its_name_rejoins_afresh(
        make_nats: Callable[..., NatsCluster], make_host: Callable[..., Host]) -> None:
    nats = make_nats(1)
    a, b = make_host(nats, "a"), make_host(nats, "b")
    ann, old = a.client(), b.client()
    old.say("/join #dev")
    old.wait_line(r"\*\*\* You joined #dev; .*")
    ann.say("/join #dev")
    ann.wait_line(r"\*\*\* You joined #dev; 2 users here: .*")
    for i in range(5):
        old.say(f"before {i}")
    ann.wait_line(rf"{re.escape(old.nick)}: before 4")
    b.kill9()
    ann.wait_line(rf"\*\*\* {re.escape(old.nick)} left \(connection lost\)", timeout=15)
    b2 = make_host(nats, "b")  # the same node name, the same worker names, numbering from 1 again
    new = b2.client()
    new.say("/join #dev")
    new.wait_line(r"\*\*\* You joined #dev; 2 users here: .*")
    new.say("after the restart")
    ann.wait_line(rf"{re.escape(new.nick)}: after the restart")
    new.wait_line(rf"\[\d\d:\d\d\] {re.escape(old.nick)}: before 4")  # the history, from the stream
    assert not any("may have been lost" in x for x in ann.lines), ann.lines


def test_a_host_stopped_gracefully_lets_its_users_go_at_once(
        make_nats: Callable[..., NatsCluster], make_host: Callable[..., Host]) -> None:
    nats = make_nats(1)
    a, b = make_host(nats, "a"), make_host(nats, "b")
    bob, ann = b.client(), a.client()
    ann.say("/who")
    ann.wait_line(r"\*\*\* 2 users online: .*")
    import signal

    b.signal(signal.SIGTERM)  # as `chatcluster stop` does: the supervisor stops the workers, then the bus
    ann.wait_line(rf"\*\*\* {bob.nick} left \(server shutting down\)", timeout=8)
    assert b.wait_exit() == 0


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
    watcher = b.timed_client()
    for c in [*clients, watcher]:
        c.say("/who")
        c.wait_line(r"\*\*\* 5 users online: .*")
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
    watcher.wait(lambda lines: len(chat_lines(lines)) >= n * len(clients), 30, "every line at the watcher")
    views[watcher.nick] = chat_lines(watcher.lines)
    for c in clients:
        assert len(views[c.nick]) == n * (len(clients) - 1)
    assert len(views[watcher.nick]) == n * len(clients)
    assert_one_order(views)
    stall = watcher.longest_pause(killed[0], r"\S+: m \S+ \d+")
    sys.stderr.write(f"\nstream leader kill -9 under chat: every line once, one order; the chat stalled "
                     f"{stall:.1f} s\n")


def test_nats_lost_at_run_time_is_told_once_and_the_held_lines_arrive_when_it_is_back(
        make_nats: Callable[..., NatsCluster], make_host: Callable[..., Host]) -> None:
    nats = make_nats(1)
    a, b = make_host(nats, "a"), make_host(nats, "b")
    ann, bob = a.client(), b.client()
    ann.say("/nick Ann")
    bob.wait_line(r"\*\*\* \S+ is now known as Ann")
    nats.nodes[0].kill()
    down = r"\*\*\* Notice: the link to the other servers is down; .*"
    for c in (ann, bob):
        c.wait_line(down, timeout=15)
    for i in range(3):
        ann.say(f"held {i}")
    # The lines are held at host a's bridge (its outbox), where no other host can see them.
    asked = time.time()
    wait_for(lambda: (m := a.multihost()) is not None and m["updated"] > asked + 0.5 and m["outbox"] > 0, 15,
             "the held lines in host a's outbox")
    bob.drain_for_quiet()
    assert not any(x.startswith("Ann: held") for x in bob.lines), "a line was shown before it was in the stream"
    nats.nodes[0].start()
    nats.wait_ready()
    for i in range(3):
        bob.wait_line(rf"Ann: held {i}", timeout=30)
    for c in (ann, bob):
        c.wait_line(r"\*\*\* Notice: the link to the other servers is back", timeout=15)
        assert sum(1 for x in c.lines if re.fullmatch(down, x)) == 1, "told more than once"
    bob.say("after")
    ann.wait_line(rf"{re.escape(bob.nick)}: after")


def test_lines_held_longer_than_nats_hold_seconds_are_dropped_and_their_sender_told(
        make_nats: Callable[..., NatsCluster], make_host: Callable[..., Host]) -> None:
    nats = make_nats(1)
    a = make_host(nats, "a", extra=("--nats-hold-seconds", "2"))
    b = make_host(nats, "b")
    ann, bob = a.client(), b.client()
    ann.say("/nick Ann")
    bob.wait_line(r"\*\*\* \S+ is now known as Ann")
    nats.nodes[0].kill()
    ann.wait_line(r"\*\*\* Notice: the link to the other servers is down; .*", timeout=15)
    for i in range(5):
        ann.say(f"late {i}")
    said = time.time()
    ann.wait_line(r"\*\*\* Notice: your last lines could not be delivered: .*", timeout=15)
    # Before NATS is back, every line has been held longer than 2 s and looked at again (each
    # failed publish attempt, at most 2 s apart, hands back what is too old): all were given up.
    wait_for(lambda: (m := a.multihost()) is not None and m["updated"] > said + 2 + 2.5 and m["handed_back"] > 0,
             15, "host a's bridge to have given up every held line")
    nats.nodes[0].start()
    nats.wait_ready()
    ann.wait_line(r"\*\*\* Notice: the link to the other servers is back", timeout=30)
    ann.say("/nick Ann2")  # goes through the stream after everything held: when it is back, so is the rest
    bob.wait_line(r"\*\*\* Ann is now known as Ann2", timeout=30)
    got = [x for x in bob.lines if x.startswith("Ann: late")]
    assert got == [], "lines were delivered, though their sender was told they were not"


def test_the_nats_node_a_host_is_connected_to_restarted_loses_nothing(
        make_nats: Callable[..., NatsCluster], make_host: Callable[..., Host]) -> None:
    nats = make_nats(3)
    a = make_host(nats, "a", urls=[nats.urls[0], nats.urls[1], nats.urls[2]])
    b = make_host(nats, "b", urls=[nats.urls[1], nats.urls[2], nats.urls[0]])
    clients = [a.client(), b.client()]
    for c in clients:
        c.say("/who")
        c.wait_line(r"\*\*\* 2 users online: .*")
    st = wait_for(lambda: (a.multihost() or {}).get("url"), 15, "host a's NATS connection in multihost.json")
    node = next(n for n in nats.nodes if f":{n.client_port}" in str(st))
    n = 40
    def talk(c: Client) -> None:
        for i in range(n):
            if i == 10 and c is clients[0]:
                nats.restart(node)
            c.say(f"m {c.nick} {i}")
            time.sleep(0.02)

    threads = [threading.Thread(target=talk, args=(c,)) for c in clients]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    views = wait_all_lines(clients, n * 2, n, timeout=90)
    for c in clients:
        assert len(views[c.nick]) == n
    assert_one_order(views)


@pytest.mark.timeout(240)
def test_an_upgrade_of_one_host_keeps_its_users_and_the_chat_across_hosts(
        make_nats: Callable[..., NatsCluster], make_host: Callable[..., Host]) -> None:
    from test_upgrade import upgraded

    nats = make_nats(1)
    a, b = make_host(nats, "a"), make_host(nats, "b")
    clients = [a.client(), a.client(), b.client(), b.client()]
    ann = clients[0]
    ann.say("/join #dev")
    ann.wait_line(r"\*\*\* You joined #dev; 1 user here: \S+")
    ann.say("/join #lobby")  # a member of #dev, talking in the lobby again
    for c in clients[1:]:
        c.say("/who")
        c.wait_line(r"\*\*\* 4 users online: .*")
    old = set(a.worker_pids())
    n = 30
    upgrading = threading.Event()

    def talk(c: Client) -> None:
        for i in range(n):
            if i == 5 and c is ann:
                upgrading.set()
            c.say(f"m {c.nick} {i}")
            time.sleep(0.05)  # pacing: the lines are spread over the upgrade

    threads = [threading.Thread(target=talk, args=(c,)) for c in clients]
    for t in threads:
        t.start()
    upgrading.wait(30)
    out = upgraded(a)
    for t in threads:
        t.join()
    assert "upgraded" in out and re.search(r"\b2 clients kept", out), out
    assert not (set(a.worker_pids()) & old), "the upgrade replaced every worker of host a"
    views = wait_all_lines(clients, n * len(clients), n, timeout=90)
    for c in clients:
        assert len(views[c.nick]) == n * (len(clients) - 1), c.nick
        assert not c.closed
    assert_one_order(views)
    # The rooms of the upgraded host's users are still known everywhere.
    clients[2].say("/who #dev")
    clients[2].wait_line(rf"\*\*\* 1 user in #dev: {re.escape(ann.nick)}")


# -- TLS and authentication ----------------------------------------------------------------------

def test_hosts_talk_over_tls_with_a_password_and_a_host_without_credentials_is_refused(
        make_nats: Callable[..., NatsCluster], make_host: Callable[..., Host]) -> None:
    nats = make_nats(3, tls_auth=True)
    auth = nats.auth
    assert auth is not None
    a, b = make_host(nats, "a"), make_host(nats, "b")
    ann, bob = a.client(), b.client()
    ann.say("over tls")
    bob.wait_line(rf"{re.escape(ann.nick)}: over tls")
    st = wait_for(lambda: (a.multihost() or {}).get("url"), 15, "host a's NATS connection")
    assert str(st).startswith("tls://"), st
    base = ("--nats-servers", ",".join(nats.urls), "--port", str(free_port()), "--host", "127.0.0.1",
            "--node-name", "c", "--nats-replicas", "3")
    tls = ("--nats-ca-file", auth.ca, "--nats-cert-file", auth.client_cert, "--nats-key-file", auth.client_key)
    p = start_refused(*base, *tls, "--runtime-dir", f"/tmp/cc-refused-{free_port()}")
    assert p.returncode == 1 and p.stderr.count("\n") == 1, p.stderr
    assert "credentials refused (authorization violation)" in p.stderr and nats.urls[0] in p.stderr, p.stderr
    wrong = a.runtime_dir + "-wrong-password"
    with open(wrong, "w") as fh:
        fh.write("not the password\n")
    p = start_refused(*base, *tls, "--nats-user", auth.user, "--nats-password-file", wrong,
                      "--runtime-dir", f"/tmp/cc-refused-{free_port()}")
    assert p.returncode == 1 and "authorization violation" in p.stderr, p.stderr
    # A password given on the command line is not even a setting: only the file is.
    p = start_refused(*base, "--nats-password", "secret", "--runtime-dir", f"/tmp/cc-refused-{free_port()}")
    assert p.returncode != 0 and "--nats-password" in p.stderr


def test_hosts_with_an_nkey_seed_file_talk_and_a_host_without_one_is_refused(
        make_nats: Callable[..., NatsCluster], make_host: Callable[..., Host], tmp_path: Path) -> None:
    nkeys = pytest.importorskip("nkeys", reason="nats_nkey_seed_file needs the nkeys package")
    seed = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)
    public = nkeys.from_seed(bytearray(seed)).public_key.decode()
    seed_file = tmp_path / "host.nk"
    seed_file.write_bytes(seed + b"\n")
    seed_file.chmod(0o600)
    nats = make_nats(1, nkey_users=(public,))
    signed = ("--nats-nkey-seed-file", str(seed_file))
    a, b = make_host(nats, "a", extra=signed), make_host(nats, "b", extra=signed)
    ann, bob = a.client(), b.client()
    ann.say("signed with an nkey")
    bob.wait_line(rf"{re.escape(ann.nick)}: signed with an nkey")
    base = ("--nats-servers", nats.urls[0], "--port", str(free_port()), "--host", "127.0.0.1", "--node-name", "c",
            "--nats-replicas", "1")
    p = start_refused(*base, "--runtime-dir", str(tmp_path / "refused"))
    assert p.returncode == 1 and p.stderr.count("\n") == 1, p.stderr
    assert "authorization violation" in p.stderr and nats.urls[0] in p.stderr, p.stderr
    other = tmp_path / "other.nk"  # a valid seed the server does not know
    other.write_bytes(nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER) + b"\n")
    p = start_refused(*base, "--nats-nkey-seed-file", str(other), "--runtime-dir", str(tmp_path / "refused2"))
    assert p.returncode == 1 and "authorization violation" in p.stderr, p.stderr


# -- status --------------------------------------------------------------------------------------

def test_status_shows_the_nats_link_the_stream_sequence_and_each_hosts_lag(
        make_nats: Callable[..., NatsCluster], make_host: Callable[..., Host]) -> None:
    nats = make_nats(1)
    a, b = make_host(nats, "a"), make_host(nats, "b")
    ann, bob = a.client(), b.client()
    ann.say("hello")
    bob.wait_line(rf"{re.escape(ann.nick)}: hello")

    def both_hosts() -> dict[str, Any] | None:
        st = a.status().get("nats")
        return st if st and {h["node"] for h in st["hosts"]} == {"a", "b"} else None

    st = wait_for(both_hosts, 15, "status --json to list both hosts")
    assert st["state"] == "connected" and st["node"] == "a" and st["stream"] == STREAM
    assert st["stream_last_seq"] >= st["applied_seq"] > 0
    for h in st["hosts"]:
        assert h["applied_seq"] > 0
    # Host b's bus process stopped (not for the 5 s that would end it): host a sees b fall behind
    # the stream, and catch up once it runs again.
    def lag_of_b() -> int | None:
        m = a.multihost()
        return next((h["lag"] for h in (m or {}).get("hosts", []) if h["node"] == "b"), None)

    b_bus = psutil.Process(b.broker_pid())
    b_bus.suspend()
    try:
        for i in range(5):
            ann.say(f"while b sleeps {i}")
        wait_for(lambda: (lag_of_b() or 0) >= 5, 3.5, "host b's lag, seen from host a, to grow while it is stopped")
    finally:
        b_bus.resume()
    bob.wait_line(rf"{re.escape(ann.nick)}: while b sleeps 4")
    wait_for(lambda: (lag := lag_of_b()) is not None and lag < 5, 15, "host b to catch up")
    out = subprocess.run([sys.executable, "-m", "chatcluster", "status", "--runtime-dir", a.runtime_dir,
                          "--port", str(a.port)], capture_output=True, text=True, timeout=60, cwd=REPO)
    text = out.stdout
    assert re.search(r"NATS: connected to nats://127\.0\.0\.1:\d+, stream CHATCLUSTER_main at \d+", text), text
    assert re.search(r"host a \(this one\): applied \d+, lag \d+", text), text
    assert re.search(r"host b: applied \d+, lag \d+", text), text


def test_metrics_show_the_nats_link_the_stream_and_each_hosts_lag(
        make_nats: Callable[..., NatsCluster], make_host: Callable[..., Host]) -> None:
    from test_metrics import Scrape, fetch

    nats = make_nats(1)
    mport = free_port()
    a = make_host(nats, "a", extra=("--metrics-listen", f"127.0.0.1:{mport}"))
    b = make_host(nats, "b")
    ann, bob = a.client(), b.client()
    ann.say("measured")
    bob.wait_line(rf"{re.escape(ann.nick)}: measured")

    def scraped(cond: Callable[[Scrape], bool], what: str) -> Scrape:
        def ok() -> Scrape | None:
            try:
                status, text = fetch(mport)
            except OSError:
                return None
            s = Scrape(text) if status == 200 else None
            return s if s is not None and cond(s) else None
        got = wait_for(ok, 15, what)
        assert isinstance(got, Scrape)
        return got

    s = scraped(lambda s: s.sum("chatcluster_hosts_up") == 2, "both hosts up on /metrics")
    assert s.sum("chatcluster_nats_connection_state", state="connected") == 1
    assert s.sum("chatcluster_nats_connection_state") == 1  # one state at a time
    applied = {ls["host"]: v for n, ls, v in s.samples if n == "chatcluster_stream_applied_sequence"}
    assert set(applied) == {"a", "b"} and min(applied.values()) > 0
    assert s.sum("chatcluster_stream_last_sequence") >= max(applied.values())
    assert s.types["chatcluster_stream_publish_retries"] == "counter"
    # NATS gone: the state moves, the held line waits in the outbox.
    nats.nodes[0].kill()
    ann.wait_line(r"\*\*\* Notice: the link to the other servers is down; .*", timeout=15)
    ann.say("held")
    s = scraped(lambda s: s.sum("chatcluster_nats_connection_state", state="connected") == 0
                and s.sum("chatcluster_stream_outbox_batches") > 0, "the link down and a batch held on /metrics")
    assert s.sum("chatcluster_nats_connection_state") == 1
    if shutil.which("promtool"):
        check = subprocess.run(["promtool", "check", "metrics"], input=s.text, text=True, capture_output=True,
                               timeout=30)
        assert check.returncode == 0 and not check.stdout.strip(), check
    nats.nodes[0].start()
    nats.wait_ready()
    bob.wait_line(rf"{re.escape(ann.nick)}: held", timeout=30)
    scraped(lambda s: s.sum("chatcluster_nats_connection_state", state="connected") == 1
            and s.sum("chatcluster_stream_outbox_batches") == 0, "the link back and nothing held")


# -- hosts with addresses of their own -----------------------------------------------------------

def test_hosts_in_their_own_network_namespaces_and_a_host_cut_off_and_back(
        make_nats: Callable[..., NatsCluster], make_host: Callable[..., Host]) -> None:
    from netns_support import TestLan, netns_available

    ok, why = netns_available()
    if not ok:
        pytest.skip(why)
    with TestLan() as lan:
        nats_ns, ns_a, ns_b = lan.add(), lan.add(), lan.add()
        nats = make_nats(1, netns=[nats_ns])
        a = make_host(nats, "a", netns=ns_a)
        b = make_host(nats, "b", netns=ns_b)
        try:
            ann, bob, bea = a.client(), b.client(), b.client()
            for c, name in ((ann, "Ann"), (bob, "Bob"), (bea, "Bea")):
                c.say(f"/nick {name}")
                c.wait_line(rf"\*\*\* You are now known as {name}")
            ann.say("/who")
            ann.wait_line(r"\*\*\* 3 users online: Ann, Bea, Bob")
            bob.say(f"hello from {ns_b.addr}")
            ann.wait_line(rf"Bob: hello from {re.escape(ns_b.addr)}")
            # NATS saw each host come from its own address.
            ips = {x.get("ip") for x in (nats.nodes[0].monitor("/connz") or {}).get("connections", [])}
            assert {ns_a.addr, ns_b.addr} <= ips, ips
            lan.cut(ns_b)
            cut = time.monotonic()
            for name in ("Bob", "Bea"):
                ann.wait_line(rf"\*\*\* {name} left \(connection lost\)", timeout=15)
            took = time.monotonic() - cut
            assert took < 10, f"the cut-off host's users left after {took:.1f} s"
            bob.wait_line(r"\*\*\* Notice: the link to the other servers is down; .*", timeout=20)
            ann.say("/nick Bob")  # the name is free while its holder is cut off
            ann.wait_line(r"\*\*\* You are now known as Bob")
            lan.mend(ns_b)
            # Back: the host rejoins afresh; Bea gets her name back, Bob's went to Ann meanwhile.
            bob.wait_line(r"\*\*\* Notice: the link to the other servers is back", timeout=30)
            bob.wait_line(r"\*\*\* Notice: your nickname was taken while the server recovered; you are now "
                          r"known as (\S+)", timeout=30)

            ann.wait_line(r"\*\*\* Bea joined", timeout=30)  # host b's users are announced again
            asked = len(ann.lines)
            ann.say("/who")
            ann.wait(lambda lines: any(re.fullmatch(r"\*\*\* 3 users online: .*Bea.*", x) for x in lines[asked:]),
                     15, "Bea back in /who")
            bea.say("back again")
            ann.wait_line(r"Bea: back again", timeout=15)
            sys.stderr.write(f"\na host cut off from the network: its users left elsewhere after {took:.1f} s\n")
        finally:
            for h in (a, b):
                h.stop()
            nats.stop()


def test_two_hosts_under_one_node_name_are_told_to_choose_their_own(
        make_nats: Callable[..., NatsCluster], make_host: Callable[..., Host]) -> None:
    nats = make_nats(1)
    first = make_host(nats, "same")
    second = make_host(nats, "same", start=False)
    second.start(wait=False)
    said = "another host publishes under this host's node_name 'same'; give each host a node_name of its own"
    told = wait_for(lambda: next((h for h in (first, second) if said in h.read_log()), None), 30,
                    "the complaint about the node name")
    assert isinstance(told, Host)
    # The host told stops, instead of a new bus process taking the name back for ever.
    assert told.wait_exit(30) == 1
    assert "a new one would fail the same way" in told.read_log()
    other = second if told is first else first
    other.wait_ready()
    c = other.client()
    c.say("/who")
    c.wait_line(r"\*\*\* 1 user online: \S+")
    assert said not in other.read_log()
