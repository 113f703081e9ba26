"""The cluster roster: who is online, kept by the broker as a state machine over the bus order.

The broker gives every bus message one place in a single order, and it alone
holds the roster: it applies the roster requests of that order (claims of a
name, renames, departures, moves, /who) with `decide()` and puts its verdict
in the request's place in the stream, so every worker sees the same verdicts
at the same point: the first claim of a name in bus order wins, without a
lock server and without a copy of the roster in every worker. This module also
declares the bus event tuples (plain tuples so `marshal` encodes them
cheaply). It is pure: no sockets, no clock, no randomness.
"""

from __future__ import annotations

import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

# Bus events are tuples whose first item is one of these kinds.
CHAT = 0  # (CHAT, conn, text_bytes, nick_bytes): the sender's nickname travels with its line
ME = 1  # (ME, conn, text_bytes, nick_bytes)
# (JOIN, conn, nick, since_unix, ip, old_nick, max_clients, max_clients_per_ip): claim a name for a
# new client (old_nick "") or for one that lost its name (old_nick set; no limits apply then)
JOIN = 2
NICK = 3  # (NICK, conn, new_nick): claim a new nickname
LEAVE = 4  # (LEAVE, conn, reason)
HELLO = 5  # (HELLO, nonce): a booting worker asks where its view starts; also proves its bus path
# (SNAPSHOT, worker_id, nonce, [(conn, nick), ...]): the answer to HELLO, with the roster's members
# of that worker at this point (none for a new worker; after a broker restart, those kept)
SNAPSHOT = 6
RESYNC = 7  # (RESYNC, members): a worker re-announces its clients after the broker restarted
GONE = 8  # (GONE, worker_id[, nicks]): a worker process died; its clients (these names) are gone
PING = 9  # (PING,): keeps the bus path checked while a worker is idle
ADOPT = 10  # (ADOPT, old_worker, old_conn, conn): a client moved here from another worker
# (HANDOFF, new_worker, token): where in the order a worker hands its clients to new_worker
# (see handoff.py); the roster does not change
HANDOFF = 11
WHO = 12  # (WHO, conn): a client asks who is online
WHOIS = 13  # (WHOIS, conn, nick, now_unix): a client asks about one nickname
# Verdicts: the broker replaces each request above by its verdict, in the same place of the order.
JOINED = 14  # (JOINED, conn, nick, old_nick): the claim won
REFUSED = 15  # (REFUSED, conn, nick, why, old_nick): why is TAKEN_WHY, FULL or PER_IP
RENAMED = 16  # (RENAMED, conn, old_nick, new_nick)
TAKEN = 17  # (TAKEN, conn, new_nick, known): the rename lost (known 0: the client had no name)
LEFT = 18  # (LEFT, conn, nick, reason)
ADOPTED = 19  # (ADOPTED, old_worker, old_conn, conn, accepted)
REPLY = 20  # (REPLY, conn, text): the answer to WHO or WHOIS, for one client of the publisher

