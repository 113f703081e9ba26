"""Multi-host hosts on a bad day: processes stopped and resumed, hosts restarted at once, floods.

Real nats-server and real chatcluster hosts, as in tests/test_multihost.py; each
test drives one fault an operator or an attacker can cause and checks what the
clients on both hosts see afterwards.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

pytest.importorskip("nats", reason="nats-py is not installed (pip install 'chatcluster[nats]')")

from conftest import wait_for  # noqa: E402
from multihost_support import Host  # noqa: E402
from nats_support import NatsCluster, clusters_for, nats_server_binary  # noqa: E402

_binary, _why = nats_server_binary()
pytestmark = [pytest.mark.skipif(_binary is None, reason=_why), pytest.mark.slow, pytest.mark.timeout(240)]


@pytest.fixture
def make_nats(request: pytest.FixtureRequest) -> Iterator[Callable[..., NatsCluster]]:
    yield from clusters_for(request, 1)


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
