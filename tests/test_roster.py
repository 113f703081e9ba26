"""The roster state machine: every replica that applies the same events in the same order agrees.

Pure tests: events in, outcomes and state out. The bus order is a list here.
"""

from __future__ import annotations

import random

import pytest

from chatcluster import events as E
from chatcluster import roster as R


def join(conn: int, nick: str, ip: str = "127.0.0.1", since: float = 1000.0) -> tuple:
    return E.Join(conn, nick, since, ip)


def nicks(r: R.Roster) -> list[str]:
    return sorted(m.nick for m in r.by_key.values())


# -- nickname rules ------------------------------------------------------------------------------


@pytest.mark.parametrize("nick", ["a", "Bob", "x" * 24, "under_score", "da-sh", "0123", "A_b-9"])
def test_valid_nicknames_have_no_problem(nick: str) -> None:
    assert R.nick_problem(nick) is None


@pytest.mark.parametrize(("nick", "words"), [
    ("", "1 to 24"),
    ("x" * 25, "too long"),
    ("bad nick", "may only use"),
    ("dot.ted", "may only use"),
    ("ümlaut", "may only use"),
    ("semi;colon", "may only use"),
])
def test_invalid_nicknames_name_the_problem(nick: str, words: str) -> None:
    problem = R.nick_problem(nick)
    assert problem is not None and words in problem


# -- JOIN ----------------------------------------------------------------------------------------


def test_join_adds_a_member_under_its_worker_and_conn() -> None:
    r = R.Roster()
    out = r.apply("w1", join(7, "alice", "10.0.0.1", 55.0))
    assert out.accepted and out.member is not None
    m = r.get("w1", 7)
    assert m is not None and (m.worker, m.conn, m.nick, m.since, m.ip) == ("w1", 7, "alice", 55.0, "10.0.0.1")
    assert m.prefix == b"alice: "
    assert r.holder("ALICE") is m
    assert r.per_ip["10.0.0.1"] == 1


def test_join_with_a_name_held_in_any_case_is_rejected() -> None:
    r = R.Roster()
    assert r.apply("w1", join(1, "Bob")).accepted
    out = r.apply("w2", join(1, "bOB"))
    assert not out.accepted
    assert r.get("w2", 1) is None
    assert nicks(r) == ["Bob"]


def test_join_of_an_invalid_name_is_rejected() -> None:
    r = R.Roster()
    assert not r.apply("w1", join(1, "no spaces")).accepted
    assert len(r) == 0


def test_second_join_of_the_same_connection_is_rejected() -> None:
    r = R.Roster()
    assert r.apply("w1", join(1, "first")).accepted
    assert not r.apply("w1", join(1, "second")).accepted
    assert nicks(r) == ["first"]


def test_same_conn_number_on_two_workers_are_two_members() -> None:
    r = R.Roster()
    assert r.apply("w1", join(1, "a")).accepted
    assert r.apply("w2", join(1, "b")).accepted
    assert len(r) == 2


# -- NICK ----------------------------------------------------------------------------------------


def test_nick_renames_and_frees_the_old_name() -> None:
    r = R.Roster()
    r.apply("w1", join(1, "old"))
    out = r.apply("w1", E.Nick(1, "new"))
    assert out.accepted and out.old_nick == "old" and out.member is not None and out.member.nick == "new"
    assert r.holder("old") is None and r.holder("NEW") is r.get("w1", 1)
    assert r.get("w1", 1).prefix == b"new: "  # type: ignore[union-attr]
    assert r.apply("w2", join(1, "old")).accepted


def test_first_claim_in_bus_order_wins() -> None:
    r = R.Roster()
    r.apply("w1", join(1, "a"))
    r.apply("w2", join(1, "b"))
    first = r.apply("w2", E.Nick(1, "prize"))
    second = r.apply("w1", E.Nick(1, "PRIZE"))
    assert first.accepted and not second.accepted
    assert second.member is r.get("w1", 1)
    assert nicks(r) == ["a", "prize"]


def test_own_name_in_another_case_is_allowed() -> None:
    r = R.Roster()
    r.apply("w1", join(1, "bob"))
    out = r.apply("w1", E.Nick(1, "Bob"))
    assert out.accepted and out.old_nick == "bob"
    assert nicks(r) == ["Bob"]


def test_nick_of_an_unknown_connection_is_rejected() -> None:
    r = R.Roster()
    assert not r.apply("w1", E.Nick(9, "ghost")).accepted
    assert r.holder("ghost") is None


def test_nick_to_an_invalid_name_is_rejected() -> None:
    r = R.Roster()
    r.apply("w1", join(1, "ok"))
    assert not r.apply("w1", E.Nick(1, "not ok")).accepted
    assert nicks(r) == ["ok"]


