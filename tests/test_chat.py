"""The chat rules, with two or three ChatCore replicas joined by an in-memory bus.

No sockets and no processes: `Net` is the pure model of the cluster. The broker
is the real sequencing and routing logic (`broker.Broker`) emitting into one list
per worker (the one its topic names) instead of a PUB socket, each worker's
bookkeeping is the real
`wire.OrderTracker`, and client bytes go through the real `protocol.LineReader`.
Effects and bus items go through the worker's own `dispatch.apply` and
`dispatch.feed_bus`, into a sink that records bytes per client instead of
writing to sockets. Tests compare what each client saw, line by line.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import pytest

from chatcluster import broker as B
from chatcluster import chat as C
from chatcluster import dispatch, wire
from chatcluster import events as E
from chatcluster.protocol import Line, LineReader

NOW = 1_700_000_000.0
WELCOME = re.compile(r"\*\*\* Welcome to chatcluster! Your nickname is ([A-Za-z0-9]{4})\. Type /help for commands\.")
LOST = "*** Notice: some messages may have been lost"


class ScriptedRng(random.Random):
    """Draws the given nicknames first (one character per `choice`), then random ones."""

    def __init__(self, *nicks: str, seed: int = 0) -> None:
        super().__init__(seed)
        self.script = list("".join(nicks))

    def choice(self, seq: Any) -> Any:  # type: ignore[override]
        return self.script.pop(0) if self.script else super().choice(seq)


@dataclass(eq=False)
class Client:
    worker: str
    conn: int
    raw: bytearray = field(default_factory=bytearray)
    closed: bool = False
    nick: str = ""

    @property
    def fd(self) -> int:
        return self.conn  # no socket here; the registry needs a descriptor number

    @property
    def lines(self) -> list[str]:
        return bytes(self.raw).decode("utf-8", "replace").split("\r\n")[:-1]


@dataclass
class Replica:
    core: C.ChatCore
    order: wire.OrderTracker
    queue: list[tuple[bytes, bytes]] = field(default_factory=list)  # stamped messages not yet read
    outgoing: wire.Outbox = field(default_factory=wire.Outbox)
    clients: dict[int, Client] = field(default_factory=dict)
    readers: dict[int, LineReader] = field(default_factory=dict)
    lost_told: int = 0


class Recorder:
    """The dispatch.Sink of one worker of the Net: bytes go to the clients' `raw`, not to sockets."""

    def __init__(self, net: Net, w: str) -> None:
        self.net, self.w = net, w
        self.rep = net.workers[w]

    def publish(self, event: E.Event, route: str) -> None:
        self.rep.outgoing.append(event, route)

    def send(self, c: Client, data: bytes) -> None:
        if not c.closed:
            c.raw += data

    def broadcast(self, b: C.Broadcast, recipients: Iterable[tuple[int, Client]]) -> None:
        for conn, c in recipients:
            if conn not in b.exclude:
                c.raw += b.data
        if b.data == C.LOST_NOTICE:
            self.rep.lost_told += 1

    def entered(self, c: Client) -> None:
        pass

    def close(self, c: Client, why: str) -> None:
        c.closed = True
        self.rep.core.registry.remove(c)
        self.net.apply(self.w, self.rep.core.disconnect(c.conn, ""))

    def bus_restarted(self, control: list[E.Event]) -> None:
        self.net.inbox.append(self.rep.order.resync_batch(control))
        self.net.inbox.extend(p for *_, p in self.rep.order.unacked)

    def bus_trouble(self, kind: str, text: str) -> None:
        pass

    def batch_done(self, publisher: str, events: list[E.Event], effects: list[C.Effect]) -> None:
        pass


