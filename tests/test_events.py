"""The bus schema: each event kind is a class with named fields, and its wire bytes are the plain tuple's.

Pure tests. The wire form must not change with the classes (the bus wire
version only goes up when the bytes do), an event nobody knows must be counted
by whoever receives it, and one that cannot be read must never take the
broker or a worker down.
"""

from __future__ import annotations

import ast
import marshal
import pathlib
import random
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from chatcluster import broker as B
from chatcluster import chat as C
from chatcluster import events as E
from chatcluster import wire

SAMPLES: list[E.Event] = [
    E.Chat(1, b"hi", b"Ann"), E.Me(2, b"waves", b"Bo"), E.Join(3, "Cy", 1.5, "10.0.0.1", "", 100, 5),
    E.Nick(4, "Di"), E.Leave(5, "bye"), E.Hello(99), E.Snapshot("w1", 99, [(1, "Ann")]),
    E.Resync([("w1", 1, "Ann", 1.0, "::1")]), E.Gone("w2", ["Ann"]), E.Ping(), E.Adopt("w1", 4, 11),
    E.Handoff("w2", 3), E.Who(6), E.Whois(7, "Ann", 2.5), E.Joined(8, "Ed", ""), E.Refused(9, "Fi", E.FULL, ""),
    E.Renamed(10, "Gu", "Ha"), E.Taken(11, "Ix", 1), E.Left(12, "Jo", "quit"), E.Adopted("w1", 4, 11, 1),
    E.Reply(13, "*** 1 user online: Ann"),
    E.JoinRoom(14, "#Rust", 20, 10_000), E.PartRoom(15, "#Rust", "later"), E.Msg(16, "Ann", b"psst", b"Bo"),
    E.ListRooms(17, 1), E.WhoRoom(18, "#Rust", 2), E.RoomJoined(19, "Ann", "#Rust"),
    E.RoomIntro(20, "#Rust", "*** You joined #Rust; 1 user here: Ann"), E.RoomParted(21, "Ann", "#Rust", ""),
    E.Private("w2", 22, b"Bo", b"psst"), E.Quit(23, "Ann", "bye", ["#lobby", "#rust"]),
    E.Lost("w3", [("Ann", ["#lobby"])]), E.NickChanged(24, "Ann", "Anna", ["#lobby"]),
    E.Rejoined(25, "Cy2", "Cy", ["#lobby"]), E.Seed("#rust", [(1.5, b"Ann: hi\r\n")], [("w1", 3)]),
    E.HistoryCopy([("#rust", [(1.5, b"Ann: hi\r\n")])]), E.Numbering([("#rust", 3)]), E.Pressure("w2", 1),
    E.Notice("the link to the other servers is down"), E.StreamGap("stream sequences 5-9 never arrived"),
    E.Undelivered("w1@a", [("#rust", 4)], [7]),
]


def test_every_kind_has_a_sample_here() -> None:
    assert {type(ev) for ev in SAMPLES} == set(E.KINDS.values())


@pytest.mark.parametrize("ev", SAMPLES, ids=lambda ev: type(ev).__name__)
def test_an_event_is_its_kind_number_then_its_fields_and_reads_back_as_itself(ev: E.Event) -> None:
    raw = E.to_wire([ev])[0]
    assert type(raw) is tuple and raw[0] == type(ev).KIND and raw[1:] == tuple(getattr(ev, f) for f in ev.FIELDS)
    back = E.from_wire(marshal.loads(marshal.dumps(raw)))
    assert type(back) is type(ev) and back == ev


def test_the_wire_bytes_are_those_of_plain_tuples() -> None:
    # Recorded from the code before events were classes: a worker of either kind reads the other's batches.
    batch = [E.Chat(1, b"hi", b"Ann"), E.Join(2, "Bo", 1700000000.0, "127.0.0.1", "", 100000, 0), E.Ping()]
    plain = [(0, 1, b"hi", b"Ann"), (2, 2, "Bo", 1700000000.0, "127.0.0.1", "", 100000, 0), (9,)]
    payload = wire.encode("w1", 7, batch)
    head = wire.PREFIX.pack(4, wire.FLAG_ROSTER, 7, 3, 2, 0) + b"w1"  # version 4: event count and route
    assert payload.startswith(head) and wire.WIRE_VERSION == 4
    # (marshal's own reference flags depend on reference counts, so compare what the bytes say.)
    body = marshal.loads(payload[len(head):])
    assert body == plain and all(type(t) is tuple for t in body)
    assert wire.decode(head + marshal.dumps(plain)) == ("w1", 7, batch)


def test_fields_are_named() -> None:
    ev = E.Refused(9, "Fi", E.PER_IP, "old")
    assert (ev.conn, ev.nick, ev.why, ev.old) == (9, "Fi", E.PER_IP, "old")
    assert repr(ev) == "Refused(conn=9, nick='Fi', why='address', old='old')"
    with pytest.raises(AttributeError):
        ev.conn = 3  # type: ignore[misc]


