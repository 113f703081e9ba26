"""Multi-host hosts on a bad day: processes stopped and resumed, hosts restarted at once, floods.

Real nats-server and real chatcluster hosts, as in tests/test_multihost.py; each
test drives one fault an operator or an attacker can cause and checks what the
clients on both hosts see afterwards.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

pytest.importorskip("nats", reason="nats-py is not installed (pip install 'chatcluster[nats]')")

from conftest import REPO, wait_for  # noqa: E402
from multihost_support import Host, hosts_for  # noqa: E402
from nats_support import NatsCluster, clusters_for, nats_server_binary  # noqa: E402

_binary, _why = nats_server_binary()
pytestmark = [pytest.mark.skipif(_binary is None, reason=_why), pytest.mark.slow, pytest.mark.timeout(240)]


@pytest.fixture
def make_nats(request: pytest.FixtureRequest) -> Iterator[Callable[..., NatsCluster]]:
    yield from clusters_for(request, 1)


@pytest.fixture
def make_host(request: pytest.FixtureRequest) -> Iterator[Callable[..., Host]]:
    yield from hosts_for(request)


def _stopped_and_resumed(a: Host, b: Host, stop: Callable[[], None], resume: Callable[[], None],
                         pause: float) -> None:
    """Stop part of host a for `pause` seconds (past the 5 s lease), resume it, and check the chat after."""
    ann, bob = a.client(), b.client()
    ann.say("/nick Ann")
    ann.wait_line(r"\*\*\* You are now known as Ann")
    bob.wait_line(r"\*\*\* \S+ is now known as Ann")
    bob.say("/nick Bob")
    ann.wait_line(r"\*\*\* \S+ is now known as Bob")
    stop()
    try:
        bob.wait_line(r"\*\*\* Ann left \(connection lost\)", timeout=20)
        bob.say("while a was away")
        ann.say("typed while stopped")  # held by the stopped process (its socket buffers, its outbox)
        time.sleep(max(0.0, pause - 5))  # the fault itself: the host stays stopped this long
    finally:
        resume()
    bob.wait_line(r"\*\*\* Ann joined", timeout=30)
    ann.say("hello after")
    bob.wait_line(r"Ann: hello after", timeout=20)
    bob.say("hello back")
    ann.wait_line(r"Bob: hello back", timeout=20)
    for c in (ann, bob):
        c.say("/who")
        c.wait_line(r"\*\*\* 2 users online: (Ann, Bob|Bob, Ann)")
    # Each host's book has both hosts up, under the incarnations the other host knows them by.
    def books_agree() -> bool:
        sa, sb = a.multihost() or {}, b.multihost() or {}
        ha = {h["node"]: h["incarnation"] for h in sa.get("hosts", [])}
        hb = {h["node"]: h["incarnation"] for h in sb.get("hosts", [])}
        return set(ha) == {"a", "b"} and ha == hb and ha["a"] == sa.get("incarnation")
    wait_for(books_agree, 20, "both hosts' books naming the same incarnations")
    for c in (ann, bob):
        c.drain_for_quiet()
    assert bob.lines.count("*** Ann joined") == 1, bob.lines
    assert bob.lines.count("Ann: hello after") == 1, bob.lines
    # What Ann typed while her host was stopped arrives once, after she is back, or she is told it did not.
    held = bob.lines.count("Ann: typed while stopped")
    told = any("could not be delivered" in x for x in ann.lines)
    assert (held, told) in ((1, False), (0, True)), (bob.lines, ann.lines)
    if held:
        assert bob.lines.index("*** Ann joined") < bob.lines.index("Ann: typed while stopped"), bob.lines
    assert ann.lines.count("Bob: hello back") == 1, ann.lines
    assert not any("Bob left" in x for x in ann.lines), ann.lines


def test_a_bus_process_stopped_past_the_lease_and_resumed_brings_its_users_back_once(
        make_nats: Callable[..., NatsCluster], make_host: Callable[..., Host]) -> None:
    nats = make_nats(1)
    a, b = make_host(nats, "a"), make_host(nats, "b")
    pid = a.broker_pid()
    _stopped_and_resumed(a, b, lambda: os.kill(pid, signal.SIGSTOP), lambda: os.kill(pid, signal.SIGCONT), 8)
    assert a.broker_pid() == pid  # resumed, not replaced: the watchdog allows worker_timeout (30 s)


def test_a_whole_host_stopped_past_the_lease_and_resumed_brings_its_users_back_once(
        make_nats: Callable[..., NatsCluster], make_host: Callable[..., Host]) -> None:
    nats = make_nats(1)
    a, b = make_host(nats, "a"), make_host(nats, "b")
    assert a.proc is not None
    group = a.proc.pid
    _stopped_and_resumed(a, b, lambda: os.killpg(group, signal.SIGSTOP), lambda: os.killpg(group, signal.SIGCONT),
                         8)
    assert a.proc.poll() is None


def test_a_host_stopped_and_started_again_at_once_under_its_name_rejoins_while_the_other_chats(
        make_nats: Callable[..., NatsCluster], make_host: Callable[..., Host]) -> None:
    nats = make_nats(1)
    a, b = make_host(nats, "a"), make_host(nats, "b")
    ann, al, bob = a.client(), a.client(), b.client()
    for c in (ann, al, bob):
        c.say("/who")
        c.wait_line(r"\*\*\* 3 users online: .*")
    talking = threading.Event()
    said: list[int] = []

    def talk() -> None:
        i = 0
        while not talking.is_set():
            al.say(f"m {i}")
            said.append(i)
            i += 1
            talking.wait(0.02)  # a steady trickle of chat, while host b stops and starts

    t = threading.Thread(target=talk)
    t.start()
    try:
        b.signal(signal.SIGTERM)  # as `chatcluster stop` does
        assert b.wait_exit() == 0
        b2 = make_host(nats, "b")  # at once, the same node_name
        ann.wait_line(rf"\*\*\* {bob.nick} left \(server shutting down\)", timeout=10)
        new = b2.client()
        new.wait_line(rf"{re.escape(al.nick)}: m \d+", timeout=20)
    finally:
        talking.set()
        t.join()
    last = said[-1]
    ann.wait_line(rf"{re.escape(al.nick)}: m {last}", timeout=20)
    new.wait_line(rf"{re.escape(al.nick)}: m {last}", timeout=20)
    seen = [x for x in ann.lines if x.startswith(f"{al.nick}: m ")]
    assert seen == [f"{al.nick}: m {i}" for i in said], "ann missed, doubled or reordered lines"
    got = [int(x.rsplit(" ", 1)[1]) for x in new.lines if x.startswith(f"{al.nick}: m ")]
    assert got == list(range(got[0], last + 1)), "the new host's client missed or doubled lines"
    new.say("/who")
    new.wait_line(r"\*\*\* 3 users online: .*")
    assert b2.proc is not None and b2.proc.poll() is None, "the restarted host stopped"
    assert "node_name" not in b2.read_log(), b2.read_log()[-2000:]


def _config_host(nats: NatsCluster, tmp_path: Path, node: str) -> tuple[Host, Path]:
    """A host whose NATS settings come from its config file alone (flags would mask an edit of the file)."""
    config = tmp_path / f"{node}.toml"
    config.write_text(f'[multihost]\nnats_servers = "{nats.urls[0]}"\nnode_name = "{node}"\n'
                      '[limits]\nflood_burst = 20\n')
    h = Host(nats, node)
    i = h.args.index("--nats-servers")
    del h.args[i:i + 4]  # --nats-servers URL --node-name NODE
    h.args += ["--config", str(config)]
    return h, config


def test_nats_settings_edited_before_reload_and_upgrade_need_a_restart_and_nothing_half_applies(
        make_nats: Callable[..., NatsCluster], make_host: Callable[..., Host], tmp_path: Path) -> None:
    from test_upgrade import upgraded

    nats = make_nats(1)
    a, config = _config_host(nats, tmp_path, "a")
    try:
        a.start()
        b = make_host(nats, "b")
        ann, bob = a.client(), b.client()
        pw = tmp_path / "pw"
        pw.write_text("secret")
        config.write_text('[multihost]\nnats_servers = "nats://127.0.0.1:1"\nnode_name = "c"\n'
                          f'nats_cluster = "other"\nnats_user = "u"\nnats_password_file = "{pw}"\n'
                          '[limits]\nflood_burst = 21\n')
        at = ("--port", str(a.port), "--runtime-dir", a.runtime_dir)
        out = subprocess.run([sys.executable, "-m", "chatcluster", "reload", *at], capture_output=True, text=True,
                             timeout=60, cwd=REPO)
        assert out.returncode == 0, out.stderr
        assert "flood_burst=21" in out.stdout, out.stdout
        for name in ("nats_servers", "node_name", "nats_cluster", "nats_user", "nats_password_file"):
            assert re.search(rf"restart is needed: .*\b{name} \(", out.stdout), out.stdout
        # A bus process started after the reload (this one killed) still joins as node a of cluster main.
        old = a.broker_pid()
        os.kill(old, signal.SIGKILL)
        wait_for(lambda: a.broker_pid() not in (0, old), 20, "a new bus process on host a")
        ann.say("after the new bus process")
        bob.wait_line(rf"{re.escape(ann.nick)}: after the new bus process", timeout=20)
        wait_for(lambda: (a.multihost() or {}).get("incarnation") not in (None, "")
                 and (a.multihost() or {}).get("node") == "a"
                 and (a.multihost() or {}).get("cluster") == "main", 10, "host a's bus as node a of main")
        # A broken file: refused, and the host goes on.
        config.write_text("[multihost\nnode_name = ")
        out = subprocess.run([sys.executable, "-m", "chatcluster", "reload", *at], capture_output=True, text=True,
                             timeout=60, cwd=REPO)
        assert out.returncode == 1 and "reload refused" in out.stderr and out.stderr.count("\n") == 1, out.stderr
        # An upgrade with the edited (valid) file: the same report, and the new workers are still of node a.
        config.write_text('[multihost]\nnats_servers = "nats://127.0.0.1:1"\nnode_name = "c"\n'
                          f'nats_cluster = "other"\nnats_user = "u"\nnats_password_file = "{pw}"\n')
        text = upgraded(a)
        for name in ("nats_servers", "node_name", "nats_cluster", "nats_user", "nats_password_file"):
            assert re.search(rf"restart is needed: .*\b{name} \(", text), text
        newcomer = a.client()
        newcomer.say("after the upgrade")
        bob.wait_line(rf"{re.escape(newcomer.nick)}: after the upgrade", timeout=20)
        bob.say(f"/whois {newcomer.nick}")
        bob.wait_line(rf"\*\*\* {re.escape(newcomer.nick)} is on worker w\d+@a, .*")
        ann.say("still here")
        bob.wait_line(rf"{re.escape(ann.nick)}: still here", timeout=20)
        assert a.proc is not None and a.proc.poll() is None
    finally:
        a.stop()


def test_a_name_taken_while_its_host_is_stopped_is_not_given_back_twice(
        make_nats: Callable[..., NatsCluster], make_host: Callable[..., Host]) -> None:
    nats = make_nats(1)
    a, b = make_host(nats, "a"), make_host(nats, "b")
    ann, bob = a.client(), b.client()
    ann.say("/nick Ann")
    bob.wait_line(r"\*\*\* \S+ is now known as Ann")
    assert a.proc is not None
    group = a.proc.pid
    os.killpg(group, signal.SIGSTOP)
    try:
        bob.wait_line(r"\*\*\* Ann left \(connection lost\)", timeout=20)
        bob.say("/nick Ann")  # the name is free once its host's lease ran out
        bob.wait_line(r"\*\*\* You are now known as Ann", timeout=10)
    finally:
        os.killpg(group, signal.SIGCONT)
    # Back, the stopped host's user cannot keep the name: a fresh one, and a notice saying so.
    m = bob.wait_line(r"\*\*\* (\S+) joined", timeout=30)
    fresh = m.group(1)
    assert fresh != "Ann"
    ann.wait_line(r"\*\*\* .*Ann.*", timeout=20)
    for c in (ann, bob):
        c.say("/who")
    for c in (ann, bob):
        c.wait_line(rf"\*\*\* 2 users online: ({re.escape(fresh)}, Ann|Ann, {re.escape(fresh)})")
    ann.say("who am I")
    bob.wait_line(rf"{re.escape(fresh)}: who am I", timeout=20)