class Net:
    """Workers, their clients and the broker, all in one process and in one order."""

    def __init__(self, *workers: str, settings: C.ChatSettings | None = None,
                 rngs: dict[str, random.Random] | None = None) -> None:
        self.settings = settings or C.ChatSettings()
        self.rngs = rngs or {}
        self.now = NOW
        self.clock = 0.0  # the broker's monotonic clock
        self.inbox: list[bytes] = []  # pushed by workers, not yet read by the broker
        self.workers: dict[str, Replica] = {}
        self.broker = self.new_broker(())
        for w in workers:
            self.boot(w)

    # -- the bus -----------------------------------------------------------------------------

    def new_broker(self, workers: Iterable[str]) -> B.Broker:
        s = self.settings
        settings = B.BrokerSettings(s.default_room, s.history_lines, s.history_max_bytes)
        return B.Broker(self.emit, list(workers), self.clock, settings, clock=lambda: self.now)

    def emit(self, header: bytes, payload: bytes) -> None:
        rep = self.workers.get(wire.unstamp(header)[0])
        if rep is not None:
            rep.queue.append((header, payload))

    def boot(self, w: str) -> Replica:
        seed = sum(map(ord, w))
        rep = Replica(C.ChatCore(w, self.settings, self.rngs.get(w) or random.Random(seed)), wire.OrderTracker(w))
        self.workers[w] = rep
        self.inbox.append(wire.encode(w, 0, [rep.core.hello()]))
        self.settle()
        assert rep.core.ready, f"{w} got no snapshot"
        return rep

    def flush(self, w: str) -> None:
        rep = self.workers[w]
        for route, events in rep.outgoing.take():
            self.inbox.append(rep.order.number(events, route))

    def read_bus(self, w: str, limit: int | None = None) -> None:
        """Worker `w` handles what the broker sent it, as `Worker.handle_bus` does."""
        rep = self.workers[w]
        count = 0
        while rep.queue and (limit is None or count < limit):
            header, payload = rep.queue.pop(0)
            count += 1
            _, epoch, _, wseq = wire.unstamp(header)
            items: list[tuple[str, Any]] = []
            if not rep.order.accept(epoch, wseq, payload, items):
                rep.order.accept(epoch, wseq, payload, items)
            rep.core.clock = self.now
            dispatch.feed_bus(rep.core, items, rep.core.registry, Recorder(self, w), rep.order)
            self.flush(w)

    def step_broker(self) -> None:
        while self.inbox:
            self.broker.receive(self.inbox.pop(0), self.clock)

    def settle(self, skip: Iterable[str] = ()) -> None:
        """Run the bus until nothing moves (workers in `skip` read nothing)."""
        skip = set(skip)
        for _ in range(1000):
            for w in self.workers:
                self.flush(w)
            moved = bool(self.inbox)
            self.step_broker()
            for w, rep in list(self.workers.items()):
                if w not in skip and rep.queue:
                    moved = True
                    self.read_bus(w)
            if not moved:
                return
        raise AssertionError("the bus never settled")

    # -- effects, as the worker applies them ---------------------------------------------------

    def apply(self, w: str, effects: list[C.Effect]) -> None:
        dispatch.apply(effects, self.workers[w].core.registry, Recorder(self, w))

    # -- clients -----------------------------------------------------------------------------

    def connect(self, w: str, ip: str = "127.0.0.1") -> Client:
        rep = self.workers[w]
        c = Client(w, rep.core.registry.new_conn())
        rep.clients[c.conn] = c
        rep.core.registry.add(c)
        rep.readers[c.conn] = LineReader(512)
        self.apply(w, rep.core.connect(c.conn, ip, self.now))
        return c

    def join(self, w: str, nick: str | None = None) -> Client:
        """A connected, welcomed client (renamed to `nick` if given)."""
        c = self.connect(w)
        self.settle()
        m = WELCOME.fullmatch(c.lines[0]) if c.lines else None
        assert m, f"no welcome line: {c.lines}"
        c.nick = m.group(1)
        if nick:
            self.say(c, f"/nick {nick}")
            assert c.lines[-1] == f"*** You are now known as {nick}", c.lines
            c.nick = nick
        return c

    def send(self, c: Client, data: bytes, settle: bool = True) -> None:
        """Bytes from the client's socket, as the worker reads them."""
        rep = self.workers[c.worker]
        for ev in rep.readers[c.conn].feed(data):
            if c.closed:
                break
            if isinstance(ev, Line):
                if ev.text.strip():
                    self.apply(c.worker, rep.core.line(c.conn, ev.text, self.now))
            else:
                self.apply(c.worker, rep.core.line_too_long(c.conn, ev.limit))
        if settle:
            self.settle()

    def say(self, c: Client, text: str, settle: bool = True) -> None:
        self.send(c, text.encode() + b"\r\n", settle)

    def half_close(self, c: Client) -> None:
        """The client shut its sending side: the worker still sends it what is queued."""
        rep = self.workers[c.worker]
        rep.core.registry.leave_room(c.conn)
        self.apply(c.worker, rep.core.disconnect(c.conn, ""))
        self.settle()

    def hang_up(self, c: Client, reason: str = "") -> None:
        rep = self.workers[c.worker]
        c.closed = True
        rep.core.registry.remove(c)
        self.apply(c.worker, rep.core.disconnect(c.conn, reason))
        self.settle()

    # -- failures ----------------------------------------------------------------------------

    def kill_worker(self, w: str) -> None:
        """The process dies; the supervisor tells the broker."""
        del self.workers[w]
        self.broker.gone(w, self.clock)
        self.settle()

    def kill_broker(self, undelivered: dict[str, int] | None = None) -> None:
        """The broker dies and a new one starts.

        `undelivered[w]`: how many of the last messages the old broker published never reached
        worker w (they were still in its socket). What a worker had received stays readable.
        """
        for w, n in (undelivered or {}).items():
            if n:
                del self.workers[w].queue[-n:]
        self.clock += 10
        self.broker = self.new_broker(self.workers)
        self.broker.nudge(self.clock)

    # -- views -------------------------------------------------------------------------------

    def who(self, c: Client) -> str:
        self.say(c, "/who")
        return c.lines[-1]

    def assert_agree(self) -> None:
        """Every worker's welcomed clients are the broker's members of that worker, under the same names."""
        for w, rep in self.workers.items():
            want = sorted((m.conn, m.nick) for m in self.broker.roster.members_of(w))
            got = sorted((u.conn, u.nick) for u in rep.core.local.values() if u.state == C.ACTIVE)
            assert got == want, f"{w} disagrees with the broker"


def since(c: Client, mark: int) -> list[str]:
    return c.lines[mark:]


@pytest.fixture
def net() -> Net:
    return Net("w1", "w2")


# -- joining -----------------------------------------------------------------------------------


def test_welcome_line_gives_a_random_four_character_nickname(net: Net) -> None:
    a = net.connect("w1")
    assert a.lines == []  # nothing before the claim of the name came back through the bus
    net.settle()
    assert len(a.lines) == 1 and WELCOME.fullmatch(a.lines[0])
    assert a.raw.endswith(b"\r\n")


def test_random_nicknames_differ(net: Net) -> None:
    names = {net.join(w).nick.lower() for w in ("w1", "w2") * 10}
    assert len(names) == 20


def test_others_are_told_who_joined_but_not_the_joiner(net: Net) -> None:
    a = net.join("w1")
    b = net.join("w2")
    c = net.join("w1")
    assert a.lines[1:] == [f"*** {b.nick} joined", f"*** {c.nick} joined"]
    assert b.lines[1:] == [f"*** {c.nick} joined"]
    assert c.lines[1:] == []


