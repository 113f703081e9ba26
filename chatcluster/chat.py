"""The chat rules of one worker: commands, nicknames, notices and who receives what.

`ChatCore` is pure. The worker feeds it what happened (a client connected, sent
a line, went away; a batch arrived from the bus) and gets back effects: events
to publish on the bus, bytes for one client, bytes for everyone in the room,
a client entering the room, a connection to close. Everything a client sees
of other clients comes from the bus order, including its own worker's clients,
so every client on every worker sees one order. The randomness for nicknames
is injected, the clock is passed in; no sockets here.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import Any

from . import roster as R
from .protocol import encode_line

EMPTY: frozenset[int] = frozenset()
CRLF = b"\r\n"
NICK_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"

HELP = (
    "*** Commands:",
    "*** /nick NAME - change your nickname (1-24 characters from A-Z a-z 0-9 _ -)",
    "*** /me ACTION - tell others what you do; they see * NICK ACTION",
    "*** /who - list everyone online",
    "*** /whois NICK - show where NICK is connected and since when",
    "*** /quit [REASON] - leave the chat",
    "*** /help - show this list",
    "*** A line starting with // is sent as text with one / removed",
)
LOST_NOTICE = encode_line("*** Notice: some messages may have been lost")
# Bus events a client would see something of.
VISIBLE_KINDS = frozenset({R.CHAT, R.ME, R.JOIN, R.NICK, R.LEAVE, R.GONE})


# Effects -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Publish:
    event: tuple[Any, ...]


@dataclass(frozen=True, slots=True)
class Send:
    conn: int
    data: bytes


@dataclass(frozen=True, slots=True)
class Broadcast:
    """`data` goes to every client in the room except those in `exclude`."""

    data: bytes
    exclude: frozenset[int] = EMPTY


@dataclass(frozen=True, slots=True)
class Enter:
    """The client has its welcome line and from now on receives the room's traffic."""

    conn: int


@dataclass(frozen=True, slots=True)
class Close:
    """Close the connection once what was queued for it has been sent."""

    conn: int


Effect = Publish | Send | Broadcast | Enter | Close

PENDING, ACTIVE, REJOINING = "pending", "active", "rejoining"


@dataclass(slots=True)
class LocalUser:
    conn: int
    ip: str
    since: float
    nick: str
    state: str = PENDING
    backlog: list[str | int] | None = None  # lines, or limits of too long ones (a list only while some wait)
    claiming: bool = False  # a /nick claim is on the bus; what the client says next waits for it
    leaving: str | None = None  # gone (with this reason) while lines waited: they go out first

    @property
    def waiting(self) -> bool:
        """Lines wait until the bus has decided on the client's name, so replies keep their order."""
        return self.state != ACTIVE or self.claiming

    def hold(self, item: str | int) -> None:
        """Keep a line (or the limit of a too long one) until the client may speak again."""
        if self.backlog is None:
            self.backlog = []
        self.backlog.append(item)


@dataclass(slots=True)
class ChatSettings:
    welcome: str = "*** Welcome to chatcluster! Your nickname is {nick}. Type /help for commands."
    announce_joins: bool = True
    max_clients: int = 0
    max_clients_per_ip: int = 0


