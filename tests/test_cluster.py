"""End to end: the chat protocol and its delivery guarantees, with real processes and sockets.

Every test starts `chatcluster start` (4 workers unless said otherwise), puts
clients on workers chosen and verified through psutil, and checks what the
clients receive. The guarantees: every client receives every line of every
other client exactly once and unaltered, whichever worker each is on; all
clients see one order; a line sent after a client's welcome reaches it; the
bus loses nothing (no gap is ever counted or logged).
"""

from __future__ import annotations

import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from chat_support import (
    LineProc,
    announced,
    have,
    no_gaps,
    numbers_from,
    send_numbered,
    wait_numbers,
    wait_who,
)
from conftest import REPO, WAIT, Client, Cluster, free_port, skip_greeting, strip_greeting, wait_for

WELCOME = r"\*\*\* Welcome to chatcluster! Your nickname is ([A-Za-z0-9]{4})\. Type /help for commands\."
FAST = ("--flood-rate", "0")


# -- the protocol, seen by real clients ----------------------------------------------------------


def test_welcome_line_and_a_line_to_clients_on_other_workers(make_cluster: Callable[..., Cluster]) -> None:
    cl = make_cluster(4)
    a, b, c = cl.clients_on_distinct_workers(3)
    assert re.fullmatch(WELCOME, a.lines[0])
    a.say("hello from a")
    b.wait_line(rf"{a.nick}: hello from a")
    c.wait_line(rf"{a.nick}: hello from a")
    b.say("/who")  # a round trip through the bus after a's line: a would have its echo by now
    b.wait_line(r"\*\*\* \d+ users online: .*")
    a.say("/who")
    a.wait_line(r"\*\*\* \d+ users online: .*")
    assert f"{a.nick}: hello from a" not in a.lines


def test_server_lines_end_in_crlf(make_cluster: Callable[..., Cluster]) -> None:
    cl = make_cluster(2)
    s = socket.create_connection(("127.0.0.1", cl.port), timeout=WAIT)
    try:
        assert skip_greeting(s)
        data = b""
        while b"\r\n" not in data:
            chunk = s.recv(4096)
            assert chunk, "connection closed before the welcome line"
            data += chunk
        line, _, _ = data.partition(b"\r\n")
        assert re.fullmatch(WELCOME.encode(), line)
        assert b"\n" not in line and b"\r" not in line
    finally:
        s.close()


def test_commands_across_workers(make_cluster: Callable[..., Cluster]) -> None:
    cl = make_cluster(4, extra=FAST)
    a, b = cl.clients_on_distinct_workers(2)
    old = a.nick
    a.say("/nick Walrus")
    a.wait_line(r"\*\*\* You are now known as Walrus")
    b.wait_line(rf"\*\*\* {old} is now known as Walrus")
    a.say("/me waves")
    b.wait_line(r"\* Walrus waves")
    a.say("//slash")
    b.wait_line(r"Walrus: /slash")
    a.say("/nick bad name")
    a.wait_line(r"\*\*\* Error: a nickname may only use letters A-Z a-z, digits 0-9, _ and -")
    a.say("/frobnicate")
    a.wait_line(r"\*\*\* Error: unknown command /frobnicate\. Type /help for commands\.")
    a.say("/help")
    a.wait_line(r"\*\*\* /quit \[REASON\] - .*")
    a.send(b"x" * 600 + b"\r\nafter the long one\r\n")
    a.wait_line(r"\*\*\* Error: line too long \(max 512 bytes\)")
    b.wait_line(r"Walrus: after the long one")
    assert not any("xxxx" in line for line in b.lines)
    a.send(b"bad \xff\xfe utf8 \xc3\r\n")  # \xff\xfe is telnet IAC DONT: stripped
    a.send(b"bad \xc3\x28 utf8\r\n")
    b.wait_line("Walrus: bad \ufffd\\( utf8")
    a.say("/quit see you")
    a.wait_line(r"\*\*\* Goodbye")
    a.wait_closed()
    assert a.lines[-1] == "*** Goodbye"
    b.wait_line(r"\*\*\* Walrus left \(see you\)")


def test_line_endings_of_every_client_kind(make_cluster: Callable[..., Cluster]) -> None:
    cl = make_cluster(2)
    a, b = cl.clients_on_distinct_workers(2)
    a.send(b"lf\ncrlf\r\ncrnul\r\0")
    for text in ("lf", "crlf", "crnul"):
        b.wait_line(rf"{a.nick}: {text}")