def test_no_join_or_leave_notices_when_announcements_are_off() -> None:
    net = Net("w1", "w2", settings=C.ChatSettings(announce_joins=False))
    a = net.join("w1")
    b = net.join("w2")
    net.say(b, "/quit")
    c = net.join("w2")
    net.hang_up(c)
    assert a.lines[1:] == []


def test_lines_typed_before_the_welcome_follow_it() -> None:
    net = Net("w1", "w2")
    b = net.join("w2")
    a = net.connect("w1")
    net.send(a, b"early\r\n/nick Early\r\n" + b"x" * 600 + b"\r\n", settle=False)
    net.settle()
    assert WELCOME.fullmatch(a.lines[0])
    assert a.lines[1:] == ["*** You are now known as Early", "*** Error: line too long (max 512 bytes)"]
    nick = WELCOME.fullmatch(a.lines[0]).group(1)  # type: ignore[union-attr]
    assert b.lines[1:] == [f"*** {nick} joined", f"{nick}: early", f"*** {nick} is now known as Early"]


# -- chatting ------------------------------------------------------------------------------------


def test_a_line_reaches_every_other_client_on_every_worker_and_not_the_sender() -> None:
    net = Net("w1", "w2", "w3")
    a, b, c, d = net.join("w1"), net.join("w1"), net.join("w2"), net.join("w3")
    marks = [len(x.lines) for x in (a, b, c, d)]
    net.say(a, "hello, world")
    assert since(a, marks[0]) == []
    for x, mark in zip((b, c, d), marks[1:], strict=True):
        assert since(x, mark) == [f"{a.nick}: hello, world"]


def test_empty_and_whitespace_lines_are_ignored(net: Net) -> None:
    a, b = net.join("w1"), net.join("w2")
    mark = len(b.lines), len(a.lines)
    net.send(a, b"\r\n   \r\n\t\n \r\0", settle=False)
    assert net.workers["w1"].outgoing == []
    net.settle()
    assert (len(b.lines), len(a.lines)) == mark


def test_a_double_slash_sends_the_line_with_one_slash_removed(net: Net) -> None:
    a, b = net.join("w1"), net.join("w2")
    net.say(a, "//nick is not a command")
    assert b.lines[-1] == f"{a.nick}: /nick is not a command"


def test_line_endings_of_telnet_and_nc_all_end_a_line(net: Net) -> None:
    a, b = net.join("w1"), net.join("w2")
    net.send(a, b"one\ntwo\r\nthree\r\0four\n")
    assert b.lines[-4:] == [f"{a.nick}: {w}" for w in ("one", "two", "three", "four")]


def test_invalid_utf8_is_replaced_not_refused(net: Net) -> None:
    a, b = net.join("w1"), net.join("w2")
    net.send(a, b"caf\xc3 \x80ok\r\n")
    assert b.lines[-1] == f"{a.nick}: caf\ufffd \ufffdok"


def test_a_too_long_line_is_refused_and_not_delivered(net: Net) -> None:
    a, b = net.join("w1"), net.join("w2")
    mark = len(b.lines)
    net.send(a, b"y" * 513 + b"z" * 2000 + b"\r\nshort\r\n")
    assert a.lines[-1] == "*** Error: line too long (max 512 bytes)"
    assert since(b, mark) == [f"{a.nick}: short"]


def test_a_line_of_exactly_the_limit_is_delivered(net: Net) -> None:
    a, b = net.join("w1"), net.join("w2")
    net.send(a, b"q" * 512 + b"\r\n")
    assert b.lines[-1] == f"{a.nick}: " + "q" * 512


def test_me_shows_an_action_to_the_others(net: Net) -> None:
    a, b = net.join("w1"), net.join("w2")
    mark = len(a.lines)
    net.say(a, "/me waves at everyone")
    assert b.lines[-1] == f"* {a.nick} waves at everyone"
    assert since(a, mark) == []


def test_me_without_an_action_is_an_error(net: Net) -> None:
    a, b = net.join("w1"), net.join("w2")
    mark = len(b.lines)
    net.say(a, "/me   ")
    assert a.lines[-1] == "*** Error: usage: /me ACTION"
    assert since(b, mark) == []


def test_help_lists_every_command_with_its_syntax(net: Net) -> None:
    a = net.join("w1")
    mark = len(a.lines)
    net.say(a, "/help")
    shown = since(a, mark)
    assert shown and all(line.startswith("*** ") for line in shown)
    for syntax in ("/nick NAME", "/me ACTION", "/who", "/whois NICK", "/quit [REASON]", "/help"):
        assert sum(line.startswith(f"*** {syntax} ") for line in shown) == 1, syntax
    assert net.workers["w1"].outgoing == [] and net.inbox == []


def test_unknown_command_is_an_error_naming_it(net: Net) -> None:
    a, b = net.join("w1"), net.join("w2")
    mark = len(b.lines)
    net.say(a, "/dance wildly")
    assert a.lines[-1] == "*** Error: unknown command /dance. Type /help for commands."
    assert since(b, mark) == []


def test_commands_are_case_insensitive(net: Net) -> None:
    a, b = net.join("w1"), net.join("w2")
    net.say(a, "/ME shouts")
    assert b.lines[-1] == f"* {a.nick} shouts"


# -- nicknames -----------------------------------------------------------------------------------


def test_nick_change_tells_the_requester_and_everyone_else(net: Net) -> None:
    a, b, c = net.join("w1"), net.join("w1"), net.join("w2")
    old = a.nick
    net.say(a, "/nick Alice")
    assert a.lines[-1] == "*** You are now known as Alice"
    assert b.lines[-1] == c.lines[-1] == f"*** {old} is now known as Alice"
    net.say(a, "hi")
    assert c.lines[-1] == "Alice: hi"
    net.assert_agree()


