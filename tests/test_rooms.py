"""The room state machine, the directory's verdicts and routing, and the history store: pure tests.

Events in, verdicts and state out; the bus order is a list here. Every replica
that applies the same requests in the same order must reach the same rooms.
"""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from chatcluster import directory as D
from chatcluster import events as E
from chatcluster import history as H
from chatcluster import rooms as R

ALL = D.ALL


def only(*workers: str) -> frozenset[str]:
    return frozenset(workers)


def claim(d: D.Directory, worker: str, conn: int, nick: str) -> None:
    [(verdict, _), *_] = d.decide(worker, E.Join(conn, nick, 1000.0, "127.0.0.1"))
    assert type(verdict) is E.Joined, verdict


# -- room names ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["#a", "#Rust", "#" + "x" * 32, "#under_score", "#da-sh", "#0123"])
def test_valid_room_names_have_no_problem(name: str) -> None:
    assert R.room_problem(name) is None


@pytest.mark.parametrize(("name", "words"), [
    ("rust", "starts with #, as in #rust"),
    ("#", "1 to 32 characters after the #"),
    ("#" + "x" * 33, "too long (33 characters after the #, max 32)"),
    ("#two words", "may only use"),
    ("#caf\u00e9", "may only use"),
    ("##x", "may only use"),
])
def test_invalid_room_names_name_the_problem(name: str, words: str) -> None:
    problem = R.room_problem(name)
    assert problem is not None and words in problem


def test_the_name_length_limit_is_a_parameter() -> None:
    assert R.room_problem("#abcd", 3) == "room name is too long (4 characters after the #, max 3)"
    assert R.room_problem("#abc", 3) is None


# -- membership ----------------------------------------------------------------------------------


def test_a_room_is_named_as_first_created_and_found_in_any_case() -> None:
    rooms = R.Rooms()
    assert rooms.add("w1", 1, "#rust", "#Rust")
    assert rooms.add("w2", 1, R.fold("#RUST"), "#RUST")
    assert rooms.get("#rust").name == "#Rust"  # type: ignore[union-attr]
    assert rooms.rooms_of("w2", 1) == ["#rust"]
    assert not rooms.add("w1", 1, "#rust", "#rust")  # already in it


def test_a_room_goes_with_its_last_member_but_the_default_room_stays() -> None:
    rooms = R.Rooms("#lobby")
    rooms.add("w1", 1, "#lobby", "#lobby")
    rooms.add("w1", 1, "#x", "#x")
    assert len(rooms) == 2 and rooms.memberships == 2
    assert rooms.remove_member("w1", 1) == ["#lobby", "#x"]
    assert len(rooms) == 1 and rooms.get("#lobby") is not None and rooms.memberships == 0


def test_the_audience_of_a_room_is_the_workers_with_members_there() -> None:
    rooms = R.Rooms()
    rooms.add("w1", 1, "#a", "#a")
    rooms.add("w1", 2, "#a", "#a")
    rooms.add("w2", 1, "#a", "#a")
    assert rooms.audience("#a") == {"w1", "w2"}
    rooms.remove("w2", 1, "#a")
    assert rooms.audience("#a") == {"w1"}
    rooms.remove("w1", 1, "#a")
    assert rooms.audience("#a") == {"w1"}  # conn 2 is still there
    assert rooms.audience("#nowhere") == frozenset()


def test_a_dead_worker_leaves_every_room_and_says_which_rooms_each_member_was_in() -> None:
    rooms = R.Rooms()
    rooms.add("w1", 1, "#lobby", "#lobby")
    rooms.add("w1", 2, "#lobby", "#lobby")
    rooms.add("w1", 2, "#b", "#b")
    rooms.add("w2", 1, "#b", "#b")
    gone = rooms.remove_worker("w1")
    assert gone == {1: ["#lobby"], 2: ["#lobby", "#b"]}
    assert rooms.audience("#b") == {"w2"} and rooms.memberships == 1


