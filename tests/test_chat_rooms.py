"""The chat rules of rooms, private lines and history, on the in-memory cluster of test_chat (`Net`).

The broker is the real one (its directory, routing and history), each worker
the real chat core with its real bus bookkeeping, and every effect goes
through the worker's own dispatch; what each client saw is compared line by
line. A client that never types a room command is covered by test_chat.py,
whose expectations are those of the protocol before rooms.
"""

from __future__ import annotations

import re

import pytest
from test_chat import LOST, Client, Net, since

from chatcluster import chat as C
from chatcluster import events as E
from chatcluster import wire

NOW = 1_700_000_000.0  # 2023-11-14 22:13:20 UTC


def named(net: Net, *spec: tuple[str, str]) -> list[Client]:
    return [net.join(w, nick) for w, nick in spec]


def joined(net: Net, c: Client, room: str) -> list[str]:
    """/join ROOM; returns what the joiner got for it."""
    mark = len(c.lines)
    net.say(c, f"/join {room}")
    got = since(c, mark)
    assert got and got[0].startswith("*** You joined "), got
    return got


@pytest.fixture
def net() -> Net:
    return Net("w1", "w2", "w3")


# -- joining and leaving rooms ---------------------------------------------------------------------


def test_a_joiner_gets_who_is_there_and_the_room_is_told(net: Net) -> None:
    ann, bob, cy = named(net, ("w1", "ann"), ("w2", "bob"), ("w3", "cy"))
    assert joined(net, ann, "#Rust") == ["*** You joined #Rust; 1 user here: ann"]
    mark = len(cy.lines)
    assert joined(net, bob, "#rust") == ["*** You joined #Rust; 2 users here: ann, bob"]
    assert ann.lines[-1] == "*** bob joined #Rust"
    assert since(cy, mark) == []  # not in the room: told nothing


def test_two_rooms_never_see_each_others_lines(net: Net) -> None:
    ann, bob, cy, dee = named(net, ("w1", "ann"), ("w2", "bob"), ("w1", "cy"), ("w3", "dee"))
    for c, room in ((ann, "#a"), (bob, "#a"), (cy, "#b"), (dee, "#b")):
        joined(net, c, room)
    net.say(ann, "/part #lobby")
    net.say(bob, "/part #lobby")
    net.say(cy, "/part #lobby")
    net.say(dee, "/part #lobby")
    marks = {c.nick: len(c.lines) for c in (ann, bob, cy, dee)}
    net.say(ann, "in a")
    net.say(cy, "in b")
    net.say(dee, "/me also in b")
    assert since(bob, marks["bob"]) == ["ann: in a"]
    assert since(cy, marks["cy"]) == ["* dee also in b"]
    assert since(dee, marks["dee"]) == ["cy: in b"]
    assert since(ann, marks["ann"]) == []


def test_lines_of_a_room_that_is_not_the_active_one_carry_its_name(net: Net) -> None:
    ann, bob, cy = named(net, ("w1", "ann"), ("w2", "bob"), ("w2", "cy"))
    joined(net, ann, "#Go")
    joined(net, bob, "#go")
    mark = len(ann.lines)
    net.say(cy, "in the lobby")
    net.say(bob, "in go")
    net.say(bob, "/me waves in go")
    assert since(ann, mark) == ["#lobby cy: in the lobby", "bob: in go", "* bob waves in go"]
    net.say(ann, "/join #lobby")  # a room it is in: it talks there now, nothing to decide
    assert ann.lines[-1] == "*** Now talking in #lobby"
    mark = len(ann.lines)
    net.say(bob, "still in go")
    net.say(cy, "lobby again")
    net.say(ann, "to the lobby")
    assert since(ann, mark) == ["#Go bob: still in go", "cy: lobby again"]
    assert cy.lines[-1] == "ann: to the lobby" and bob.lines[-1] != "ann: to the lobby"