@pytest.mark.parametrize(("arg", "error"), [
    ("", "*** Error: usage: /nick NAME"),
    ("x" * 25, "*** Error: nickname is too long (25 characters, max 24)"),
    ("two words", "*** Error: a nickname may only use letters A-Z a-z, digits 0-9, _ and -"),
    ("café", "*** Error: a nickname may only use letters A-Z a-z, digits 0-9, _ and -"),
    ("semi;colon", "*** Error: a nickname may only use letters A-Z a-z, digits 0-9, _ and -"),
])
def test_an_invalid_nick_is_refused_and_nothing_changes(net: Net, arg: str, error: str) -> None:
    a, b = net.join("w1"), net.join("w2")
    mark = len(b.lines)
    net.say(a, f"/nick {arg}".rstrip())
    assert a.lines[-1] == error
    assert since(b, mark) == []
    net.say(a, "still me")
    assert b.lines[-1] == f"{a.nick}: still me"


def test_longest_valid_nick_is_accepted(net: Net) -> None:
    a = net.join("w1")
    net.say(a, "/nick " + "A_b-9" * 4 + "wxyz")
    assert a.lines[-1] == "*** You are now known as A_b-9A_b-9A_b-9A_b-9wxyz"


def test_a_nick_held_on_another_worker_is_refused_in_any_case(net: Net) -> None:
    a, b, c = net.join("w1", "Bob"), net.join("w2"), net.join("w1")
    mark = len(c.lines)
    net.say(b, "/nick bOB")
    assert b.lines[-1] == "*** Error: nickname bOB is already taken"
    assert since(c, mark) == []
    net.say(b, "unchanged")
    assert a.lines[-1] == f"{b.nick}: unchanged"


def test_own_nick_in_another_case_is_allowed(net: Net) -> None:
    a, b = net.join("w1", "bob"), net.join("w2")
    net.say(a, "/nick Bob")
    assert a.lines[-1] == "*** You are now known as Bob"
    assert b.lines[-1] == "*** bob is now known as Bob"


def test_the_same_nick_again_changes_nothing(net: Net) -> None:
    a, b = net.join("w1", "same"), net.join("w2")
    mark = len(b.lines)
    net.say(a, "/nick same")
    assert a.lines[-1] == "*** You are already known as same"
    assert since(b, mark) == []


def test_a_freed_nick_can_be_taken(net: Net) -> None:
    a, b = net.join("w1", "Free"), net.join("w2")
    net.say(a, "/nick Other")
    net.say(b, "/nick free")
    assert b.lines[-1] == "*** You are now known as free"


@pytest.mark.parametrize("first", ["w1", "w2"])
def test_simultaneous_claims_of_a_name_exactly_one_wins_and_all_agree(first: str) -> None:
    net = Net("w1", "w2", "w3")
    a, b, watcher = net.join("w1"), net.join("w2"), net.join("w3")
    old = {"w1": a.nick, "w2": b.nick}
    # Both workers see the name free and publish their claim before either comes back.
    net.say(a, "/nick Prize", settle=False)
    net.say(b, "/nick prize", settle=False)
    order = [first, "w2" if first == "w1" else "w1"]
    for w in order:
        net.flush(w)  # the broker reads them in this order
    net.settle()
    winner, loser = (a, b) if first == "w1" else (b, a)
    wanted = "Prize" if first == "w1" else "prize"
    assert winner.lines[-1] == f"*** You are now known as {wanted}"
    assert loser.lines[-1] == f"*** Error: nickname {'prize' if first == 'w1' else 'Prize'} is already taken"
    assert watcher.lines[-1] == f"*** {old[first]} is now known as {wanted}"
    assert sum("is now known as" in line for line in watcher.lines) == 1
    net.assert_agree()
    for c in (a, b, watcher):
        assert net.who(c).endswith(", ".join(sorted([wanted, old[order[1]], watcher.nick], key=str.lower)))


def test_a_random_name_claimed_first_elsewhere_is_drawn_again() -> None:
    rngs = {"w1": ScriptedRng("Same", "Aaaa"), "w2": ScriptedRng("Same", "Bbbb")}
    net = Net("w1", "w2", rngs=rngs)
    a = net.connect("w1")
    b = net.connect("w2")
    net.settle()
    assert a.lines[0] == "*** Welcome to chatcluster! Your nickname is Same. Type /help for commands."
    assert b.lines[0] == "*** Welcome to chatcluster! Your nickname is Bbbb. Type /help for commands."
    assert a.lines[1:] == ["*** Bbbb joined"] and b.lines[1:] == []
    net.assert_agree()


def test_a_random_name_held_in_another_case_is_refused_and_drawn_again() -> None:
    rngs = {"w1": ScriptedRng("Zed1"), "w2": ScriptedRng("zED1", "Next")}
    net = Net("w1", "w2", rngs=rngs)
    a = net.join("w1")
    b = net.connect("w2")
    net.settle()
    assert b.lines == ["*** Welcome to chatcluster! Your nickname is Next. Type /help for commands."]
    assert a.lines[1:] == ["*** Next joined"]  # the refused claim showed nobody anything
    net.assert_agree()


# -- who and whois -------------------------------------------------------------------------------


def test_who_lists_everyone_on_every_worker_sorted_case_insensitively() -> None:
    net = Net("w1", "w2", "w3")
    a = net.join("w1", "carol")
    net.join("w2", "Alice")
    net.join("w3", "bob")
    net.join("w2", "_under")
    c = net.join("w1", "Zed")
    expected = "*** 5 users online: _under, Alice, bob, carol, Zed"
    assert net.who(a) == expected
    assert net.who(c) == expected
    assert net.who(net.join("w3", "Dave")) == "*** 6 users online: _under, Alice, bob, carol, Dave, Zed"


