"""One worker's clients: the single place that knows who is connected, who is in which room, and who is who.

A client appears here in two roles that live for different spans. Its
connection (a `Client` of the worker, found by descriptor or by connection
number) exists from accept to close; its chat state (a `LocalUser` of the chat
core: nickname, rooms, claim in flight, lines waiting) exists from connect
until the chat core has published its departure, which may be a little before
the socket closes (a /quit still sends "Goodbye") or a little after (lines it
sent before a reset still go out once its name is decided). A connection that
has entered receives the traffic of its rooms: each room keeps its recipients
on this worker in two sets, the clients whose active room it is (they get a
line as `NICK: text`) and the others (`#ROOM NICK: text`), so a broadcast is
one pass over a ready-made set. Every add and remove goes through this class,
so no map can keep a trace of a client that is gone, and `traces()` can prove
it. It is pure: it holds objects, it does not do I/O.
"""

from __future__ import annotations

from collections.abc import ItemsView, Iterable, Mapping, ValuesView
from itertools import chain
from types import MappingProxyType
from typing import Generic, Protocol, TypeVar

EVERYONE, HERE, AWAY = 0, 1, 2  # which members of a room a broadcast is for (see chat.Broadcast)


class Connection(Protocol):
    """What the registry needs of a connection: its descriptor and its number on this worker."""

    @property
    def fd(self) -> int: ...

    @property
    def conn(self) -> int: ...


C = TypeVar("C", bound=Connection)
U = TypeVar("U")


class RoomSet(Generic[C]):
    """One room on this worker: its name, its members here, and who of them receives what."""

    __slots__ = ("key", "name", "prefix", "members", "here", "away")

    def __init__(self, key: str, name: str) -> None:
        self.key = key
        self.name = name
        self.prefix = name.encode() + b" "  # before a line of this room for a member talking elsewhere
        self.members = 0  # local members, received traffic or not
        self.here: dict[int, C] = {}  # recipients whose active room this is
        self.away: dict[int, C] = {}  # recipients whose active room is another

    def __repr__(self) -> str:
        return f"RoomSet({self.name!r}, {self.members} members, {len(self.here)}+{len(self.away)} receiving)"