ROSTER_KINDS = frozenset({JOIN, NICK, LEAVE, HELLO, RESYNC, GONE, ADOPT, WHO, WHOIS})
TAKEN_WHY, FULL, PER_IP = "taken", "full", "address"

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

    def decide(self, publisher: str, ev: tuple[Any, ...]) -> tuple[Any, ...] | None:
        """Apply one event of `publisher` and return what takes its place in the stream (None: nothing).

        Events that are not roster requests pass unchanged; HELLO and RESYNC leave nothing
        behind (the broker answers HELLO with a SNAPSHOT of its own).
        """
        kind = ev[0]
        if kind not in ROSTER_KINDS:
            return ev
        if kind == JOIN:
            return self._decide_join(publisher, ev)
        if kind == NICK:
            conn, new = ev[1], ev[2]
            out = self.apply(publisher, ev)
            if out.accepted and out.member is not None:
                return (RENAMED, conn, out.old_nick, new)
            return (TAKEN, conn, new, int(out.member is not None))
        if kind == LEAVE:
            out = self.apply(publisher, ev)
            return (LEFT, ev[1], out.member.nick, ev[2]) if out.member is not None else None
        if kind == GONE:
            return (GONE, ev[1], [m.nick for m in self.apply(publisher, ev).gone])
        if kind == ADOPT:
            return (ADOPTED, ev[1], ev[2], ev[3], int(self.apply(publisher, ev).accepted))
        if kind == WHO:
            return (REPLY, ev[1], self.who_text())
        if kind == WHOIS:
            return (REPLY, ev[1], self.whois_text(ev[2], ev[3]))
        self.apply(publisher, ev)  # RESYNC, HELLO
        return None

    def decide_batch(self, publisher: str, events: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
        decided = []
        for ev in events:
            d = self.decide(publisher, ev)
            if d is not None:
                decided.append(d)
        return decided

    def _decide_join(self, publisher: str, ev: tuple[Any, ...]) -> tuple[Any, ...] | None:
        conn, nick, ip = ev[1], ev[2], ev[4]
        old = ev[5] if len(ev) > 5 else ""
        max_clients, per_ip = (ev[6], ev[7]) if len(ev) > 7 else (0, 0)
        if self.get(publisher, conn) is not None:
            return None  # a second claim for a member: nothing to decide
        if max_clients and len(self) >= max_clients:
            return (REFUSED, conn, nick, FULL, old)
        if per_ip and self.per_ip.get(ip, 0) >= per_ip:
            return (REFUSED, conn, nick, PER_IP, old)
        if not self.apply(publisher, ev).accepted:
            return (REFUSED, conn, nick, TAKEN_WHY, old)
        return (JOINED, conn, nick, old)

    def snapshot_for(self, worker: str, nonce: int) -> tuple[Any, ...]:
        """The answer to a HELLO of `worker`: its members as the roster has them now."""
        return (SNAPSHOT, worker, nonce, [(m.conn, m.nick) for m in self.members_of(worker)])

    def who_text(self) -> str:
        nicks = sorted((m.nick for m in self.members()), key=lambda n: (n.lower(), n))
        word = "user" if len(nicks) == 1 else "users"
        return f"*** {len(nicks)} {word} online: {', '.join(nicks)}"

    def whois_text(self, nick: str, now: float) -> str:
        m = self.holder(nick)
        if m is None:
            return f"*** Error: no such nickname {nick}"
        since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(m.since))
        return f"*** {m.nick} is on worker {m.worker}, connected since {since} ({_duration(now - m.since)} ago)"

    def apply(self, publisher: str, ev: tuple[Any, ...]) -> Outcome:
        """Apply one roster event published by `publisher`, in bus order."""
        handler = _APPLY.get(ev[0])
        return handler(self, publisher, ev) if handler else Outcome(accepted=False)

    def _join(self, publisher: str, ev: tuple[Any, ...]) -> Outcome:
        conn, nick, since, ip = ev[1:5]
        if self.get(publisher, conn) is not None or nick_problem(nick) or nick.lower() in self.by_fold:
            return Outcome(accepted=False)
        m = _member(publisher, conn, nick, since, ip)
        self._add(m)
        return Outcome(member=m)

    def _nick(self, publisher: str, ev: tuple[Any, ...]) -> Outcome:
        _, conn, new = ev
        m = self.get(publisher, conn)
        if m is None or nick_problem(new) or not self.is_free_for(new, publisher, conn):
            return Outcome(accepted=False, member=m)
        self._remove(m)
        renamed = m._replace(nick=new)
        self._add(renamed)
        return Outcome(member=renamed, old_nick=m.nick)

    def _leave(self, publisher: str, ev: tuple[Any, ...]) -> Outcome:
        m = self.get(publisher, ev[1])
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
                self._add(_member(*entry))
        return Outcome(rejected=tuple(rejected))

    def _adopt(self, publisher: str, ev: tuple[Any, ...]) -> Outcome:
        _, old_worker, old_conn, conn = ev
        m = self.get(old_worker, old_conn)
        if m is None or self.get(publisher, conn) is not None:
            return Outcome(accepted=False)
        self._remove(m)
        moved = _member(publisher, conn, m.nick, m.since, m.ip)
        self._add(moved)
        return Outcome(member=moved)


def _duration(seconds: float) -> str:
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60}s"
    return f"{s // 3600}h {s % 3600 // 60}m"


_APPLY = {JOIN: Roster._join, NICK: Roster._nick, LEAVE: Roster._leave, GONE: Roster._gone,
          RESYNC: Roster._resync, ADOPT: Roster._adopt}