# -- LEAVE and GONE -------------------------------------------------------------------------------


def test_leave_removes_the_member_and_frees_its_name() -> None:
    r = R.Roster()
    r.apply("w1", join(1, "gone", "10.0.0.9"))
    out = r.apply("w1", E.Leave(1, "bye"))
    assert out.accepted and out.member is not None and out.member.nick == "gone"
    assert len(r) == 0 and r.holder("gone") is None and "10.0.0.9" not in r.per_ip


def test_leave_of_a_connection_whose_join_was_rejected_changes_nothing() -> None:
    r = R.Roster()
    r.apply("w1", join(1, "taken"))
    r.apply("w2", join(5, "taken"))  # rejected
    assert not r.apply("w2", E.Leave(5, "")).accepted
    assert nicks(r) == ["taken"]


def test_gone_removes_every_member_of_the_dead_worker_only() -> None:
    r = R.Roster()
    r.apply("w1", join(1, "a"))
    r.apply("w1", join(2, "b"))
    r.apply("w2", join(1, "c"))
    out = r.apply("broker", E.Gone("w1"))
    assert sorted(m.nick for m in out.gone) == ["a", "b"]
    assert nicks(r) == ["c"]
    assert r.apply("w2", join(2, "A")).accepted  # the names are free again


# -- snapshots and resyncs ------------------------------------------------------------------------


def test_snapshot_and_load_round_trip() -> None:
    r = R.Roster()
    r.apply("w1", join(1, "a", "10.0.0.1", 1.5))
    r.apply("w2", join(3, "B", "10.0.0.2", 2.5))
    copy = R.Roster()
    copy.load([list(t) for t in r.snapshot()])  # marshal may hand back lists
    assert copy.snapshot() == r.snapshot()
    assert copy.holder("b") is copy.get("w2", 3)
    assert copy.per_ip == r.per_ip


def test_load_replaces_everything() -> None:
    r = R.Roster()
    r.apply("w1", join(1, "old"))
    r.load([("w3", 4, "new", 0.0, "::1")])
    assert nicks(r) == ["new"] and r.holder("old") is None and list(r.per_ip) == ["::1"]


def test_resync_replaces_the_publishers_members() -> None:
    r = R.Roster()
    r.apply("w1", join(1, "stale"))
    r.apply("w2", join(1, "other"))
    out = r.apply("w1", E.Resync([("w1", 2, "fresh", 3.0, "127.0.0.1")]))
    assert out.rejected == ()
    assert nicks(r) == ["fresh", "other"]
    assert r.get("w1", 1) is None and r.get("w1", 2) is not None


def test_resync_entry_whose_name_is_held_by_another_worker_is_rejected() -> None:
    r = R.Roster()
    r.apply("w2", join(1, "Clash"))
    out = r.apply("w1", E.Resync([("w1", 1, "clash", 3.0, "127.0.0.1"), ("w1", 2, "fine", 3.0, "127.0.0.1")]))
    assert [t[2] for t in out.rejected] == ["clash"]
    assert nicks(r) == ["Clash", "fine"]


def test_adopt_moves_a_member_keeping_its_name() -> None:
    r = R.Roster()
    r.apply("w1", join(4, "mover", since=9.0))
    out = r.apply("w2", E.Adopt("w1", 4, 11))
    assert out.accepted
    m = r.get("w2", 11)
    assert r.get("w1", 4) is None and m is not None and m.nick == "mover" and m.since == 9.0


def test_events_that_are_not_roster_events_change_nothing() -> None:
    r = R.Roster()
    r.apply("w1", join(1, "a"))
    before = r.snapshot()
    for ev in [E.Chat(1, b"hi", b"Ann"), E.Me(1, b"waves", b"Ann"), E.Ping(), E.Hello(5)]:
        assert not r.apply("w1", ev).accepted
    assert r.snapshot() == before


# -- replicas agree -------------------------------------------------------------------------------


def test_replicas_applying_the_same_order_agree_whatever_the_order() -> None:
    """Random claims from three workers: every replica ends equal, names unique case-insensitively."""
    rng = random.Random(7)
    names = ["ann", "ANN", "bob", "Bob", "cy", "dee", "Dee", "eve"]
    for _ in range(50):
        events: list[tuple[str, tuple]] = []
        conns = {w: 0 for w in ("w1", "w2", "w3")}
        for _ in range(60):
            w = rng.choice(list(conns))
            roll = rng.random()
            if roll < 0.4 or not conns[w]:
                conns[w] += 1
                events.append((w, join(conns[w], rng.choice(names))))
            elif roll < 0.8:
                events.append((w, E.Nick(rng.randint(1, conns[w]), rng.choice(names))))
            elif roll < 0.95:
                events.append((w, E.Leave(rng.randint(1, conns[w]), "")))
            else:
                events.append(("broker", E.Gone(w)))
        replicas = [R.Roster() for _ in range(3)]
        for publisher, ev in events:
            outcomes = {r.apply(publisher, ev).accepted for r in replicas}
            assert len(outcomes) == 1
        assert replicas[0].snapshot() == replicas[1].snapshot() == replicas[2].snapshot()
        folded = [m.nick.lower() for m in replicas[0].by_key.values()]
        assert len(folded) == len(set(folded))
        assert set(replicas[0].by_fold) == set(folded)