def test_a_member_moving_in_an_upgrade_keeps_its_rooms() -> None:
    rooms = R.Rooms()
    rooms.add("w1", 4, "#lobby", "#lobby")
    rooms.add("w1", 4, "#solo", "#Solo")
    assert rooms.move("w1", 4, "w9", 11) == ["#lobby", "#solo"]
    assert rooms.rooms_of("w9", 11) == ["#lobby", "#solo"] and rooms.rooms_of("w1", 4) == []
    assert rooms.get("#solo").name == "#Solo" and rooms.audience("#solo") == {"w9"}  # type: ignore[union-attr]


def test_resync_rebuilds_a_workers_rooms_from_its_list() -> None:
    rooms = R.Rooms()
    rooms.add("w1", 7, "#old", "#old")
    rooms.resync("w1", [("w1", 1, "a", 0.0, "ip"), ("w1", 2, "b", 0.0, "ip", ["#lobby", "#Go"])])
    assert rooms.rooms_of("w1", 1) == ["#lobby"] and rooms.rooms_of("w1", 2) == ["#lobby", "#go"]
    assert rooms.get("#old") is None and rooms.get("#go").name == "#Go"  # type: ignore[union-attr]


def test_sorted_names_are_made_again_only_when_the_room_changed() -> None:
    rooms = R.Rooms()
    names = {("w1", 1): "bob", ("w2", 1): "Alice", ("w1", 2): "_x"}
    calls = []

    def name_of(w: str, c: int) -> str:
        calls.append((w, c))
        return names[(w, c)]

    for (w, c) in names:
        rooms.add(w, c, "#a", "#a")
    assert rooms.sorted_names("#a", name_of) == ["_x", "Alice", "bob"]
    made = len(calls)
    assert rooms.sorted_names("#a", name_of) == ["_x", "Alice", "bob"]
    assert len(calls) == made  # cached
    names[("w1", 1)] = "Zed"
    rooms.renamed("w1", 1)
    assert rooms.sorted_names("#a", name_of) == ["_x", "Alice", "Zed"]


def test_a_join_a_part_and_a_rename_update_the_sorted_names_without_making_them_again() -> None:
    # The broker lists a room's members for every /join and /who of it: sorting the whole room
    # again after each join or part cost milliseconds per join of a room of 10,000.
    rooms = R.Rooms()
    names = {("w1", i): f"u{i:04d}" for i in range(1000)}
    calls: list[tuple[str, int]] = []

    def name_of(w: str, c: int) -> str | None:
        calls.append((w, c))
        return names.get((w, c))

    for w, c in names:
        rooms.add(w, c, "#a", "#a")
    assert rooms.sorted_names("#a", name_of) == sorted(names.values())
    calls.clear()
    names[("w2", 5)] = "Zz"
    rooms.add("w2", 5, "#a", "#a")  # a join
    rooms.remove("w1", 3, "#a")  # a part
    del names[("w1", 3)]
    names[("w1", 7)] = "A7"
    rooms.renamed("w1", 7)  # a rename
    want = sorted(names.values(), key=lambda n: (n.lower(), n))
    assert rooms.sorted_names("#a", name_of) == want
    assert len(calls) <= 3  # the members that changed, not the whole room
    assert rooms.sorted_names("#a", name_of) == want and len(calls) <= 3


@given(st.lists(st.tuples(st.sampled_from(["add", "remove", "leave", "die", "move", "rename", "look"]),
                          st.sampled_from(["w1", "w2", "w3"]), st.integers(1, 4),
                          st.sampled_from(["#lobby", "#a", "#B"])), max_size=80))