def test_commands_after_who_are_answered_after_its_reply(net: Net) -> None:
    a = net.join("w1", "Ann")
    net.join("w2", "Ben")
    net.send(a, b"/who\r\n/whois Ben\r\n/help\r\n")
    mark = a.lines.index("*** 2 users online: Ann, Ben")
    assert a.lines[mark + 1].startswith("*** Ben is on worker w2, connected since ")
    assert a.lines[mark + 2] == C.HELP[0]


def test_who_with_one_user_says_user(net: Net) -> None:
    a = net.join("w1", "solo")
    assert net.who(a) == "*** 1 user online: solo"


def test_who_drops_those_who_left(net: Net) -> None:
    a, b = net.join("w1", "stay"), net.join("w2", "go")
    net.say(b, "/quit")
    assert net.who(a) == "*** 1 user online: stay"


def test_whois_names_the_worker_and_the_connection_time(net: Net) -> None:
    a = net.join("w1")
    net.join("w2", "Target")
    net.now += 125
    net.say(a, "/whois target")
    assert a.lines[-1] == "*** Target is on worker w2, connected since 2023-11-14 22:13:20 UTC (2m 5s ago)"


def test_whois_of_an_unknown_nick_is_an_error(net: Net) -> None:
    a = net.join("w1")
    net.say(a, "/whois nobody")
    assert a.lines[-1] == "*** Error: no such nickname nobody"
    net.say(a, "/whois")
    assert a.lines[-1] == "*** Error: usage: /whois NICK"


# -- leaving -------------------------------------------------------------------------------------


def test_quit_says_goodbye_closes_and_tells_the_others(net: Net) -> None:
    a, b = net.join("w1"), net.join("w2")
    net.say(a, "/quit")
    assert a.lines[-1] == "*** Goodbye" and a.closed
    assert b.lines[-1] == f"*** {a.nick} left"
    net.assert_agree()
    assert len(net.broker.roster) == 1


def test_quit_with_a_reason_tells_it(net: Net) -> None:
    a, b = net.join("w1"), net.join("w2")
    net.say(a, "/quit   gone fishing ")
    assert b.lines[-1] == f"*** {a.nick} left (gone fishing)"


def test_nothing_after_quit_is_processed(net: Net) -> None:
    a, b = net.join("w1"), net.join("w2")
    mark = len(b.lines)
    net.send(a, b"/quit\r\nafter quit\r\n")
    assert a.lines[-1] == "*** Goodbye"
    assert since(b, mark) == [f"*** {a.nick} left"]


def test_a_dropped_connection_tells_the_others_left(net: Net) -> None:
    a, b = net.join("w1"), net.join("w2")
    net.hang_up(a)
    assert b.lines[-1] == f"*** {a.nick} left"
    net.assert_agree()


def test_a_client_leaving_before_its_welcome_leaves_no_trace(net: Net) -> None:
    b = net.join("w2")
    a = net.connect("w1")
    nick = net.workers["w1"].outgoing[0][2]
    net.hang_up(a)
    assert a.lines == []
    assert b.lines[1:] == [f"*** {nick} joined", f"*** {nick} left"]
    assert len(net.broker.roster) == 1
    net.assert_agree()


def test_lines_sent_before_a_half_close_go_out_before_the_leave(net: Net) -> None:
    b = net.join("w2")
    a = net.connect("w1")  # like `printf 'hi\n/nick Bot\nbye\n' | nc -N`
    net.send(a, b"hi\r\n/nick Bot\r\nbye\r\n", settle=False)
    net.half_close(a)
    nick = WELCOME.fullmatch(a.lines[0]).group(1)  # type: ignore[union-attr]
    assert a.lines[1:] == ["*** You are now known as Bot"]
    assert b.lines[1:] == [f"*** {nick} joined", f"{nick}: hi", f"*** {nick} is now known as Bot",
                           "Bot: bye", "*** Bot left"]
    assert len(net.broker.roster) == 1
    net.assert_agree()


def test_a_half_closed_client_renaming_itself_still_says_its_last_line(net: Net) -> None:
    a, b = net.join("w1"), net.join("w2")
    net.send(a, b"/nick Bot\r\nlast words\r\n/quit done\r\nignored\r\n", settle=False)
    net.hang_up(a, "connection lost")
    assert b.lines[-3:] == [f"*** {a.nick} is now known as Bot", "Bot: last words", "*** Bot left (done)"]
    net.assert_agree()


# -- one order -----------------------------------------------------------------------------------


def test_every_client_sees_the_same_order_minus_its_own_lines() -> None:
    net = Net("w1", "w2", "w3")
    clients = [net.join(w) for w in ("w1", "w1", "w2", "w3", "w3")]
    observer = net.join("w2")  # says nothing, so it sees everything
    marks = [len(c.lines) for c in clients]
    start = len(observer.lines)
    names: dict[int, set[str]] = {i: {c.nick} for i, c in enumerate(clients)}
    rng = random.Random(3)
    for i in range(300):
        k = rng.randrange(len(clients))
        c = clients[k]
        roll = rng.random()
        if roll < 0.05:
            net.say(c, f"/nick n{i}", settle=False)
            names[k].add(f"n{i}")
        elif roll < 0.1:
            net.say(c, f"/me does {i}", settle=False)
        else:
            net.say(c, f"line {i}", settle=False)
        if rng.random() < 0.3:
            net.flush(c.worker)
        if rng.random() < 0.2:
            net.settle()
    net.settle()
    everything = since(observer, start)
    assert len([line for line in everything if ": line " in line]) > 200
    for k, (c, mark) in enumerate(zip(clients, marks, strict=True)):
        expected = []
        for line in everything:
            author = line.split(": ", 1)[0] if ": " in line else line.split(" ")[1] if line.startswith("* ") else ""
            if author in names[k]:
                continue  # its own line: never echoed
            m = re.fullmatch(r"\*\*\* \S+ is now known as (\S+)", line)
            if m and m.group(1) in names[k]:
                line = f"*** You are now known as {m.group(1)}"
            expected.append(line)
        assert since(c, mark) == expected


