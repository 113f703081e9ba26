"""The server's telnet behaviour over raw sockets: what a cluster sends and receives byte for byte.

These drive a real cluster with its default negotiation (`always`) through plain sockets that
speak telnet by hand: the greeting, every answer, AYT, IP, the 7-bit repair as another client
sees it, a Synch sent as TCP urgent data, a flood of requests and a client trying to start a
negotiation loop.
"""

from __future__ import annotations

import re
import socket
import time
from collections.abc import Callable, Iterator

import pytest
from client_bytes import INETUTILS_7BIT_SAMPLE, INETUTILS_CTRL_C, SAMPLE
from conftest import WAIT, Cluster

from chatcluster import telnet as T

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

IAC, DONT, DO, WONT, WILL, AYT, IP, DM = b"\xff", b"\xfe", b"\xfd", b"\xfc", b"\xfb", b"\xf6", b"\xf4", b"\xf2"
BINARY, ECHO, SGA, TM, NAWS = b"\x00", b"\x01", b"\x03", b"\x06", b"\x1f"
YES = b"*** [Yes]\r\n"
HINT = b"\r\n*** (Ctrl-C and Ctrl-Z do nothing here: type /quit to leave)\r\n"
WELCOME = re.compile(rb"\*\*\* Welcome to chatcluster! Your nickname is (\S+)\. Type /help for commands\.\r\n")
MAX_SENDQ = 16384
NEGOTIATION = re.compile(rb"\xff[\xfb-\xfe].", re.DOTALL)


def neg(verb: bytes, option: bytes) -> bytes:
    return IAC + verb + option


