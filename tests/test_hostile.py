"""Broken and hostile input, end to end against a running 2-worker cluster.

Each test sends what a hostile or broken client sends (a megabyte without a
newline, random binary from many connections, telnet negotiation, terminal
escape sequences, NUL bytes, a half-closed or reset connection) and checks
that the workers survive it with bounded memory, that nothing able to control
a terminal or to pass for a server notice reaches anyone else, and that the
other clients still receive everything.
"""

from __future__ import annotations

import random
import re
import shutil
import socket
import struct
import subprocess
from collections.abc import Callable

import pytest
from conftest import Cluster, strip_greeting, wait_for
from limits_support import MemoryWatch, Reader, numbers_from, pump, raw_socket, read_to_end, recv_until

MiB = 1 << 20
IAC, DONT, DO, WONT, WILL, SB, SE, NOP = b"\xff", b"\xfe", b"\xfd", b"\xfc", b"\xfb", b"\xfa", b"\xf0", b"\xf1"
ECHO, SGA, TTYPE, NAWS = b"\x01", b"\x03", b"\x18", b"\x1f"

# What may never reach a client from another client: C0 controls but TAB (ESC among them,
# so no escape sequence either), DEL, C1, line/paragraph separators, bidi controls.
FORBIDDEN = frozenset(
    [chr(c) for c in range(0x20) if c != 0x09]
    + [chr(c) for c in range(0x7F, 0xA0)]
    + ["\u2028", "\u2029"]
    + [chr(c) for c in range(0x202A, 0x202F)]
    + [chr(c) for c in range(0x2066, 0x206A)]
)
NOTICE = re.compile(r"\*\*\* (?:\S+ joined|\S+ left(?: \(.*\))?|\S+ is now known as \S+)")


class Room:
    """Two bystanders on different workers, read on threads, and a watch on the workers' memory."""

    def __init__(self, cl: Cluster) -> None:
        self.cl = cl
        a, b = cl.clients_on_distinct_workers(2)
        self.a, self.b = Reader(a.sock, a.buf, a.nick), Reader(b.sock, b.buf, b.nick)
        self.pids = sorted(cl.worker_pids())
        self.watch = MemoryWatch(self.pids)

    def assert_unharmed(self, max_growth: int = 8 * MiB, lines: int = 10) -> None:
        """The bystanders still hear each other, no worker died, and memory stayed bounded."""
        exchange(self.a, self.b, "OK", lines)
        growth = self.watch.stop()
        assert sorted(self.cl.worker_pids()) == self.pids, "a worker was replaced"
        assert "Traceback" not in self.cl.read_log()
        assert growth < max_growth, f"the workers grew by {growth / MiB:.1f} MiB"


def assert_clean(lines: list[str], nicks: set[str] | None = None) -> None:
    """No line controls a terminal, and every line is a chat line or a real notice."""
    for line in lines:
        assert not FORBIDDEN.intersection(line), repr(line)
        if line.startswith("*** "):
            assert NOTICE.fullmatch(line), f"looks like a server notice: {line!r}"
        else:
            m = re.match(r"(?:\* )?([A-Za-z0-9_-]+)(?::)? ", line)
            assert m, f"no sender in front: {line!r}"
            if nicks is not None:
                assert m.group(1) in nicks, f"unknown sender in {line!r}"


def exchange(a: Reader, b: Reader, tag: str, count: int = 2000) -> None:
    """a and b send each other `count` numbered lines; each receives all of them, in order."""
    pumps = [pump(a.sock, a.name, tag, count, 100, to=b), pump(b.sock, b.name, tag, count, 100, to=a)]
    for p in pumps:
        p.join(120)
    b.wait(lambda lines: b.progress.get((a.name, tag)) == count - 1, 60, f"all of {a.name}'s {tag} lines")
    a.wait(lambda lines: a.progress.get((b.name, tag)) == count - 1, 60, f"all of {b.name}'s {tag} lines")
    assert numbers_from(b.lines, a.name, tag) == list(range(count))
    assert numbers_from(a.lines, b.name, tag) == list(range(count))