def test_sorted_names_kept_up_to_date_always_equal_a_fresh_sort(ops: list[tuple[str, str, int, str]]) -> None:
    rooms = R.Rooms()
    names: dict[tuple[str, int], str] = {}
    serial = 0

    def name_of(w: str, c: int) -> str | None:
        return names.get((w, c))

    def fresh(key: str) -> list[str]:
        room = rooms.rooms[key]
        got = [names[(w, c)] for w, conns in room.by_worker.items() for c in conns]
        return sorted(got, key=lambda n: (n.lower(), n))

    for op, w, c, name in ops:
        serial += 1
        key = R.fold(name)
        if op == "add":
            names.setdefault((w, c), f"{'ab'[serial % 2]}{serial}")
            rooms.add(w, c, key, name)
        elif op == "remove":
            rooms.remove(w, c, key)
        elif op == "leave":
            rooms.remove_member(w, c)
        elif op == "die":
            rooms.remove_worker(w)
        elif op == "move":
            if rooms.is_member(w, c) and not rooms.is_member("w9", c):
                names[("w9", c)] = names[(w, c)]
                rooms.move(w, c, "w9", c)
        elif op == "rename":
            if (w, c) in names:
                names[(w, c)] = f"{'BA'[serial % 2]}{serial}"
                rooms.renamed(w, c)
        elif key in rooms.rooms:
            assert rooms.sorted_names(key, name_of) == fresh(key)
        for (mw, mc) in list(names):
            if not rooms.is_member(mw, mc):
                del names[(mw, mc)]  # gone from every room: gone from the roster too
    for key in rooms.rooms:
        assert rooms.sorted_names(key, name_of) == fresh(key)


@given(st.lists(st.tuples(st.sampled_from(["add", "remove", "leave", "die", "move"]), st.sampled_from(["w1", "w2"]),
                          st.integers(1, 4), st.sampled_from(["#lobby", "#a", "#B", "#c"])), max_size=60))
def test_two_replicas_applying_the_same_order_agree_and_counts_add_up(ops: list[tuple[str, str, int, str]]) -> None:
    replicas = [R.Rooms(), R.Rooms()]
    for rooms in replicas:
        for op, w, c, name in ops:
            if op == "add":
                rooms.add(w, c, R.fold(name), name)
            elif op == "remove":
                rooms.remove(w, c, R.fold(name))
            elif op == "leave":
                rooms.remove_member(w, c)
            elif op == "die":
                rooms.remove_worker(w)
            elif rooms.is_member(w, c) and not rooms.is_member("w3", c):
                rooms.move(w, c, "w3", c)
    a, b = replicas
    assert {k: (r.name, {w: set(s) for w, s in r.by_worker.items()}) for k, r in a.rooms.items()} == \
        {k: (r.name, {w: set(s) for w, s in r.by_worker.items()}) for k, r in b.rooms.items()}
    for rooms in replicas:
        assert rooms.memberships == sum(r.size for r in rooms.rooms.values())
        assert rooms.order == sorted(rooms.rooms)  # what /rooms lists, kept in order as rooms come and go
        for r in rooms.rooms.values():
            assert r.size == sum(len(s) for s in r.by_worker.values())
            assert all(s for s in r.by_worker.values())
            assert r.size or r.key == rooms.default
        for (w, c), keys in rooms.extra.items():
            assert all(c in rooms.rooms[k].by_worker.get(w, ()) for k in keys)


# -- the directory: verdicts and who gets them -----------------------------------------------------


def test_a_new_client_enters_the_default_room_and_the_room_is_told() -> None:
    d = D.Directory("#lobby")
    claim(d, "w1", 1, "ann")
    out = d.decide("w2", E.Join(1, "bob", 1000.0, "ip"))
    assert out[0] == (E.Joined(1, "bob", ""), only("w1", "w2"))
    assert out[1:] == [(E.Seed("#lobby", [], None), only("w2"))]  # w2 starts receiving the lobby
    assert d.rooms.rooms_of("w2", 1) == ["#lobby"]


def test_joining_a_room_tells_its_members_and_gives_the_joiner_who_is_there() -> None:
    d = D.Directory()
    claim(d, "w1", 1, "ann")
    claim(d, "w2", 1, "bob")
    d.decide("w1", E.JoinRoom(1, "#Rust", 20, 100))
    out = d.decide("w2", E.JoinRoom(1, "#RUST", 20, 100))
    assert out == [(E.RoomJoined(1, "bob", "#Rust"), only("w1", "w2")),
                   (E.Seed("#rust", [], None), only("w2")),
                   (E.RoomIntro(1, "#Rust", "*** You joined #Rust; 2 users here: ann, bob"), only("w2"))]


