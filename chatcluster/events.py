"""The bus schema: every kind of event that travels on the bus, each a small class, defined once.

An event is an immutable tuple whose first item is its kind number, followed by
its fields in a fixed order; each kind is a class with named fields, so code
reads `ev.nick`, never `ev[3]`, and dispatches on the class (`type(ev) is
Chat`), in the manner of h11's event classes. On the wire a batch of events is
a `marshal`led list of plain tuples (cheap to encode, and the bytes are the
same as when events were bare tuples); `to_wire` and `from_wire` are the only
places that see the positions. A tuple of a kind this code does not know
becomes `Unknown`, and one of a known kind with the wrong number of fields
becomes `Malformed`: receivers log and count both, never drop them silently.
This module is pure: no sockets, no clock, and it imports nothing of ours.
"""

from __future__ import annotations

from collections.abc import Sequence
from operator import itemgetter
from typing import Any, ClassVar, Self

# Kind numbers: the first item of every event tuple on the wire. Never reuse or renumber one.
CHAT = 0
ME = 1
JOIN = 2
NICK = 3
LEAVE = 4
HELLO = 5
SNAPSHOT = 6
RESYNC = 7
GONE = 8
PING = 9
ADOPT = 10
HANDOFF = 11
WHO = 12
WHOIS = 13
JOINED = 14
REFUSED = 15
RENAMED = 16
TAKEN = 17
LEFT = 18
ADOPTED = 19
REPLY = 20
JOIN_ROOM = 21
PART_ROOM = 22
MSG = 23
LIST_ROOMS = 24
WHO_ROOM = 25
ROOM_JOINED = 26
ROOM_INTRO = 27
ROOM_PARTED = 28
PRIVATE = 29
QUIT = 30
LOST = 31
NICK_CHANGED = 32
REJOINED = 33
SEED = 34
HISTORY_COPY = 35
NUMBERING = 36
PRESSURE = 37
NOTICE = 38
STREAM_GAP = 39
UNDELIVERED = 40

# Why a claim was refused (Refused.why).
TAKEN_WHY, FULL, PER_IP = "taken", "full", "address"

_MISSING = object()