class Registry(Generic[C, U]):
    """Connections by descriptor and by number, the rooms' recipients, and the chat state of each client.

    A client's rooms and active room are fields of its chat state (`rooms`, `active`: room keys),
    which the chat core keeps; a chat state without rooms (or a connection without chat state) is
    in the default room only. The core also counts its members per room here (`count_in`,
    `count_out`), which says when this worker starts or stops needing a room's traffic.
    """

    __slots__ = ("_by_fd", "_by_conn", "_entered", "_users", "_next_conn", "default", "default_rooms", "_rooms",
                 "_gens", "_placed")

    def __init__(self, default_room: str = "#lobby") -> None:
        self._by_fd: dict[int, C] = {}
        self._by_conn: dict[int, C] = {}
        self._entered: dict[int, C] = {}
        self._users: dict[int, U] = {}
        self._next_conn = 1
        self.default = default_room.lower()
        self.default_rooms: tuple[str, ...] = (self.default,)  # shared by every client in the default room only
        self._rooms: dict[str, RoomSet[C]] = {self.default: RoomSet(self.default, default_room)}
        self._gens: dict[str, int] = {}  # room key -> times this worker got its first member there
        # conn -> (rooms, active) of a receiving client placed anywhere but in the default room alone
        self._placed: dict[int, tuple[tuple[str, ...], str]] = {}

    # -- connections ---------------------------------------------------------------------------

    def new_conn(self) -> int:
        """A connection number never used on this worker before (numbers are not reused)."""
        conn = self._next_conn
        self._next_conn += 1
        return conn

    def add(self, client: C) -> None:
        if client.fd in self._by_fd or client.conn in self._by_conn:
            raise ValueError(f"connection {client.conn} (fd {client.fd}) is registered already")
        self._by_fd[client.fd] = client
        self._by_conn[client.conn] = client

    def remove(self, client: C) -> bool:
        """Forget the connection (and its place in the rooms); False if it was not registered.

        The chat state stays until the chat core drops it: see the module docstring.
        """
        if self._by_fd.get(client.fd) is not client:
            return False
        del self._by_fd[client.fd]
        del self._by_conn[client.conn]
        self.leave_room(client.conn)
        return True

    def by_fd(self, fd: int) -> C | None:
        return self._by_fd.get(fd)

    @property
    def fd_index(self) -> Mapping[int, C]:
        """Connections by descriptor, read-only by contract, for the loops that look up every client
        of a pass (a method call each was a tenth of a recipient's cost in a large room)."""
        return self._by_fd

    def by_conn(self, conn: int) -> C | None:
        return self._by_conn.get(conn)

    def __len__(self) -> int:
        return len(self._by_fd)

    def __contains__(self, client: C) -> bool:
        """Whether this very connection is open here (not merely one with its descriptor number)."""
        return self._by_fd.get(client.fd) is client

    def clients(self) -> ValuesView[C]:
        """Every open connection (a live view: copy it before closing clients while iterating)."""
        return self._by_fd.values()

    # -- receiving traffic -----------------------------------------------------------------------

    def _placement(self, conn: int) -> tuple[tuple[str, ...], str]:
        """Where the client's chat state says it is: (rooms, active room)."""
        user = self._users.get(conn)
        rooms = getattr(user, "rooms", None)
        if not rooms:
            return self.default_rooms, self.default
        return rooms, getattr(user, "active", self.default)

    def enter(self, client: C) -> None:
        """From now on the client receives the traffic of its rooms."""
        conn = client.conn
        if self._by_conn.get(conn) is not client:
            return
        self._entered[conn] = client
        self._set(conn, client, *self._placement(conn))

    def place(self, conn: int, rooms: tuple[str, ...], active: str) -> None:
        """The client receives the traffic of `rooms` from here on, `active` without a prefix.

        A separate step from the chat state's change (see chat.Place), so that what was
        broadcast before it, in the same batch, still reached the rooms as they were.
        """
        client = self._entered.get(conn)
        if client is not None:
            self._unplace(conn)
            self._set(conn, client, rooms or self.default_rooms, active if rooms else self.default)

    def _set(self, conn: int, client: C, rooms: tuple[str, ...], active: str) -> None:
        if rooms is not self.default_rooms or active != self.default:
            self._placed[conn] = (rooms, active)
        for key in rooms:
            rs = self._rooms.get(key)
            if rs is not None:
                (rs.here if key == active else rs.away)[conn] = client

    def _unplace(self, conn: int) -> None:
        rooms, _ = self._placed.pop(conn, (self.default_rooms, self.default))
        for key in rooms:
            rs = self._rooms.get(key)
            if rs is not None:
                rs.here.pop(conn, None)
                rs.away.pop(conn, None)
                self._maybe_drop(rs)

    def leave_room(self, conn: int) -> None:
        """The client receives nothing more (its rooms stay its own until its chat state is dropped)."""
        if self._entered.pop(conn, None) is not None:
            self._unplace(conn)

    def in_room(self, conn: int) -> bool:
        return conn in self._entered

    def room(self) -> ItemsView[int, C]:
        """(conn, client) of every client that receives traffic."""
        return self._entered.items()

    def room_size(self) -> int:
        return len(self._entered)

    def recipients(self, rooms: tuple[str, ...], part: int = EVERYONE) -> Iterable[tuple[int, C]]:
        """Who receives a broadcast to `rooms` (() is the default room): each client once."""
        if len(rooms) <= 1:
            rs = self._rooms.get(rooms[0] if rooms else self.default)
            if rs is None:
                return ()
            if part == HERE or (part == EVERYONE and not rs.away):
                return rs.here.items()
            if part == AWAY:
                return rs.away.items()
            return chain(rs.here.items(), rs.away.items())
        union: dict[int, C] = {}
        for key in rooms:
            rs = self._rooms.get(key)
            if rs is not None:
                union.update(rs.here)
                union.update(rs.away)
        return union.items()

    # -- rooms (the chat core's count of its members in each) ------------------------------------

    def room_set(self, key: str) -> RoomSet[C] | None:
        return self._rooms.get(key)

    def has_away(self, key: str) -> bool:
        rs = self._rooms.get(key)
        return rs is not None and bool(rs.away)

    def gen(self, key: str) -> int:
        """How many times this worker got a first member in room `key` (see wire.OrderTracker.place)."""
        return self._gens.get(key, 0)

    def gens(self) -> dict[str, int]:
        """The current generation of every room this worker has members in."""
        return {k: self._gens.get(k, 0) for k, rs in self._rooms.items() if rs.members > 0}

    def count_in(self, key: str, name: str) -> bool:
        """One more local member in room `key` (shown as `name`); True if it is the first."""
        rs = self._rooms.get(key)
        if rs is None:
            rs = self._rooms[key] = RoomSet(key, name)
        rs.members += 1
        if rs.members == 1:
            self._gens[key] = self._gens.get(key, 0) + 1
            return True
        return False

    def count_out(self, key: str) -> bool:
        """One local member fewer in room `key`; True if it was the last."""
        rs = self._rooms.get(key)
        if rs is None:
            return False
        rs.members -= 1
        last = rs.members <= 0
        self._maybe_drop(rs)
        return last

    def _maybe_drop(self, rs: RoomSet[C]) -> None:
        if rs.members <= 0 and not rs.here and not rs.away and rs.key != self.default:
            del self._rooms[rs.key]

    # -- chat state ------------------------------------------------------------------------------

    def set_user(self, conn: int, user: U) -> None:
        self._users[conn] = user

    def user(self, conn: int) -> U | None:
        return self._users.get(conn)

    def drop_user(self, conn: int) -> U | None:
        """Forget the client's chat state (and its room memberships); it receives nothing more."""
        self.leave_room(conn)
        user = self._users.pop(conn, None)
        for key in getattr(user, "rooms", None) or ():
            self.count_out(key)
        return user

    def users(self) -> ValuesView[U]:
        return self._users.values()

    @property
    def user_map(self) -> Mapping[int, U]:
        """Chat state by connection number, read-only."""
        return MappingProxyType(self._users)

    # -- checks ----------------------------------------------------------------------------------

    def traces(self, conn: int) -> list[str]:
        """The maps that still mention connection `conn`: [] once it is wholly gone."""
        found = []
        if any(c.conn == conn for c in self._by_fd.values()):
            found.append("by_fd")
        if conn in self._by_conn:
            found.append("by_conn")
        if (conn in self._entered or conn in self._placed
                or any(conn in rs.here or conn in rs.away for rs in self._rooms.values())):
            found.append("room")
        if conn in self._users:
            found.append("users")
        return found

    def __repr__(self) -> str:
        return (f"Registry({len(self._by_fd)} connections, {len(self._entered)} receiving, "
                f"{len(self._users)} users, {len(self._rooms)} rooms)")