def test_defaults_fill_the_last_fields_and_an_older_shorter_form_is_read() -> None:
    assert E.Join(1, "a", 0.0, "ip") == (E.JOIN, 1, "a", 0.0, "ip", "", 0, 0)
    assert E.from_wire((E.JOIN, 1, "a", 0.0, "ip")) == E.Join(1, "a", 0.0, "ip")
    assert E.from_wire((E.GONE, "w1")) == E.Gone("w1", ())
    with pytest.raises(TypeError, match="takes 4 to 7 fields"):
        E.Join(1, "a")


def test_a_kind_nobody_knows_becomes_unknown_and_passes_on_unchanged() -> None:
    ev = E.from_wire((77, "new", "fields"))
    assert type(ev) is E.Unknown and ev.raw == (77, "new", "fields")
    assert E.to_wire([ev]) == [(77, "new", "fields")]


@pytest.mark.parametrize("raw", [(E.CHAT, 1), (E.NICK, 1, "a", "extra"), (), "text", None, [E.PING]])
def test_a_known_kind_of_the_wrong_shape_or_not_a_tuple_is_malformed(raw: object) -> None:
    assert type(E.from_wire(raw)) is E.Malformed


def test_a_batch_that_is_not_a_list_is_one_malformed_event() -> None:
    assert [type(ev) for ev in E.batch_from_wire({"a": 1})] == [E.Malformed]


@given(st.lists(st.one_of(st.integers(), st.text(max_size=3), st.binary(max_size=3), st.none(),
                          st.lists(st.integers(), max_size=2)).map(lambda x: x), max_size=9).map(tuple))
def test_reading_any_tuple_never_raises(raw: tuple[object, ...]) -> None:
    ev = E.from_wire(raw)
    assert isinstance(ev, E.Event)


def test_the_chat_core_counts_events_it_cannot_read_and_goes_on() -> None:
    core = C.ChatCore("w1", rng=random.Random(1))
    core.hello()
    core.on_bus("broker", [E.Snapshot("w1", core.nonce, [])])
    out = core.on_bus("w2", [E.from_wire((77, 1)), E.from_wire((E.LEFT, 1)), E.Left(3, "Ann", "")])
    assert core.unreadable == 2
    assert out == [C.Broadcast(b"*** Ann left\r\n")]


def test_the_broker_drops_what_it_cannot_read_or_decide_and_keeps_sequencing() -> None:
    sent: list[bytes] = []
    broker = B.Broker(lambda header, payload: sent.append(payload), (), 0.0)
    broker.receive(wire.encode("w1", 0, [E.Hello(5)]), 0.0)
    assert len(sent) == 2  # the batch, then the snapshot
    broker.receive(b"\x03garbage", 0.0)
    bad = wire.PREFIX.pack(4, wire.FLAG_ROSTER, 1, 3, 2, 0) + b"w1" + marshal.dumps([(E.JOIN, 1), (77,), (E.WHO, 4)])
    broker.receive(bad, 0.0)
    # The malformed Join is dropped, the unknown kind passed on, the Who answered.
    publisher, pseq, events = wire.decode(sent[-1])
    assert (publisher, pseq) == ("w1", 1)
    assert [type(ev) for ev in events] == [E.Unknown, E.Reply]
    assert broker.unreadable == 2 and broker.unknown == 1
    unmarshallable = wire.PREFIX.pack(4, wire.FLAG_ROSTER, 2, 0, 2, 0) + b"w1" + b"\xff\x00"
    broker.receive(unmarshallable, 0.0)
    assert broker.unreadable == 3
    broker.receive(wire.encode("w1", 3, [E.Who(4)]), 0.0)
    assert wire.decode(sent[-1])[1] == 3


def test_an_unreadable_message_is_reported_by_the_order_tracker_not_raised() -> None:
    order = wire.OrderTracker("w1")
    out: list[tuple[str, object]] = []
    order.accept(1, 1, wire.encode("w2", 1, [E.Ping()]), out)
    order.accept(1, 2, b"\x03\x00", out)
    assert out[-1][0] == wire.BAD and order.unreadable == 1


def test_no_module_reads_an_event_by_position_outside_the_wire_edge() -> None:
    # Events are read by name (ev.nick); only events.py and wire.py see positions.
    pattern = re.compile(r"\b(ev|event|e)\[\d")
    for path in pathlib.Path(E.__file__).parent.glob("*.py"):
        if path.name in ("events.py", "wire.py"):
            continue
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#")[0]
            assert not pattern.search(code), f"{path.name}:{lineno}: {line.strip()}"


def test_the_pure_modules_import_nothing_that_does_io() -> None:
    pure = ["events", "protocol", "roster", "chat", "registry", "dispatch", "wire", "stopping", "textfmt", "rooms",
            "directory", "history"]
    io = {"worker", "bus", "broker", "supervisor", "cli", "upgrade", "migrate", "roles", "zmq", "socket", "select"}
    for name in pure:
        tree = ast.parse((pathlib.Path(E.__file__).parent / f"{name}.py").read_text())
        imported = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                imported.add((node.module or "").split(".")[0])
                imported.update(a.name for a in node.names)
            elif isinstance(node, ast.Import):
                imported.update(a.name.split(".")[0] for a in node.names)
        assert not imported & io, f"{name} imports {sorted(imported & io)}"