def test_joins_and_leaves_are_announced(make_cluster: Callable[..., Cluster]) -> None:
    cl = make_cluster(2)
    a = cl.client()
    b = cl.client()
    a.wait_line(rf"\*\*\* {b.nick} joined")
    b.close()
    a.wait_line(rf"\*\*\* {b.nick} left")


def test_no_announcements_with_no_announce_joins(make_cluster: Callable[..., Cluster]) -> None:
    cl = make_cluster(2, extra=("--no-announce-joins",))
    a, b = cl.clients_on_distinct_workers(2)
    c = cl.client()
    c.say("/quit")
    c.wait_closed()
    b.close()
    wait_who(a, [a.nick])
    assert not any(line.endswith((" joined", " left")) for line in a.lines)


@pytest.mark.skipif(not have("nc"), reason="nc (netcat-openbsd) is not installed; scripts/test.sh installs it")
def test_a_real_nc_client_chats(make_cluster: Callable[..., Cluster]) -> None:
    cl = make_cluster(2)
    peer = cl.client()
    nc = LineProc("nc", "127.0.0.1", str(cl.port))
    try:
        nick = nc.wait_line(WELCOME).group(1)
        peer.wait_line(rf"\*\*\* {nick} joined")
        peer.say("hi nc")
        nc.wait_line(rf"{peer.nick}: hi nc")
        nc.type("hi from nc")  # nc ends lines with a bare \n
        peer.wait_line(rf"{nick}: hi from nc")
        nc.type("/quit done")
        nc.wait_line(r"\*\*\* Goodbye")
        peer.wait_line(rf"\*\*\* {nick} left \(done\)")
        nc.end_input()
        assert nc.wait_exit() == 0
    finally:
        nc.close()


@pytest.mark.skipif(not have("nc"), reason="nc (netcat-openbsd) is not installed; scripts/test.sh installs it")
def test_a_piped_nc_session_is_delivered_whole(make_cluster: Callable[..., Cluster]) -> None:
    """`printf ... | nc -N`: every line sent before the half-close counts, then the client leaves."""
    cl = make_cluster(2)
    peer = cl.client()
    res = subprocess.run(["nc", "-N", "127.0.0.1", str(cl.port)], input=b"/nick Piped\nhello\n/me waves\n",
                         capture_output=True, timeout=WAIT)
    assert res.returncode == 0
    out = strip_greeting(res.stdout).decode().split("\r\n")
    assert re.fullmatch(WELCOME, out[0])
    peer.wait_line(r"\*\*\* Piped left")
    mine = [x for x in peer.lines if "Piped" in x]
    assert mine[-3:] == ["Piped: hello", "* Piped waves", "*** Piped left"]


def test_lines_sent_before_a_half_close_all_count(make_cluster: Callable[..., Cluster]) -> None:
    """Sent and shut at once, before the welcome: a rename, then lines that wait for it."""
    cl = make_cluster(2)
    peer = cl.client()
    s = socket.create_connection(("127.0.0.1", cl.port), timeout=WAIT)
    try:
        s.sendall(b"/nick Halfway\r\nstill here\r\n/me leaves\r\n")
        s.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    finally:
        s.close()
    assert b"*** You are now known as Halfway\r\n" in data
    peer.wait_line(r"\*\*\* Halfway left")
    assert [x for x in peer.lines if "Halfway" in x][-3:] == ["Halfway: still here", "* Halfway leaves",
                                                              "*** Halfway left"]


@pytest.mark.skipif(not have("telnet"), reason="telnet is not installed; scripts/test.sh installs it")
def test_a_real_telnet_client_chats(make_cluster: Callable[..., Cluster]) -> None:
    cl = make_cluster(2)
    peer = cl.client()
    tn = LineProc("telnet", "127.0.0.1", str(cl.port))
    try:
        nick = tn.wait_line(WELCOME).group(1)
        tn.type("/nick Telly")
        tn.wait_line(r"\*\*\* You are now known as Telly")
        tn.type("hello over telnet")
        peer.wait_line(r"Telly: hello over telnet")
        peer.say("hello telnet")
        tn.wait_line(rf"{peer.nick}: hello telnet")
        tn.type("/quit")
        tn.wait_line(r"\*\*\* Goodbye")
        tn.wait_line(r"Connection closed by foreign host\.")
        peer.wait_line(r"\*\*\* Telly left")
        assert nick
    finally:
        tn.close()