class ChatCore:
    """One worker's view of the chat: its own clients plus a replica of the cluster roster."""

    def __init__(self, worker_id: str, settings: ChatSettings | None = None,
                 rng: random.Random | None = None) -> None:
        self.worker_id = worker_id
        self.settings = settings or ChatSettings()
        self.rng = rng or random.Random()
        self.roster = R.Roster()
        self.local: dict[int, LocalUser] = {}
        # Clients whose JOIN claim is on the bus (pending or rejoining): few, so that connect()
        # need not scan every local client. Entries whose client is gone are pruned on use.
        self.claims: dict[int, LocalUser] = {}
        self.ready = False  # True once a roster snapshot has been loaded
        self.nonce = 0
        self.syncing = False  # waiting for a snapshot after a broker restart
        self.lost_told = False  # the clients heard "messages may have been lost" in this epoch
        self.undelivered = 0  # events for clients that arrived while resyncing, so never shown
        self.missed = False  # some of them arrived during the current resync
        self.clock = 0.0  # the latest time a caller passed in, for lines answered later

    # -- boot and bus recovery ---------------------------------------------------------------

    def hello(self) -> tuple[Any, ...]:
        """The HELLO event asking the broker for a roster snapshot (sent as a control batch)."""
        if not self.nonce:
            self.nonce = self.rng.randrange(1, 1 << 62)
        return (R.HELLO, self.nonce)

    @property
    def waiting_for_snapshot(self) -> bool:
        return not self.ready or self.syncing

    def bus_restarted(self) -> list[tuple[Any, ...]]:
        """A new broker: the control batch that re-announces our clients and asks for a snapshot.

        The roster is kept as it was until the snapshot replaces it, so /who stays whole while
        the cluster resyncs. Clients still pending keep their JOIN in flight: it is among the
        batches sent again after this one, so it is decided after our RESYNC.
        """
        members = [(self.worker_id, u.conn, u.nick, u.since, u.ip)
                   for u in self.local.values() if u.state == ACTIVE]
        self.syncing = True
        self.lost_told = False
        self.nonce = 0
        return [(R.RESYNC, members), self.hello()]

    def messages_lost(self) -> list[Effect]:
        """Tell the room that bus traffic was lost; once per broker epoch is enough."""
        if self.lost_told:
            return []
        self.lost_told = True
        return [Broadcast(LOST_NOTICE)]

    # -- client side -------------------------------------------------------------------------

    def connect(self, conn: int, ip: str, now: float) -> list[Effect]:
        s = self.settings
        pending = [u for u in self._claiming() if u.state == PENDING]
        if s.max_clients and len(self.roster) + len(pending) >= s.max_clients:
            return [Send(conn, encode_line("*** Error: server full")), Close(conn)]
        if s.max_clients_per_ip:
            same_ip = self.roster.per_ip.get(ip, 0) + sum(1 for u in pending if u.ip == ip)
            if same_ip >= s.max_clients_per_ip:
                return [Send(conn, encode_line("*** Error: too many connections from your address")),
                        Close(conn)]
        user = LocalUser(conn, ip, now, self._free_nick())
        self.local[conn] = user
        self.claims[conn] = user
        return [Publish((R.JOIN, conn, user.nick, now, ip))]

    def disconnect(self, conn: int, reason: str = "") -> list[Effect]:
        user = self.local.get(conn)
        if user is None or user.leaving is not None:
            return []
        if user.waiting and user.backlog:
            # What the client sent before it went away still counts (`printf ... | nc -N`): its
            # lines go out once the bus has decided on its name, then it leaves and is closed.
            user.leaving = reason
            return []
        del self.local[conn]
        # Published even for a pending client: LEAVE follows its JOIN in bus order, so every
        # replica removes it again whether or not the claim was accepted.
        return [Publish((R.LEAVE, conn, reason))]

    def line_too_long(self, conn: int, limit: int) -> list[Effect]:
        user = self.local.get(conn)
        if user is not None and user.waiting:
            user.hold(limit)  # answered in the order sent, after the pending reply
            return []
        return [Send(conn, encode_line(f"*** Error: line too long (max {limit} bytes)"))]

    def line(self, conn: int, text: str, now: float = 0.0) -> list[Effect]:
        if now:
            self.clock = now
        user = self.local.get(conn)
        if user is None:
            return []
        if user.waiting:
            user.hold(text)
            return []
        if not text.strip():
            return []
        if text.startswith("//"):
            return [Publish((R.CHAT, conn, text[1:].encode()))]
        if text.startswith("/"):
            return self._command(user, text, now)
        return [Publish((R.CHAT, conn, text.encode()))]

    def _command(self, user: LocalUser, text: str, now: float) -> list[Effect]:
        word, _, rest = text[1:].partition(" ")
        cmd = word.lower()
        arg = rest.strip()
        conn = user.conn
        if cmd == "nick":
            return self._nick(user, arg)
        if cmd == "me":
            if not arg:
                return [self._error(conn, "usage: /me ACTION")]
            return [Publish((R.ME, conn, rest.lstrip().encode()))]
        if cmd == "who":
            nicks = sorted((m.nick for m in self.roster.members()), key=lambda n: (n.lower(), n))
            word_users = "user" if len(nicks) == 1 else "users"
            return [Send(conn, encode_line(f"*** {len(nicks)} {word_users} online: {', '.join(nicks)}"))]
        if cmd == "whois":
            return [Send(conn, self._whois(arg, now))]
        if cmd == "help":
            return [Send(conn, b"".join(encode_line(h) for h in HELP))]
        if cmd == "quit":
            self.local.pop(conn, None)
            return [Send(conn, encode_line("*** Goodbye")), Close(conn), Publish((R.LEAVE, conn, arg))]
        return [self._error(conn, f"unknown command /{word}. Type /help for commands.")]

    def _nick(self, user: LocalUser, new: str) -> list[Effect]:
        conn = user.conn
        if not new:
            return [self._error(conn, "usage: /nick NAME")]
        problem = R.nick_problem(new)
        if problem:
            return [self._error(conn, problem)]
        if new == user.nick:
            return [Send(conn, encode_line(f"*** You are already known as {new}"))]
        if not self.roster.is_free_for(new, self.worker_id, conn):
            return [self._error(conn, f"nickname {new} is already taken")]
        # The claim is decided in bus order: another worker may claim the same name first.
        user.claiming = True
        return [Publish((R.NICK, conn, new))]

    def _whois(self, nick: str, now: float) -> bytes:
        if not nick:
            return encode_line("*** Error: usage: /whois NICK")
        m = self.roster.holder(nick)
        if m is None:
            return encode_line(f"*** Error: no such nickname {nick}")
        since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(m.since))
        return encode_line(f"*** {m.nick} is on worker {m.worker}, connected since {since} "
                           f"({_duration(now - m.since)} ago)")

    def _error(self, conn: int, reason: str) -> Send:
        return Send(conn, encode_line(f"*** Error: {reason}"))

    def _claiming(self) -> list[LocalUser]:
        claims = self.claims
        for conn in [c for c, u in claims.items() if self.local.get(c) is not u or u.state == ACTIVE]:
            del claims[conn]
        return list(claims.values())

    def _free_nick(self) -> str:
        taken = {u.nick.lower() for u in self._claiming()}
        while True:
            nick = "".join(self.rng.choice(NICK_ALPHABET) for _ in range(4))
            if nick.lower() not in taken and self.roster.holder(nick) is None:
                return nick

    # -- bus side ----------------------------------------------------------------------------

    def on_bus(self, publisher: str, events: list[tuple[Any, ...]], replay: bool = False) -> list[Effect]:
        """Apply one bus batch, in order, and say what each local client receives.

        `replay` marks a batch this worker saw before a broker restart and now sees again:
        its roster events still count (the new broker's roster was rebuilt without them, and
        ours must stay equal to it), but the clients were told about it the first time.
        """
        out: list[Effect] = []
        if self.waiting_for_snapshot:
            # Before our snapshot the roster is unknown: everything up to it is already part
            # of the snapshot, so only the snapshot itself matters. What the clients would have
            # seen is lost to them, and they are told so once the snapshot is in.
            for i, ev in enumerate(events):
                if ev[0] == R.SNAPSHOT and ev[1] == self.worker_id and ev[2] == self.nonce:
                    out.extend(self._load_snapshot(ev[3]))
                    out.extend(self.on_bus(publisher, events[i + 1:], replay))
                    return out
                if self.ready and not replay and ev[0] in VISIBLE_KINDS:
                    self.undelivered += 1
                    self.missed = True
            return out
        if replay:
            for ev in events:
                if ev[0] in R.ROSTER_KINDS:
                    self.roster.apply(publisher, ev)
            return out
        mine = publisher == self.worker_id
        run: list[tuple[int, bytes]] = []
        member = self.roster.get
        for ev in events:
            kind = ev[0]
            if kind == R.CHAT or kind == R.ME:
                m = member(publisher, ev[1])
                if m is None:
                    continue
                if kind == R.CHAT:
                    line = m.prefix + ev[2] + CRLF
                else:
                    line = b"* " + m.prefix[:-2] + b" " + ev[2] + CRLF
                run.append((ev[1] if mine else -1, line))
            else:
                if run:
                    self._flush_run(run, out)
                    run = []
                self._roster_event(publisher, mine, ev, out)
        if run:
            self._flush_run(run, out)
        return out

    def _flush_run(self, run: list[tuple[int, bytes]], out: list[Effect]) -> None:
        senders = {c for c, _ in run if c >= 0 and c in self.local}
        everything = b"".join(line for _, line in run)
        out.append(Broadcast(everything, frozenset(senders) if senders else EMPTY))
        for s in senders:
            # A sender never sees its own lines, but does see the others' in the same order.
            rest = b"".join(line for c, line in run if c != s)
            if rest:
                out.append(Send(s, rest))

    def _roster_event(self, publisher: str, mine: bool, ev: tuple[Any, ...], out: list[Effect]) -> None:
        kind = ev[0]
        if kind not in R.ROSTER_KINDS and kind != R.SNAPSHOT:
            return
        if kind == R.SNAPSHOT:
            if ev[1] == self.worker_id and ev[2] == self.nonce:
                out.extend(self._load_snapshot(ev[3]))
            return
        outcome = self.roster.apply(publisher, ev)
        announce = self.settings.announce_joins
        if kind == R.JOIN:
            user = self.local.get(ev[1]) if mine else None
            if outcome.accepted and outcome.member is not None:
                nick = outcome.member.nick
                refused = self._over_limit(user) if user is not None and user.state == PENDING else []
                if refused:
                    out.extend(refused)
                elif user is not None and user.state != ACTIVE:
                    out.extend(self._entered(user, nick))
                # A client that lost its name in a broker restart rejoins under a new one:
                # for everyone else that is a rename.
                if len(ev) > 5:
                    out.append(Broadcast(encode_line(f"*** {ev[5]} is now known as {nick}"),
                                         frozenset((ev[1],)) if mine else EMPTY))
                elif announce:
                    out.append(Broadcast(encode_line(f"*** {nick} joined"),
                                         frozenset((ev[1],)) if mine else EMPTY))
            elif user is not None and user.state != ACTIVE and self.roster.get(self.worker_id, user.conn) is None:
                # Someone claimed the random name first: draw another one and claim again.
                user.nick = self._free_nick()
                out.append(Publish((R.JOIN, user.conn, user.nick, user.since, user.ip, *ev[5:])))
        elif kind == R.NICK:
            user = self.local.get(ev[1]) if mine else None
            m = outcome.member
            if outcome.accepted and m is not None:
                if user is not None:
                    user.nick = m.nick
                    out.append(Send(user.conn, encode_line(f"*** You are now known as {m.nick}")))
                out.append(Broadcast(encode_line(f"*** {outcome.old_nick} is now known as {m.nick}"),
                                     frozenset((ev[1],)) if mine else EMPTY))
            elif user is not None and m is not None:
                out.append(self._error(user.conn, f"nickname {ev[2]} is already taken"))
            # (m is None: the client lost its name in a broker restart and is told so on rejoining.)
            if user is not None and user.claiming:
                user.claiming = False
                out.extend(self._run_backlog(user))
        elif kind == R.LEAVE:
            if outcome.accepted and outcome.member is not None and announce:
                reason = f" ({ev[2]})" if ev[2] else ""
                out.append(Broadcast(encode_line(f"*** {outcome.member.nick} left{reason}")))
        elif kind == R.GONE:
            if outcome.gone and announce:
                out.append(Broadcast(b"".join(encode_line(f"*** {m.nick} left (connection lost)")
                                              for m in outcome.gone)))
        elif kind == R.ADOPT:
            user = self.local.get(ev[3]) if mine else None
            if user is not None and outcome.accepted:
                user.state = ACTIVE

    def _over_limit(self, user: LocalUser) -> list[Effect]:
        """Refuse a new client whose JOIN won its name but came after the limits were reached.

        connect() checks the limits against the roster, which does not yet hold the clients
        other workers are admitting at the same moment. Their JOINs and ours meet in bus
        order, where every replica counts the same members: the first ones up to the limit
        stay, and the worker of any later one closes it here. Other workers may show it
        joining and leaving.
        """
        s = self.settings
        if s.max_clients and len(self.roster) > s.max_clients:
            notice, reason = "server full", "server full"
        elif s.max_clients_per_ip and self.roster.per_ip.get(user.ip, 0) > s.max_clients_per_ip:
            notice, reason = "too many connections from your address", "too many connections from one address"
        else:
            return []
        self.local.pop(user.conn, None)
        return [Send(user.conn, encode_line(f"*** Error: {notice}")), Close(user.conn),
                Publish((R.LEAVE, user.conn, reason))]

    def _entered(self, user: LocalUser, nick: str) -> list[Effect]:
        """The client's claim won: it gets its welcome (or rename notice) and joins the room."""
        effects: list[Effect]
        if user.state == REJOINING:
            effects = [Send(user.conn, encode_line(
                f"*** Notice: your nickname was taken while the server recovered; you are now known as {nick}"))]
        else:
            effects = [Send(user.conn, encode_line(self.settings.welcome.format(nick=nick)))]
            if user.leaving is None:
                effects.append(Enter(user.conn))
        user.state = ACTIVE
        user.nick = nick
        effects.extend(self._run_backlog(user))
        return effects

    def _run_backlog(self, user: LocalUser) -> list[Effect]:
        """Process what the client sent while waiting, until it has to wait again."""
        effects: list[Effect] = []
        while user.backlog and not user.waiting and user.conn in self.local:
            item = user.backlog.pop(0)
            if isinstance(item, int):
                effects.extend(self.line_too_long(user.conn, item))
            else:
                effects.extend(self.line(user.conn, item, self.clock))
        if not user.backlog:
            user.backlog = None
        if user.leaving is not None and not user.waiting and self.local.get(user.conn) is user:
            del self.local[user.conn]
            effects += [Publish((R.LEAVE, user.conn, user.leaving)), Close(user.conn)]
        return effects

    def _load_snapshot(self, members: list[Any]) -> list[Effect]:
        self.roster.load(members)
        self.ready = True
        self.syncing = False
        self.nonce = 0  # later copies of this snapshot (answers to repeated HELLOs) are stale
        out: list[Effect] = []
        for user in self.local.values():
            if user.state != ACTIVE:
                continue  # its JOIN is sent after our HELLO, so it is decided after this point
            m = self.roster.get(self.worker_id, user.conn)
            if m is None:
                # After a broker restart a client whose name went to someone else while the bus
                # was down claims a fresh one; everyone else is in the snapshot already.
                user.state = REJOINING
                self.claims[user.conn] = user
                old, user.nick = user.nick, self._free_nick()
                out.append(Publish((R.JOIN, user.conn, user.nick, user.since, user.ip, old)))
            else:
                user.nick = m.nick
        if self.missed:
            self.missed = False
            out.extend(self.messages_lost())
        return out


def _duration(seconds: float) -> str:
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60}s"
    return f"{s // 3600}h {s % 3600 // 60}m"
