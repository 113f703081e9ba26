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
PRESSURE = 21

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


class Hello(Event, kind=HELLO):
    """A booting or resyncing worker asks where its view starts; also proves its bus path."""

    __slots__ = ()
    nonce: int


class Resync(Event, kind=RESYNC):
    """After a broker restart a worker re-announces its clients: (worker, conn, nick, since, ip) each."""

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
    """Where in the order a worker hands its clients to new_worker (see migrate.py)."""

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
    Joined, Refused, Renamed, Taken, Left, Adopted, Reply, Pressure)}

# Requests the broker's roster decides (see roster.Roster.decide).
ROSTER_REQUESTS: frozenset[type[Event]] = frozenset({Join, Nick, Leave, Hello, Resync, Gone, Adopt, Who, Whois})
# Events a client would see something of: lost ones are worth a "messages may have been lost".
VISIBLE: frozenset[type[Event]] = frozenset({Chat, Me, Joined, Renamed, Left, Gone})
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