def welcomed(port: int, rcvbuf: int | None = None) -> tuple[socket.socket, str]:
    sock = raw_socket(port, rcvbuf=rcvbuf)
    data = recv_until(sock, b"\r\n")
    m = re.match(rb"\*\*\* Welcome to chatcluster! Your nickname is (\S+)\.", data)
    assert m, data
    return sock, m.group(1).decode()


# ---------------------------------------------------------------------------


def test_a_megabyte_without_newline_is_refused_once_and_the_client_goes_on(
    make_cluster: Callable[..., Cluster],
) -> None:
    cl = make_cluster(2, extra=("--flood-rate", "0"))
    room = Room(cl)
    a, b = room.a, room.b
    big, nick = welcomed(cl.port)
    big.sendall(b"y" * MiB)
    exchange(a, b, "M")
    big.sendall(b"\r\nafter the megabyte\r\n")
    b.wait_line(rf"{nick}: after the megabyte")
    reply = recv_until(big, b"bytes)\r\n")
    assert reply.count(b"*** Error: line too long (max 512 bytes)\r\n") == 1, reply[-300:]
    assert not any("yyyy" in line for line in a.lines + b.lines)
    room.assert_unharmed()


def test_random_binary_from_fifty_connections_harms_nobody(make_cluster: Callable[..., Cluster]) -> None:
    # Without flood control every junk line is relayed at once: the most for the others to get.
    cl = make_cluster(2, extra=("--flood-rate", "0"))
    room = Room(cl)
    a, b = room.a, room.b
    rng = random.Random(5)
    junk = [raw_socket(cl.port) for _ in range(50)]
    for i, sock in enumerate(junk):
        payload = rng.randbytes(64 * 1024)
        for start in range(0, len(payload), 8192):
            try:
                sock.send(payload[start:start + 8192])
            except OSError:
                break
        if i % 2:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()  # half of them with a reset
    exchange(a, b, "R", 500)
    wait_for(lambda: sum(v.connections for v in cl.stats()) == 2, 30, "the junk connections to be closed")
    # Everything the junk produced reached the bystanders as harmless text after a nick.
    assert_clean(a.lines)
    assert_clean(b.lines)
    room.assert_unharmed(16 * MiB)


def test_telnet_negotiation_is_removed_and_never_answered_when_turned_off(
    make_cluster: Callable[..., Cluster],
) -> None:
    # With telnet_negotiation = off the server is a plain line protocol; what it answers in the
    # default mode is specified in test_telnet_server.py.
    cl = make_cluster(2, extra=("--telnet-negotiation", "off"))
    room = Room(cl)
    a, b = room.a, room.b
    sock = raw_socket(cl.port)
    sock.sendall(IAC + DO + ECHO + IAC + WILL + NAWS + IAC + SB + NAWS + b"\x00\x50\x00\x18" + IAC + SE
                 + IAC + DO + SGA + IAC + WILL + TTYPE + IAC + SB + TTYPE + b"\x00xterm" + IAC + SE
                 + IAC + DONT + ECHO + IAC + WONT + SGA)
    data = recv_until(sock, b"\r\n")
    nick = re.search(rb"Your nickname is (\S+)\.", data).group(1).decode()  # type: ignore[union-attr]
    sock.sendall(b"hel" + IAC + NOP + b"lo" + IAC + DO + ECHO + b" tel" + IAC + SB + NAWS + b"\r\n" + IAC + SE
                 + b"net\r\n")
    a.wait_line(rf"{nick}: hello telnet")
    b.sock.sendall(b"over\r\n")
    data += recv_until(sock, f"{b.name}: over\r\n".encode())
    assert IAC not in data, data
    assert not any(IAC.decode("latin-1") in line for line in a.lines)
    room.assert_unharmed()