def test_room_limits_are_checked_in_bus_order() -> None:
    d = D.Directory()
    claim(d, "w1", 1, "ann")
    assert type(d.decide("w1", E.JoinRoom(1, "#a", 2, 3))[0][0]) is E.RoomJoined
    [(reply, to)] = d.decide("w1", E.JoinRoom(1, "#b", 2, 3))
    assert reply == E.Reply(1, "*** Error: you are in 2 rooms, the most allowed; /part one first")
    assert to == only("w1")
    claim(d, "w2", 1, "bob")
    d.decide("w2", E.JoinRoom(1, "#b", 20, 3))  # the third room of the cluster
    [(reply, _)] = d.decide("w2", E.JoinRoom(1, "#c", 20, 3))
    assert reply.text == "*** Error: the server has 3 rooms, the most allowed; join one of them (/rooms lists them)"
    assert type(d.decide("w2", E.JoinRoom(1, "#a", 20, 3))[0][0]) is E.RoomJoined  # an existing one is fine


def test_parting_the_last_room_puts_the_client_back_in_the_default_room() -> None:
    d = D.Directory()
    claim(d, "w1", 1, "ann")
    d.decide("w1", E.JoinRoom(1, "#a", 20, 100))
    d.decide("w1", E.PartRoom(1, "#lobby", ""))
    out = d.decide("w1", E.PartRoom(1, "#A", "bye"))
    assert [type(ev) for ev, _ in out] == [E.RoomParted, E.RoomJoined, E.Seed, E.RoomIntro]
    assert out[0][0] == E.RoomParted(1, "ann", "#a", "bye")
    assert d.rooms.rooms_of("w1", 1) == ["#lobby"] and d.rooms.get("#a") is None


def test_a_private_line_goes_to_the_recipients_worker_and_the_confirmation_to_the_senders() -> None:
    d = D.Directory()
    claim(d, "w1", 1, "ann")
    claim(d, "w2", 5, "Bob")
    out = d.decide("w1", E.Msg(1, "BOB", b"hi there", b"ann"))
    assert out == [(E.Private("w2", 5, b"ann", b"hi there"), only("w2")),
                   (E.Reply(1, "-> *Bob* hi there"), only("w1"))]
    assert d.decide("w1", E.Msg(1, "nobody", b"x", b"ann")) == [(E.Reply(1, "*** Error: no such user nobody"),
                                                                   only("w1"))]


def test_leaving_renaming_and_dying_say_which_rooms_the_client_was_in() -> None:
    d = D.Directory()
    claim(d, "w1", 1, "ann")
    claim(d, "w2", 1, "bob")
    d.decide("w1", E.JoinRoom(1, "#a", 20, 100))
    [(renamed, to)] = d.decide("w1", E.Nick(1, "anna"))
    assert renamed == E.NickChanged(1, "ann", "anna", ["#lobby", "#a"]) and to == only("w1", "w2")
    [(quit_, _)] = d.decide("w1", E.Leave(1, "bye"))
    assert quit_ == E.Quit(1, "anna", "bye", ["#lobby", "#a"])
    [(lost, to)] = d.decide(D.BROKER, E.Gone("w2"))
    assert lost == E.Lost("w2", [("bob", ["#lobby"])]) and to is ALL
    assert d.rooms.memberships == 0


def test_a_client_renamed_after_a_broker_restart_is_listed_under_its_new_name() -> None:
    # After a broker restart w1's ann lost her name to w2's (w2 re-listed first); she is still in
    # her rooms, and claims a new name. /who of her rooms must show it, made before or after.
    d = D.Directory()
    d.decide("w2", E.Resync([("w2", 1, "ann", 1.0, "ip")]))
    d.decide("w1", E.Resync([("w1", 1, "ann", 1.0, "ip", ["#lobby", "#a"])]))
    assert d.decide("w2", E.WhoRoom(1, "#a", 1))[0][0].text == "*** 0 users in #a: "
    [(rejoined, _)] = d.decide("w1", E.Join(1, "bob", 1.0, "ip", "ann", 0, 0))
    assert rejoined == E.Rejoined(1, "bob", "ann", ["#lobby", "#a"])
    assert d.decide("w2", E.WhoRoom(1, "#a", 1))[0][0].text == "*** 1 user in #a: bob"
    assert d.decide("w2", E.Who(1))[0][0].text == "*** 2 users online: ann, bob"