def test_a_sender_sees_the_others_lines_of_a_room_it_no_longer_talks_in_with_its_name() -> None:
    net = Net("w1")
    ann, bob = named(net, ("w1", "ann"), ("w1", "bob"))
    joined(net, ann, "#x")
    joined(net, bob, "#x")
    mark = len(ann.lines)
    net.send(ann, b"mine\r\n", settle=False)
    net.send(bob, b"his\r\n", settle=False)  # the same batch as ann's line
    net.send(ann, b"/join #lobby\r\n", settle=False)  # ann talks in #lobby before the batch is back
    net.settle()
    assert since(ann, mark) == ["*** Now talking in #lobby", "#x bob: his"]
    assert bob.lines[-1] == "ann: mine"


def test_parting_tells_the_room_and_the_last_room_goes_back_to_the_default_room(net: Net) -> None:
    ann, bob = named(net, ("w1", "ann"), ("w2", "bob"))
    joined(net, ann, "#a")
    joined(net, bob, "#a")
    mark = len(bob.lines)
    net.say(ann, "/part #a see you")
    assert ann.lines[-1] == "*** You left #a; now talking in #lobby"
    assert since(bob, mark) == ["*** ann left #a (see you)"]
    net.say(bob, "/part #lobby")
    assert bob.lines[-1] == "*** You left #lobby"  # still in #a, which it talks in
    mark = len(ann.lines)
    net.say(bob, "/part")  # its active room, #a, its last one
    got = bob.lines[-2:]
    assert got[0] == "*** You left #a"
    assert got[1] == "*** You joined #lobby; 2 users here: ann, bob"
    assert since(ann, mark) == ["*** bob joined #lobby"]


def test_part_errors_are_told_and_nothing_changes(net: Net) -> None:
    (ann,) = named(net, ("w1", "ann"))
    net.say(ann, "/part")
    assert ann.lines[-1] == "*** Error: you are only in #lobby; join another room before leaving it"
    net.say(ann, "/part #nowhere")
    assert ann.lines[-1] == "*** Error: you are not in #nowhere"
    assert net.workers["w1"].outgoing == [] and net.inbox == []


def test_part_of_one_of_your_rooms_named_without_its_hash_leaves_nothing(net: Net) -> None:
    # `/part rust` while in #rust used to leave the active room (#lobby) with the reason "rust".
    ann, bob = named(net, ("w1", "ann"), ("w2", "bob"))
    joined(net, ann, "#Rust")
    net.say(ann, "/join #lobby")
    mark = len(bob.lines)
    net.say(ann, "/part rust")
    assert ann.lines[-1] == "*** Error: a room name starts with #, as in #rust"
    assert since(bob, mark) == []
    net.say(ann, "/part RUST is boring")
    assert ann.lines[-1] == "*** Error: a room name starts with #, as in #RUST"
    net.say(ann, "/part see you")  # words that name none of its rooms are the reason
    assert ann.lines[-1] == "*** You left #lobby; now talking in #Rust"
    assert since(bob, mark) == ["*** ann left #lobby (see you)"]


@pytest.mark.parametrize(("line", "error"), [
    ("/join", "*** Error: usage: /join #ROOM"),
    ("/join rust", "*** Error: a room name starts with #, as in #rust"),
    ("/join #", "*** Error: a room name needs 1 to 32 characters after the #"),
    ("/join #" + "x" * 33, "*** Error: room name is too long (33 characters after the #, max 32)"),
    ("/join #no.dots", "*** Error: a room name may only use letters A-Z a-z, digits 0-9, _ and - after the #"),
])
def test_a_bad_room_name_is_refused_with_the_reason(net: Net, line: str, error: str) -> None:
    (ann,) = named(net, ("w1", "ann"))
    net.say(ann, line)
    assert ann.lines[-1] == error