def test_escape_sequences_and_bidi_controls_never_reach_another_terminal(
    make_cluster: Callable[..., Cluster],
) -> None:
    cl = make_cluster(2)
    room = Room(cl)
    a, b = room.a, room.b
    sock, nick = welcomed(cl.port)
    attacks = [
        (b"\x1b[2J\x1b[Hcleared\x1b[K", f"{nick}: cleared"),
        (b"\x1b]0;owned\x07title", f"{nick}: title"),
        (b"\x1b]8;;http://evil/\x1b\\link\x1b]8;;\x1b\\", f"{nick}: link"),
        (b"\x1b[31mred\x1b[0m \x1bPdcs payload\x1b\\done", f"{nick}: red done"),
        ("right\u202eto\u2066left\u2069".encode(), f"{nick}: righttoleft"),
        ("c1\u009b2J\u0085csi".encode(), f"{nick}: c1csi"),
        ("para\u2028graph".encode(), f"{nick}: paragraph"),
        (b"bell\x07\x08back\x7fdel\x00nul", f"{nick}: bellbackdelnul"),
        (b"/me \x1b[1mwaves", f"* {nick} waves"),
        (b"\tindented", f"{nick}: \tindented"),
    ]
    # Every burst of them is fine under the default flood control: only the time it takes grows.
    sock.sendall(b"".join(data + b"\r\n" for data, _ in attacks) + b"end of attacks\r\n")
    b.wait_line(rf"{nick}: end of attacks", timeout=30)
    got = [line for line in b.lines if nick in line and "joined" not in line]
    assert got == [want for _, want in attacks] + [f"{nick}: end of attacks"]
    assert_clean(a.lines + b.lines)
    room.assert_unharmed()


def test_nobody_can_forge_a_server_notice_or_another_users_line(make_cluster: Callable[..., Cluster]) -> None:
    cl = make_cluster(2)
    room = Room(cl)
    a, b = room.a, room.b
    sock, nick = welcomed(cl.port)
    forgeries = [
        b"*** Server is shutting down",
        b"hi\r*** Error: disconnected: you are not reading fast enough",
        b"hi\n" + a.name.encode() + b": I said this",
        b"\x1b[2K\r*** " + a.name.encode() + b" left",
        b"/me \r*** fake notice",
        b"// *** slash escape",
        b"x\x1b[1A\x1b[2K*** overwritten",
        "\u2028*** separator".encode(),
        b"\x1bE*** ESC E is a newline too",
        b"/nick ***",
        b"/nick " + a.name.encode(),
    ]
    sock.sendall(b"\r\n".join(forgeries) + b"\r\nthe end\r\n")
    b.wait_line(rf"{nick}: the end", timeout=30)
    assert_clean(b.lines, {nick, a.name, b.name})
    from_attacker = [line for line in b.lines if re.match(rf"(\* )?{nick}:? ", line)]
    assert from_attacker[-1] == f"{nick}: the end"
    assert not any(line.startswith(f"{a.name}: I said") for line in b.lines)
    assert not any(line.startswith("*** Server") or line.startswith("*** Error") for line in a.lines + b.lines)
    replies = recv_until(sock, b"already taken\r\n")
    assert b"*** Error: a nickname may only use letters" in replies
    room.assert_unharmed()


def test_nul_bytes_lone_cr_and_invalid_utf8_are_made_harmless(make_cluster: Callable[..., Cluster]) -> None:
    cl = make_cluster(2)
    room = Room(cl)
    b = room.b
    sock, nick = welcomed(cl.port)
    sock.sendall(b"a\x00b\rc\rd\r\n\x00\r\ne\xc3(f\xed\xa0\x80g\r\n\x80\x81\xfe\r\nlast\n")
    b.wait_line(rf"{nick}: last")
    got = [line for line in b.lines if line.startswith(f"{nick}: ")]
    assert got == [f"{nick}: ab", f"{nick}: c", f"{nick}: d", f"{nick}: e\ufffd(f\ufffd\ufffd\ufffdg",
                   f"{nick}: \ufffd\ufffd\ufffd", f"{nick}: last"]
    room.assert_unharmed()


