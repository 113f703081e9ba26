"""The cluster roster: who is online, kept by the broker as a state machine over the bus order.

The broker gives every bus message one place in a single order, and it alone
holds the roster: it applies the roster requests of that order (claims of a
name, renames, departures, moves, /who) with `decide()` and puts its verdict
in the request's place in the stream, so every worker sees the same verdicts
at the same point: the first claim of a name in bus order wins, without a
lock server and without a copy of the roster in every worker. The events
themselves are declared in `events`. It is pure: no sockets, no clock, no
randomness.
"""

from __future__ import annotations

import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

from . import events as E
from .events import FULL, PER_IP, TAKEN_WHY
from .textfmt import duration

MAX_NICK = 24
NICK_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")

# A member as a tuple, for snapshots and resyncs: (worker, conn, nick, since, ip)
MemberTuple = tuple[str, int, str, float, str]


def nick_problem(nick: str) -> str | None:
    """Why `nick` is not a valid nickname, or None when it is."""
    if not nick:
        return "a nickname needs 1 to 24 characters"
    if len(nick) > MAX_NICK:
        return f"nickname is too long ({len(nick)} characters, max {MAX_NICK})"
    if not NICK_CHARS.issuperset(nick):
        return "a nickname may only use letters A-Z a-z, digits 0-9, _ and -"
    return None


class Member(NamedTuple):
    """One user of the cluster. A tuple of strings and numbers: the smallest record Python has
    (and one the cyclic garbage collector soon stops visiting), for a roster of every user."""

    worker: str
    conn: int
    nick: str
    since: float
    ip: str

    @property
    def prefix(self) -> bytes:
        """b"NICK: ", the start of every chat line of this member (made when needed, not stored)."""
        return self.nick.encode() + b": "

    def as_tuple(self) -> MemberTuple:
        return (self.worker, self.conn, self.nick, self.since, self.ip)


def _member(worker: str, conn: int, nick: str, since: float, ip: str) -> Member:
    # Worker names and addresses repeat across members: one shared string each.
    return Member(sys.intern(worker), conn, nick, since, sys.intern(ip))


def _fold(nick: str) -> str:
    """The case-insensitive key of a nickname: the nickname itself when it is lower case already."""
    folded = nick.lower()
    return nick if folded == nick else folded


@dataclass(frozen=True, slots=True)
class Outcome:
    """What applying one event did, for the verdict that tells people."""

    accepted: bool = True
    member: Member | None = None  # the member joined, renamed, left or adopted
    old_nick: str = ""  # for NICK
    gone: tuple[Member, ...] = ()  # for GONE and RESYNC: members removed
    rejected: tuple[MemberTuple, ...] = ()  # for RESYNC: entries whose name was taken meanwhile


