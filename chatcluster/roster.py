"""The cluster roster: who is online, replicated as a state machine over the bus order.

The broker gives every bus message one place in a single order. Every worker,
and the broker itself, applies the roster events of that order with `apply()`,
so all replicas agree on who holds which nickname at every point: the first
claim of a name in bus order wins everywhere, without a lock server. This
module also declares the bus event tuples (plain tuples so `marshal` encodes
them cheaply). It is pure: no sockets, no clock, no randomness.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

# Bus events are tuples whose first item is one of these kinds.
CHAT = 0  # (CHAT, conn, text_bytes)
ME = 1  # (ME, conn, text_bytes)
JOIN = 2  # (JOIN, conn, nick, since_unix, ip[, old_nick]): claim a name for a new (or renamed) client
NICK = 3  # (NICK, conn, new_nick): claim a new nickname
LEAVE = 4  # (LEAVE, conn, reason)
HELLO = 5  # (HELLO, nonce): a booting worker asks for a snapshot; also proves its bus path
SNAPSHOT = 6  # (SNAPSHOT, worker_id, nonce, members): the roster as of this point, for one worker
RESYNC = 7  # (RESYNC, members): a worker re-announces its clients after the broker restarted
GONE = 8  # (GONE, worker_id): a worker process died; its clients are gone
PING = 9  # (PING,): keeps the bus path checked while a worker is idle
ADOPT = 10  # (ADOPT, old_worker, old_conn, conn): a client moved here from another worker
# (HANDOFF, new_worker, token): where in the order a worker hands its clients to new_worker
# (see handoff.py); no replica's state changes
HANDOFF = 11

ROSTER_KINDS = frozenset({JOIN, NICK, LEAVE, HELLO, RESYNC, GONE, ADOPT})

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


@dataclass(slots=True)
class Member:
    worker: str
    conn: int
    nick: str
    since: float
    ip: str
    prefix: bytes = b""  # b"NICK: ", cached because every chat line starts with it

    def __post_init__(self) -> None:
        self.prefix = self.nick.encode() + b": "

    def as_tuple(self) -> MemberTuple:
        return (self.worker, self.conn, self.nick, self.since, self.ip)


@dataclass(frozen=True, slots=True)
class Outcome:
    """What applying one event did, for the replica that wants to tell people."""

    accepted: bool = True
    member: Member | None = None  # the member joined, renamed, left or adopted
    old_nick: str = ""  # for NICK
    gone: tuple[Member, ...] = ()  # for GONE and RESYNC: members removed
    rejected: tuple[MemberTuple, ...] = ()  # for RESYNC: entries whose name was taken meanwhile


class Roster:
    """Members keyed by (worker, conn), with a case-insensitive nickname index."""

    __slots__ = ("by_key", "by_fold", "per_ip")

    def __init__(self) -> None:
        self.by_key: dict[tuple[str, int], Member] = {}
        self.by_fold: dict[str, Member] = {}
        self.per_ip: Counter[str] = Counter()

    def __len__(self) -> int:
        return len(self.by_key)

    def get(self, worker: str, conn: int) -> Member | None:
        return self.by_key.get((worker, conn))

    def holder(self, nick: str) -> Member | None:
        return self.by_fold.get(nick.lower())

    def is_free_for(self, nick: str, worker: str, conn: int) -> bool:
        held = self.by_fold.get(nick.lower())
        return held is None or (held.worker == worker and held.conn == conn)

    def _add(self, m: Member) -> None:
        self.by_key[(m.worker, m.conn)] = m
        self.by_fold[m.nick.lower()] = m
        self.per_ip[m.ip] += 1

    def _remove(self, m: Member) -> None:
        del self.by_key[(m.worker, m.conn)]
        if self.by_fold.get(m.nick.lower()) is m:
            del self.by_fold[m.nick.lower()]
        self.per_ip[m.ip] -= 1
        if self.per_ip[m.ip] <= 0:
            del self.per_ip[m.ip]

    def members_of(self, worker: str) -> list[Member]:
        return [m for m in self.by_key.values() if m.worker == worker]

    def snapshot(self) -> list[MemberTuple]:
        return [m.as_tuple() for m in self.by_key.values()]

    def load(self, members: list[MemberTuple] | list[list[Any]]) -> None:
        self.by_key.clear()
        self.by_fold.clear()
        self.per_ip.clear()
        for t in members:
            self._add(Member(str(t[0]), int(t[1]), str(t[2]), float(t[3]), str(t[4])))

    def apply(self, publisher: str, ev: tuple[Any, ...]) -> Outcome:
        """Apply one roster event published by `publisher`, identically on every replica."""
        handler = _APPLY.get(ev[0])
        return handler(self, publisher, ev) if handler else Outcome(accepted=False)

    def _join(self, publisher: str, ev: tuple[Any, ...]) -> Outcome:
        conn, nick, since, ip = ev[1:5]
        if (publisher, conn) in self.by_key or nick_problem(nick) or nick.lower() in self.by_fold:
            return Outcome(accepted=False)
        m = Member(publisher, conn, nick, since, ip)
        self._add(m)
        return Outcome(member=m)

    def _nick(self, publisher: str, ev: tuple[Any, ...]) -> Outcome:
        _, conn, new = ev
        m = self.by_key.get((publisher, conn))
        if m is None or nick_problem(new) or not self.is_free_for(new, publisher, conn):
            return Outcome(accepted=False, member=m)
        self._remove(m)
        renamed = Member(publisher, conn, new, m.since, m.ip)
        self._add(renamed)
        return Outcome(member=renamed, old_nick=m.nick)

    def _leave(self, publisher: str, ev: tuple[Any, ...]) -> Outcome:
        m = self.by_key.get((publisher, ev[1]))
        if m is None:
            return Outcome(accepted=False)
        self._remove(m)
        return Outcome(member=m)

    def _gone(self, _publisher: str, ev: tuple[Any, ...]) -> Outcome:
        gone = tuple(self.members_of(ev[1]))
        for m in gone:
            self._remove(m)
        return Outcome(gone=gone)

    def _resync(self, publisher: str, ev: tuple[Any, ...]) -> Outcome:
        """The publisher's members are exactly these now; a name taken meanwhile is refused."""
        for m in self.members_of(publisher):
            self._remove(m)
        rejected: list[MemberTuple] = []
        for t in ev[1]:
            entry = (publisher, int(t[1]), str(t[2]), float(t[3]), str(t[4]))
            if entry[2].lower() in self.by_fold:
                rejected.append(entry)
            else:
                self._add(Member(*entry))
        return Outcome(rejected=tuple(rejected))

    def _adopt(self, publisher: str, ev: tuple[Any, ...]) -> Outcome:
        _, old_worker, old_conn, conn = ev
        m = self.by_key.get((old_worker, old_conn))
        if m is None or (publisher, conn) in self.by_key:
            return Outcome(accepted=False)
        self._remove(m)
        moved = Member(publisher, conn, m.nick, m.since, m.ip)
        self._add(moved)
        return Outcome(member=moved)


_APPLY = {JOIN: Roster._join, NICK: Roster._nick, LEAVE: Roster._leave, GONE: Roster._gone,
          RESYNC: Roster._resync, ADOPT: Roster._adopt}