def test_who_is_answered_from_a_cache_for_the_asker_alone_and_paged() -> None:
    d = D.Directory()
    for i in range(1203):
        claim(d, f"w{i % 3}", i, f"u{i:04d}")
    [(reply, to)] = d.decide("w1", E.Who(1))
    assert to == only("w1")
    assert reply.text.startswith("*** 1203 users online (1-500; /who 2 for more): u0000, u0001, ")
    assert reply.text.endswith(", u0499")
    [(last, _)] = d.decide("w1", E.WhoRoom(1, "", 3))
    assert last.text.startswith("*** 1203 users online (1001-1203): u1000, ") and last.text.endswith("u1202")
    d.decide("w0", E.JoinRoom(0, "#Small", 20, 100))
    assert d.decide("w0", E.WhoRoom(0, "#small", 1))[0][0].text == "*** 1 user in #Small: u0000"
    assert d.decide("w0", E.WhoRoom(0, "#none", 1))[0][0].text == "*** Error: no such room #none"


def test_rooms_lists_every_room_with_its_size_sorted() -> None:
    d = D.Directory()
    claim(d, "w1", 1, "ann")
    claim(d, "w1", 2, "bob")
    d.decide("w1", E.JoinRoom(1, "#zed", 20, 100))
    d.decide("w1", E.JoinRoom(2, "#Alpha", 20, 100))
    d.decide("w1", E.JoinRoom(1, "#alpha", 20, 100))
    [(reply, _)] = d.decide("w1", E.ListRooms(1, 1))
    assert reply.text == "*** 3 rooms: #Alpha (2), #lobby (2), #zed (1)"


class CountedName(str):
    """A room name that counts how often it is compared case-insensitively or formatted."""

    uses = 0

    def lower(self) -> str:
        CountedName.uses += 1
        return str.lower(self)

    def __format__(self, spec: str) -> str:
        CountedName.uses += 1
        return str.__format__(self, spec)


def test_rooms_costs_one_page_however_many_rooms_there_are() -> None:
    # The broker answers every /rooms in the one order: sorting and formatting every room for
    # each request let a few clients asking /rooms over and over stall the whole cluster's chat.
    d = D.Directory()
    for i in range(1203):
        claim(d, "w1", i, f"u{i:04d}")
        d.decide("w1", E.JoinRoom(i, CountedName(f"#R{1202 - i:04d}"), 20, 10_000))
    CountedName.uses = 0
    [(first, _)] = d.decide("w1", E.ListRooms(0, 1))
    assert first.text.startswith("*** 1204 rooms (1-500; /rooms 2 for more): #lobby (1203), #R0000 (1), ")
    assert first.text.endswith(", #R0498 (1)")
    assert CountedName.uses <= 500  # the names on the page, not every room's
    CountedName.uses = 0
    [(last, _)] = d.decide("w1", E.ListRooms(0, 3))
    assert last.text.startswith("*** 1204 rooms (1001-1204): #R0999 (1), ") and last.text.endswith(", #R1202 (1)")
    assert CountedName.uses <= 500
    d.decide("w1", E.PartRoom(5, "#r1197", ""))  # a room goes, another comes: the order follows
    d.decide("w1", E.JoinRoom(5, "#Q", 20, 10_000))
    [(again, _)] = d.decide("w1", E.ListRooms(0, 3))
    assert again.text.startswith("*** 1204 rooms (1001-1204): #R0998 (1), ")
    assert "#R1197" not in again.text and again.text.endswith(", #R1202 (1)")
    assert d.decide("w1", E.ListRooms(0, 1))[0][0].text.startswith("*** 1204 rooms (1-500; /rooms 2 for more): "
                                                                  "#lobby (1203), #Q (1), #R0000 (1), ")


