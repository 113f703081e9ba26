"""End to end: one set of nicknames for the whole cluster, through worker and broker failures.

Names are unique across every worker, case-insensitively, and a race for one
name has exactly one winner everywhere. /who lists every user of every worker.
A worker killed with SIGKILL takes only its own users with it; a worker that
starts later knows everyone before its first client. A broker killed with
SIGKILL is replaced, the roster is rebuilt and chat goes on, and a client that
could have missed something is told so instead of silently missing lines.
Times are measured and printed (run with -s to see them); the assertions only
use bounds with ample headroom, because the product's "within 2 s" must not
turn into a flaky test on a loaded machine.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable

import pytest
import zmq
from chat_support import (
    LOST,
    announced,
    broker_pid,
    new_broker,
    numbers_from,
    send_numbered,
    wait_numbers,
    wait_who,
    who,
)
from conftest import REPO, Client, Cluster, wait_for

from chatcluster import bus, wire
from chatcluster import events as E

FAST = ("--flood-rate", "0")
HEADROOM = 10.0  # seconds: an assertion bound, far above the 2 s the product promises


def named(cl: Cluster, clients: list[Client], prefix: str) -> list[Client]:
    for k, c in enumerate(clients):
        c.say(f"/nick {prefix}{k}")
        c.wait_line(rf"\*\*\* You are now known as {prefix}{k}")
        c.nick = f"{prefix}{k}"
    return clients


# -- unique names --------------------------------------------------------------------------------


def test_a_nick_held_on_another_worker_is_refused_in_any_case(make_cluster: Callable[..., Cluster]) -> None:
    cl = make_cluster(4)
    a, b, watcher = cl.clients_on_distinct_workers(3)
    a.say("/nick Holder")
    a.wait_line(r"\*\*\* You are now known as Holder")
    watcher.wait_line(r"\*\*\* \S+ is now known as Holder")
    for attempt in ("Holder", "holder", "HOLDER", "hOlDeR"):
        b.say(f"/nick {attempt}")
        b.wait_line(rf"\*\*\* Error: nickname {attempt} is already taken")
    b.say("still the old name")
    watcher.wait_line(rf"{b.nick}: still the old name")
    assert sorted(who(watcher), key=str.lower) == sorted([b.nick, "Holder", watcher.nick], key=str.lower)


def test_own_nick_in_another_case_is_allowed(make_cluster: Callable[..., Cluster]) -> None:
    cl = make_cluster(2)
    a, b = cl.clients_on_distinct_workers(2)
    a.say("/nick bob")
    a.wait_line(r"\*\*\* You are now known as bob")
    a.say("/nick Bob")
    a.wait_line(r"\*\*\* You are now known as Bob")
    b.wait_line(r"\*\*\* bob is now known as Bob")


def test_a_freed_nick_can_be_taken_on_another_worker(make_cluster: Callable[..., Cluster]) -> None:
    cl = make_cluster(4)
    a, b = cl.clients_on_distinct_workers(2)
    a.say("/nick Passed")
    a.wait_line(r"\*\*\* You are now known as Passed")
    a.say("/quit")
    b.wait_line(r"\*\*\* Passed left")
    b.say("/nick passed")
    b.wait_line(r"\*\*\* You are now known as passed")


def test_random_nicks_are_unique_across_the_cluster(make_cluster: Callable[..., Cluster]) -> None:
    cl = make_cluster(4)
    clients = [cl.client() for _ in range(60)]
    nicks = [c.nick.lower() for c in clients]
    assert len(set(nicks)) == len(nicks)
    assert len({cl.worker_of(c) for c in clients}) == 4


def test_simultaneous_claims_of_a_name_have_exactly_one_winner(make_cluster: Callable[..., Cluster]) -> None:
    cl = make_cluster(4)
    a, b, watcher = cl.clients_on_distinct_workers(3)
    wins = {"a": 0, "b": 0}
    gate = threading.Barrier(2)

    def claim(c: Client, name: str) -> None:
        gate.wait()
        c.say(f"/nick {name}")

    for rnd in range(30):
        name = f"Prize{rnd}"
        threads = [threading.Thread(target=claim, args=(a, name)),
                   threading.Thread(target=claim, args=(b, name.upper()))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        outcome = {}
        for key, c, asked in (("a", a, name), ("b", b, name.upper())):
            m = c.wait_line(rf"\*\*\* (You are now known as {asked}|Error: nickname {asked} is already taken)")
            outcome[key] = m.group(1).startswith("You")
            c.lines.clear()  # each round starts afresh
        assert sorted(outcome.values()) == [False, True], f"round {rnd}: {outcome}"
        winner = "a" if outcome["a"] else "b"
        wins[winner] += 1
        (a if outcome["a"] else b).nick = name if outcome["a"] else name.upper()
        watcher.wait_line(rf"\*\*\* \S+ is now known as (?i:{name})")
        assert sum(bool(re.fullmatch(rf"\*\*\* \S+ is now known as (?i:{name})", x)) for x in watcher.lines) == 1
        watcher.lines.clear()
        # Every worker agrees on who holds it.
        if rnd % 10 == 9:
            lists = [who(c) for c in (a, b, watcher)]
            assert lists[0] == lists[1] == lists[2]
            assert sum(n.lower() == name.lower() for n in lists[0]) == 1
    print(f"\nname race: client a won {wins['a']} rounds, client b {wins['b']}")


# -- who and whois -------------------------------------------------------------------------------


def test_who_lists_every_user_of_every_worker_sorted(make_cluster: Callable[..., Cluster]) -> None:
    cl = make_cluster(4)
    clients = cl.clients_on_distinct_workers(4)
    for c, name in zip(clients, ["delta", "Alpha", "charlie", "Bravo"], strict=True):
        c.say(f"/nick {name}")
        c.wait_line(rf"\*\*\* You are now known as {name}")
    extra = cl.client()
    for c in clients:
        wait_who(c, ["Alpha", "Bravo", "charlie", "delta", extra.nick])
    m = re.fullmatch(r"\*\*\* 5 users online: (.*)", next(x for x in reversed(clients[0].lines) if "online" in x))
    assert m
    extra.say("/quit")
    for c in clients:
        wait_who(c, ["Alpha", "Bravo", "charlie", "delta"])


def test_whois_names_the_worker_and_the_time(make_cluster: Callable[..., Cluster]) -> None:
    cl = make_cluster(2)
    a, b = cl.clients_on_distinct_workers(2)
    a.say("/nick Known")
    a.wait_line(r"\*\*\* You are now known as Known")
    # b's worker applies the rename when it reaches b's worker through the bus, not when a hears of it.
    b.wait_line(rf"\*\*\* {a.nick} is now known as Known")
    b.say("/whois known")
    m = b.wait_line(r"\*\*\* Known is on worker (w\d+), connected since (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d) UTC "
                    r"\((\d+)s ago\)")
    assert int(m.group(3)) < 60
    stamp = time.strptime(m.group(2), "%Y-%m-%d %H:%M:%S")
    assert abs(time.mktime(stamp) - time.mktime(time.gmtime())) < 120
    b.say("/whois Nobody")
    b.wait_line(r"\*\*\* Error: no such nickname Nobody")


# -- a worker dies -------------------------------------------------------------------------------


def test_a_killed_workers_users_leave_and_nobody_else_loses_a_line(make_cluster: Callable[..., Cluster]) -> None:
    cl = make_cluster(4, extra=FAST)
    announced(cl)
    talker, listener, *_ = clients = named(cl, cl.clients_on_distinct_workers(4), "Keep")
    victim_pid = cl.worker_of(clients[3])
    doomed = [clients[3]]
    for _ in range(40):  # a second user on the same worker
        c = cl.client()
        if cl.worker_of(c) == victim_pid:
            doomed.append(c)
            break
        c.say("/quit")
    assert len(doomed) == 2, "no second client landed on the doomed worker"
    doomed[1].say("/nick Doomed1")
    doomed[1].wait_line(r"\*\*\* You are now known as Doomed1")
    doomed[1].nick = "Doomed1"
    survivors = clients[:3]
    send_numbered(talker, "t", range(0, 200))
    os.kill(victim_pid, signal.SIGKILL)
    killed = time.monotonic()
    send_numbered(talker, "t", range(200, 400))
    for c in survivors[1:]:
        for d in doomed:
            c.wait_line(rf"\*\*\* {d.nick} left \(connection lost\)")
    elapsed = time.monotonic() - killed
    print(f"\nusers of the killed worker announced gone after {elapsed:.2f} s")
    assert elapsed < HEADROOM
    for c in survivors:
        wait_who(c, [s.nick for s in survivors])
    for c in survivors[1:]:
        wait_numbers(c, talker.nick, "t", 399)
        assert numbers_from(c, talker.nick, "t") == list(range(400))
        assert LOST not in c.lines
    listener.say("/nick doomed1")  # the dead user's name is free again
    listener.wait_line(r"\*\*\* You are now known as doomed1")


def probe(cl: Cluster) -> Client | None:
    """A new connection that asks /who at once (answered right after its welcome)."""
    try:
        c = Client(cl.port)
        cl.clients.append(c)
        c.say("/who")
    except OSError:
        return None  # it hit the listener of a worker that was just killed
    return c


@pytest.mark.parametrize("how", ["respawned", "added"])
def test_a_new_worker_knows_the_roster_before_its_first_client(make_cluster: Callable[..., Cluster], how: str) -> None:
    cl = make_cluster(3)
    announced(cl)
    base = named(cl, [cl.client() for _ in range(12)], "Base")
    base_names = {c.nick for c in base}
    gone: set[str] = set()
    before = set(cl.worker_pids())
    if how == "respawned":
        victim = cl.worker_of(base[0])
        gone = {c.nick for c in base if cl.worker_of(c) == victim}
        base_names -= gone
        os.kill(victim, signal.SIGKILL)
    else:
        cl.signal(signal.SIGTTIN)
    # Keep connecting while the new worker starts, so that its very first clients are among
    # these: they must already see everyone, and see nobody who is gone.
    probes: list[Client] = []
    ready_at: float | None = None
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and len(probes) < 300:
        c = probe(cl)
        if c is not None:
            probes.append(c)
        if ready_at is None and set(cl.worker_pids()) - before:
            ready_at = time.monotonic()
        if ready_at is not None and time.monotonic() - ready_at > 1.0:
            break
        time.sleep(0.02)  # pacing the connection attempts, not waiting for an event
    fresh = set(cl.worker_pids()) - before
    assert len(fresh) == 1, f"no {how} worker became ready"
    fresh_pid = fresh.pop()
    checked = 0
    for c in probes:
        c.wait(lambda lines: lines or c.closed, what="a welcome or a close")  # noqa: B023
        if c.closed:
            continue  # it reached the killed worker
        c.welcome()
        if cl.worker_of(c) != fresh_pid:
            continue
        listed = set(c.wait_line(r"\*\*\* \d+ users? online: (.*)").group(1).split(", "))
        assert base_names <= listed, f"partial /who from the new worker: missing {base_names - listed}"
        assert not gone & listed, f"the new worker lists users of the killed one: {gone & listed}"
        assert c.nick.lower() not in {n.lower() for n in base_names}
        checked += 1
    assert checked, "no client reached the new worker"
    print(f"\n{checked} of {len(probes)} probes reached the {how} worker; all saw the whole roster")


# -- the broker dies -----------------------------------------------------------------------------


def kill_broker(cl: Cluster) -> tuple[int, float]:
    pid = broker_pid(cl)
    os.kill(pid, signal.SIGKILL)
    return pid, time.monotonic()


def test_a_killed_broker_is_replaced_and_chat_resumes(make_cluster: Callable[..., Cluster]) -> None:
    cl = make_cluster(4, extra=FAST)
    announced(cl)
    a, b, c, d = named(cl, cl.clients_on_distinct_workers(4), "B")
    workers = sorted(cl.worker_pids())
    old, killed = kill_broker(cl)
    # A probe line every 50 ms from the moment of the kill; the first to arrive ends the outage.
    i = 0
    while not numbers_from(b, a.nick, "probe"):
        assert time.monotonic() - killed < HEADROOM, "chat did not resume"
        a.say(f"probe {i}")
        i += 1
        try:
            b.wait(lambda _: numbers_from(b, a.nick, "probe"), 0.05)
        except AssertionError:
            pass  # not yet: send the next probe
    resumed = time.monotonic() - killed
    new = new_broker(cl, old)
    print(f"\nchat resumed {resumed:.2f} s after the broker was killed (new broker pid {new})")
    wait_numbers(b, a.nick, "probe", i - 1)
    for r in (b, c, d):
        wait_numbers(r, a.nick, "probe", i - 1)
        assert numbers_from(r, a.nick, "probe") == list(range(i)), "a line sent during the outage was lost"
    assert sorted(cl.worker_pids()) == workers, "a worker died with the broker"
    log = cl.read_log()
    assert "crashed" not in log and "Traceback" not in log
    # Every worker found the new broker and resynced with it.
    assert sorted(set(re.findall(r"worker (\d+): bus broker restarted", log))) == ["1", "2", "3", "4"]


def test_the_roster_is_rebuilt_after_a_broker_restart(make_cluster: Callable[..., Cluster]) -> None:
    cl = make_cluster(4)
    announced(cl)
    clients = named(cl, cl.clients_on_distinct_workers(4), "Rost")
    extra = named(cl, [cl.client() for _ in range(4)], "More")
    everyone = [c.nick for c in clients + extra]
    old, killed = kill_broker(cl)
    new_broker(cl, old)
    wait_for(lambda: "roster rebuilt" in cl.read_log(), what="the new broker to rebuild the roster")
    print(f"\nroster rebuilt {time.monotonic() - killed:.2f} s after the broker was killed (upper bound)")
    for c in clients:
        wait_who(c, everyone)
    # Names are still unique cluster-wide, and claims still work.
    clients[0].say("/nick more3")
    clients[0].wait_line(r"\*\*\* Error: nickname more3 is already taken")
    extra[3].say("/quit")
    clients[0].wait_line(r"\*\*\* More3 left")
    clients[0].say("/nick more3")
    clients[0].wait_line(r"\*\*\* You are now known as more3")
    newcomer = cl.client()
    assert newcomer.nick.lower() not in {n.lower() for n in everyone}


def test_a_broker_killed_again_while_the_cluster_resyncs(make_cluster: Callable[..., Cluster]) -> None:
    cl = make_cluster(4, extra=FAST)
    announced(cl)
    clients = named(cl, cl.clients_on_distinct_workers(4), "Twice")
    send_numbered(clients[0], "t", range(50))
    first, _ = kill_broker(cl)
    second = new_broker(cl, first)
    os.kill(second, signal.SIGKILL)  # before, during or just after its resync phase
    send_numbered(clients[0], "t", range(50, 100))
    third = new_broker(cl, second)
    for c in clients[1:]:
        wait_numbers(c, clients[0].nick, "t", 99)
        got = numbers_from(c, clients[0].nick, "t")
        assert got == sorted(set(got))
        assert got == list(range(100)) or LOST in c.lines
    for c in clients:
        wait_who(c, [x.nick for x in clients])
    log = cl.read_log()
    assert "Traceback" not in log and "crashed" not in log
    print(f"\nbrokers {first} -> {second} -> {third}; roster whole, nothing lost silently")


@pytest.mark.timeout(240)
def test_broker_kills_under_load_lose_nothing_silently(make_cluster: Callable[..., Cluster]) -> None:
    """Kill the broker three times while everyone talks: each receiver gets every sender's lines
    once and in order, or is told once per restart that something may be missing; a gap is
    counted and logged; no worker crashes."""
    cl = make_cluster(4, extra=FAST)
    announced(cl)
    clients = named(cl, cl.clients_on_distinct_workers(4), "L")
    workers = sorted(cl.worker_pids())
    sent = 0
    for _round in range(3):
        for k in range(6):
            for c in clients:
                send_numbered(c, "x", range(sent + k * 25, sent + k * 25 + 25))
            if k == 2:
                old, _ = kill_broker(cl)
        sent += 150
        new_broker(cl, old)
        for r in clients:
            for s in clients:
                if s is not r:
                    wait_numbers(r, s.nick, "x", sent - 1, timeout=30)
    log = cl.read_log()
    assert log.count("restarting it") >= 3
    assert sorted(cl.worker_pids()) == workers, "a worker died"
    assert "crashed" not in log and "Traceback" not in log
    gaps = sum(v.gaps for v in cl.stats())
    missing_total = 0
    for r in clients:
        for s in clients:
            if s is r:
                continue
            got = numbers_from(r, s.nick, "x")
            assert got == sorted(set(got)), f"{r.nick} got lines of {s.nick} twice or out of order"
            missing = set(range(sent)) - set(got)
            missing_total += len(missing)
            if missing:
                assert LOST in r.lines, f"{r.nick} silently missed {len(missing)} lines of {s.nick}"
        assert r.lines.count(LOST) <= 3  # at most once per restart
    if missing_total:
        assert gaps > 0 and "gap" in log
    print(f"\n3 broker kills under load: {missing_total} lines missing in total, {gaps} gaps counted")


class FaultyPublisher:
    """Pushes batches into the bus the way a worker does, numbering them with holes on purpose."""

    def __init__(self, cl: Cluster, name: str) -> None:
        self.ctx = zmq.Context()
        self.push = self.ctx.socket(zmq.PUSH)
        self.push.setsockopt(zmq.LINGER, 2000)
        self.push.connect(bus.Endpoints.in_dir(cl.runtime_dir).inbound)
        self.name = name

    def send(self, pseq: int) -> None:
        events: list[E.Event] = [E.Hello(1)] if pseq == 0 else [E.Ping()]
        self.push.send(wire.encode(self.name, pseq, events))

    def close(self) -> None:
        self.push.close()
        self.ctx.term()


def test_a_gap_on_the_bus_is_logged_counted_and_told_once_per_broker(make_cluster: Callable[..., Cluster]) -> None:
    cl = make_cluster(4)
    announced(cl)
    clients = cl.clients_on_distinct_workers(4)
    faulty = FaultyPublisher(cl, "w999")
    try:
        for pseq in (0, 1, 4):  # batches 2 and 3 "never arrived"
            faulty.send(pseq)
        for c in clients:
            c.wait_line(re.escape(LOST))
        wait_for(lambda: sum(v.gaps for v in cl.stats()) == 4, what="one gap counted by each worker")
        assert cl.read_log().count("2 batches from w999 never arrived") == 4
        faulty.send(9)  # another gap in the same broker epoch: counted and logged, not told again
        wait_for(lambda: sum(v.gaps for v in cl.stats()) == 8, what="the second gap counted")
        clients[0].say("after the second gap")
        for c in clients[1:]:
            c.wait_line(rf"{clients[0].nick}: after the second gap")
            assert c.lines.count(LOST) == 1
        old, _ = kill_broker(cl)
        new_broker(cl, old)
        faulty.send(0)  # the new broker admits it after its control batch, as any worker
        faulty.send(12)
        for c in clients:
            c.wait(lambda lines: lines.count(LOST) == 2, what="the notice for the new broker's gap")  # noqa: B023
        wait_for(lambda: sum(v.gaps for v in cl.stats()) == 12, what="the third gap counted")
    finally:
        faulty.close()


@pytest.mark.slow
def test_a_hung_broker_is_killed_and_replaced_and_nothing_is_lost(make_cluster: Callable[..., Cluster]) -> None:
    # SIGSTOP, not a crash: the process is there, it just answers nothing. Its heartbeat in the
    # stats file stops, and after worker_timeout the supervisor treats it as dead.
    cl = make_cluster(2, extra=(*FAST, "--worker-timeout", "2"))
    announced(cl)
    a, b = named(cl, cl.clients_on_distinct_workers(2), "H")
    workers = sorted(cl.worker_pids())
    old = broker_pid(cl)
    os.kill(old, signal.SIGSTOP)
    a.say("said while the broker hangs")
    wait_for(lambda: re.search(rf"broker \(pid {old}\): no heartbeat for [\d.]+ s \(worker_timeout=2\); "
                               r"killing it", cl.read_log()), 20, "the hung broker to be killed")
    new = new_broker(cl, old)
    b.wait_line(rf"{a.nick}: said while the broker hangs")
    a.say("after")
    b.wait_line(rf"{a.nick}: after")
    assert sorted(cl.worker_pids()) == workers, "a worker was replaced"
    status = json.loads(subprocess.run(
        [sys.executable, "-m", "chatcluster", "status", "--json", "--runtime-dir", cl.runtime_dir,
         "--port", str(cl.port)], capture_output=True, text=True, check=True, cwd=REPO).stdout)
    broker_row = next(p for p in status["processes"] if p["role"] == "broker")
    assert broker_row["pid"] == new and broker_row["heartbeat_age_s"] < 2
    assert status["restarts"]["broker"] == 1