def test_room_limits_give_clear_errors() -> None:
    net = Net("w1", "w2", settings=C.ChatSettings(max_rooms_per_user=2, max_rooms=4))
    ann, bob, cy = named(net, ("w1", "ann"), ("w2", "bob"), ("w2", "cy"))
    joined(net, ann, "#a")  # with #lobby: 2 rooms
    net.say(ann, "/join #b")
    assert ann.lines[-1] == "*** Error: you are in 2 rooms, the most allowed; /part one first"
    joined(net, bob, "#b")
    net.say(bob, "/part #lobby")
    joined(net, bob, "#c")  # the cluster has #lobby, #a, #b, #c
    net.say(cy, "/join #e")
    assert cy.lines[-1] == "*** Error: the server has 4 rooms, the most allowed; join one of them (/rooms lists them)"
    joined(net, cy, "#c")  # an existing room is fine
    net.say(bob, "/part #b")  # #b goes with its last member
    assert joined(net, bob, "#d")[0] == "*** You joined #d; 1 user here: bob"


def test_simultaneous_joins_parts_and_renames_on_different_workers_agree() -> None:
    net = Net("w1", "w2", "w3")
    clients = [net.join(w, f"u{i}") for i, w in enumerate(("w1", "w2", "w3") * 3)]
    for i, c in enumerate(clients):  # all in flight at once, decided in one order
        net.say(c, "/join #race" if i % 2 else "/join #RACE", settle=False)
        net.say(c, f"/nick v{i}" if i % 3 == 0 else "/part #lobby", settle=False)
    for w in net.workers:
        net.flush(w)
    net.settle()
    net.say(clients[0], "/who #race")
    names = clients[0].lines[-1].split(": ", 1)[1].split(", ")
    assert len(names) == 9 and len(set(names)) == 9
    for c in clients:
        net.say(c, "/who #race")
        assert c.lines[-1] == clients[0].lines[-1]
    room = net.broker.directory.rooms.get("#race")
    assert room is not None and room.size == 9
    for w, rep in net.workers.items():
        local = sum(1 for u in rep.core.local.values() if "#race" in u.rooms)
        assert local == len(room.by_worker.get(w, ()))


# -- /who, /rooms, /whois, /msg ------------------------------------------------------------------


def test_who_lists_the_active_room_or_the_named_one(net: Net) -> None:
    ann, bob, cy = named(net, ("w1", "ann"), ("w2", "Bob"), ("w3", "cy"))
    joined(net, ann, "#Rust")
    joined(net, bob, "#rust")
    net.say(ann, "/who")
    assert ann.lines[-1] == "*** 2 users in #Rust: ann, Bob"
    net.say(cy, "/who #RUST")
    assert cy.lines[-1] == "*** 2 users in #Rust: ann, Bob"
    net.say(cy, "/who")
    assert cy.lines[-1] == "*** 3 users online: ann, Bob, cy"
    net.say(cy, "/who #nope")
    assert cy.lines[-1] == "*** Error: no such room #nope"


def test_rooms_lists_every_room_with_its_member_count(net: Net) -> None:
    ann, bob = named(net, ("w1", "ann"), ("w2", "bob"))
    joined(net, ann, "#zeta")
    joined(net, bob, "#Alpha")
    net.say(bob, "/rooms")
    assert bob.lines[-1] == "*** 3 rooms: #Alpha (1), #lobby (2), #zeta (1)"


def test_whois_gains_the_users_rooms(net: Net) -> None:
    ann, bob = named(net, ("w1", "ann"), ("w2", "bob"))
    joined(net, ann, "#b")
    net.say(bob, "/whois ann")
    assert re.fullmatch(r"\*\*\* ann is on worker w1, connected since .* UTC \(0s ago\), in #b, #lobby", bob.lines[-1])
    net.say(ann, "/whois bob")
    assert ann.lines[-1].endswith("(0s ago)")  # only in the default room: as before


def test_a_private_line_reaches_only_its_recipient_on_another_worker(net: Net) -> None:
    ann, bob, cy = named(net, ("w1", "ann"), ("w2", "Bob"), ("w3", "cy"))
    marks = [len(c.lines) for c in (ann, bob, cy)]
    net.say(ann, "/msg bob meet me in #x")
    assert since(ann, marks[0]) == ["-> *Bob* meet me in #x"]
    assert since(bob, marks[1]) == ["*ann* meet me in #x"]
    assert since(cy, marks[2]) == []
    net.say(ann, "/msg nobody hello")
    assert ann.lines[-1] == "*** Error: no such user nobody"
    net.say(ann, "/msg bob")
    assert ann.lines[-1] == "*** Error: usage: /msg NICK TEXT"