@pytest.fixture(scope="module")
def chat() -> Iterator[Cluster]:
    cluster = Cluster(2, extra=("--max-sendq-bytes", str(MAX_SENDQ), "--flood-rate", "0"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


class Raw:
    """A telnet client by hand: every byte sent and received is the test's."""

    def __init__(self, port: int, rcvbuf: int | None = None) -> None:
        self.sock = socket.socket()
        if rcvbuf:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(WAIT)
        self.sock.connect(("127.0.0.1", port))
        self.got = b""
        self.closed = False

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def until(self, cond: Callable[[bytes], object], what: str, timeout: float = WAIT) -> object:
        deadline = time.monotonic() + timeout
        while True:
            value = cond(self.got)
            if value:
                return value
            left = deadline - time.monotonic()
            if left <= 0 or self.closed:
                raise AssertionError(f"{what} not received (closed={self.closed}); got {self.got[-300:]!r}")
            self.sock.settimeout(min(left, 0.2))
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                continue
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                self.closed = True
            self.got += chunk

    def welcome(self) -> str:
        m = self.until(lambda got: WELCOME.search(got), "the welcome line")
        return m.group(1).decode()  # type: ignore[union-attr]

    def after(self, request: bytes, what: str) -> bytes:
        """Send `request` then AYT; the negotiation the server answered the request with, in order.

        The server answers in order, so once the AYT's line is back the request's answers are all
        there too: no waiting for a quiet moment. Chat lines that arrive meanwhile (someone
        leaving) are left out.
        """
        mark = len(self.got)
        self.send(request + IAC + AYT)
        self.until(lambda got: got.find(YES, mark) >= 0, f"the answers to {what}")
        answers = b"".join(NEGOTIATION.findall(self.got, mark, self.got.find(YES, mark)))
        self.got = self.got[: mark] + self.got[mark:].replace(YES, b"", 1)
        return answers

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def raw(chat: Cluster) -> Iterator[Raw]:
    r = Raw(chat.port)
    yield r
    r.close()


def test_the_greeting_comes_before_the_welcome(raw: Raw) -> None:
    raw.welcome()
    assert raw.got.startswith(T.GREETING + b"*** Welcome to chatcluster!")


def test_options_are_answered_as_rfc_1143_says(raw: Raw) -> None:
    raw.welcome()
    requests = (neg(WILL, BINARY) + neg(DO, ECHO) + neg(WILL, NAWS) + neg(DO, TM) + neg(WONT, SGA)
                + neg(DO, SGA) + neg(DO, BINARY) + neg(DONT, ECHO))
    assert raw.after(requests, "the requests") == (neg(WONT, ECHO) + neg(DONT, NAWS) + neg(WILL, TM)
                                                   + neg(WONT, SGA) + neg(WONT, BINARY))


def test_ip_drops_the_unfinished_line_and_says_how_to_leave(chat: Cluster, raw: Raw) -> None:
    nick = raw.welcome()
    peer = chat.client()
    raw.send(b"secret" + IAC + IP + neg(DO, TM) + b"public\r\n")
    peer.wait_line(rf"{re.escape(nick)}: public")
    assert not [x for x in peer.lines if "secret" in x]
    raw.until(lambda got: HINT in got, "the hint")
    assert neg(WILL, TM) + HINT in raw.got  # the mark first: until it, the client shows nothing
    peer.close()


def test_a_7_bit_client_line_reaches_others_repaired(chat: Cluster, raw: Raw) -> None:
    nick = raw.welcome()
    peer = chat.client()
    raw.send(INETUTILS_7BIT_SAMPLE + b"\r\n")
    assert peer.wait_line(rf"{re.escape(nick)}: (.*)").group(1) == SAMPLE
    raw.until(lambda got: got.count(neg(WILL, TM)) == 5, "five timing marks")
    assert HINT not in raw.got
    peer.close()


def test_a_synch_sent_as_urgent_data_leaves_the_line_intact(chat: Cluster, raw: Raw) -> None:
    nick = raw.welcome()
    peer = chat.client()
    raw.send(b"hel" + IAC)
    raw.sock.send(DM, socket.MSG_OOB)  # telnet's Synch: the DM byte is TCP urgent data
    raw.send(b"lo\r\n")
    peer.wait_line(rf"{re.escape(nick)}: (.*)")
    assert peer.lines[-1] == f"{nick}: hello"
    peer.close()


def test_a_flood_of_requests_gets_a_bounded_answer(chat: Cluster, raw: Raw) -> None:
    raw.welcome()
    options = [bytes([o]) for o in range(256) if o != 6]
    flood = b"".join(neg(v, o) for v in (WILL, DO) for o in options) * 20
    answers = raw.after(flood, "the flood")
    assert len(answers) <= 2 * 256 * T.MAX_ANSWERS * 3
    assert raw.after(flood, "the flood, again") == b""


def test_a_client_insisting_on_a_refused_option_cannot_start_a_loop(raw: Raw) -> None:
    raw.welcome()
    rounds = 0
    while raw.after(neg(DO, ECHO), "DO ECHO") == neg(WONT, ECHO):
        rounds += 1
        assert rounds <= T.MAX_ANSWERS
    assert rounds == T.MAX_ANSWERS


def test_a_client_mashing_ctrl_c_without_reading_is_cut_off_by_its_sendq(chat: Cluster) -> None:
    # Each Ctrl-C of a telnet client (IAC IP, IAC DO TIMING-MARK) gets the mark and the hint
    # back: 67 bytes for 5. They go through the client's output like any line, so a client
    # that never reads them is disconnected once max_sendq_bytes is unsent (this cluster has
    # flood control off, which would otherwise stop reading it first); the others carry on.
    peer, other = chat.client(), chat.client()
    flooder = Raw(chat.port, rcvbuf=4096)
    nick = flooder.welcome()
    chunk = INETUTILS_CTRL_C * 10_000
    left = re.compile(rf"\*\*\* {re.escape(nick)} left.*")
    try:
        for _ in range(40):  # at most 2 MB of Ctrl-C, over 25 MB of answers
            flooder.sock.sendall(chunk)
            peer.drain_for_quiet()
            if any(left.fullmatch(x) for x in peer.lines):
                break
    except (BrokenPipeError, ConnectionResetError):
        pass
    peer.wait_line(left.pattern)
    peer.say("still here")
    other.wait_line(rf"{re.escape(peer.nick)}: still here")
    flooder.close()
    peer.close()
    other.close()