def test_each_client_sees_exactly_the_others_lines_once_in_send_order() -> None:
    net = Net("w1", "w2", "w3")
    clients = [net.join(w, f"c{i}") for i, w in enumerate(("w1", "w2", "w3", "w1"))]
    marks = [len(c.lines) for c in clients]
    for i in range(50):
        for c in clients:
            net.say(c, f"{c.nick}-{i}", settle=False)
        if i % 7 == 0:
            net.settle()
    net.settle()
    for c, mark in zip(clients, marks, strict=True):
        view = since(c, mark)
        for other in clients:
            lines = [line for line in view if line.startswith(f"{other.nick}: ")]
            want = [] if other is c else [f"{other.nick}: {other.nick}-{i}" for i in range(50)]
            assert lines == want


def test_a_client_welcomed_before_a_send_receives_it() -> None:
    net = Net("w1", "w2")
    talker = net.join("w1")
    sent: list[int] = []
    newcomers: list[tuple[Client, int]] = []  # (client, lines sent before its welcome)
    pending: list[Client] = []
    for i in range(60):
        net.say(talker, f"m{i}", settle=False)
        sent.append(i)
        if i % 5 == 0:
            pending.append(net.connect("w2"))
        net.flush("w1")
        net.flush("w2")
        net.step_broker()
        for w in ("w2", "w1"):
            net.read_bus(w, limit=1)
        for c in list(pending):
            if c.lines:
                newcomers.append((c, len(sent)))
                pending.remove(c)
    net.settle()
    for c in pending:
        newcomers.append((c, len(sent)))
    for c, before in newcomers:
        got = [int(line.split(": m")[1]) for line in c.lines if line.startswith(f"{talker.nick}: m")]
        # Everything sent after the welcome arrived, in order, and nothing twice.
        assert got == sorted(set(got))
        assert set(range(before, 60)) <= set(got)


# -- the whole sequence, whatever the chunking ----------------------------------------------------

SCRIPT = (b"hi\r\n" + b"x" * 600 + b"\r\nafter\n/nick Zed\r\n/me waves\r\0//slash\r\n \r\n"
          b"\xc3(bad\r\n/who\r\n/bogus\r\n/quit bye\r\n")


def run_script(chunks: list[bytes]) -> list[list[str]]:
    net = Net("w1", "w2")
    a, b, c = net.join("w1"), net.join("w2"), net.join("w1")
    for chunk in chunks:
        net.send(a, chunk)
    return [a.lines, b.lines, c.lines]


def test_script_output_is_what_the_protocol_says() -> None:
    a, b, c = run_script([SCRIPT])
    nick = WELCOME.fullmatch(a[0]).group(1)  # type: ignore[union-attr]
    bn = WELCOME.fullmatch(b[0]).group(1)  # type: ignore[union-attr]
    cn = WELCOME.fullmatch(c[0]).group(1)  # type: ignore[union-attr]
    assert a[1:] == [
        f"*** {bn} joined", f"*** {cn} joined",
        "*** Error: line too long (max 512 bytes)",
        "*** You are now known as Zed",
        f"*** 3 users online: {', '.join(sorted([bn, cn, 'Zed'], key=str.lower))}",
        "*** Error: unknown command /bogus. Type /help for commands.",
        "*** Goodbye",
    ]
    others = [f"{nick}: hi", f"{nick}: after", f"*** {nick} is now known as Zed", "* Zed waves",
              "Zed: /slash", "Zed: \ufffd(bad", "*** Zed left (bye)"]
    assert b[2:] == others and c[1:] == others


def test_the_same_output_whatever_the_bytes_are_split() -> None:
    reference = run_script([SCRIPT])
    for cut in range(1, len(SCRIPT)):
        assert run_script([SCRIPT[:cut], SCRIPT[cut:]]) == reference, f"split at byte {cut}"
    assert run_script([SCRIPT[i:i + 1] for i in range(len(SCRIPT))]) == reference


# -- booting workers and dead workers -----------------------------------------------------------


def test_a_booting_worker_sees_the_whole_roster_from_its_first_client() -> None:
    net = Net("w1", "w2")
    a = net.join("w1", "Ann")
    net.join("w2", "Ben")
    net.say(a, "before the new worker")
    net.boot("w3")
    c = net.join("w3")
    assert c.lines == [c.lines[0]]  # nothing that happened before it connected
    assert net.who(c) == f"*** 3 users online: {', '.join(sorted(['Ann', 'Ben', c.nick], key=str.lower))}"
    net.assert_agree()


def test_a_booting_worker_ignores_everything_before_its_snapshot() -> None:
    net = Net("w1")
    a = net.join("w1", "Ann")
    rep = Replica(C.ChatCore("w3", net.settings, random.Random(1)), wire.OrderTracker("w3"))
    net.workers["w3"] = rep
    net.say(a, "/nick Anna", settle=False)
    net.flush("w1")
    net.step_broker()  # sequenced before w3 asks: already part of its snapshot
    net.inbox.append(wire.encode("w3", 0, [rep.core.hello()]))
    net.settle()
    assert rep.core.ready and not rep.core.undelivered
    c = net.join("w3")
    assert c.lines == [c.lines[0]]  # not the rename, which came before the snapshot
    assert net.who(c) == f"*** 2 users online: {', '.join(sorted(['Anna', c.nick], key=str.lower))}"
    net.assert_agree()


