"""The chat rules of one worker: commands, nicknames, notices and who receives what.

`ChatCore` is pure. The worker feeds it what happened (a client connected, sent
a line, went away; a batch arrived from the bus) and gets back effects: events
to publish on the bus, bytes for one client, bytes for everyone in the room,
a client entering the room, a connection to close. Everything a client sees
of other clients comes from the bus order, including its own worker's clients,
so every client on every worker sees one order. A worker knows only its own
clients: the cluster roster is the broker's (see roster.py), which decides
every claim and answers /who in bus order; chat lines carry their sender's
nickname. Its clients (connections, the room, each one's chat state) live in
one `Registry` shared with the worker. The randomness for nicknames is
injected, the clock is passed in; no sockets here.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from . import events as E
from .protocol import CRLF, encode_line
from .registry import Registry
from .roster import nick_problem

EMPTY: frozenset[int] = frozenset()
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


# Effects -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Publish:
    event: E.Event


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
    """Close the connection once what was queued for it has been sent; `why` is for the counters
    ("quit", "refused_server_full", "refused_per_ip"), not part of what the effect is."""

    conn: int
    why: str = field(default="", compare=False)


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
    claiming: bool = False  # a /nick claim or a /who is on the bus; what the client says next waits for it
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


class ChatConfig(Protocol):
    """The settings the chat rules read; the worker passes its one live settings object."""

    welcome: str
    announce_joins: bool
    max_clients: int
    max_clients_per_ip: int


@dataclass(slots=True)
class ChatSettings:
    """Chat settings on their own, for a chat core without a worker around it."""

    welcome: str = "*** Welcome to chatcluster! Your nickname is {nick}. Type /help for commands."
    announce_joins: bool = True
    max_clients: int = 0
    max_clients_per_ip: int = 0


class ChatCore:
    """One worker's view of the chat: its own clients; the roster is the broker's."""

    def __init__(self, worker_id: str, settings: ChatConfig | None = None,
                 rng: random.Random | None = None, registry: Registry[Any, LocalUser] | None = None) -> None:
        self.worker_id = worker_id
        self.settings: ChatConfig = settings or ChatSettings()
        self.rng = rng or random.Random()
        self.registry: Registry[Any, LocalUser] = Registry() if registry is None else registry
        self.ready = False  # True once the broker answered our HELLO
        self.nonce = 0
        self.syncing = False  # waiting for a snapshot after a broker restart
        self.lost_told = False  # the clients heard "messages may have been lost" in this epoch
        self.undelivered = 0  # events for clients that arrived while resyncing, so never shown
        self.missed = False  # some of them arrived during the current resync
        self.clock = 0.0  # the latest time a caller passed in, for lines answered later
        self.unreadable = 0  # bus events of an unknown kind or shape: counted, logged by the worker

    @property
    def local(self) -> Mapping[int, LocalUser]:
        """This worker's clients' chat state by connection number (read-only: see Registry)."""
        return self.registry.user_map

    # -- boot and bus recovery ---------------------------------------------------------------

    def hello(self) -> E.Hello:
        """The Hello event asking the broker for our snapshot (sent as a control batch)."""
        if not self.nonce:
            self.nonce = self.rng.randrange(1, 1 << 62)
        return E.Hello(self.nonce)

    @property
    def waiting_for_snapshot(self) -> bool:
        return not self.ready or self.syncing

    def bus_restarted(self) -> list[E.Event]:
        """A new broker: the control batch that re-announces our clients and asks for a snapshot.

        The new broker rebuilds the roster from every worker's RESYNC; our snapshot says which
        of our clients kept their names. Clients still pending keep their JOIN in flight: it is
        among the batches sent again after this one, so it is decided after our RESYNC. Until
        the snapshot the clients' lines wait: a client may yet lose its name.
        """
        members = [(self.worker_id, u.conn, u.nick, u.since, u.ip)
                   for u in self.registry.users() if u.state == ACTIVE]
        self.syncing = True
        self.lost_told = False
        self.nonce = 0
        return [E.Resync(members), self.hello()]

    def messages_lost(self) -> list[Effect]:
        """Tell the room that bus traffic was lost; once per broker epoch is enough."""
        if self.lost_told:
            return []
        self.lost_told = True
        return [Broadcast(LOST_NOTICE)]

    # -- client side -------------------------------------------------------------------------

    def connect(self, conn: int, ip: str, now: float) -> list[Effect]:
        """A new client claims a random name; the broker decides it, and the client limits, in bus order."""
        user = LocalUser(conn, ip, now, self._free_nick())
        self.registry.set_user(conn, user)
        return [Publish(self._join(user, ""))]

    def adopt(self, conn: int, ip: str, since: float, nick: str) -> None:
        """A client handed over by another worker in an upgrade: it keeps its name (the taker publishes
        the Adopt that moves it in the roster) and needs no welcome."""
        self.registry.set_user(conn, LocalUser(conn, ip, since, nick, state=ACTIVE))

    def forget(self, conn: int) -> None:
        """The client was handed to another worker: it lives on there, so no Leave."""
        self.registry.drop_user(conn)

    def _join(self, user: LocalUser, old: str) -> E.Join:
        s = self.settings
        if old:  # a client that lost its name is not a new connection: no limits for it
            return E.Join(user.conn, user.nick, user.since, user.ip, old, 0, 0)
        return E.Join(user.conn, user.nick, user.since, user.ip, "", s.max_clients, s.max_clients_per_ip)

    def _holds(self, user: LocalUser) -> bool:
        return user.waiting or self.syncing

    def disconnect(self, conn: int, reason: str = "") -> list[Effect]:
        user = self.registry.user(conn)
        if user is None or user.leaving is not None:
            return []
        if self._holds(user) and user.backlog:
            # What the client sent before it went away still counts (`printf ... | nc -N`): its
            # lines go out once the bus has decided on its name, then it leaves and is closed.
            user.leaving = reason
            return []
        self.registry.drop_user(conn)
        # Published even for a pending client: Leave follows its Join in bus order, so the
        # broker removes it again whether or not the claim was accepted.
        return [Publish(E.Leave(conn, reason))]

    def line_too_long(self, conn: int, limit: int) -> list[Effect]:
        user = self.registry.user(conn)
        if user is not None and self._holds(user):
            user.hold(limit)  # answered in the order sent, after the pending reply
            return []
        return [Send(conn, encode_line(f"*** Error: line too long (max {limit} bytes)"))]

    def line(self, conn: int, text: str, now: float = 0.0) -> list[Effect]:
        if now:
            self.clock = now
        user = self.registry.user(conn)
        if user is None:
            return []
        if self._holds(user):
            user.hold(text)
            return []
        if not text.strip():
            return []
        if text.startswith("//"):
            return [Publish(E.Chat(conn, text[1:].encode(), user.nick.encode()))]
        if text.startswith("/"):
            return self._command(user, text, now or self.clock)
        return [Publish(E.Chat(conn, text.encode(), user.nick.encode()))]

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
            return [Publish(E.Me(conn, rest.lstrip().encode(), user.nick.encode()))]
        if cmd == "who":
            # The broker answers from the roster in bus order; later lines wait for the answer.
            user.claiming = True
            return [Publish(E.Who(conn))]
        if cmd == "whois":
            if not arg:
                return [self._error(conn, "usage: /whois NICK")]
            user.claiming = True
            return [Publish(E.Whois(conn, arg, now))]
        if cmd == "help":
            return [Send(conn, b"".join(encode_line(h) for h in HELP))]
        if cmd == "quit":
            self.registry.drop_user(conn)
            return [Send(conn, encode_line("*** Goodbye")), Close(conn, "quit"), Publish(E.Leave(conn, arg))]
        return [self._error(conn, f"unknown command /{word}. Type /help for commands.")]

    def _nick(self, user: LocalUser, new: str) -> list[Effect]:
        conn = user.conn
        if not new:
            return [self._error(conn, "usage: /nick NAME")]
        problem = nick_problem(new)
        if problem:
            return [self._error(conn, problem)]
        if new == user.nick:
            return [Send(conn, encode_line(f"*** You are already known as {new}"))]
        # The broker decides the claim in bus order: another worker may claim the same name first.
        user.claiming = True
        return [Publish(E.Nick(conn, new))]

    def _error(self, conn: int, reason: str) -> Send:
        return Send(conn, encode_line(f"*** Error: {reason}"))

    def _free_nick(self) -> str:
        """A random name. Whether it is free only the broker knows: a taken one is refused and drawn
        again (62**4 names make that rare)."""
        return "".join(self.rng.choice(NICK_ALPHABET) for _ in range(4))

    # -- bus side ----------------------------------------------------------------------------

    def on_bus(self, publisher: str, events: list[E.Event], replay: bool = False) -> list[Effect]:
        """Apply one bus batch, in order, and say what each local client receives.

        `replay` marks a batch this worker saw before a broker restart and now sees again: its
        clients were told about it the first time, and the roster is the broker's to rebuild.
        """
        out: list[Effect] = []
        if self.waiting_for_snapshot:
            # Before our snapshot nothing is ours to act on: what the clients would have seen
            # of it is lost to them, and they are told so once the snapshot is in.
            for i, ev in enumerate(events):
                if type(ev) is E.Snapshot and ev.worker == self.worker_id and ev.nonce == self.nonce:
                    out.extend(self._load_snapshot(ev.members))
                    out.extend(self.on_bus(publisher, events[i + 1:], replay))
                    return out
                if self.ready and not replay and type(ev) in E.VISIBLE:
                    self.undelivered += 1
                    self.missed = True
            return out
        if replay:
            return out
        mine = publisher == self.worker_id
        run: list[tuple[int, bytes]] = []
        for ev in events:
            if type(ev) is E.Chat:
                run.append((ev.conn if mine else -1, ev.nick + b": " + ev.text + CRLF))
            elif type(ev) is E.Me:
                run.append((ev.conn if mine else -1, b"* " + ev.nick + b" " + ev.text + CRLF))
            else:
                if run:
                    self._flush_run(run, out)
                    run = []
                self._verdict(mine, ev, out)
        if run:
            self._flush_run(run, out)
        return out

    def _flush_run(self, run: list[tuple[int, bytes]], out: list[Effect]) -> None:
        users = self.registry
        senders = {c for c, _ in run if c >= 0 and users.user(c) is not None}
        everything = b"".join(line for _, line in run)
        out.append(Broadcast(everything, frozenset(senders) if senders else EMPTY))
        for s in senders:
            # A sender never sees its own lines, but does see the others' in the same order.
            rest = b"".join(line for c, line in run if c != s)
            if rest:
                out.append(Send(s, rest))

    def _verdict(self, mine: bool, ev: E.Event, out: list[Effect]) -> None:
        """One of the broker's verdicts (or a Snapshot): tell everyone, act for our own clients."""
        handler = _VERDICTS.get(type(ev))
        if handler is not None:
            handler(self, mine, ev, out)
        elif type(ev) in E.UNREADABLE:
            self.unreadable += 1

    def _on_snapshot(self, _mine: bool, ev: E.Snapshot, out: list[Effect]) -> None:
        if ev.worker == self.worker_id and ev.nonce == self.nonce:
            out.extend(self._load_snapshot(ev.members))

    def _on_gone(self, _mine: bool, ev: E.Gone, out: list[Effect]) -> None:
        if ev.nicks and self.settings.announce_joins:
            out.append(Broadcast(b"".join(encode_line(f"*** {n} left (connection lost)") for n in ev.nicks)))

    def _on_adopted(self, mine: bool, ev: E.Adopted, out: list[Effect]) -> None:
        user = self.registry.user(ev.conn) if mine else None
        if user is not None:
            if ev.accepted:
                user.state = ACTIVE
            else:
                # The name was lost while the client moved (a broker restart): it claims another.
                user.state = REJOINING
                old, user.nick = user.nick, self._free_nick()
                out.append(Publish(self._join(user, old)))

    def _mine(self, mine: bool, conn: int) -> tuple[LocalUser | None, frozenset[int]]:
        """The verdict's client if it is ours, and who to leave out of the broadcast about it."""
        if not mine:
            return None, EMPTY
        return self.registry.user(conn), frozenset((conn,))

    def _on_joined(self, mine: bool, ev: E.Joined, out: list[Effect]) -> None:
        user, exclude = self._mine(mine, ev.conn)
        if user is not None and user.state != ACTIVE:
            out.extend(self._entered(user, ev.nick))
        # A client that lost its name in a broker restart rejoins under a new one:
        # for everyone else that is a rename.
        if ev.old:
            out.append(Broadcast(encode_line(f"*** {ev.old} is now known as {ev.nick}"), exclude))
        elif self.settings.announce_joins:
            out.append(Broadcast(encode_line(f"*** {ev.nick} joined"), exclude))

    def _on_refused(self, mine: bool, ev: E.Refused, out: list[Effect]) -> None:
        user, _ = self._mine(mine, ev.conn)
        if user is None or user.state == ACTIVE:
            return
        if ev.why == E.TAKEN_WHY:
            # Someone holds the random name: draw another one and claim again.
            user.nick = self._free_nick()
            out.append(Publish(self._join(user, ev.old)))
            return
        full = ev.why == E.FULL
        notice = "server full" if full else "too many connections from your address"
        self.registry.drop_user(ev.conn)
        out.extend([Send(ev.conn, encode_line(f"*** Error: {notice}")),
                    Close(ev.conn, "refused_server_full" if full else "refused_per_ip")])

    def _on_renamed(self, mine: bool, ev: E.Renamed, out: list[Effect]) -> None:
        user, exclude = self._mine(mine, ev.conn)
        if user is not None:
            user.nick = ev.new
            out.append(Send(ev.conn, encode_line(f"*** You are now known as {ev.new}")))
        out.append(Broadcast(encode_line(f"*** {ev.old} is now known as {ev.new}"), exclude))
        if user is not None:
            out.extend(self._answered(user))

    def _on_taken(self, mine: bool, ev: E.Taken, out: list[Effect]) -> None:
        user, _ = self._mine(mine, ev.conn)
        if user is not None:
            if ev.known:  # (not known: the client lost its name in a broker restart and is told on rejoining)
                out.append(self._error(ev.conn, f"nickname {ev.new} is already taken"))
            out.extend(self._answered(user))

    def _on_left(self, _mine: bool, ev: E.Left, out: list[Effect]) -> None:
        if self.settings.announce_joins:
            reason = f" ({ev.reason})" if ev.reason else ""
            out.append(Broadcast(encode_line(f"*** {ev.nick} left{reason}")))

    def _on_reply(self, mine: bool, ev: E.Reply, out: list[Effect]) -> None:
        user, _ = self._mine(mine, ev.conn)
        if user is not None:
            out.append(Send(ev.conn, encode_line(ev.text)))
            out.extend(self._answered(user))

    def _answered(self, user: LocalUser) -> list[Effect]:
        """The client's claim or question came back: what it said meanwhile goes on."""
        if not user.claiming:
            return []
        user.claiming = False
        return self._run_backlog(user)

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
        while user.backlog and not self._holds(user) and self.registry.user(user.conn) is not None:
            item = user.backlog.pop(0)
            if isinstance(item, int):
                effects.extend(self.line_too_long(user.conn, item))
            else:
                effects.extend(self.line(user.conn, item, self.clock))
        if not user.backlog:
            user.backlog = None
        if user.leaving is not None and not self._holds(user) and self.registry.user(user.conn) is user:
            self.registry.drop_user(user.conn)
            effects += [Publish(E.Leave(user.conn, user.leaving)), Close(user.conn, "quit")]
        return effects

    def _load_snapshot(self, members: list[Any]) -> list[Effect]:
        """Our place in the order: `members` are our clients the broker's roster holds by name."""
        self.ready = True
        self.syncing = False
        self.nonce = 0  # later copies of this snapshot (answers to repeated HELLOs) are stale
        kept = {int(t[0]): str(t[1]) for t in members}
        out: list[Effect] = []
        for user in list(self.registry.users()):
            if user.state != ACTIVE:
                continue  # its JOIN is sent after our HELLO, so it is decided after this point
            nick = kept.get(user.conn)
            if nick is None:
                # After a broker restart a client whose name went to someone else while the bus
                # was down claims a fresh one; everyone else kept theirs.
                user.state = REJOINING
                old, user.nick = user.nick, self._free_nick()
                out.append(Publish(self._join(user, old)))
            else:
                user.nick = nick
        if self.missed:
            self.missed = False
            out.extend(self.messages_lost())
        for user in list(self.registry.users()):
            if user.backlog or user.leaving is not None:
                out.extend(self._run_backlog(user))  # lines held while the cluster resynced
        return out


# How each verdict of the broker (and a Snapshot) reaches this worker's clients. Chat and Me are
# handled inline in on_bus (the hot path); Ping, Handoff and the requests leave nothing to tell.
_VERDICTS: dict[type[E.Event], Any] = {
    E.Snapshot: ChatCore._on_snapshot, E.Gone: ChatCore._on_gone, E.Adopted: ChatCore._on_adopted,
    E.Joined: ChatCore._on_joined, E.Refused: ChatCore._on_refused, E.Renamed: ChatCore._on_renamed,
    E.Taken: ChatCore._on_taken, E.Left: ChatCore._on_left, E.Reply: ChatCore._on_reply}
