"""Chat rooms: the rules for their names, and who is in which room, as a state machine in bus order.

The broker applies membership changes (a client joins or leaves a room, leaves
the cluster, moves to another worker, a worker dies, a new broker rebuilds the
rooms from the workers' lists) at their place in the one bus order, like the
roster's changes, so every worker is told the same thing at the same point.
Each room knows its members by worker, which is what routing needs: a room's
traffic goes to the workers that have members there (`audience`). Sorted
member lists for /who and a joiner's listing are made when first asked and
then kept up to date a member at a time (a join, a part, a rename);
the rooms are kept sorted by name as they come and go, so /rooms formats only
the page it shows.
A room is named as it was first created and compared case-insensitively; it
exists while it has members, except the default room, which always exists.
Pure: no sockets, no clock; it knows members by (worker, conn), names come
from the roster (see `directory`).
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable, Sequence
from typing import overload

from .roster import NICK_CHARS

MAX_ROOM_NAME = 32  # characters after the "#" (the setting max_room_name may lower it)
EMPTY: frozenset[str] = frozenset()
TOUCHED_MAX = 64  # members changed since a room's sorted names were brought up to date, before
# making them anew is cheaper (plus a sixteenth of the room)


def _order(name: str) -> tuple[str, str]:
    """How member names are sorted: case-insensitively, then as spelled."""
    return (name.lower(), name)


def fold(name: str) -> str:
    """A room's key: its name compared case-insensitively."""
    return name.lower()


def room_problem(name: str, max_length: int = MAX_ROOM_NAME) -> str | None:
    """Why `name` is not a valid room name, or None when it is."""
    body = name[1:] if name.startswith("#") else name
    if body and not NICK_CHARS.issuperset(body):
        return "a room name may only use letters A-Z a-z, digits 0-9, _ and - after the #"
    if not name.startswith("#"):
        return f"a room name starts with #, as in #{body}" if body else "usage: /join #ROOM"
    if not body:
        return f"a room name needs 1 to {max_length} characters after the #"
    if len(body) > max_length:
        return f"room name is too long ({len(body)} characters after the #, max {max_length})"
    return None


class Room:
    """One room: its members by worker, and what is made from them on demand."""

    __slots__ = ("key", "name", "by_worker", "size", "version", "names", "placed", "touched", "audience")

    def __init__(self, key: str, name: str) -> None:
        self.key = key
        self.name = name
        self.by_worker: dict[str, set[int]] = {}
        self.size = 0
        self.version = 0  # changes whenever the member list or a member's name changes
        # The members' names sorted (see _order), made when first asked for and from then on kept
        # up to date a member at a time: `placed` is the name each member has in the list (by
        # worker, then conn), `touched` the members that came, went or were renamed since the
        # list was last brought up to date. A join of a big room, and /who after it, then cost a
        # few bisections instead of a sort of the whole room. None: not made (or dropped).
        self.names: list[str] | None = None
        self.placed: dict[str, dict[int, str]] | None = None
        self.touched: set[tuple[str, int]] | None = None
        self.audience: frozenset[str] | None = None  # workers with members here; None: make it again

    def touch(self, worker: str, conn: int) -> None:
        """The member came, went or changed its name: its place in the sorted names is out of date."""
        self.version += 1
        if self.names is None:
            return
        if self.touched is None:
            self.touched = set()
        self.touched.add((worker, conn))
        if len(self.touched) > TOUCHED_MAX + self.size // 16:
            self.names = self.placed = self.touched = None  # made anew when next asked for

    def __repr__(self) -> str:
        return f"Room({self.name!r}, {self.size} members on {len(self.by_worker)} workers)"


