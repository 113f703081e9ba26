"""The cluster's directory: the roster and the rooms, decided together in bus order, each verdict addressed.

`Directory.decide` takes one request at its place in the single order and
returns what takes its place in the stream: the verdicts, each with the
workers it is for. A verdict about a room goes to the workers with members in
it (and the requester's), an answer to a question only to the asker's worker,
a private line only to its recipient's; `ALL` means every worker. Nicknames
are the roster's (`roster.Roster`, unchanged: it decides claims, renames,
limits), rooms are `rooms.Rooms`'; this class keeps the two in step (a client
that leaves the cluster leaves its rooms, a new client enters the default
room) and says which worker starts receiving a room's traffic (a `Seed`,
which the broker fills with the room's history and numbering, which it keeps). It also keeps
the upgrade aliases: from a HANDOFF on, whatever goes to the giver goes to its
successor too. Pure: applied identically by anyone who sees the same order.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from . import events as E
from .rooms import Rooms, fold, room_problem
from .roster import Roster

ALL = None  # a verdict for every worker
Targets = frozenset[str] | None
Decided = list[tuple[E.Event, Targets]]
BROKER = "broker"
PAGE_SIZE = 500  # names per /who page when a request does not say


def page_text(count: int, noun: str, label: str, items: Sequence[str], page: int, page_size: int,
              more: str) -> str:
    """`3 users online: a, b, c`, or one page of a long list: `1200 users online (1-500; /who 2 for more): ...`."""
    word = noun if count == 1 else noun + "s"
    head = f"{count} {word}{' ' + label if label else ''}"
    if len(items) <= page_size:
        return f"{head}: {', '.join(items)}"
    pages = -(-len(items) // page_size)
    page = min(max(page, 1), pages)
    lo = (page - 1) * page_size
    chunk = items[lo:lo + page_size]
    tail = f"; {more} {page + 1} for more" if page < pages else ""
    return f"{head} ({lo + 1}-{lo + len(chunk)}{tail}): {', '.join(chunk)}"


class Directory:
    """Roster and rooms; `decide` is the one entry point, in bus order."""

    def __init__(self, default_room: str = "#lobby") -> None:
        self.roster = Roster()
        self.rooms = Rooms(default_room)
        self.aliases: dict[str, str] = {}  # giver -> its successor during an upgrade

    # -- routing ----------------------------------------------------------------------------------

    def audience(self, key: str) -> frozenset[str]:
        """The workers a batch of room `key` goes to (besides its publisher)."""
        room = self.rooms.rooms.get(key)
        if room is not None and room.audience is not None and not self.aliases:
            return room.audience  # the hot path: made once per change of the room's workers
        workers = self.rooms.audience(key)
        if self.aliases:
            extra = {self.aliases[w] for w in workers if w in self.aliases}
            if extra:
                return workers | extra
        return workers

    def _of_member(self, worker: str, conn: int, publisher: str) -> frozenset[str]:
        workers = self.rooms.workers_of(worker, conn)
        if self.aliases:
            workers = workers | {self.aliases[w] for w in workers if w in self.aliases}
        return workers | {publisher}

    # -- deciding ---------------------------------------------------------------------------------

    def decide(self, publisher: str, ev: E.Event) -> Decided:
        handler = _DECIDE.get(type(ev))
        if handler is None:
            return [(ev, ALL)]  # not a request: passed on to everyone (Ping, Unknown, ...)
        out: Decided = handler(self, publisher, ev)
        return out

    def _mine(self, publisher: str) -> frozenset[str]:
        return frozenset((publisher,))

    def _reply(self, publisher: str, conn: int, text: str) -> Decided:
        return [(E.Reply(conn, text), self._mine(publisher))]

    def _seed(self, worker: str, key: str, had: frozenset[str]) -> Decided:
        """A Seed for `worker` if it just got its first member in room `key` (had: the room's workers before)."""
        return [] if worker in had else [(E.Seed(key, [], None), frozenset((worker,)))]

    def _join(self, publisher: str, ev: E.Join) -> Decided:
        d = self.roster.decide(publisher, ev)
        if d is None:
            return []
        if type(d) is not E.Joined:
            return [(d, self._mine(publisher))]
        rooms = self.rooms
        if not rooms.is_member(publisher, ev.conn):
            had = rooms.audience(rooms.default)
            rooms.add(publisher, ev.conn, rooms.default, rooms.default_name)
            seed = self._seed(publisher, rooms.default, had)
        else:
            seed = []  # its rooms came back with its worker's resync after a broker restart
            rooms.renamed(publisher, ev.conn)  # named only now: its rooms' sorted names must show it
        if ev.old:
            keys = rooms.rooms_of(publisher, ev.conn)
            rejoined = E.Rejoined(ev.conn, ev.nick, ev.old, list(keys))
            return [(rejoined, self._of_member(publisher, ev.conn, publisher)), *seed]
        return [(d, self.audience(rooms.default) | {publisher}), *seed]

    def _nick(self, publisher: str, ev: E.Nick) -> Decided:
        d = self.roster.decide(publisher, ev)
        if type(d) is E.Renamed:
            self.rooms.renamed(publisher, ev.conn)
            keys = list(self.rooms.rooms_of(publisher, ev.conn))
            return [(E.NickChanged(d.conn, d.old, d.new, keys), self._of_member(publisher, ev.conn, publisher))]
        return [(d, self._mine(publisher))] if d is not None else []

    def _leave(self, publisher: str, ev: E.Leave) -> Decided:
        d = self.roster.decide(publisher, ev)
        targets = self._of_member(publisher, ev.conn, publisher)
        keys = self.rooms.remove_member(publisher, ev.conn)
        if type(d) is not E.Left:
            return []
        return [(E.Quit(d.conn, d.nick, d.reason, keys), targets)]

    def _gone(self, publisher: str, ev: E.Gone) -> Decided:
        members = self.roster.members_of(ev.worker)
        self.roster.decide(publisher, ev)
        rooms_by_conn = self.rooms.remove_worker(ev.worker)
        default = [self.rooms.default]
        lost = [(m.nick, rooms_by_conn.get(m.conn, default)) for m in members]
        self.aliases = {g: t for g, t in self.aliases.items() if ev.worker not in (g, t)}
        return [(E.Lost(ev.worker, lost), ALL)]

    def _adopt(self, publisher: str, ev: E.Adopt) -> Decided:
        d = self.roster.decide(publisher, ev)
        out: Decided = [(d, self._mine(publisher))] if d is not None else []
        rooms = self.rooms
        if rooms.is_member(ev.old_worker, ev.old_conn) and not rooms.is_member(publisher, ev.conn):
            before = {k: rooms.audience(k) for k in rooms.rooms_of(ev.old_worker, ev.old_conn)}
            rooms.move(ev.old_worker, ev.old_conn, publisher, ev.conn)
            for key, had in before.items():
                out += self._seed(publisher, key, had)
        return out

    def _who(self, publisher: str, ev: E.Who) -> Decided:
        return self._reply(publisher, ev.conn, self.who_text("", 1, PAGE_SIZE))

    def _whois(self, publisher: str, ev: E.Whois) -> Decided:
        text = self.roster.whois_text(ev.nick, ev.now)
        m = self.roster.holder(ev.nick)
        if m is not None:
            keys = self.rooms.rooms_of(m.worker, m.conn)
            if keys != [self.rooms.default]:
                names = sorted((self.rooms.name_of(k) for k in keys), key=lambda n: (n.lower(), n))
                text += f", in {', '.join(names)}" if names else ", in no room"
        return self._reply(publisher, ev.conn, text)

    def _resync(self, publisher: str, ev: E.Resync) -> Decided:
        self.roster.decide(publisher, ev)
        self.rooms.resync(publisher, ev.members)
        return []

    def _quiet(self, publisher: str, ev: E.Event) -> Decided:
        self.roster.decide(publisher, ev)
        return []

    def _handoff(self, publisher: str, ev: E.Handoff) -> Decided:
        self.aliases[publisher] = ev.new_worker
        return [(ev, ALL)]

    def _join_room(self, publisher: str, ev: E.JoinRoom) -> Decided:
        m = self.roster.get(publisher, ev.conn)
        if m is None:
            return []  # gone meanwhile
        problem = room_problem(ev.room, 255)
        if problem:
            return self._reply(publisher, ev.conn, f"*** Error: {problem}")
        rooms = self.rooms
        key = fold(ev.room)
        mine = rooms.rooms_of(publisher, ev.conn)
        room = rooms.get(key)
        if key in mine:
            return self._reply(publisher, ev.conn, f"*** Now talking in {room.name if room else ev.room}")
        if ev.max_rooms_per_user and len(mine) >= ev.max_rooms_per_user:
            return self._reply(publisher, ev.conn, f"*** Error: you are in {len(mine)} rooms, the most allowed; "
                                                   f"/part one first")
        if room is None and ev.max_rooms and len(rooms) >= ev.max_rooms:
            return self._reply(publisher, ev.conn, f"*** Error: the server has {len(rooms)} rooms, the most "
                                                   f"allowed; join one of them (/rooms lists them)")
        return self._enter(publisher, ev.conn, m.nick, key, ev.room)

    def _enter(self, publisher: str, conn: int, nick: str, key: str, name: str) -> Decided:
        """The member joins room `key`: the room is told, the joiner gets who is there (and its history)."""
        rooms = self.rooms
        had = rooms.audience(key)
        rooms.add(publisher, conn, key, name)
        room = rooms.rooms[key]
        names = rooms.sorted_names(key, self._name_of)
        listing = page_text(len(names), "user", "here", names, 1, PAGE_SIZE, f"/who {room.name}")
        return [(E.RoomJoined(conn, nick, room.name), self.audience(key) | {publisher}),
                *self._seed(publisher, key, had),
                (E.RoomIntro(conn, room.name, f"*** You joined {room.name}; {listing}"), self._mine(publisher))]

    def _part_room(self, publisher: str, ev: E.PartRoom) -> Decided:
        m = self.roster.get(publisher, ev.conn)
        if m is None:
            return []
        rooms = self.rooms
        key = fold(ev.room)
        if key not in rooms.rooms_of(publisher, ev.conn):
            return self._reply(publisher, ev.conn, f"*** Error: you are not in {ev.room}")
        targets = self.audience(key) | {publisher}
        name = rooms.rooms[key].name
        rooms.remove(publisher, ev.conn, key)
        out: Decided = [(E.RoomParted(ev.conn, m.nick, name, ev.reason), targets)]
        if not rooms.rooms_of(publisher, ev.conn):
            # Nobody is in no room: leaving the last one puts the client back in the default room.
            out += self._enter(publisher, ev.conn, m.nick, rooms.default, rooms.default_name)
        return out

    def _msg(self, publisher: str, ev: E.Msg) -> Decided:
        to = self.roster.holder(ev.to)
        if to is None:
            return self._reply(publisher, ev.conn, f"*** Error: no such user {ev.to}")
        text = ev.text.decode("utf-8", "replace")
        targets = frozenset((to.worker,))
        if to.worker in self.aliases:
            # Handed over in an upgrade but not adopted yet: the giver has sent the client away,
            # its successor delivers the line (see chat.ChatCore.arriving).
            targets |= {self.aliases[to.worker]}
        return [(E.Private(to.worker, to.conn, ev.nick, ev.text), targets),
                (E.Reply(ev.conn, f"-> *{to.nick}* {text}"), self._mine(publisher))]

    def _list_rooms(self, publisher: str, ev: E.ListRooms) -> Decided:
        items = self.rooms.listing()  # formats only the items of the page shown
        text = page_text(len(items), "room", "", items, ev.page, PAGE_SIZE, "/rooms")
        return self._reply(publisher, ev.conn, "*** " + text)

    def _who_room(self, publisher: str, ev: E.WhoRoom) -> Decided:
        if ev.room and self.rooms.get(fold(ev.room)) is None:
            return self._reply(publisher, ev.conn, f"*** Error: no such room {ev.room}")
        return self._reply(publisher, ev.conn, self.who_text(ev.room, ev.page, PAGE_SIZE))

    # -- answers ----------------------------------------------------------------------------------

    def _name_of(self, worker: str, conn: int) -> str | None:
        m = self.roster.get(worker, conn)
        return m.nick if m is not None else None

    def who_text(self, room: str, page: int, page_size: int) -> str:
        """/who of a room; room "" is the default room, answered in today's words (`N users online: ...`)."""
        rooms = self.rooms
        key = fold(room) if room else rooms.default
        names = rooms.sorted_names(key, self._name_of)
        if room:
            name = rooms.name_of(key)
            return "*** " + page_text(len(names), "user", f"in {name}", names, page, page_size, f"/who {name}")
        return "*** " + page_text(len(names), "user", "online", names, page, page_size, "/who")

    # -- what the broker reports ------------------------------------------------------------------

    @property
    def memberships(self) -> int:
        return self.rooms.memberships


_DECIDE: dict[type[E.Event], Callable[[Directory, str, Any], Decided]] = {
    E.Join: Directory._join, E.Nick: Directory._nick, E.Leave: Directory._leave, E.Gone: Directory._gone,
    E.Adopt: Directory._adopt, E.Who: Directory._who, E.Whois: Directory._whois, E.Resync: Directory._resync,
    E.Hello: Directory._quiet, E.Handoff: Directory._handoff, E.JoinRoom: Directory._join_room,
    E.PartRoom: Directory._part_room, E.Msg: Directory._msg, E.ListRooms: Directory._list_rooms,
    E.WhoRoom: Directory._who_room, E.HistoryCopy: lambda d, p, ev: [], E.Numbering: lambda d, p, ev: []}