def test_whois_shows_the_rooms_of_someone_not_only_in_the_default_room() -> None:
    d = D.Directory()
    claim(d, "w1", 1, "ann")
    assert d.decide("w1", E.Whois(1, "ann", 1000.0))[0][0].text.endswith("(0s ago)")
    d.decide("w1", E.JoinRoom(1, "#b", 20, 100))
    assert d.decide("w1", E.Whois(1, "ann", 1000.0))[0][0].text.endswith("(0s ago), in #b, #lobby")


def test_a_handoff_sends_the_givers_traffic_to_its_successor_until_the_giver_is_gone() -> None:
    d = D.Directory()
    claim(d, "w1", 1, "ann")
    d.decide("w1", E.JoinRoom(1, "#a", 20, 100))
    assert d.audience("#a") == {"w1"}
    d.decide("w1", E.Handoff("w2", 1))
    assert d.audience("#a") == {"w1", "w2"}
    [(adopted, _), *seeds] = d.decide("w2", E.Adopt("w1", 1, 9))
    assert adopted == E.Adopted("w1", 1, 9, 1)
    assert sorted(ev.room for ev, _ in seeds) == ["#a", "#lobby"]  # w2 starts receiving both
    d.decide(D.BROKER, E.Gone("w1"))
    assert d.audience("#a") == {"w2"} and d.rooms.rooms_of("w2", 9) == ["#lobby", "#a"]


def test_a_private_line_for_a_client_being_handed_over_reaches_the_successor_too() -> None:
    # From the giver's HANDOFF marker until the successor's ADOPT, the roster still has the
    # client at the giver, which has already sent it away: the line must reach the successor.
    d = D.Directory()
    claim(d, "w1", 1, "ann")
    claim(d, "w3", 4, "cy")
    d.decide("w1", E.Handoff("w2", 1))
    out = d.decide("w3", E.Msg(4, "ann", b"are you there", b"cy"))
    assert out[0] == (E.Private("w1", 1, b"cy", b"are you there"), only("w1", "w2"))
    d.decide("w2", E.Adopt("w1", 1, 9))
    out = d.decide("w3", E.Msg(4, "ann", b"and now", b"cy"))
    assert out[0] == (E.Private("w2", 9, b"cy", b"and now"), only("w2"))


@given(st.lists(st.tuples(st.sampled_from(["w1", "w2", "w3"]), st.integers(1, 3),
                          st.sampled_from(["join", "part", "nick", "leave", "claim", "msg"]),
                          st.sampled_from(["#a", "#B", "#lobby"])), max_size=50))
def test_every_replica_of_the_directory_gives_the_same_verdicts(ops: list[tuple[str, int, str, str]]) -> None:
    logs = []
    for _ in range(2):
        d = D.Directory()
        log = []
        for w, c, op, room in ops:
            ev: E.Event
            if op == "claim":
                ev = E.Join(c, f"{w}c{c}", 1.0, "ip")
            elif op == "join":
                ev = E.JoinRoom(c, room, 2, 3)
            elif op == "part":
                ev = E.PartRoom(c, room, "")
            elif op == "nick":
                ev = E.Nick(c, f"n{c}")
            elif op == "msg":
                ev = E.Msg(c, "n1", b"x", b"y")
            else:
                ev = E.Leave(c, "")
            log.append(d.decide(w, ev))
        logs.append(log)
        # Everyone in a room has a name in the roster, and nobody is in no room.
        for key in d.rooms.rooms:
            names = d.rooms.sorted_names(key, d._name_of)
            assert len(names) == d.rooms.rooms[key].size
        for m in d.roster.members():
            assert d.rooms.rooms_of(m.worker, m.conn)
    assert logs[0] == logs[1]


def test_page_text_pages_a_long_list() -> None:
    items = [str(i) for i in range(7)]
    assert D.page_text(7, "user", "online", items, 1, 10, "/who") == "7 users online: 0, 1, 2, 3, 4, 5, 6"
    assert D.page_text(7, "user", "online", items, 2, 3, "/who") == "7 users online (4-6; /who 3 for more): 3, 4, 5"
    assert D.page_text(7, "user", "online", items, 9, 3, "/who") == "7 users online (7-7): 6"
    assert D.page_text(1, "room", "", ["#a (1)"], 1, 3, "/rooms") == "1 room: #a (1)"