# -- the broker's verdicts ------------------------------------------------------------------------


def claim(conn: int, nick: str, ip: str = "127.0.0.1", old: str = "", limit: int = 0, per_ip: int = 0) -> tuple:
    return E.Join(conn, nick, 1000.0, ip, old, limit, per_ip)


def test_a_winning_claim_becomes_joined_and_a_losing_one_refused_with_its_old_name() -> None:
    r = R.Roster()
    assert r.decide("w1", claim(1, "Ann")) == (E.JOINED, 1, "Ann", "")
    assert r.decide("w2", claim(4, "ANN", old="Was")) == (E.REFUSED, 4, "ANN", E.TAKEN_WHY, "Was")
    assert r.decide("w2", claim(4, "Bo", old="Was")) == (E.JOINED, 4, "Bo", "Was")


def test_claims_over_the_limits_they_carry_are_refused_and_take_no_place() -> None:
    r = R.Roster()
    assert r.decide("w1", claim(1, "a", limit=2))[0] == E.JOINED
    assert r.decide("w2", claim(1, "b", limit=2))[0] == E.JOINED
    assert r.decide("w2", claim(2, "c", limit=2)) == (E.REFUSED, 2, "c", E.FULL, "")
    assert r.decide("w1", claim(2, "d", ip="10.0.0.1", per_ip=1))[0] == E.JOINED
    assert r.decide("w2", claim(3, "e", ip="10.0.0.1", per_ip=1)) == (E.REFUSED, 3, "e", E.PER_IP, "")
    assert len(r) == 3 and r.holder("c") is None and r.holder("e") is None


def test_renames_and_departures_are_decided_with_the_names_receivers_need() -> None:
    r = R.Roster()
    r.decide("w1", claim(1, "old"))
    r.decide("w2", claim(1, "other"))
    assert r.decide("w1", E.Nick(1, "new")) == (E.RENAMED, 1, "old", "new")
    assert r.decide("w1", E.Nick(1, "OTHER")) == (E.TAKEN, 1, "OTHER", 1)
    assert r.decide("w1", E.Nick(9, "free")) == (E.TAKEN, 9, "free", 0)  # no such member
    assert r.decide("w1", E.Leave(1, "bye")) == (E.LEFT, 1, "new", "bye")
    assert r.decide("w1", E.Leave(1, "bye")) is None  # nothing to tell
    assert r.decide("broker", E.Gone("w2")) == (E.GONE, "w2", ["other"])


def test_who_and_whois_are_answered_from_the_roster_at_their_place_in_the_order() -> None:
    r = R.Roster()
    r.decide("w1", claim(1, "bob"))
    r.decide("w2", claim(1, "Ann"))
    assert r.decide("w1", E.Who(1)) == (E.REPLY, 1, "*** 2 users online: Ann, bob")
    text = r.decide("w2", E.Whois(1, "BOB", 1000.0 + 75))[2]
    assert text == "*** bob is on worker w1, connected since 1970-01-01 00:16:40 UTC (1m 15s ago)"
    assert r.decide("w2", E.Whois(1, "nobody", 0.0)) == (E.REPLY, 1, "*** Error: no such nickname nobody")


def test_chat_passes_unchanged_and_hello_and_resync_leave_nothing() -> None:
    r = R.Roster()
    chat = E.Chat(1, b"hi", b"Ann")
    assert r.decide_batch("w1", [chat, E.Hello(5), E.Resync([("w1", 2, "x", 0.0, "::1")])]) == [chat]
    assert r.snapshot_for("w1", 5) == (E.SNAPSHOT, "w1", 5, [(2, "x")])
    assert r.snapshot_for("w2", 6) == (E.SNAPSHOT, "w2", 6, [])


def test_adopt_is_decided_accepted_or_not() -> None:
    r = R.Roster()
    r.decide("w1", claim(4, "mover"))
    assert r.decide("w2", E.Adopt("w1", 4, 11)) == (E.ADOPTED, "w1", 4, 11, 1)
    assert r.decide("w3", E.Adopt("w1", 4, 12)) == (E.ADOPTED, "w1", 4, 12, 0)
