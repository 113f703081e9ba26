"""One worker's clients: the single place that knows who is connected, who is in the room, and who is who.

A client appears here in two roles that live for different spans. Its
connection (a `Client` of the worker, found by descriptor or by connection
number) exists from accept to close; its chat state (a `LocalUser` of the chat
core: nickname, claim in flight, lines waiting) exists from connect until the
chat core has published its departure, which may be a little before the
socket closes (a /quit still sends "Goodbye") or a little after (lines it sent
before a reset still go out once its name is decided). The room is the set of
connections that receive the chat's traffic. Every add and remove goes through
this class, so no map can keep a trace of a client that is gone, and
`traces()` can prove it. It is pure: it holds objects, it does not do I/O.
"""

from __future__ import annotations

from collections.abc import ItemsView, Mapping, ValuesView
from types import MappingProxyType
from typing import Generic, Protocol, TypeVar


class Connection(Protocol):
    """What the registry needs of a connection: its descriptor and its number on this worker."""

    @property
    def fd(self) -> int: ...

    @property
    def conn(self) -> int: ...


C = TypeVar("C", bound=Connection)
U = TypeVar("U")


class Registry(Generic[C, U]):
    """Connections by descriptor and by number, the room, and the chat state of each client."""

    __slots__ = ("_by_fd", "_by_conn", "_room", "_users", "_next_conn")

    def __init__(self) -> None:
        self._by_fd: dict[int, C] = {}
        self._by_conn: dict[int, C] = {}
        self._room: dict[int, C] = {}
        self._users: dict[int, U] = {}
        self._next_conn = 1

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
        """Forget the connection (and its place in the room); False if it was not registered.

        The chat state stays until the chat core drops it: see the module docstring.
        """
        if self._by_fd.get(client.fd) is not client:
            return False
        del self._by_fd[client.fd]
        del self._by_conn[client.conn]
        self._room.pop(client.conn, None)
        return True

    def by_fd(self, fd: int) -> C | None:
        return self._by_fd.get(fd)

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

    # -- the room ------------------------------------------------------------------------------

    def enter(self, client: C) -> None:
        """From now on the client receives the room's traffic."""
        if self._by_conn.get(client.conn) is client:
            self._room[client.conn] = client

    def leave_room(self, conn: int) -> None:
        self._room.pop(conn, None)

    def in_room(self, conn: int) -> bool:
        return conn in self._room

    def room(self) -> ItemsView[int, C]:
        """(conn, client) of every client in the room: the recipients of a broadcast."""
        return self._room.items()

    def room_size(self) -> int:
        return len(self._room)

    # -- chat state ------------------------------------------------------------------------------

    def set_user(self, conn: int, user: U) -> None:
        self._users[conn] = user

    def user(self, conn: int) -> U | None:
        return self._users.get(conn)

    def drop_user(self, conn: int) -> U | None:
        return self._users.pop(conn, None)

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
        if conn in self._room:
            found.append("room")
        if conn in self._users:
            found.append("users")
        return found

    def __repr__(self) -> str:
        return (f"Registry({len(self._by_fd)} connections, {len(self._room)} in the room, "
                f"{len(self._users)} users)")
