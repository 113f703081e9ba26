"""Real telnet and nc clients in real terminals, against a real cluster.

Each client (Debian's `telnet`, `busybox telnet`, `plink -telnet`, `nc`) runs in a tmux pane
and is used as a person would: an ASCII line, a line of non-ASCII text, Ctrl-C and Ctrl-Z in
the middle of a line, backspace editing, a 600-character line, /quit. What another (socket)
client receives is checked byte for byte, and after each action a line from that other client
must appear on the screen as a row of its own, starting at the first column, with nothing
else on it (no stair-stepping, no stray bytes), and nothing the terminal received may be a
stray byte.

Some cases pass only because the server negotiates (IAC DO BINARY, answering DO
TIMING-MARK): inetutils telnet strips the 8th bit of typed bytes without BINARY, and after
sending DO TIMING-MARK it shows no more output until the server answers it.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest
from client_bytes import INETUTILS_7BIT_LINES, LONG, SAMPLE, SENT, inetutils_sample_switching_to_binary
from conftest import Client, Cluster
from pty_support import CLIENTS, ClientKind, Pane, leave_menu, missing, record_session

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

WELCOME = re.compile(r"\*\*\* Welcome to chatcluster! Your nickname is (\S+)\. Type /help for commands\.")
HINT = "*** (Ctrl-C and Ctrl-Z do nothing here: type /quit to leave)"


def kinds() -> list[object]:
    """Every client as a parameter, skipped when it cannot run here."""
    params = []
    for name, kind in CLIENTS.items():
        marks: list[pytest.MarkDecorator] = []
        reason = missing(kind)
        if reason:
            marks.append(pytest.mark.skip(reason=reason))
        params.append(pytest.param(kind, marks=marks, id=name))
    return params


@pytest.fixture(scope="module")
def chat() -> Iterator[Cluster]:
    # Two workers keep the load small; lines up to 1024 bytes, so the 600-character line is a line.
    cluster = Cluster(2, extra=("--max-line-bytes", "1024"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


class Session:
    """A real client in a pane, welcomed, and a socket client beside it in the same chat."""

    def __init__(self, chat: Cluster, kind: ClientKind) -> None:
        self.kind = kind
        self.chat = chat
        self.peer: Client | None = None
        self.pane = Pane(kind.argv("127.0.0.1", chat.port))
        self.counter = 0
        try:
            match = self.pane.wait(lambda rows: next((m for r in rows if (m := WELCOME.fullmatch(r))), None),
                                   "the welcome line, alone on its row")
            self.nick = match.group(1)  # type: ignore[union-attr]
            self.peer = chat.client()
            self.pane.wait_row(f"*** {self.peer.nick} joined")
            self.welcomed_at = len(self.pane.output())
        except BaseException:
            self.close()
            raise

    def said(self, text: str) -> None:
        """The other client receives `text` from this one, exactly."""
        assert self.peer is not None
        prefix = f"{self.nick}: "
        line = self.peer.wait(lambda lines: next((x for x in lines if x.startswith(prefix)), None),
                              what=f"a line from {self.nick}")
        assert line == prefix + text
        self.peer.lines.remove(line)  # type: ignore[arg-type]

    def other_line_shows_cleanly(self) -> None:
        """A line from the other client appears on a row of its own, exactly as sent."""
        assert self.peer is not None
        self.counter += 1
        text = f"line {self.counter} from the other side: é ✓ 世界"
        self.peer.say(text)
        self.pane.wait_row(f"{self.peer.nick}: {text}")
        self.no_stray_bytes()

    def no_stray_bytes(self) -> None:
        """Since the welcome, the terminal received only UTF-8 text, CR, LF, tab and backspace."""
        received = self.pane.output()[self.welcomed_at :]
        text = received.decode("utf-8")  # a telnet byte (0xFF...) leaking through fails here
        stray = {c for c in text if (ord(c) < 0x20 and c not in "\r\n\t\b") or 0x7F <= ord(c) < 0xA0}
        assert not stray, f"stray characters {sorted(stray)} in {received!r}"

    def close(self) -> None:
        self.pane.close()
        if self.peer is not None:
            self.peer.close()


@pytest.fixture
def session(chat: Cluster, request: pytest.FixtureRequest) -> Iterator[Session]:
    s = Session(chat, request.param)
    try:
        yield s
    finally:
        s.close()


def parametrize_clients(needs_server: tuple[str, ...] = ()) -> pytest.MarkDecorator:
    """Every client; `needs_server` names those for which the case depends on the server's telnet
    negotiation (documentation: they fail with telnet_negotiation = off)."""
    params = []
    for p in kinds():
        kind = p.values[0]  # type: ignore[attr-defined]
        marks = list(p.marks)  # type: ignore[attr-defined]
        params.append(pytest.param(kind, marks=marks, id=kind.name))
    return pytest.mark.parametrize("session", params, indirect=True)


# ---------------------------------------------------------------------------
# A user's session, one action per test


@parametrize_clients()
def test_ascii_line(session: Session) -> None:
    session.pane.line("hello there")
    session.said("hello there")
    session.other_line_shows_cleanly()


@parametrize_clients(needs_server=("inetutils",))
def test_non_ascii_line(session: Session) -> None:
    session.pane.line(SAMPLE)
    session.said(SAMPLE)
    session.other_line_shows_cleanly()


@parametrize_clients(needs_server=("inetutils",))
def test_ctrl_c_mid_line(session: Session) -> None:
    session.pane.type("half a li")
    session.pane.key("C-c")
    if session.kind.ctrl_c == "exit":
        # nc and plink end, as they do on any terminal; the server sees the user leave.
        session.pane.wait_dead()
        assert session.peer is not None
        session.peer.wait_line(rf"\*\*\* {re.escape(session.nick)} left.*")
        return
    leave_menu(session.pane, session.kind)
    if session.kind.ctrl_c == "interrupt":
        session.pane.wait_row(HINT)
    session.pane.line("after")
    session.said("after")  # the half line typed before Ctrl-C is gone
    session.other_line_shows_cleanly()


@parametrize_clients(needs_server=("inetutils",))
def test_ctrl_z_mid_line(session: Session) -> None:
    session.pane.type("half a li")
    session.pane.key("C-z")
    if session.kind.ctrl_c == "interrupt":
        session.pane.wait_row(HINT)
    session.pane.line("after")
    session.said("after")  # the terminal dropped the half line: it never left the client
    session.other_line_shows_cleanly()


@parametrize_clients(needs_server=("inetutils",))
def test_letters_a_7_bit_client_would_lose(session: Session) -> None:
    # Without BINARY inetutils swallows ą's second byte (^E) and takes Н's (^]) for its escape
    # key; only BINARY, asked for at connect, lets them through: the reason for `always`.
    session.pane.line("ą Н")
    session.said("ą Н")
    session.other_line_shows_cleanly()


@parametrize_clients()
def test_backspace_editing(session: Session) -> None:
    session.pane.type("hellp wörld")
    session.pane.key(*["BSpace"] * 7)
    session.pane.line("o wörld")
    session.said("hello wörld")
    session.other_line_shows_cleanly()


@parametrize_clients()
def test_600_character_line(session: Session) -> None:
    session.pane.line(LONG)
    session.said(LONG)
    session.other_line_shows_cleanly()


@parametrize_clients()
def test_quit(session: Session) -> None:
    assert session.peer is not None
    session.pane.line("/quit")
    session.pane.wait_row("*** Goodbye")
    session.peer.wait_line(rf"\*\*\* {re.escape(session.nick)} left.*")
    session.no_stray_bytes()


# ---------------------------------------------------------------------------
# What the clients put on the wire (the fixtures of the unit tests)


@pytest.mark.parametrize("telnet", [None, "always", "on-iac"], ids=["silent-server", "always", "on-iac"])
@pytest.mark.parametrize("kind", kinds())
def test_client_sends_the_recorded_bytes(kind: ClientKind, telnet: str | None) -> None:
    got = record_session(kind, telnet)
    expected = dict(SENT[kind.name, telnet])
    if (kind.name, telnet) == ("inetutils", "on-iac"):
        # Where in the line the client switches to BINARY depends on when it reads our DO.
        assert got.pop("sample") in inetutils_sample_switching_to_binary()
        del expected["sample"]
    assert got == expected


@pytest.mark.parametrize("kind", [p for p in kinds() if p.id == "inetutils"])  # type: ignore[attr-defined]
def test_inetutils_without_binary_loses_some_characters(kind: ClientKind) -> None:
    from pty_support import Recorder

    rec = Recorder(None)
    pane = Pane(kind.argv("127.0.0.1", rec.port))
    try:
        pane.wait_row("hello from the recorder")
        expected = b""
        for count, (typed, sent) in enumerate(INETUTILS_7BIT_LINES.items(), 1):
            pane.line(typed)
            expected += sent
            got = rec.wait_for(lambda d, n=count: d.count(b"\r\n") >= n and d, f"what inetutils sends for {typed!r}")
            assert got == expected
    finally:
        pane.close()
        rec.close()