def test_private_lines_travel_only_to_the_recipients_worker() -> None:
    net = Net("w1", "w2", "w3")
    ann, bob = named(net, ("w1", "ann"), ("w2", "bob"))
    seen: dict[str, list[E.Event]] = {w: [] for w in net.workers}
    emit = net.broker.emit

    def spy(header: bytes, payload: bytes) -> None:
        seen[wire.unstamp(header)[0]].extend(wire.decode(payload)[2])
        emit(header, payload)

    net.broker.emit = spy
    net.say(ann, "/msg bob secret")
    assert [type(ev) for ev in seen["w2"]] == [E.Private]
    assert [type(ev) for ev in seen["w1"]] == [E.Reply]
    assert seen["w3"] == []  # the batch's place in w1's numbering, with nothing in it
    assert bob.lines[-1] == "*ann* secret"


# -- renames, departures, dead workers ------------------------------------------------------------


def test_a_rename_is_told_once_to_someone_who_shares_two_rooms(net: Net) -> None:
    ann, bob, cy = named(net, ("w1", "ann"), ("w2", "bob"), ("w3", "cy"))
    joined(net, ann, "#a")
    joined(net, bob, "#a")
    joined(net, cy, "#c")
    net.say(cy, "/part #lobby")
    marks = [len(c.lines) for c in (bob, cy)]
    net.say(ann, "/nick anna")
    assert since(bob, marks[0]) == ["*** ann is now known as anna"]
    assert since(cy, marks[1]) == []  # shares no room with ann
    net.say(ann, "/quit bye")
    assert bob.lines[-1] == "*** anna left (bye)" and bob.lines.count("*** anna left (bye)") == 1
    assert "*** anna left (bye)" not in cy.lines


def test_a_dead_workers_users_are_announced_where_they_were(net: Net) -> None:
    ann, bob, cy = named(net, ("w1", "ann"), ("w2", "bob"), ("w3", "cy"))
    joined(net, ann, "#a")
    net.say(ann, "/part #lobby")
    joined(net, bob, "#a")
    mark = len(cy.lines)
    net.kill_worker("w1")
    assert bob.lines[-1] == "*** ann left (connection lost)"
    assert since(cy, mark) == []
    net.say(bob, "/who #a")
    assert bob.lines[-1] == "*** 1 user in #a: bob"


# -- history --------------------------------------------------------------------------------------


def test_a_joiner_gets_the_recent_lines_with_their_time_before_any_live_line() -> None:
    net = Net("w1", "w2")
    net.now = NOW
    ann, bob = named(net, ("w1", "ann"), ("w2", "bob"))
    joined(net, ann, "#h")
    net.say(ann, "first")
    net.now += 60
    net.say(ann, "/me second")
    net.say(bob, "not in #h")
    mark = len(bob.lines)
    net.send(bob, b"/join #h\r\n", settle=False)
    net.flush("w2")
    net.step_broker()  # the join has its place in the order; ann's next line comes after it
    net.say(ann, "live")
    assert since(bob, mark) == ["*** You joined #h; 2 users here: ann, bob", "[22:13] ann: first",
                                "[22:14] * ann second", "ann: live"]


def test_history_keeps_the_last_history_lines_of_each_room() -> None:
    net = Net("w1", "w2", settings=C.ChatSettings(history_lines=3))
    ann, bob = named(net, ("w1", "ann"), ("w2", "bob"))
    joined(net, ann, "#h")
    for i in range(6):
        net.say(ann, f"line {i}")
    got = joined(net, bob, "#h")
    assert [x.split("] ", 1)[1] for x in got[1:]] == ["ann: line 3", "ann: line 4", "ann: line 5"]