class Event(tuple):  # type: ignore[type-arg]
    """Base of every event kind: a tuple (KIND, field, ...) with one property per field.

    A subclass names its kind (`class Chat(Event, kind=CHAT)`) and declares its fields as
    annotations, optionally with defaults; the properties are made here, once per class.
    """

    __slots__ = ()
    KIND: ClassVar[int] = -1
    FIELDS: ClassVar[tuple[str, ...]] = ()
    DEFAULTS: ClassVar[tuple[Any, ...]] = ()  # for the last len(DEFAULTS) fields

    def __init_subclass__(cls, kind: int = -1, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        cls.KIND = kind
        names = tuple(n for n, a in cls.__dict__.get("__annotations__", {}).items()
                      if not str(a).startswith("ClassVar"))
        defaults = []
        for i, name in enumerate(names, 1):
            default = cls.__dict__.get(name, _MISSING)
            if default is not _MISSING:
                defaults.append(default)
            elif defaults:
                raise TypeError(f"{cls.__name__}.{name}: a field without a default follows one with a default")
            setattr(cls, name, property(itemgetter(i), doc=f"field {i} of a {cls.__name__} event"))
        cls.FIELDS = names
        cls.DEFAULTS = tuple(defaults)

    def __new__(cls, *args: Any) -> Self:
        n, given = len(cls.FIELDS), len(args)
        if given != n:
            missing = n - given
            if missing < 0 or missing > len(cls.DEFAULTS):
                raise TypeError(f"{cls.__name__} takes {n - len(cls.DEFAULTS)} to {n} fields, got {given}")
            args = args + cls.DEFAULTS[len(cls.DEFAULTS) - missing:]
        return tuple.__new__(cls, (cls.KIND, *args))

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={value!r}" for name, value in zip(self.FIELDS, self[1:], strict=False))
        return f"{type(self).__name__}({fields})"

    def __getnewargs__(self) -> tuple[Any, ...]:
        return tuple(self[1:])


# -- requests a worker publishes ---------------------------------------------------------------


class Chat(Event, kind=CHAT):
    """A line of chat; the sender's nickname travels with it, so no receiver needs a roster."""

    __slots__ = ()
    conn: int
    text: bytes
    nick: bytes


class Me(Event, kind=ME):
    """/me ACTION: others see `* NICK ACTION`."""

    __slots__ = ()
    conn: int
    text: bytes
    nick: bytes


class Join(Event, kind=JOIN):
    """Claim a name for a new client (old "") or for one that lost its name (old set; no limits then).

    The limits travel with the claim, so the broker decides them in bus order across workers.
    """

    __slots__ = ()
    conn: int
    nick: str
    since: float  # unix time of the connection
    ip: str
    old: str = ""
    max_clients: int = 0
    max_clients_per_ip: int = 0


class Nick(Event, kind=NICK):
    """/nick NEW: claim a new nickname."""

    __slots__ = ()
    conn: int
    new: str


class Leave(Event, kind=LEAVE):
    """A client is gone (quit, reset, idle, refused...); the reason is told to the others."""

    __slots__ = ()
    conn: int
    reason: str


class JoinRoom(Event, kind=JOIN_ROOM):
    """/join #ROOM of a room the client is not in; the limits travel with it, like Join's."""

    __slots__ = ()
    conn: int
    room: str  # as typed (valid); the broker folds it
    max_rooms_per_user: int
    max_rooms: int


class PartRoom(Event, kind=PART_ROOM):
    """/part: leave one room (its key); leaving the last one puts the client back in the default room."""

    __slots__ = ()
    conn: int
    room: str
    reason: str


class Msg(Event, kind=MSG):
    """/msg NICK TEXT: a private line; the sender's nickname travels with it, as with Chat."""

    __slots__ = ()
    conn: int
    to: str
    text: bytes
    nick: bytes


class ListRooms(Event, kind=LIST_ROOMS):
    """/rooms [PAGE]."""

    __slots__ = ()
    conn: int
    page: int


class WhoRoom(Event, kind=WHO_ROOM):
    """/who [#ROOM] [PAGE]; room "" is the default room, answered in today's words ("users online")."""

    __slots__ = ()
    conn: int
    room: str
    page: int


class HistoryCopy(Event, kind=HISTORY_COPY):
    """After a broker restart a worker hands over its copies of the rooms' recent lines.

    rooms: [(room key, [(unix time, line with CRLF), ...]), ...]
    """

    __slots__ = ()
    rooms: list[Any]


class Numbering(Event, kind=NUMBERING):
    """After a broker restart a worker says where its numbering of each route stands: [(route, the last
    number it saw come back)], so the new broker can tell a worker that starts receiving a room where
    every publisher's numbering of it is (see Seed)."""

    __slots__ = ()
    routes: list[Any]


class Hello(Event, kind=HELLO):
    """A booting or resyncing worker asks where its view starts; also proves its bus path."""

    __slots__ = ()
    nonce: int


class Resync(Event, kind=RESYNC):
    """After a broker restart a worker re-announces its clients: (worker, conn, nick, since, ip) each,
    with a sixth item, the names of its rooms, for a client that is in any room but the default one."""

    __slots__ = ()
    members: list[Any]


class Ping(Event, kind=PING):
    """Keeps the bus path checked while a worker is idle, and marks points in the order."""

    __slots__ = ()


class Adopt(Event, kind=ADOPT):
    """A client moved here (conn) from another worker (old_worker, old_conn) in an upgrade."""

    __slots__ = ()
    old_worker: str
    old_conn: int
    conn: int


class Handoff(Event, kind=HANDOFF):
    """Where in the order a worker hands its clients to new_worker (see migrate.py); from there on the
    broker routes to new_worker whatever it routes to the giver, since its clients are on their way."""

    __slots__ = ()
    new_worker: str
    token: int


class Who(Event, kind=WHO):
    """A client asks who is online."""

    __slots__ = ()
    conn: int


class Whois(Event, kind=WHOIS):
    """A client asks about one nickname; `now` is the asker's unix time, for "connected ... ago"."""

    __slots__ = ()
    conn: int
    nick: str
    now: float


class Pressure(Event, kind=PRESSURE):
    """A worker's clients are not taking their output (on=1), or take it again (on=0).

    While any worker is under pressure, every worker stops reading its heavy senders (clients
    that use their whole read budget in a loop pass), so one client sending as fast as TCP
    allows cannot bury everyone else's lines under its own; the others are read as usual.
    """

    __slots__ = ()
    worker: str
    on: int


# -- what the broker puts in the stream --------------------------------------------------------


class Snapshot(Event, kind=SNAPSHOT):
    """The answer to Hello: the roster's members of that worker at this point, [(conn, nick), ...]."""

    __slots__ = ()
    worker: str
    nonce: int
    members: list[Any]


class Gone(Event, kind=GONE):
    """A worker process died; its clients (these names) are gone. The request carries no names."""

    __slots__ = ()
    worker: str
    nicks: Sequence[str] = ()


class Joined(Event, kind=JOINED):
    """A claim won (old: the name the client had before a broker restart took it)."""

    __slots__ = ()
    conn: int
    nick: str
    old: str


class Refused(Event, kind=REFUSED):
    """A claim lost; why is TAKEN_WHY, FULL or PER_IP."""

    __slots__ = ()
    conn: int
    nick: str
    why: str
    old: str


class Renamed(Event, kind=RENAMED):
    __slots__ = ()
    conn: int
    old: str
    new: str


class Taken(Event, kind=TAKEN):
    """A rename lost; known is 0 when the client had no name (it lost it in a broker restart)."""

    __slots__ = ()
    conn: int
    new: str
    known: int


class Left(Event, kind=LEFT):
    __slots__ = ()
    conn: int
    nick: str
    reason: str


class Adopted(Event, kind=ADOPTED):
    """The verdict on Adopt: accepted 0 means the name was lost meanwhile and the client claims anew."""

    __slots__ = ()
    old_worker: str
    old_conn: int
    conn: int
    accepted: int


class Reply(Event, kind=REPLY):
    """The answer to Who or Whois, for one client of the publisher."""

    __slots__ = ()
    conn: int
    text: str


class RoomJoined(Event, kind=ROOM_JOINED):
    """A client joined a room (room: its name as first created); the joiner's worker makes it active."""

    __slots__ = ()
    conn: int
    nick: str
    room: str


class RoomIntro(Event, kind=ROOM_INTRO):
    """For the joiner alone: who is in the room (text), then the room's history, which its worker has."""

    __slots__ = ()
    conn: int
    room: str
    text: str


class RoomParted(Event, kind=ROOM_PARTED):
    __slots__ = ()
    conn: int
    nick: str
    room: str
    reason: str


class Private(Event, kind=PRIVATE):
    """A /msg for client conn of worker; only that worker receives it."""

    __slots__ = ()
    worker: str
    conn: int
    nick: bytes
    text: bytes


class Quit(Event, kind=QUIT):
    """A client left the cluster; everyone who shares one of these rooms (keys) with it is told, once."""

    __slots__ = ()
    conn: int
    nick: str
    reason: str
    rooms: Sequence[str]


class Lost(Event, kind=LOST):
    """A worker process died: its clients [(nick, room keys), ...] are gone."""

    __slots__ = ()
    worker: str
    members: list[Any]


class NickChanged(Event, kind=NICK_CHANGED):
    """A rename won; everyone who shares one of these rooms (keys) with the client is told, once."""

    __slots__ = ()
    conn: int
    old: str
    new: str
    rooms: Sequence[str]


class Rejoined(Event, kind=REJOINED):
    """A client that lost its name in a broker restart has a new one; for the others that is a rename."""

    __slots__ = ()
    conn: int
    nick: str
    old: str
    rooms: Sequence[str]


class Seed(Event, kind=SEED):
    """For a worker that starts receiving a room's traffic (its first member there): the room's recent
    lines, for its copy, and [(publisher, last number)] of the room's route so far (None: not known),
    so that it can tell a missing first batch from a publisher's numbering of the room."""

    __slots__ = ()
    room: str
    lines: list[Any]
    seqs: list[Any] | None


# -- what the bus process of a multi-host cluster tells its own workers -------------------------


class Notice(Event, kind=NOTICE):
    """A line for every client of the receiving worker (the link to the other hosts went down, came back)."""

    __slots__ = ()
    text: str


class StreamGap(Event, kind=STREAM_GAP):
    """Messages of the shared stream never arrived (removed by retention, or a host's lost batches):
    the receiving worker counts a gap and tells its clients that some messages may have been lost."""

    __slots__ = ()
    text: str


class Undelivered(Event, kind=UNDELIVERED):
    """Batches of `worker` that never reached the shared stream (the link was down too long): it stops
    keeping them for a resend, and the clients whose lines they held (conns) are told."""

    __slots__ = ()
    worker: str
    batches: list[Any]  # [(route, pseq), ...]
    conns: list[Any]


# -- what a receiver could not read ------------------------------------------------------------


class Unknown(Event):
    """An event of a kind this code does not know (newer code sent it); `raw` is the tuple as it came."""

    __slots__ = ()
    raw: Any


class Malformed(Event):
    """A tuple of a known kind with the wrong shape, or not a tuple at all; `raw` is what came."""

    __slots__ = ()
    raw: Any


KINDS: dict[int, type[Event]] = {cls.KIND: cls for cls in (
    Chat, Me, Join, Nick, Leave, Hello, Snapshot, Resync, Gone, Ping, Adopt, Handoff, Who, Whois,
    Joined, Refused, Renamed, Taken, Left, Adopted, Reply, JoinRoom, PartRoom, Msg, ListRooms, WhoRoom,
    RoomJoined, RoomIntro, RoomParted, Private, Quit, Lost, NickChanged, Rejoined, Seed, HistoryCopy, Numbering,
    Pressure, Notice, StreamGap, Undelivered)}

# Requests the broker's roster decides (see roster.Roster.decide).
ROSTER_REQUESTS: frozenset[type[Event]] = frozenset({
    Join, Nick, Leave, Hello, Resync, Gone, Adopt, Who, Whois, Handoff, JoinRoom, PartRoom, Msg, ListRooms,
    WhoRoom, HistoryCopy, Numbering})
# Events a client would see something of: lost ones are worth a "messages may have been lost".
VISIBLE: frozenset[type[Event]] = frozenset({
    Chat, Me, Joined, Renamed, Left, Gone, RoomJoined, RoomParted, Private, Quit, Lost, NickChanged, Rejoined})
# What a receiver could not read.
UNREADABLE: frozenset[type[Event]] = frozenset({Unknown, Malformed})



def to_wire(events: list[Event]) -> list[tuple[Any, ...]]:
    """Plain tuples for marshal (which takes no tuple subclass); Unknown passes on what it carried."""
    return [ev.raw if type(ev) is Unknown else tuple(ev) for ev in events]


# kind -> (class, size of its full tuple), for the common case of a tuple of the current shape.
_EXACT: dict[int, tuple[type[Event], int]] = {k: (c, 1 + len(c.FIELDS)) for k, c in KINDS.items()}


def from_wire(raw: Any) -> Event:
    """One event from its wire tuple; an unknown kind or a wrong shape gives Unknown or Malformed."""
    if type(raw) is not tuple or not raw:
        return Malformed(raw)
    try:
        cls, most = _EXACT[raw[0]]
    except (KeyError, TypeError):  # TypeError: an unhashable first item
        return Unknown(raw)
    n = len(raw)
    if n != most:
        least = most - len(cls.DEFAULTS)
        if not least <= n <= most:
            return Malformed(raw)
        raw = raw + cls.DEFAULTS[len(cls.DEFAULTS) - (most - n):]  # an older, shorter form
    return tuple.__new__(cls, raw)


def batch_from_wire(raw: Any) -> list[Event]:
    """A batch's events; a batch that is not a list is one Malformed event."""
    if type(raw) is not list:
        return [Malformed(raw)]
    exact, new = _EXACT, tuple.__new__
    out: list[Event] = []
    for t in raw:
        known = exact.get(t[0]) if type(t) is tuple and t and type(t[0]) is int else None
        if known is not None and len(t) == known[1]:
            out.append(new(known[0], t))
        else:
            out.append(from_wire(t))
    return out


def is_request(ev: Event) -> bool:
    return type(ev) in ROSTER_REQUESTS