# -- history ------------------------------------------------------------------------------------


def lines_of(h: H.History, key: str) -> list[bytes]:
    return [line for _, line in h.lines(key)]


def test_history_keeps_the_last_lines_of_each_room() -> None:
    h = H.History(3, 1 << 20)
    for i in range(5):
        h.add("#a", float(i), 1, b"a%d\r\n" % i)
    h.add("#b", 9.0, 2, b"b0\r\nb1\r\n")
    assert lines_of(h, "#a") == [b"a2\r\n", b"a3\r\n", b"a4\r\n"]
    assert h.lines("#b") == [(9.0, b"b0\r\n"), (9.0, b"b1\r\n")]


def test_history_is_bounded_in_bytes_across_rooms_oldest_first() -> None:
    h = H.History(100, 3 * (H.CHUNK_COST + 10))
    h.add("#a", 1.0, 1, b"a-oldest\r\n")
    h.add("#b", 2.0, 1, b"b-second\r\n")
    h.add("#a", 3.0, 1, b"a-third!\r\n")
    h.add("#c", 4.0, 1, b"c-fourth\r\n")
    assert lines_of(h, "#a") == [b"a-third!\r\n"] and lines_of(h, "#b") == [b"b-second\r\n"]
    assert h.evicted == 1 and h.nbytes <= h.max_bytes


def test_encoded_chunks_are_decoded_only_when_read() -> None:
    decoded = []

    def decode(data: bytes) -> list[bytes]:
        decoded.append(data)
        return H.split_lines(data.upper())

    h = H.History(2, 1 << 20, decode)
    h.add("#a", 1.0, 2, b"x\r\ny\r\n")
    h.add("#a", 2.0, 1, b"z\r\n")
    assert decoded == []
    assert h.lines("#a") == [(1.0, b"Y\r\n"), (2.0, b"Z\r\n")]


def test_replay_prefixes_each_line_with_its_utc_time() -> None:
    h = H.History(10, 1 << 20)
    h.add("#a", 1_700_000_000.0, 2, b"ann: hi\r\n* ann waves\r\n")  # 22:13 UTC
    assert h.replay("#a") == b"[22:13] ann: hi\r\n[22:13] * ann waves\r\n"


def test_no_history_is_kept_when_it_is_off() -> None:
    h = H.History(0, 1 << 20)
    h.add("#a", 1.0, 1, b"x\r\n")
    assert h.lines("#a") == [] and h.nbytes == 0


def test_a_copy_that_reaches_further_replaces_ours() -> None:
    h = H.History(10, 1 << 20)
    h.load("#a", [(1.0, b"one\r\n"), (2.0, b"two\r\n")])
    assert not h.merge("#a", [(1.0, b"one\r\n")])
    assert h.merge("#a", [(1.0, b"one\r\n"), (2.0, b"two\r\n"), (3.0, b"three\r\n")])
    assert lines_of(h, "#a") == [b"one\r\n", b"two\r\n", b"three\r\n"]


@given(st.lists(st.tuples(st.sampled_from(["#a", "#b", "#c"]), st.integers(1, 4), st.integers(0, 40)), max_size=80),
       st.integers(1, 6), st.integers(0, 2000))
def test_history_bounds_always_hold(adds: list[tuple[str, int, int]], max_lines: int, max_bytes: int) -> None:
    h = H.History(max_lines, max_bytes)
    rng = random.Random(1)
    for i, (room, count, size) in enumerate(adds):
        h.add(room, float(i), count, b"".join(b"x" * rng.randrange(size + 1) + b"\r\n" for _ in range(count)))
        assert h.nbytes <= max_bytes
        for key in h.keys():
            got = h.lines(key)
            assert 0 < len(got) <= max_lines
            assert [t for t, _ in got] == sorted(t for t, _ in got)
    assert h.nbytes == sum(c[3] for r in h.rooms.values() for c in r.chunks)
    assert h.live == sum(len(r.chunks) for r in h.rooms.values())
    assert {(c[0], k) for k, r in h.rooms.items() for c in r.chunks} <= set(h.order)