def test_half_closed_connection_still_delivers_its_last_lines(make_cluster: Callable[..., Cluster]) -> None:
    cl = make_cluster(2)
    room = Room(cl)
    a, b = room.a, room.b
    # Sent at once and shut before the welcome line, like `printf ... | nc -N`.
    early = raw_socket(cl.port)
    early.sendall(b"first words\r\nlast words\r\n")
    early.shutdown(socket.SHUT_WR)
    data, closed = read_to_end(early)
    assert closed
    nick = re.match(rb"\*\*\* Welcome to chatcluster! Your nickname is (\S+)\.", data).group(1).decode()  # type: ignore[union-attr]
    b.wait_line(rf"\*\*\* {nick} left")
    mine = [line for line in b.lines if nick in line]
    assert mine == [f"*** {nick} joined", f"{nick}: first words", f"{nick}: last words", f"*** {nick} left"]
    # The same after the welcome, with output still queued for the half-closed client.
    late, late_nick = welcomed(cl.port)
    late.sendall(b"/who\r\nbye now\r\n")
    late.shutdown(socket.SHUT_WR)
    data, closed = read_to_end(late)
    assert closed
    assert re.search(rb"\*\*\* \d+ users online: ", data), data
    a.wait_line(rf"\*\*\* {late_nick} left")
    assert [line for line in a.lines if late_nick in line][-2:] == [f"{late_nick}: bye now", f"*** {late_nick} left"]
    room.assert_unharmed()


def test_reset_in_the_middle_of_a_write_harms_nobody(make_cluster: Callable[..., Cluster]) -> None:
    # A sendq far above what the kernel buffers, so output is still queued in the worker.
    cl = make_cluster(2, extra=("--flood-rate", "0", "--max-sendq-bytes", str(64 * MiB)))
    room = Room(cl)
    a, b = room.a, room.b
    victims = []
    for _ in range(4):
        sock, nick = welcomed(cl.port, rcvbuf=4096)
        victims.append((sock, nick))
    exchange(a, b, "W1", 30_000)  # 6 MB to each victim, who reads none of it
    for sock, _ in victims:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
    exchange(a, b, "W2", 3000)
    for _, nick in victims:
        a.wait_line(rf"\*\*\* {nick} left \(connection lost\)")
    # Up to 2 MB were queued for each victim, by design (its sendq is 64 MiB): freed, not kept.
    room.assert_unharmed(24 * MiB)


def test_reset_in_the_middle_of_a_line_harms_nobody(make_cluster: Callable[..., Cluster]) -> None:
    cl = make_cluster(2)
    room = Room(cl)
    a, b = room.a, room.b
    sock, nick = welcomed(cl.port)
    sock.sendall(b"complete\r\nhalf a li")
    b.wait_line(rf"{nick}: complete")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()
    b.wait_line(rf"\*\*\* {nick} left.*")
    assert not any("half a li" in line for line in a.lines + b.lines)
    room.assert_unharmed()


@pytest.mark.skipif(shutil.which("nc") is None, reason="needs nc (netcat-openbsd)")
def test_lines_piped_into_nc_are_delivered_before_it_hangs_up(make_cluster: Callable[..., Cluster]) -> None:
    cl = make_cluster(2)
    room = Room(cl)
    a = room.a
    # nc -N shuts its sending side at the end of its input and reads until the server closes.
    done = subprocess.run(["nc", "-N", "127.0.0.1", str(cl.port)], input=b"piped one\npiped two\n",
                          capture_output=True, timeout=30)
    assert done.returncode == 0, done.stderr
    m = re.match(rb"\*\*\* Welcome to chatcluster! Your nickname is (\S+)\.", strip_greeting(done.stdout))
    assert m, done.stdout
    nick = m.group(1).decode()
    a.wait_line(rf"\*\*\* {nick} left")
    assert [line for line in a.lines if nick in line] == [
        f"*** {nick} joined", f"{nick}: piped one", f"{nick}: piped two", f"*** {nick} left"]
    room.assert_unharmed()
