"""The chat rules of one worker: commands, nicknames, rooms, notices and who receives what.

`ChatCore` is pure. The worker feeds it what happened (a client connected, sent
a line, went away; a batch arrived from the bus) and gets back effects: events
to publish on the bus (each with its route: a room's key for chat lines, ""
for requests), bytes for one client, bytes for the members of some rooms, a
client entering or moving between rooms, a connection to close. Everything a
client sees of other clients comes from the bus order, including its own
worker's clients, so every client on every worker sees one order. A worker
knows only its own clients: the cluster's roster and rooms are the broker's
(see directory.py), which decides every claim, join and part and answers
/who in bus order; chat lines carry their sender's nickname, verdicts the
rooms they concern. A client's lines go to its active room; lines of its
other rooms reach it prefixed with the room's name. The worker keeps a copy
of the recent lines of the rooms it has members in (`history`), which a
joiner is shown and a new broker rebuilds its history from. Its clients
(connections, rooms, each one's chat state) live in one `Registry` shared
with the worker. The randomness for nicknames is injected, the clock is
passed in; no sockets here.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from . import events as E
from .history import History
from .protocol import CRLF, encode_line
from .registry import AWAY, EVERYONE, HERE, Registry
from .rooms import fold, room_problem
from .roster import nick_problem

EMPTY: frozenset[int] = frozenset()
NICK_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"

HELP = (
    "*** Commands:",
    "*** /nick NAME - change your nickname (1-24 characters from A-Z a-z 0-9 _ -)",
    "*** /me ACTION - tell others what you do; they see * NICK ACTION",
    "*** /msg NICK TEXT - send TEXT to NICK alone",
    "*** /join #ROOM - join a room (made if new) and talk there; a room you are in: talk there",
    "*** /part [#ROOM] [REASON] - leave a room (the one you talk in if none is named)",
    "*** /rooms [PAGE] - list the rooms with how many users are in each",
    "*** /who [#ROOM] [PAGE] - list the users in the room you talk in (or in #ROOM)",
    "*** /whois NICK - show where NICK is connected, since when, and in which rooms",
    "*** /quit [REASON] - leave the chat",
    "*** /help - show this list",
    "*** A line starting with // is sent as text with one / removed",
    "*** Lines from your other rooms start with the room's name: #ROOM NICK: text",
)
LOST_NOTICE = encode_line("*** Notice: some messages may have been lost")
UNDELIVERED_NOTICE = encode_line("*** Notice: your last lines could not be delivered: the link to the other "
                                 "servers was down too long")


# Effects -------------------------------------------------------------------------------------


ANYWHERE = ("*",)  # Broadcast.rooms: every client of the worker, whatever its rooms


@dataclass(frozen=True, slots=True)
class Publish:
    """An event for the bus; `route` is a room's key for that room's chat lines, "" for anything else."""

    event: E.Event
    route: str = ""


@dataclass(frozen=True, slots=True)
class Send:
    conn: int
    data: bytes


@dataclass(frozen=True, slots=True)
class Broadcast:
    """`data` goes to the clients in `rooms` (() is the default room), each once, except those in `exclude`.

    `part` says which members of a single room: EVERYONE, HERE (those whose active room it is)
    or AWAY (the others, who get the room's lines with its name in front).
    """

    data: bytes
    exclude: frozenset[int] = EMPTY
    rooms: tuple[str, ...] = ()
    part: int = EVERYONE


@dataclass(frozen=True, slots=True)
class Enter:
    """The client has its welcome line and from now on receives the room's traffic."""

    conn: int


@dataclass(frozen=True, slots=True)
class Place:
    """The client receives the traffic of these rooms from here on (`active` without a prefix).

    An effect rather than a change made at once, so that what was broadcast before it, in
    the same batch, reaches the rooms as they were at that point of the order.
    """

    conn: int
    rooms: tuple[str, ...]
    active: str


@dataclass(frozen=True, slots=True)
class Close:
    """Close the connection once what was queued for it has been sent; `why` is for the counters
    ("quit", "refused_server_full", "refused_per_ip"), not part of what the effect is."""

    conn: int
    why: str = field(default="", compare=False)


Effect = Publish | Send | Broadcast | Enter | Place | Close


def format_line(ev: E.Event) -> bytes | None:
    """A chat line as its room's members see it (with CRLF), or None for an event that is not one."""
    if type(ev) is E.Chat:
        return ev.nick + b": " + ev.text + CRLF
    if type(ev) is E.Me:
        return b"* " + ev.nick + b" " + ev.text + CRLF
    return None


def receives(b: Broadcast, rooms: tuple[str, ...], active: str, default: str) -> bool:
    """Whether a client in `rooms` talking in `active` is one of the recipients of `b` (see Registry.recipients)."""
    if b.rooms == ANYWHERE:
        return True
    keys = b.rooms or (default,)
    if b.part == HERE:
        return keys[0] == active
    if b.part == AWAY:
        return keys[0] in rooms and keys[0] != active
    return any(k in rooms for k in keys)


def transit_key(worker: str, conn: int) -> str:
    """Broadcast.rooms[0] of a private line for client `conn` of `worker`, on its way here in an upgrade.

    No room's key starts with a NUL, so no client here receives such a broadcast; a taker's
    copy keeps it for that one client (see tail_for).
    """
    return f"\0{worker}\0{conn}"


def tail_for(copy: Sequence[Broadcast], rooms: tuple[str, ...], active: str, names: Mapping[str, str],
             default: str, origin: str = "") -> bytes:
    """What of a run of broadcasts a client in `rooms` (talking in `active`) would have received.

    For a client on its way to a worker in an upgrade; `origin` is its transit_key, which picks
    out the private lines sent to it meanwhile. The worker makes the prefixed lines
    (part AWAY) of a room only for a room it knows; for one it has no member in yet, a run of
    lines (part HERE) comes alone and the prefix is made here from the client's room `names`.
    """
    out: list[bytes] = []
    for i, b in enumerate(copy):
        if b.rooms and b.rooms[0][:1] == "\0":
            if b.rooms[0] == origin:
                out.append(b.data)
        elif receives(b, rooms, active, default):
            out.append(b.data)
        elif b.part == HERE and b.rooms != ANYWHERE:
            key = (b.rooms or (default,))[0]
            paired = i + 1 < len(copy) and copy[i + 1].part == AWAY and copy[i + 1].rooms == b.rooms
            if key in rooms and not paired:
                prefix = names.get(key, key).encode() + b" "
                out.extend(prefix + line + CRLF for line in b.data.split(CRLF)[:-1])
    return b"".join(out)

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
    rooms: tuple[str, ...] = ()  # the keys of its rooms, in the order joined (set once it is welcomed)
    active: str = ""  # the key of the room its lines go to
    origin: tuple[str, int] | None = None  # (worker, conn) it had before an upgrade moved it, until adopted

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
    default_room: str
    max_rooms_per_user: int
    max_rooms: int
    max_room_name: int
    history_lines: int
    history_max_bytes: int


@dataclass(slots=True)
class ChatSettings:
    """Chat settings on their own, for a chat core without a worker around it."""

    welcome: str = "*** Welcome to chatcluster! Your nickname is {nick}. Type /help for commands."
    announce_joins: bool = True
    max_clients: int = 0
    max_clients_per_ip: int = 0
    default_room: str = "#lobby"
    max_rooms_per_user: int = 20
    max_rooms: int = 10_000
    max_room_name: int = 32
    history_lines: int = 50
    history_max_bytes: int = 64 << 20


class ChatCore:
    """One worker's view of the chat: its own clients; the roster is the broker's."""

    def __init__(self, worker_id: str, settings: ChatConfig | None = None,
                 rng: random.Random | None = None, registry: Registry[Any, LocalUser] | None = None) -> None:
        self.worker_id = worker_id
        self.settings: ChatConfig = settings or ChatSettings()
        self.rng = rng or random.Random()
        default_room = getattr(self.settings, "default_room", "#lobby")
        self.registry: Registry[Any, LocalUser] = Registry(default_room) if registry is None else registry
        self.default = self.registry.default  # the default room's key
        s = self.settings
        # This worker's copy of the recent lines of the rooms it has members in.
        self.history = History(getattr(s, "history_lines", 50), getattr(s, "history_max_bytes", 64 << 20))
        # An upgrade's taker copies what it broadcasts for clients on their way: then every line of a
        # room is made for members talking elsewhere too, whether or not it has any yet.
        self.collecting = False
        self.ready = False  # True once the broker answered our HELLO
        self.nonce = 0
        self.syncing = False  # waiting for a snapshot after a broker restart
        self.lost_told = False  # the clients heard "messages may have been lost" in this epoch
        self.undelivered = 0  # events for clients that arrived while resyncing, so never shown
        self.missed = False  # some of them arrived during the current resync
        self.clock = 0.0  # the latest time a caller passed in, for lines answered later
        self.unreadable = 0  # bus events of an unknown kind or shape: counted, logged by the worker
        # Clients handed to us in an upgrade whose ADOPT is not decided yet, by their place at the
        # giver: the roster still has them there, so a private line for them is addressed there.
        self.arriving: dict[tuple[str, int], int] = {}

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

        The new broker rebuilds the roster and the rooms from every worker's RESYNC (a client
        in any room but the default one is listed with its rooms' names) and the rooms'
        history from the workers' copies; our snapshot says which of our clients kept their
        names. Clients still pending keep their JOIN in flight: it is among the batches sent
        again after this one, so it is decided after our RESYNC. Until the snapshot the
        clients' lines wait: a client may yet lose its name.
        """
        members: list[tuple[Any, ...]] = []
        for u in self.registry.users():
            if u.state != ACTIVE:
                continue
            t: tuple[Any, ...] = (self.worker_id, u.conn, u.nick, u.since, u.ip)
            if u.rooms and u.rooms is not self.registry.default_rooms:
                t += ([self.room_name(k) for k in u.rooms],)
            members.append(t)
        self.syncing = True
        self.lost_told = False
        self.nonce = 0
        control: list[E.Event] = [E.Resync(members)]
        if self.history.enabled and self.history.rooms:
            control.append(E.HistoryCopy(self.history.snapshot()))
        return [*control, self.hello()]

    def room_name(self, key: str) -> str:
        """A room's name as it is shown (as first created), for a room this worker has members in."""
        rs = self.registry.room_set(key)
        return rs.name if rs is not None else key

    def messages_lost(self, again: bool = False) -> list[Effect]:
        """Tell every client that bus traffic was lost; once per broker epoch is enough.

        `again`: a loss that is news whatever was told before (a gap in a multi-host cluster's
        stream is one range of messages gone, reported once by the bus process).
        """
        if self.lost_told and not again:
            return []
        self.lost_told = True
        return [Broadcast(LOST_NOTICE, EMPTY, ANYWHERE)]

    # -- client side -------------------------------------------------------------------------

    def connect(self, conn: int, ip: str, now: float) -> list[Effect]:
        """A new client claims a random name; the broker decides it, and the client limits, in bus order."""
        user = LocalUser(conn, ip, now, self._free_nick())
        self.registry.set_user(conn, user)
        return [Publish(self._join(user, ""))]

    def adopt(self, conn: int, ip: str, since: float, nick: str, rooms: Sequence[str] = (), active: str = "",
              origin: tuple[str, int] | None = None) -> None:
        """A client handed over by another worker in an upgrade: it keeps its name and rooms (the taker
        publishes the Adopt that moves it in the roster) and needs no welcome. `rooms` are names;
        `origin` is its (worker, conn) at the giver, where the roster has it until the Adopt."""
        user = LocalUser(conn, ip, since, nick, state=ACTIVE, origin=origin)
        self.registry.set_user(conn, user)
        if origin is not None:
            self.arriving[origin] = conn
        names = list(rooms) or [self.room_name(self.default)]
        keys = tuple(fold(name) for name in names)
        for key, name in zip(keys, names, strict=True):
            self._count_in(key, name)
        user.rooms = self.registry.default_rooms if keys == self.registry.default_rooms else keys
        user.active = fold(active) if active and fold(active) in keys else keys[-1]

    def _count_in(self, key: str, name: str) -> None:
        self.registry.count_in(key, name)

    def _count_out(self, key: str) -> None:
        self.registry.count_out(key)

    def prune_history(self) -> None:
        """Forget the copies of rooms this worker has no member in any more.

        Not done the moment the last member leaves: until the broker has decided that leave,
        it still routes the room here, and a client joining meanwhile keeps the copy going
        (the broker sends a fresh copy, events.Seed, only when it starts routing a room here).
        """
        for key in self.history.keys():
            rs = self.registry.room_set(key)
            if rs is None or rs.members <= 0:
                self.history.drop(key)

    def forget(self, conn: int) -> None:
        """The client was handed to another worker: it lives on there, so no Leave."""
        self._drop(conn)

    def _drop(self, conn: int) -> LocalUser | None:
        """Forget a client's chat state (and its place in its rooms)."""
        user = self.registry.drop_user(conn)
        if user is not None and user.origin is not None:
            self.arriving.pop(user.origin, None)
        return user

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
        self._drop(conn)
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
            text = text[1:]
        elif text.startswith("/"):
            return self._command(user, text, now or self.clock)
        return [Publish(E.Chat(conn, text.encode(), user.nick.encode()), user.active or self.default)]

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
            return [Publish(E.Me(conn, rest.lstrip().encode(), user.nick.encode()), user.active or self.default)]
        if cmd == "who":
            return self._who(user, arg)
        if cmd == "whois":
            if not arg:
                return [self._error(conn, "usage: /whois NICK")]
            user.claiming = True
            return [Publish(E.Whois(conn, arg, now))]
        if cmd == "help":
            return [Send(conn, b"".join(encode_line(h) for h in HELP))]
        if cmd == "quit":
            self._drop(conn)
            return [Send(conn, encode_line("*** Goodbye")), Close(conn, "quit"), Publish(E.Leave(conn, arg))]
        if cmd == "join":
            return self._join_cmd(user, arg)
        if cmd == "part":
            return self._part_cmd(user, arg)
        if cmd == "rooms":
            user.claiming = True
            return [Publish(E.ListRooms(conn, int(arg) if arg.isdigit() else 1))]
        if cmd == "msg":
            to, _, said = rest.lstrip().partition(" ")
            said = said.strip()
            if not to or not said:
                return [self._error(conn, "usage: /msg NICK TEXT")]
            if nick_problem(to):
                return [self._error(conn, f"no such user {to}")]
            user.claiming = True  # the confirmation comes back in order, before what the client says next
            return [Publish(E.Msg(conn, to, said.encode(), user.nick.encode()))]
        return [self._error(conn, f"unknown command /{word}. Type /help for commands.")]

    def _who(self, user: LocalUser, arg: str) -> list[Effect]:
        """/who [#ROOM] [PAGE]: the broker answers from the rooms in bus order; later lines wait for it."""
        room, page = "", 1
        for word in arg.split():
            if word.startswith("#"):
                room = word
            elif word.isdigit():
                page = int(word)
        if room:
            problem = room_problem(room, 255)
            if problem:
                return [self._error(user.conn, problem)]
        elif user.active and user.active != self.default:
            room = self.room_name(user.active)
        user.claiming = True
        if not room and page == 1:
            return [Publish(E.Who(user.conn))]
        return [Publish(E.WhoRoom(user.conn, room, page))]

    def _join_cmd(self, user: LocalUser, arg: str) -> list[Effect]:
        conn = user.conn
        room = arg.split()[0] if arg else ""
        if not room:
            return [self._error(conn, "usage: /join #ROOM")]
        problem = room_problem(room, getattr(self.settings, "max_room_name", 32))
        if problem:
            return [self._error(conn, problem)]
        key = fold(room)
        if key in user.rooms:
            # A room the client is in: it talks there from now on; nothing to decide.
            user.active = key
            return [Place(conn, user.rooms, key), Send(conn, encode_line(f"*** Now talking in {self.room_name(key)}"))]
        s = self.settings
        user.claiming = True
        return [Publish(E.JoinRoom(conn, room, getattr(s, "max_rooms_per_user", 20), getattr(s, "max_rooms", 10_000)))]

    def _part_cmd(self, user: LocalUser, arg: str) -> list[Effect]:
        conn = user.conn
        first, _, more = arg.partition(" ")
        if first.startswith("#"):
            room, reason = first, more.strip()
        elif first and fold("#" + first) in user.rooms:
            # `/part rust` while in #rust means #rust, not the active room with the reason "rust".
            return [self._error(conn, f"a room name starts with #, as in #{first}")]
        else:
            room, reason = self.room_name(user.active or self.default), arg
        key = fold(room)
        if key not in user.rooms:
            return [self._error(conn, f"you are not in {room}")]
        if user.rooms == (self.default,):
            name = self.room_name(key)
            return [self._error(conn, f"you are only in {name}; join another room before leaving it")]
        user.claiming = True
        return [Publish(E.PartRoom(conn, self.room_name(key), reason))]

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

    def route_gen(self, route: str) -> int:
        """The generation of our membership of a route's room (see wire.OrderTracker.place)."""
        return self.registry.gen(route) if route else 0

    def on_bus(self, publisher: str, events: list[E.Event], replay: bool = False,
               room: str | None = None) -> list[Effect]:
        """Apply one bus batch, in order, and say what each local client receives.

        `room` is the batch's route: the room its chat lines were said in (None or "": the
        default room). `replay` marks a batch this worker saw before a broker restart and now
        sees again: its clients were told about it the first time, and the directory is the
        broker's to rebuild.
        """
        out: list[Effect] = []
        if self.waiting_for_snapshot:
            # Before our snapshot nothing is ours to act on: what the clients would have seen
            # of it is lost to them, and they are told so once the snapshot is in.
            for i, ev in enumerate(events):
                if type(ev) is E.Snapshot and ev.worker == self.worker_id and ev.nonce == self.nonce:
                    out.extend(self._load_snapshot(ev.members))
                    out.extend(self.on_bus(publisher, events[i + 1:], replay, room))
                    return out
                if self.ready and not replay and type(ev) in E.VISIBLE:
                    self.undelivered += 1
                    self.missed = True
            return out
        if replay:
            return out
        mine = publisher == self.worker_id
        key = room or self.default
        run: list[tuple[int, bytes]] = []
        for ev in events:
            if type(ev) is E.Chat:
                run.append((ev.conn if mine else -1, ev.nick + b": " + ev.text + CRLF))
            elif type(ev) is E.Me:
                run.append((ev.conn if mine else -1, b"* " + ev.nick + b" " + ev.text + CRLF))
            else:
                if run:
                    self._flush_run(run, out, key)
                    run = []
                self._verdict(mine, ev, out)
        if run:
            self._flush_run(run, out, key)
        return out

    def _flush_run(self, run: list[tuple[int, bytes]], out: list[Effect], key: str) -> None:
        """A run of chat lines of room `key`: one broadcast to the room, and the senders' own view."""
        users = self.registry
        senders = {c for c, _ in run if c >= 0 and users.user(c) is not None}
        everything = b"".join(line for _, line in run)
        exclude = frozenset(senders) if senders else EMPTY
        rooms = () if key == self.default else (key,)
        out.append(Broadcast(everything, exclude, rooms, HERE))
        rs = users.room_set(key)
        if rs is not None and (rs.away or self.collecting):
            # Members talking in another room get the room's name in front of each line.
            prefix = rs.prefix
            out.append(Broadcast(b"".join(prefix + line for _, line in run), exclude, rooms, AWAY))
        for s in senders:
            # A sender never sees its own lines, but does see the others' in the same order.
            rest = [line for c, line in run if c != s]
            if rest:
                user = users.user(s)
                if rs is not None and user is not None and user.active != key:
                    rest = [rs.prefix + line for line in rest]
                out.append(Send(s, b"".join(rest)))
        if rs is not None and self.history.max_lines > 0:
            self.history.add(key, self.clock, len(run), everything)

    def _verdict(self, mine: bool, ev: E.Event, out: list[Effect]) -> None:
        """One of the broker's verdicts (or a Snapshot): tell everyone, act for our own clients."""
        handler = _VERDICTS.get(type(ev))
        if handler is not None:
            handler(self, mine, ev, out)
        elif type(ev) in E.UNREADABLE:
            self.unreadable += 1

    def _scope(self, keys: Sequence[str]) -> tuple[str, ...]:
        """Broadcast.rooms for these room keys (() for the default room alone)."""
        if len(keys) == 1 and keys[0] == self.default:
            return ()
        return tuple(keys) if keys else ()

    def _on_snapshot(self, _mine: bool, ev: E.Snapshot, out: list[Effect]) -> None:
        if ev.worker == self.worker_id and ev.nonce == self.nonce:
            out.extend(self._load_snapshot(ev.members))

    def _on_gone(self, _mine: bool, ev: E.Gone, out: list[Effect]) -> None:
        if ev.nicks and self.settings.announce_joins:
            out.append(Broadcast(b"".join(encode_line(f"*** {n} left (connection lost)") for n in ev.nicks)))

    def _on_lost(self, _mine: bool, ev: E.Lost, out: list[Effect]) -> None:
        """A worker died: each of its clients is announced to those who shared a room with it, once."""
        if not ev.members or not self.settings.announce_joins:
            return
        by_scope: dict[tuple[str, ...], list[bytes]] = {}
        for nick, keys in ev.members:
            by_scope.setdefault(self._scope(list(keys)), []).append(encode_line(f"*** {nick} left (connection lost)"))
        for scope, lines in by_scope.items():
            out.append(Broadcast(b"".join(lines), EMPTY, scope))

    def _on_adopted(self, mine: bool, ev: E.Adopted, out: list[Effect]) -> None:
        user = self.registry.user(ev.conn) if mine else None
        if user is not None:
            if user.origin is not None:
                self.arriving.pop(user.origin, None)  # the roster has it here now
                user.origin = None
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
            out.append(Broadcast(encode_line(f"*** {ev.nick} joined"), exclude, (), HERE))
            if self.registry.has_away(self.default) or self.collecting:
                # Those talking in another room are told which room.
                name = self.room_name(self.default)
                out.append(Broadcast(encode_line(f"*** {ev.nick} joined {name}"), exclude, (), AWAY))

    def _on_rejoined(self, mine: bool, ev: E.Rejoined, out: list[Effect]) -> None:
        user, exclude = self._mine(mine, ev.conn)
        if user is not None and user.state != ACTIVE:
            self._set_rooms(user, tuple(ev.rooms), out)  # the broker's account of its rooms is the one
            out.extend(self._entered(user, ev.nick))
        out.append(Broadcast(encode_line(f"*** {ev.old} is now known as {ev.nick}"), exclude, self._scope(ev.rooms)))

    def _set_rooms(self, user: LocalUser, keys: tuple[str, ...], out: list[Effect]) -> None:
        if not keys or set(keys) == set(user.rooms):
            return
        for key in keys:
            if key not in user.rooms:
                self._count_in(key, key)
        for key in user.rooms:
            if key not in keys:
                self._count_out(key)
        user.rooms = self.registry.default_rooms if keys == self.registry.default_rooms else keys
        if user.active not in keys:
            user.active = keys[-1]
        out.append(Place(user.conn, user.rooms, user.active))

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
        self._drop(ev.conn)
        out.extend([Send(ev.conn, encode_line(f"*** Error: {notice}")),
                    Close(ev.conn, "refused_server_full" if full else "refused_per_ip")])

    def _on_renamed(self, mine: bool, ev: E.Renamed, out: list[Effect]) -> None:
        self._renamed(mine, ev.conn, ev.old, ev.new, (), out)

    def _on_nick_changed(self, mine: bool, ev: E.NickChanged, out: list[Effect]) -> None:
        self._renamed(mine, ev.conn, ev.old, ev.new, self._scope(ev.rooms), out)

    def _renamed(self, mine: bool, conn: int, old: str, new: str, scope: tuple[str, ...], out: list[Effect]) -> None:
        """A rename: everyone who shares a room with the client is told once."""
        user, exclude = self._mine(mine, conn)
        if user is not None:
            user.nick = new
            out.append(Send(conn, encode_line(f"*** You are now known as {new}")))
        out.append(Broadcast(encode_line(f"*** {old} is now known as {new}"), exclude, scope))
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

    def _on_quit(self, _mine: bool, ev: E.Quit, out: list[Effect]) -> None:
        """A client left the cluster: everyone who shared a room with it is told once."""
        if self.settings.announce_joins:
            reason = f" ({ev.reason})" if ev.reason else ""
            out.append(Broadcast(encode_line(f"*** {ev.nick} left{reason}"), EMPTY, self._scope(ev.rooms)))

    def _on_reply(self, mine: bool, ev: E.Reply, out: list[Effect]) -> None:
        user, _ = self._mine(mine, ev.conn)
        if user is not None:
            out.append(Send(ev.conn, encode_line(ev.text)))
            out.extend(self._answered(user))

    def _on_room_joined(self, mine: bool, ev: E.RoomJoined, out: list[Effect]) -> None:
        key = fold(ev.room)
        user, exclude = self._mine(mine, ev.conn)
        if user is not None and key not in user.rooms:
            self._count_in(key, ev.room)
            user.rooms = (self.registry.default_rooms if key == self.default and not user.rooms
                          else (*user.rooms, key))
            user.active = key
            out.append(Place(user.conn, user.rooms, key))
        if self.settings.announce_joins:
            out.append(Broadcast(encode_line(f"*** {ev.nick} joined {ev.room}"), exclude, self._scope([key])))

    def _on_room_intro(self, mine: bool, ev: E.RoomIntro, out: list[Effect]) -> None:
        """For the joiner: who is there, then the room's recent lines (our copy, seeded by the broker)."""
        user, _ = self._mine(mine, ev.conn)
        if user is None:
            return
        out.append(Send(ev.conn, encode_line(ev.text)))
        replay = self.history.replay(fold(ev.room))
        if replay:
            out.append(Send(ev.conn, replay))
        out.extend(self._answered(user))

    def _on_room_parted(self, mine: bool, ev: E.RoomParted, out: list[Effect]) -> None:
        key = fold(ev.room)
        user, exclude = self._mine(mine, ev.conn)
        if self.settings.announce_joins:
            reason = f" ({ev.reason})" if ev.reason else ""
            out.append(Broadcast(encode_line(f"*** {ev.nick} left {ev.room}{reason}"), exclude, self._scope([key])))
        if user is None or key not in user.rooms:
            return
        was_active = user.active == key
        rest = tuple(k for k in user.rooms if k != key)
        user.rooms = self.registry.default_rooms if rest == self.registry.default_rooms else rest
        if was_active:
            user.active = rest[-1] if rest else ""
        self._count_out(key)
        out.append(Place(user.conn, user.rooms, user.active))
        now = f"; now talking in {self.room_name(user.active)}" if was_active and rest else ""
        out.append(Send(ev.conn, encode_line(f"*** You left {ev.room}{now}")))
        if rest:
            out.extend(self._answered(user))
        # else: the broker puts the client back in the default room in this same batch (RoomJoined,
        # RoomIntro), and the intro answers it.

    def _on_private(self, _mine: bool, ev: E.Private, out: list[Effect]) -> None:
        line = b"*" + ev.nick + b"* " + ev.text + CRLF
        conn = ev.conn
        if ev.worker != self.worker_id:
            # For a client another worker is handing to us in an upgrade (the broker sends us
            # what it sends the giver): here already, or still on its way, when the line waits
            # in the copy of what it must get on arrival.
            conn = self.arriving.get((ev.worker, ev.conn), -1)
            if conn < 0:
                if self.collecting:
                    out.append(Broadcast(line, EMPTY, (transit_key(ev.worker, ev.conn),)))
                return
        if self.registry.user(conn) is not None:
            out.append(Send(conn, line))

    def _on_seed(self, _mine: bool, ev: E.Seed, out: list[Effect]) -> None:
        """The broker routes the room here from now on: its recent lines are the start of our copy."""
        if self.history.max_lines > 0:
            self.history.load(ev.room, ev.lines)

    def _on_notice(self, _mine: bool, ev: E.Notice, out: list[Effect]) -> None:
        """A word from the host's bus process for everyone here (the link to the other hosts)."""
        out.append(Broadcast(encode_line(f"*** Notice: {ev.text}"), EMPTY, ANYWHERE))

    def _on_undelivered(self, _mine: bool, ev: E.Undelivered, out: list[Effect]) -> None:
        """Lines of our clients that never reached the other hosts (nor anyone here): their senders are told."""
        if ev.worker != self.worker_id:
            return
        for conn in dict.fromkeys(int(c) for c in ev.conns):
            if self.registry.user(conn) is not None:
                out.append(Send(conn, UNDELIVERED_NOTICE))

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
            if not user.rooms:  # a new client: the broker put it in the default room
                self._count_in(self.default, self.room_name(self.default))
                user.rooms, user.active = self.registry.default_rooms, self.default
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
            self._drop(user.conn)
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
    E.Taken: ChatCore._on_taken, E.Left: ChatCore._on_left, E.Reply: ChatCore._on_reply,
    E.Lost: ChatCore._on_lost, E.Rejoined: ChatCore._on_rejoined, E.NickChanged: ChatCore._on_nick_changed,
    E.Quit: ChatCore._on_quit, E.RoomJoined: ChatCore._on_room_joined, E.RoomIntro: ChatCore._on_room_intro,
    E.RoomParted: ChatCore._on_room_parted, E.Private: ChatCore._on_private, E.Seed: ChatCore._on_seed,
    E.Notice: ChatCore._on_notice, E.Undelivered: ChatCore._on_undelivered}