# -- delivery guarantees -------------------------------------------------------------------------


def test_every_client_receives_every_line_of_every_other_client_exactly_once(
        make_cluster: Callable[..., Cluster]) -> None:
    cl = make_cluster(4, extra=FAST)
    clients = cl.clients_on_distinct_workers(4)
    count = 300
    for c in clients:  # all senders at once: 1200 lines through the bus
        send_numbered(c, "n", range(count))
    for r in clients:
        for s in clients:
            if s is r:
                continue
            wait_numbers(r, s.nick, "n", count - 1)
            assert numbers_from(r, s.nick, "n") == list(range(count)), f"{r.nick} from {s.nick}"
    for c in clients:
        assert numbers_from(c, c.nick, "n") == []  # never its own
    no_gaps(cl)


def test_lines_arrive_unaltered(make_cluster: Callable[..., Cluster]) -> None:
    cl = make_cluster(4, extra=FAST)
    a, b = cl.clients_on_distinct_workers(2)
    rng = random.Random(5)
    alphabet = "abcXYZ019 !\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~é€😀"
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 120))).strip() or "x" for _ in range(100)]
    texts = [t for t in texts if not t.startswith("/")]
    a.send("".join(t + "\r\n" for t in texts))
    b.wait(lambda lines: len([x for x in lines if x.startswith(f"{a.nick}: ")]) >= len(texts),
           what="every text")
    assert [x[len(a.nick) + 2:] for x in b.lines if x.startswith(f"{a.nick}: ")] == texts


def test_every_client_sees_one_order(make_cluster: Callable[..., Cluster]) -> None:
    cl = make_cluster(4, extra=FAST)
    clients = cl.clients_on_distinct_workers(4)
    observer = clients.pop()  # says nothing: it sees everything
    # A common starting point in the order: everyone marks the line right after the barrier's.
    barrier = cl.client()
    barrier.say("/nick Barrier")
    barrier.wait_line(r"\*\*\* You are now known as Barrier")
    barrier.say("start")
    for c in (*clients, observer):
        c.wait_line("Barrier: start")
    start, *marks = [c.lines.index("Barrier: start") + 1 for c in (observer, *clients)]
    for round_no in range(5):
        for k, c in enumerate(clients):
            send_numbered(c, f"r{round_no}", range(60))
            if round_no == 2:
                c.say(f"/nick Order{k}")  # notices interleave with the chat
    finals = [f"Order{k}" for k in range(len(clients))]
    for nick in finals:
        wait_numbers(observer, nick, "r4", 59)
    for c, nick in zip(clients, finals, strict=True):
        for other in finals:
            if other != nick:
                wait_numbers(c, other, "r4", 59)
    everything = observer.lines[start:]
    for c, mark, nick in zip(clients, marks, finals, strict=True):
        view = c.lines[mark:]
        names = {nick, *[m.group(1) for x in view if (m := re.fullmatch(r"\*\*\* You are now known as (\S+)", x))]}
        old = {m.group(1) for x in everything if (m := re.fullmatch(rf"\*\*\* (\S+) is now known as {nick}", x))}
        names |= old
        expected = []
        for line in everything:
            if line.split(": ", 1)[0] in names:
                continue  # its own lines are not echoed
            renamed = re.fullmatch(r"\*\*\* \S+ is now known as (\S+)", line)
            if renamed and renamed.group(1) in names:
                line = f"*** You are now known as {renamed.group(1)}"
            expected.append(line)
        assert view == expected, f"{nick} saw another order"
    no_gaps(cl)