def test_a_dead_workers_users_leave_and_their_names_are_free() -> None:
    net = Net("w1", "w2")
    a = net.join("w1")
    net.join("w2", "Doomed")
    net.join("w2", "Also")
    net.kill_worker("w2")
    assert a.lines[-2:] in (["*** Doomed left (connection lost)", "*** Also left (connection lost)"],
                            ["*** Also left (connection lost)", "*** Doomed left (connection lost)"])
    assert net.who(a) == f"*** 1 user online: {a.nick}"
    net.say(a, "/nick doomed")
    assert a.lines[-1] == "*** You are now known as doomed"
    net.assert_agree()


def test_batches_a_dead_worker_sent_just_before_dying_are_ignored() -> None:
    net = Net("w1", "w2")
    a = net.join("w1")
    z = net.join("w2", "Zombie")
    net.say(z, "from beyond", settle=False)
    net.say(z, "/nick Ghost", settle=False)
    net.flush("w2")
    late = net.inbox[:]
    net.inbox.clear()
    net.kill_worker("w2")
    net.inbox.extend(late)  # still in the broker's socket when the supervisor's GONE came in
    net.settle()
    assert "Zombie: from beyond" not in a.lines and not any("Ghost" in line for line in a.lines)
    assert len(net.broker.roster) == 1
    net.assert_agree()


# -- broker restarts -----------------------------------------------------------------------------


def restart_net() -> tuple[Net, list[Client]]:
    net = Net("w1", "w2", "w3")
    clients = [net.join("w1", "Ann"), net.join("w2", "Ben"), net.join("w3", "Cy"), net.join("w1", "Dee")]
    return net, clients


def test_after_a_broker_restart_chat_resumes_and_the_roster_is_whole() -> None:
    net, (ann, ben, cy, dee) = restart_net()
    net.kill_broker()
    net.settle()
    assert all(not rep.core.syncing for rep in net.workers.values())
    net.assert_agree()
    for c in (ann, ben, cy, dee):
        assert net.who(c) == "*** 4 users online: Ann, Ben, Cy, Dee"
    net.say(ben, "still here")
    assert ann.lines[-1] == cy.lines[-1] == dee.lines[-1] == "Ben: still here"
    assert not any(LOST in c.lines for c in (ann, ben, cy, dee))


def test_lines_sent_while_the_broker_is_down_arrive_once() -> None:
    net, (ann, ben, cy, dee) = restart_net()
    net.kill_broker()
    for i in range(5):
        net.say(ann, f"a{i}", settle=False)
        net.say(ben, f"b{i}", settle=False)
        net.flush("w1")
        net.flush("w2")
    net.settle()
    for c in (ann, ben, cy, dee):
        others = [f"Ann: a{i}" for i in range(5)] * (c is not ann) + [f"Ben: b{i}" for i in range(5)] * (c is not ben)
        got = [line for line in c.lines if line.startswith(("Ann: ", "Ben: "))]
        assert sorted(got) == sorted(others)
        assert [x for x in got if x.startswith("Ann")] == [x for x in others if x.startswith("Ann")]
        assert LOST not in c.lines
    net.assert_agree()


def test_a_batch_the_old_broker_sent_to_some_workers_only_is_a_gap_told_once() -> None:
    net, (ann, ben, cy, dee) = restart_net()
    net.say(ann, "seen by w1 only", settle=False)
    net.flush("w1")
    net.step_broker()
    net.read_bus("w1")  # the publisher saw it come back, so it will not send it again
    net.kill_broker(undelivered={"w2": 1, "w3": 1})
    net.say(ann, "after the restart")
    net.say(dee, "and more")
    for c in (ben, cy):
        assert c.lines.count(LOST) == 1
        assert "Ann: seen by w1 only" not in c.lines and c.lines[-2:] == ["Ann: after the restart", "Dee: and more"]
    assert dee.lines.count(LOST) == 0 and "Ann: seen by w1 only" in dee.lines
    assert net.workers["w2"].order.gaps == 1
    net.assert_agree()


def test_a_batch_its_publisher_never_saw_back_is_sent_again_without_repeats() -> None:
    net, (ann, ben, cy, dee) = restart_net()
    net.say(ann, "/nick Anna", settle=False)
    net.say(ann, "one", settle=False)
    net.flush("w1")
    net.step_broker()
    net.read_bus("w2")  # w2 saw it; w1 (the publisher) and w3 did not
    net.kill_broker(undelivered={"w1": 1, "w3": 1})
    net.settle()
    for c in (ben, cy, dee):
        assert c.lines.count("*** Ann is now known as Anna") == 1
        assert c.lines.count("Anna: one") == 1
    assert ann.lines.count("*** You are now known as Anna") == 1
    assert not any(LOST in c.lines for c in (ann, ben, cy, dee))
    net.assert_agree()
    assert net.who(ben) == "*** 4 users online: Anna, Ben, Cy, Dee"


def test_a_client_waiting_for_its_welcome_gets_it_after_a_restart() -> None:
    net, (ann, ben, cy, dee) = restart_net()
    new = net.connect("w2")
    net.flush("w2")  # its claim is in the broker's socket when the broker dies
    net.kill_broker()
    net.settle()
    assert len(new.lines) == 1 and WELCOME.fullmatch(new.lines[0])
    nick = WELCOME.fullmatch(new.lines[0]).group(1)  # type: ignore[union-attr]
    assert ann.lines[-1] == f"*** {nick} joined"
    net.assert_agree()