class Roster:
    """Members by worker and connection number, with a case-insensitive nickname index.

    Grouping members by worker (`shards`) rather than keying them by a (worker, conn) tuple
    saves a tuple per member; see Member for the rest of the diet.
    """

    __slots__ = ("shards", "by_fold", "per_ip")

    def __init__(self) -> None:
        self.shards: dict[str, dict[int, Member]] = {}
        self.by_fold: dict[str, Member] = {}
        self.per_ip: Counter[str] = Counter()

    def __len__(self) -> int:
        return sum(len(shard) for shard in self.shards.values())

    @property
    def by_key(self) -> dict[tuple[str, int], Member]:
        """Every member by (worker, conn): a new dict, for inspection, not for the hot path."""
        return {(w, conn): m for w, shard in self.shards.items() for conn, m in shard.items()}

    def members(self) -> Iterator[Member]:
        for shard in self.shards.values():
            yield from shard.values()

    def get(self, worker: str, conn: int) -> Member | None:
        shard = self.shards.get(worker)
        return None if shard is None else shard.get(conn)

    def holder(self, nick: str) -> Member | None:
        return self.by_fold.get(nick.lower())

    def is_free_for(self, nick: str, worker: str, conn: int) -> bool:
        held = self.by_fold.get(nick.lower())
        return held is None or (held.worker == worker and held.conn == conn)

    def _add(self, m: Member) -> None:
        shard = self.shards.get(m.worker)
        if shard is None:
            shard = self.shards[m.worker] = {}
        shard[m.conn] = m
        self.by_fold[_fold(m.nick)] = m
        self.per_ip[m.ip] += 1

    def _remove(self, m: Member) -> None:
        shard = self.shards[m.worker]
        del shard[m.conn]
        if not shard:
            del self.shards[m.worker]
        folded = m.nick.lower()
        if self.by_fold.get(folded) is m:
            del self.by_fold[folded]
        self.per_ip[m.ip] -= 1
        if self.per_ip[m.ip] <= 0:
            del self.per_ip[m.ip]

    def members_of(self, worker: str) -> list[Member]:
        return list(self.shards.get(worker, {}).values())

    def snapshot(self) -> list[MemberTuple]:
        return [m.as_tuple() for m in self.members()]

    def load(self, members: list[MemberTuple] | list[list[Any]]) -> None:
        self.shards.clear()
        self.by_fold.clear()
        self.per_ip.clear()
        for t in members:
            self._add(_member(str(t[0]), int(t[1]), str(t[2]), float(t[3]), str(t[4])))

    def decide(self, publisher: str, ev: E.Event) -> E.Event | None:
        """Apply one event of `publisher` and return what takes its place in the stream (None: nothing).

        Events that are not roster requests pass unchanged; Hello and Resync leave nothing
        behind (the broker answers Hello with a Snapshot of its own).
        """
        decide = _DECIDE.get(type(ev))
        return ev if decide is None else decide(self, publisher, ev)

    def decide_batch(self, publisher: str, events: list[E.Event]) -> list[E.Event]:
        decided = []
        for ev in events:
            d = self.decide(publisher, ev)
            if d is not None:
                decided.append(d)
        return decided

    def _decide_join(self, publisher: str, ev: E.Join) -> E.Event | None:
        if self.get(publisher, ev.conn) is not None:
            return None  # a second claim for a member: nothing to decide
        if ev.max_clients and len(self) >= ev.max_clients:
            return E.Refused(ev.conn, ev.nick, FULL, ev.old)
        if ev.max_clients_per_ip and self.per_ip.get(ev.ip, 0) >= ev.max_clients_per_ip:
            return E.Refused(ev.conn, ev.nick, PER_IP, ev.old)
        if not self.apply(publisher, ev).accepted:
            return E.Refused(ev.conn, ev.nick, TAKEN_WHY, ev.old)
        return E.Joined(ev.conn, ev.nick, ev.old)

    def _decide_nick(self, publisher: str, ev: E.Nick) -> E.Event:
        out = self.apply(publisher, ev)
        if out.accepted and out.member is not None:
            return E.Renamed(ev.conn, out.old_nick, ev.new)
        return E.Taken(ev.conn, ev.new, int(out.member is not None))

    def _decide_leave(self, publisher: str, ev: E.Leave) -> E.Event | None:
        out = self.apply(publisher, ev)
        return E.Left(ev.conn, out.member.nick, ev.reason) if out.member is not None else None

    def _decide_gone(self, publisher: str, ev: E.Gone) -> E.Event:
        return E.Gone(ev.worker, [m.nick for m in self.apply(publisher, ev).gone])

    def _decide_adopt(self, publisher: str, ev: E.Adopt) -> E.Event:
        return E.Adopted(ev.old_worker, ev.old_conn, ev.conn, int(self.apply(publisher, ev).accepted))

    def _decide_who(self, _publisher: str, ev: E.Who) -> E.Event:
        return E.Reply(ev.conn, self.who_text())

    def _decide_whois(self, _publisher: str, ev: E.Whois) -> E.Event:
        return E.Reply(ev.conn, self.whois_text(ev.nick, ev.now))

    def _decide_quietly(self, publisher: str, ev: E.Event) -> None:
        self.apply(publisher, ev)  # Resync, Hello: nothing takes their place

    def snapshot_for(self, worker: str, nonce: int) -> E.Snapshot:
        """The answer to a Hello of `worker`: its members as the roster has them now."""
        return E.Snapshot(worker, nonce, [(m.conn, m.nick) for m in self.members_of(worker)])

    def who_text(self) -> str:
        nicks = sorted((m.nick for m in self.members()), key=lambda n: (n.lower(), n))
        word = "user" if len(nicks) == 1 else "users"
        return f"*** {len(nicks)} {word} online: {', '.join(nicks)}"

    def whois_text(self, nick: str, now: float) -> str:
        m = self.holder(nick)
        if m is None:
            return f"*** Error: no such nickname {nick}"
        since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(m.since))
        return f"*** {m.nick} is on worker {m.worker}, connected since {since} ({duration(now - m.since)} ago)"

    def apply(self, publisher: str, ev: E.Event) -> Outcome:
        """Apply one roster event published by `publisher`, in bus order."""
        handler = _APPLY.get(type(ev))
        return handler(self, publisher, ev) if handler else Outcome(accepted=False)

    def _join(self, publisher: str, ev: E.Join) -> Outcome:
        nick = ev.nick
        if self.get(publisher, ev.conn) is not None or nick_problem(nick) or nick.lower() in self.by_fold:
            return Outcome(accepted=False)
        m = _member(publisher, ev.conn, nick, ev.since, ev.ip)
        self._add(m)
        return Outcome(member=m)

    def _nick(self, publisher: str, ev: E.Nick) -> Outcome:
        m = self.get(publisher, ev.conn)
        if m is None or nick_problem(ev.new) or not self.is_free_for(ev.new, publisher, ev.conn):
            return Outcome(accepted=False, member=m)
        self._remove(m)
        renamed = m._replace(nick=ev.new)
        self._add(renamed)
        return Outcome(member=renamed, old_nick=m.nick)

    def _leave(self, publisher: str, ev: E.Leave) -> Outcome:
        m = self.get(publisher, ev.conn)
        if m is None:
            return Outcome(accepted=False)
        self._remove(m)
        return Outcome(member=m)

    def _gone(self, _publisher: str, ev: E.Gone) -> Outcome:
        gone = tuple(self.members_of(ev.worker))
        for m in gone:
            self._remove(m)
        return Outcome(gone=gone)

    def _resync(self, publisher: str, ev: E.Resync) -> Outcome:
        """The publisher's members are exactly these now; a name taken meanwhile is refused."""
        for m in self.members_of(publisher):
            self._remove(m)
        rejected: list[MemberTuple] = []
        for t in ev.members:
            entry = (publisher, int(t[1]), str(t[2]), float(t[3]), str(t[4]))
            if entry[2].lower() in self.by_fold:
                rejected.append(entry)
            else:
                self._add(_member(*entry))
        return Outcome(rejected=tuple(rejected))

    def _adopt(self, publisher: str, ev: E.Adopt) -> Outcome:
        m = self.get(ev.old_worker, ev.old_conn)
        if m is None or self.get(publisher, ev.conn) is not None:
            return Outcome(accepted=False)
        self._remove(m)
        moved = _member(publisher, ev.conn, m.nick, m.since, m.ip)
        self._add(moved)
        return Outcome(member=moved)


_DECIDE: dict[type[E.Event], Callable[[Roster, str, Any], E.Event | None]] = {
    E.Join: Roster._decide_join, E.Nick: Roster._decide_nick, E.Leave: Roster._decide_leave,
    E.Gone: Roster._decide_gone, E.Adopt: Roster._decide_adopt, E.Who: Roster._decide_who,
    E.Whois: Roster._decide_whois, E.Resync: Roster._decide_quietly, E.Hello: Roster._decide_quietly}
_APPLY: dict[type[E.Event], Callable[[Roster, str, Any], Outcome]] = {
    E.Join: Roster._join, E.Nick: Roster._nick, E.Leave: Roster._leave, E.Gone: Roster._gone,
    E.Resync: Roster._resync, E.Adopt: Roster._adopt}