def test_a_line_sent_after_a_clients_welcome_reaches_it(make_cluster: Callable[..., Cluster]) -> None:
    cl = make_cluster(4, extra=FAST)
    talkers = cl.clients_on_distinct_workers(2)
    sent_at: list[float] = []  # when line i was handed to the kernel, before sendall
    newcomers: list[Client] = []
    welcomed: dict[int, float] = {}  # index in newcomers -> when its welcome was seen
    total = 400
    for i in range(total):
        if i % 10 == 0:
            newcomers.append(Client(cl.port))
            cl.clients.append(newcomers[-1])
        sent_at.append(time.monotonic())
        talkers[i % 2].say(f"s {i}")
        for k, n in enumerate(newcomers):
            if k not in welcomed:
                n.drain_for_quiet()
                if n.lines:
                    assert re.fullmatch(WELCOME, n.lines[0]), n.lines[0]
                    welcomed[k] = time.monotonic()
                    n.nick = re.fullmatch(WELCOME, n.lines[0]).group(1)  # type: ignore[union-attr]
    for k, n in enumerate(newcomers):
        if k not in welcomed:
            n.welcome()
            welcomed[k] = time.monotonic()
    for t in talkers:
        for n in newcomers:
            last = max(i for i in range(total) if talkers[i % 2] is t)
            wait_numbers(n, t.nick, "s", last)
    placed = {cl.worker_of(n) for n in newcomers}
    assert len(placed) >= 2, "the newcomers all landed on one worker"
    checked = 0
    for k, n in enumerate(newcomers):
        got = set(numbers_from(n, talkers[0].nick, "s")) | set(numbers_from(n, talkers[1].nick, "s"))
        owed = {i for i in range(total) if sent_at[i] > welcomed[k]}
        assert owed <= got, f"newcomer {n.nick} missed {sorted(owed - got)[:5]}"
        checked += len(owed)
        for t in talkers:
            seq = numbers_from(n, t.nick, "s")
            assert seq == sorted(set(seq))  # in order, never twice
    assert checked > total  # the property was exercised on many lines
    no_gaps(cl)


def test_clients_joining_and_leaving_during_traffic_cost_no_line(make_cluster: Callable[..., Cluster]) -> None:
    cl = make_cluster(4, extra=FAST)
    a, b, c = cl.clients_on_distinct_workers(3)
    for i in range(10):
        send_numbered(a, "busy", range(i * 30, i * 30 + 30))
        churn = cl.client()
        churn.say("/quit")
    wait_numbers(b, a.nick, "busy", 299)
    wait_numbers(c, a.nick, "busy", 299)
    assert numbers_from(b, a.nick, "busy") == list(range(300))
    assert numbers_from(c, a.nick, "busy") == list(range(300))
    no_gaps(cl)


# -- the process contract (the supervisor's tests go further) -------------------------------------


def test_a_killed_worker_is_replaced(make_cluster: Callable[..., Cluster]) -> None:
    cl = make_cluster(4)
    announced(cl)
    before = set(cl.worker_pids())
    victim = sorted(before)[0]
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: len(set(cl.worker_pids()) - before) == 1 and len(cl.worker_pids()) == 4,
             what="a replacement worker")
    a, b = cl.clients_on_distinct_workers(2)
    a.say("after the replacement")
    b.wait_line(rf"{a.nick}: after the replacement")


def run_start(*args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "chatcluster", "start", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


def test_a_port_in_use_by_another_program_is_a_one_line_error(tmp_path: Path) -> None:
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    try:
        res = run_start("--host", "127.0.0.1", "--port", str(port), "--runtime-dir", str(tmp_path / "rt"))
    finally:
        holder.close()
    assert res.returncode != 0
    errors = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(errors) == 1, res.stderr
    assert str(port) in errors[0] and "--port" in errors[0]


@pytest.mark.parametrize(("args", "setting"), [
    (("--max-line-bytes", "5"), "max_line_bytes"),
    (("--flood-rate", "fast"), "flood_rate"),
    (("--workers", "-2"), "workers"),
])
def test_a_bad_setting_is_a_one_line_error_naming_it(tmp_path: Path, args: tuple[str, ...], setting: str) -> None:
    res = run_start("--port", str(free_port()), "--runtime-dir", str(tmp_path / "rt"), *args)
    assert res.returncode != 0
    errors = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(errors) == 1, res.stderr
    assert setting in errors[0]


def test_a_bad_value_in_the_config_file_is_a_one_line_error_naming_it(tmp_path: Path) -> None:
    conf = tmp_path / "c.toml"
    conf.write_text("[chat]\nannounce_joins = \"sometimes\"\n")
    res = run_start("--config", str(conf), "--port", str(free_port()), "--runtime-dir", str(tmp_path / "rt"))
    assert res.returncode != 0
    errors = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(errors) == 1, res.stderr
    assert "announce_joins" in errors[0]


def test_an_unknown_option_fails(tmp_path: Path) -> None:
    res = run_start("--no-such-option", "--port", str(free_port()), "--runtime-dir", str(tmp_path / "rt"))
    assert res.returncode != 0
    assert "--no-such-option" in res.stderr