def test_no_history_when_it_is_off() -> None:
    net = Net("w1", "w2", settings=C.ChatSettings(history_lines=0))
    ann, bob = named(net, ("w1", "ann"), ("w2", "bob"))
    joined(net, ann, "#h")
    net.say(ann, "said")
    assert joined(net, bob, "#h") == ["*** You joined #h; 2 users here: ann, bob"]


def test_a_new_connection_gets_no_history_of_the_default_room() -> None:
    net = Net("w1", "w2")
    (ann,) = named(net, ("w1", "ann"))
    net.say(ann, "before you came")
    bob = net.join("w2")
    assert bob.lines == [bob.lines[0]]


def test_history_survives_a_broker_restart_through_the_workers_copies() -> None:
    net = Net("w1", "w2")
    ann, bob, cy = named(net, ("w1", "ann"), ("w2", "bob"), ("w1", "cy"))
    joined(net, ann, "#h")
    joined(net, bob, "#h")
    net.say(ann, "kept")
    net.kill_broker()
    net.settle()
    got = joined(net, cy, "#h")
    assert got[0] == "*** You joined #h; 3 users here: ann, bob, cy"
    assert [x.split("] ", 1)[1] for x in got[1:]] == ["ann: kept"]
    assert not any(LOST in c.lines for c in (ann, bob, cy))


def test_history_survives_the_death_of_a_worker() -> None:
    net = Net("w1", "w2", "w3")
    ann, bob = named(net, ("w1", "ann"), ("w2", "bob"))
    joined(net, ann, "#h")
    net.say(ann, "said by the doomed")
    net.kill_worker("w1")
    got = joined(net, bob, "#h")
    assert [x.split("] ", 1)[1] for x in got[1:]] == ["ann: said by the doomed"]


# -- routing and the order ------------------------------------------------------------------------


def test_a_worker_with_no_member_in_a_room_gets_none_of_its_batches() -> None:
    net = Net("w1", "w2", "w3")
    ann, bob, cy = named(net, ("w1", "ann"), ("w2", "bob"), ("w3", "cy"))
    joined(net, ann, "#busy")
    joined(net, bob, "#busy")
    before = {w: rep.order.room_batches for w, rep in net.workers.items()}
    for i in range(20):
        net.say(ann, f"busy {i}")
    got = {w: rep.order.room_batches - before[w] for w, rep in net.workers.items()}
    assert got == {"w1": 20, "w2": 20, "w3": 0}
    assert not any(line.startswith(("ann: busy", "#busy")) for line in cy.lines)


def test_a_batch_lost_in_a_broker_restart_is_told_only_where_it_was_due() -> None:
    net = Net("w1", "w2", "w3")
    ann, bob, cy = named(net, ("w1", "ann"), ("w2", "bob"), ("w3", "cy"))
    joined(net, ann, "#r")
    joined(net, bob, "#r")
    net.say(ann, "/part #lobby")
    net.say(bob, "/part #lobby")
    net.say(ann, "first")
    net.say(ann, "lost for bob", settle=False)
    net.flush("w1")
    net.step_broker()
    net.read_bus("w1")  # ann's worker saw it back: it will not be sent again
    net.kill_broker(undelivered={"w2": 1})
    net.say(ann, "after the restart")
    assert bob.lines.count(LOST) == 1
    assert bob.lines[-2:] == [LOST, "ann: after the restart"]
    assert LOST not in cy.lines and LOST not in ann.lines  # cy's worker never receives #r


def test_a_first_batch_lost_in_a_room_is_a_gap_too() -> None:
    net = Net("w1", "w2")
    ann, bob = named(net, ("w1", "ann"), ("w2", "bob"))
    joined(net, ann, "#r")
    joined(net, bob, "#r")  # w2 starts receiving #r: where ann's numbering of it stands comes with it
    net.say(ann, "the first line of ann in #r", settle=False)
    net.flush("w1")
    net.step_broker()
    net.read_bus("w1")
    net.kill_broker(undelivered={"w2": 1})
    net.say(ann, "second")
    assert bob.lines.count(LOST) == 1