class Rooms:
    """Which client is in which room, by (worker, conn).

    Most clients are only ever in the default room: for them nothing is stored but their
    place in the default room's member set; `extra` holds the room list of the others.
    """

    __slots__ = ("default", "default_name", "rooms", "extra", "memberships", "version", "order")

    def __init__(self, default_room: str = "#lobby") -> None:
        self.default = fold(default_room)
        self.default_name = default_room
        self.rooms: dict[str, Room] = {self.default: Room(self.default, default_room)}
        self.extra: dict[tuple[str, int], list[str]] = {}  # members whose rooms are not just [default]
        self.memberships = 0  # (member, room) pairs: the sum of the rooms' sizes
        self.version = 0  # changes whenever a room appears, goes or changes size (for /rooms)
        # Every room's key, sorted: kept as rooms come and go, so that /rooms neither sorts nor
        # formats every room for each request (the broker answers it in the one order).
        self.order: list[str] = [self.default]

    def __len__(self) -> int:
        return len(self.rooms)

    def get(self, key: str) -> Room | None:
        return self.rooms.get(key)

    def name_of(self, key: str) -> str:
        room = self.rooms.get(key)
        return room.name if room is not None else key

    # -- members ----------------------------------------------------------------------------------

    def rooms_of(self, worker: str, conn: int) -> list[str]:
        """The keys of the member's rooms, in the order it joined them ([] for no member)."""
        extra = self.extra.get((worker, conn))
        if extra is not None:
            return extra
        conns = self.rooms[self.default].by_worker.get(worker)
        return [self.default] if conns is not None and conn in conns else []

    def is_member(self, worker: str, conn: int) -> bool:
        return bool(self.rooms_of(worker, conn))

    def _set_rooms(self, worker: str, conn: int, keys: list[str]) -> None:
        if keys == [self.default] or not keys:
            self.extra.pop((worker, conn), None)
        else:
            self.extra[(worker, conn)] = keys

    def add(self, worker: str, conn: int, key: str, name: str) -> bool:
        """Put the member in room `key` (made with `name` if it does not exist); False if it was there."""
        room = self.rooms.get(key)
        if room is None:
            room = self.rooms[key] = Room(key, name)
            bisect.insort(self.order, key)
        conns = room.by_worker.get(worker)
        if conns is None:
            conns = room.by_worker[worker] = set()
            room.audience = None
        elif conn in conns:
            return False
        before = self.rooms_of(worker, conn)
        conns.add(conn)
        room.touch(worker, conn)
        self._changed(room, +1)
        self._set_rooms(worker, conn, [*before, key])
        return True

    def remove(self, worker: str, conn: int, key: str) -> bool:
        """Take the member out of room `key`; a room other than the default one goes with its last member."""
        before = self.rooms_of(worker, conn)
        if key not in before:
            return False
        self._drop(worker, conn, key)
        self._set_rooms(worker, conn, [k for k in before if k != key])
        return True

    def _drop(self, worker: str, conn: int, key: str) -> None:
        room = self.rooms[key]
        conns = room.by_worker[worker]
        conns.discard(conn)
        if not conns:
            del room.by_worker[worker]
            room.audience = None
        room.touch(worker, conn)
        self._changed(room, -1)
        if not room.size and key != self.default:
            del self.rooms[key]
            del self.order[bisect.bisect_left(self.order, key)]

    def _changed(self, room: Room, delta: int) -> None:
        room.size += delta
        self.memberships += delta
        self.version += 1

    def remove_member(self, worker: str, conn: int) -> list[str]:
        """The member left the cluster: out of every room; returns the keys of the rooms it was in."""
        keys = list(self.rooms_of(worker, conn))
        for key in keys:
            self._drop(worker, conn, key)
        self.extra.pop((worker, conn), None)
        return keys

    def remove_worker(self, worker: str) -> dict[int, list[str]]:
        """A worker died: every member of it leaves every room; returns {conn: room keys}."""
        left: dict[int, list[str]] = {}
        for room in list(self.rooms.values()):
            conns = room.by_worker.get(worker)
            for conn in list(conns or ()):
                left.setdefault(conn, []).append(room.key)
                self._drop(worker, conn, room.key)
        for key in [k for k in self.extra if k[0] == worker]:
            left[key[1]] = self.extra.pop(key)  # in the order joined
        return left

    def move(self, old_worker: str, old_conn: int, worker: str, conn: int) -> list[str]:
        """The member moved to (worker, conn) in an upgrade: same rooms; returns them."""
        keys = list(self.rooms_of(old_worker, old_conn))
        for key in keys:
            room = self.rooms[key]
            self._drop(old_worker, old_conn, key)
            if key not in self.rooms:  # it was its last member for a moment
                self.rooms[key] = room
                bisect.insort(self.order, key)
            self.add(worker, conn, key, room.name)
        self.extra.pop((old_worker, old_conn), None)
        self._set_rooms(worker, conn, keys)
        return keys

    def renamed(self, worker: str, conn: int) -> None:
        """A member changed its name: the sorted lists of its rooms are out of date."""
        for key in self.rooms_of(worker, conn):
            self.rooms[key].touch(worker, conn)

    def resync(self, worker: str, members: Iterable[Sequence[object]]) -> None:
        """After a broker restart: the worker's members are in exactly these rooms.

        Each entry is a resync tuple (worker, conn, nick, since, ip[, room names]); one without
        room names is in the default room. Limits are not checked: this is what existed.
        """
        self.remove_worker(worker)
        for t in members:
            conn = int(t[1])  # type: ignore[call-overload]
            names = list(t[5]) if len(t) > 5 else [self.default_name]  # type: ignore[call-overload]
            for name in names:
                name = str(name)
                self.add(worker, conn, fold(name), name)

    # -- what routing and the replies need --------------------------------------------------------

    def audience(self, key: str) -> frozenset[str]:
        """The workers with members in room `key`."""
        room = self.rooms.get(key)
        if room is None:
            return EMPTY
        if room.audience is None:
            room.audience = frozenset(room.by_worker)
        return room.audience

    def workers_of(self, worker: str, conn: int) -> frozenset[str]:
        """The workers with members in any room of this member (itself included)."""
        keys = self.rooms_of(worker, conn)
        if len(keys) == 1:
            return self.audience(keys[0])
        out: set[str] = set()
        for key in keys:
            out |= self.audience(key)
        return frozenset(out)

    def sorted_names(self, key: str, name_of: Callable[[str, int], str | None]) -> list[str]:
        """The names of the room's members sorted case-insensitively: made once, then brought up to
        date by the members that changed since (the list is the room's own: do not change it)."""
        room = self.rooms.get(key)
        if room is None:
            return []
        if room.names is None or room.placed is None:
            placed: dict[str, dict[int, str]] = {}
            names: list[str] = []
            for w, conns in room.by_worker.items():
                mine = placed[w] = {}
                for c in conns:
                    n = name_of(w, c)
                    if n is not None:
                        mine[c] = n
                        names.append(n)
            names.sort(key=_order)
            room.names, room.placed, room.touched = names, placed, None
        elif room.touched and not self._catch_up(room, room.names, room.placed, name_of):
            room.names = room.placed = room.touched = None  # (cannot happen) make it anew
            return self.sorted_names(key, name_of)
        return room.names

    @staticmethod
    def _catch_up(room: Room, names: list[str], placed: dict[str, dict[int, str]],
                  name_of: Callable[[str, int], str | None]) -> bool:
        """Take the touched members out of the sorted names, then put back those still here as named
        now; False if a name was not where it should be."""
        touched = room.touched or set()
        room.touched = None
        for w, c in touched:
            mine = placed.get(w)
            old = mine.pop(c, None) if mine is not None else None
            if old is not None:
                i = bisect.bisect_left(names, _order(old), key=_order)
                if i == len(names) or names[i] != old:
                    return False
                del names[i]
                if not mine:
                    del placed[w]
        for w, c in touched:
            conns = room.by_worker.get(w)
            if conns is not None and c in conns:
                n = name_of(w, c)
                if n is not None:
                    bisect.insort(names, n, key=_order)
                    placed.setdefault(w, {})[c] = n
        return True

    def listing(self) -> Listing:
        """Every room as `#name (members)`, sorted by name case-insensitively, made as it is read."""
        return Listing(self)


class Listing(Sequence[str]):
    """The rooms as /rooms shows them, in order; an item is made only when it is read, so a page
    of a long list costs that page. A view: it changes with the rooms."""

    __slots__ = ("_rooms",)

    def __init__(self, rooms: Rooms) -> None:
        self._rooms = rooms

    def __len__(self) -> int:
        return len(self._rooms.order)

    @overload
    def __getitem__(self, i: int) -> str: ...

    @overload
    def __getitem__(self, i: slice) -> list[str]: ...

    def __getitem__(self, i: int | slice) -> str | list[str]:
        rooms = self._rooms.rooms
        if isinstance(i, slice):
            return [f"{r.name} ({r.size})" for r in (rooms[k] for k in self._rooms.order[i])]
        r = rooms[self._rooms.order[i]]
        return f"{r.name} ({r.size})"