def test_roster_events_of_a_replayed_batch_still_count() -> None:
    net, (ann, ben, cy, dee) = restart_net()
    new = net.connect("w3")
    net.flush("w3")
    net.step_broker()
    net.read_bus("w1")  # w1 saw the JOIN; w3 (its publisher) did not, so it is pending there
    net.kill_broker(undelivered={"w2": 1, "w3": 1})
    net.settle()
    nick = WELCOME.fullmatch(new.lines[0]).group(1)  # type: ignore[union-attr]
    assert ann.lines.count(f"*** {nick} joined") == 1
    assert ben.lines.count(f"*** {nick} joined") == 1
    net.assert_agree()
    assert len(net.broker.roster) == 5


def zed_on_both_sides_of_a_restart(net: Net, ann: Client, ben: Client) -> None:
    """Ann gives up "Zed" and Ben takes it, but w1 has not yet seen Ann's rename come back.

    After a broker restart w1 and w2 then both re-announce a member called zed.
    """
    net.say(ann, "/nick Zed")
    net.say(ann, "/nick Yan", settle=False)
    net.flush("w1")
    net.step_broker()
    net.read_bus("w2")
    net.say(ben, "/nick zed", settle=False)
    net.flush("w2")
    net.step_broker()
    net.read_bus("w2")
    net.read_bus("w3")


def test_a_name_claimed_twice_across_a_restart_is_kept_by_one_and_the_other_is_told() -> None:
    net, (ann, ben, cy, dee) = restart_net()
    zed_on_both_sides_of_a_restart(net, ann, ben)
    assert ben.lines[-1] == "*** You are now known as zed"
    net.kill_broker(undelivered={"w1": 2})
    net.settle()
    net.assert_agree()
    names = sorted(m.nick for m in net.broker.roster.by_key.values())
    assert len({n.lower() for n in names}) == 4
    assert "Yan" in names  # Ann's rename was sent again and applied
    notice = re.compile(r"\*\*\* Notice: your nickname was taken while the server recovered; "
                        r"you are now known as (\S+)")
    told = [m.group(1) for line in ben.lines if (m := notice.fullmatch(line))]
    # w1 re-announced first, so Ann's stale "Zed" won and Ben draws a fresh name.
    assert len(told) == 1 and told[0] in names and "zed" not in names
    for c in (cy, dee):
        assert c.lines[-1] == f"*** zed is now known as {told[0]}"
    assert not any(line.startswith("*** Error") for line in ann.lines + ben.lines)


def test_lines_said_while_the_cluster_resyncs_wait_for_the_verdict_on_the_name() -> None:
    net, (ann, ben, cy, dee) = restart_net()
    # After the restart Ann's stale "Zed" wins, and Ben, who is zed now, loses his name.
    zed_on_both_sides_of_a_restart(net, ann, ben)
    net.kill_broker(undelivered={"w1": 2})
    net.read_bus("w1")  # w1 sees the new broker and resyncs first: Ann's "Zed" wins
    net.step_broker()
    net.read_bus("w2")  # then w2
    net.say(ben, "said while resyncing", settle=False)
    assert net.workers["w2"].outgoing == []  # held: the line would carry a name Ben may lose
    net.settle()
    m = re.fullmatch(r"\*\*\* zed is now known as (\S+)", cy.lines[-2])
    assert m, cy.lines[-4:]
    assert cy.lines[-1] == f"{m.group(1)}: said while resyncing"
    assert "zed: said while resyncing" not in cy.lines + dee.lines + ann.lines


def test_a_worker_that_resyncs_late_tells_its_clients_what_it_missed() -> None:
    net, (ann, ben, cy, dee) = restart_net()
    net.kill_broker()
    net.settle(skip={"w3"})  # w3 hears nothing of the new broker for a while
    assert net.broker.resyncing
    net.clock += B.RESYNC_WAIT
    net.broker.tick(net.clock)  # the others go on without w3
    net.say(ann, "while w3 was away", settle=False)
    net.settle(skip={"w3"})
    assert ben.lines[-1] == "Ann: while w3 was away"
    net.settle()
    assert cy.lines.count(LOST) == 1
    assert net.workers["w3"].core.undelivered >= 1
    net.assert_agree()
    net.say(ann, "back")
    assert cy.lines[-1] == "Ann: back"
    assert net.who(cy) == "*** 4 users online: Ann, Ben, Cy, Dee"


def test_the_broker_holds_chat_until_every_worker_has_resynced() -> None:
    net, (ann, ben, cy, dee) = restart_net()
    net.kill_broker()
    net.say(ann, "held", settle=False)
    net.flush("w1")
    net.settle(skip={"w3"})
    assert "Ann: held" not in ben.lines  # w3 has not resynced: nobody has a whole roster yet
    net.settle()
    assert ben.lines[-1] == cy.lines[-1] == "Ann: held"


def test_the_lost_notice_is_given_once_per_restart() -> None:
    net, (ann, ben, cy, dee) = restart_net()
    rep = net.workers["w2"]
    net.apply("w2", rep.core.messages_lost())
    net.apply("w2", rep.core.messages_lost())
    assert ben.lines.count(LOST) == 1
    net.kill_broker()
    net.settle()
    net.apply("w2", rep.core.messages_lost())
    assert ben.lines.count(LOST) == 2


def test_each_gap_in_a_multi_host_stream_is_told_when_it_comes(net: Net) -> None:
    # A restarted broker leaves many gaps that are one loss: told once per epoch. A gap in the
    # shared stream of several hosts is one range of messages gone, reported once by the bus
    # process (as the multi-host broker's tell() sends it): each one is news.
    ann, ben = net.join("w1"), net.join("w2")
    for n in (1, 2, 3):
        gap = E.StreamGap(f"sequences {n}-{n} gone")
        net.broker.send_to(("w1", "w2"), wire.encode("broker@host-a", 0, [gap]))
        net.settle()
        assert ann.lines.count(LOST) == ben.lines.count(LOST) == n
    net.say(ann, "still here")
    assert ben.lines[-1] == f"{ann.nick}: still here"