def test_every_client_sees_one_order_across_rooms() -> None:
    net = Net("w1", "w2", "w3")
    talkers = [net.join(w, f"t{i}") for i, w in enumerate(("w1", "w2", "w3", "w1"))]
    for t, room in zip(talkers, ("#a", "#b", "#a", "#b"), strict=True):
        joined(net, t, room)
    watchers = [net.join(w, f"o{i}") for i, w in enumerate(("w1", "w2", "w3"))]
    for o in watchers:
        joined(net, o, "#a")
        joined(net, o, "#b")
    marks = [len(o.lines) for o in watchers]
    for i in range(30):
        t = talkers[i % 4]
        net.say(t, f"m{i}", settle=False)
        if i % 5 == 0:
            net.settle()
    net.settle()
    views = [since(o, m) for o, m in zip(watchers, marks, strict=True)]
    assert views[0] == views[1] == views[2]
    assert len(views[0]) == 30


def test_a_client_in_transit_gets_what_its_rooms_got_as_its_rooms_say() -> None:
    lobby = C.Broadcast(b"a: hi\r\n", C.EMPTY, (), C.HERE)
    lobby_away = C.Broadcast(b"#lobby a: hi\r\n", C.EMPTY, (), C.AWAY)
    unknown_room = C.Broadcast(b"b: one\r\nb: two\r\n", C.EMPTY, ("#x",), C.HERE)  # no AWAY made for it
    quit_ = C.Broadcast(b"*** c left\r\n", C.EMPTY, ("#x", "#y"))
    copy = [lobby, lobby_away, unknown_room, quit_]
    names = {"#lobby": "#lobby", "#x": "#X"}
    assert C.tail_for(copy, ("#lobby", "#x"), "#x", names, "#lobby") == (
        b"#lobby a: hi\r\nb: one\r\nb: two\r\n*** c left\r\n")
    assert C.tail_for(copy, ("#lobby", "#x"), "#lobby", names, "#lobby") == (
        b"a: hi\r\n#X b: one\r\n#X b: two\r\n*** c left\r\n")
    assert C.tail_for(copy, ("#lobby",), "#lobby", names, "#lobby") == b"a: hi\r\n"


def test_a_private_line_for_a_client_in_transit_reaches_it_at_the_successor() -> None:
    # The successor (w2) of worker w1 in an upgrade: from w1's HANDOFF marker until its own ADOPT
    # of the client is back, a /msg is still addressed to the client's place at w1.
    taker = C.ChatCore("w2")
    taker.ready = True
    taker.collecting = True  # the marker was seen: w2 copies what its clients on their way must get
    out = taker.on_bus("w3", [E.Private("w1", 7, b"cy", b"before it arrived")])
    copy = [e for e in out if isinstance(e, C.Broadcast)]
    lobby = ("#lobby",)
    assert C.tail_for(copy, lobby, "#lobby", {}, "#lobby", C.transit_key("w1", 7)) == b"*cy* before it arrived\r\n"
    assert C.tail_for(copy, lobby, "#lobby", {}, "#lobby", C.transit_key("w1", 8)) == b""  # someone else's
    assert C.tail_for(copy, lobby, "#lobby", {}, "#lobby") == b""
    taker.collecting = False
    taker.adopt(3, "127.0.0.1", NOW, "ann", origin=("w1", 7))  # here now; its ADOPT is on the bus
    out = taker.on_bus("w3", [E.Private("w1", 7, b"cy", b"while adopting")])
    assert out == [C.Send(3, b"*cy* while adopting\r\n")]
    taker.on_bus("w2", [E.Adopted("w1", 7, 3, 1)])  # the roster has it here from now on
    assert taker.on_bus("w3", [E.Private("w1", 7, b"cy", b"stale")]) == []
    assert taker.on_bus("w3", [E.Private("w2", 3, b"cy", b"after")]) == [C.Send(3, b"*cy* after\r\n")]
