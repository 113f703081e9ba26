"""Each room's recent lines, bounded per room in lines and across all rooms in bytes.

The broker keeps the history of every room (it sees every line in order) and
each worker keeps a copy for the rooms it has members in (so a new broker can
rebuild it after a crash). Lines arrive in chunks, one per bus batch of a
room, each with one time: the broker stores a chunk as the batch's bytes as
they came off the bus and decodes it only when someone needs the lines (a
worker that starts keeping a copy), so keeping history costs the broker an
append per batch, not a decode; a worker stores the bytes it broadcast. A room
keeps its newest chunks while they hold `max_lines` lines; when all rooms
together hold more than `max_bytes`, the oldest chunks go first, whatever
their room. Pure: times are given, never read from a clock.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence

from .protocol import CRLF

CHUNK_COST = 120  # bytes counted per chunk on top of its data: the containers that hold it
Line = tuple[float, bytes]  # (unix time, one line ending in CRLF)


def split_lines(data: bytes) -> list[bytes]:
    """Lines joined as they were broadcast ("a: x\\r\\nb: y\\r\\n") back into lines, each with its CRLF."""
    return [part + CRLF for part in data.split(CRLF)[:-1]]


def stamp(ts: float) -> bytes:
    """The replay prefix of a line said at unix time `ts`: b"[HH:MM] ", in UTC."""
    t = time.gmtime(ts)
    return b"[%02d:%02d] " % (t.tm_hour, t.tm_min)


class _Room:
    __slots__ = ("chunks", "count")

    def __init__(self) -> None:
        # (serial, time, lines in it, bytes counted, data): data is encoded bytes or a tuple of lines
        self.chunks: deque[tuple[int, float, int, int, bytes | tuple[bytes, ...]]] = deque()
        self.count = 0


class History:
    """Recent lines by room key. `decode` turns a chunk's encoded bytes into its lines."""

    def __init__(self, max_lines: int, max_bytes: int, decode: Callable[[bytes], list[bytes]] = split_lines) -> None:
        self.max_lines = max_lines
        self.max_bytes = max_bytes
        self.decode = decode
        self.rooms: dict[str, _Room] = {}
        # (serial, room) of every chunk, oldest first, for evicting by age across rooms. A chunk that
        # went otherwise (its room's line limit, a dropped room) leaves its entry behind: it is
        # skipped when met, and the deque is rebuilt when such entries outnumber the live ones.
        self.order: deque[tuple[int, str]] = deque()
        self.live = 0  # chunks held
        self.serial = 0
        self.nbytes = 0
        self.evicted = 0  # chunks dropped to keep within max_bytes

    @property
    def enabled(self) -> bool:
        return self.max_lines > 0

    def __contains__(self, key: str) -> bool:
        return key in self.rooms

    def add(self, key: str, ts: float, count: int, data: bytes | tuple[bytes, ...], serial: int = 0) -> None:
        """A chunk of `count` lines said at time `ts` in room `key`.

        `serial`, if given, numbers the chunk instead of the next number of our own: it must be
        larger than any before (a multi-host cluster numbers chunks by their place in the stream,
        to say from where the history it holds can be read again, see `oldest`).
        """
        if self.max_lines <= 0 or count <= 0:
            return
        room = self.rooms.get(key)
        if room is None:
            room = self.rooms[key] = _Room()
        self.serial = max(serial, self.serial + 1)
        size = (len(data) if isinstance(data, bytes) else sum(len(line) for line in data)) + CHUNK_COST
        chunks = room.chunks
        chunks.append((self.serial, ts, count, size, data))
        room.count += count
        self.order.append((self.serial, key))
        self.live += 1
        self.nbytes += size
        while room.count - chunks[0][2] >= self.max_lines:  # (never the chunk just added)
            _, _, n, dropped, _ = chunks.popleft()
            room.count -= n
            self.nbytes -= dropped
            self.live -= 1
        if self.nbytes > self.max_bytes:
            while self.nbytes > self.max_bytes and self.live:
                self._evict()
        if len(self.order) > 2 * self.live + 1024:
            self.order = deque(sorted((c[0], k) for k, r in self.rooms.items() for c in r.chunks))

    def _evict(self) -> None:
        """Drop the oldest chunk of all rooms."""
        order, rooms = self.order, self.rooms
        while True:
            serial, key = order.popleft()
            room = rooms.get(key)
            if room is not None and room.chunks[0][0] == serial:
                break  # (otherwise that chunk is gone already)
        _, _, count, size, _ = room.chunks.popleft()
        room.count -= count
        self.nbytes -= size
        self.live -= 1
        self.evicted += 1
        if not room.chunks:
            del rooms[key]

    def lines(self, key: str) -> list[Line]:
        """The room's last `max_lines` lines, oldest first, with their times."""
        room = self.rooms.get(key)
        if room is None:
            return []
        out: list[Line] = []
        for _, ts, _, _, data in room.chunks:
            lines = self.decode(data) if isinstance(data, bytes) else data
            out.extend((ts, line) for line in lines)
        return out[-self.max_lines:]

    def load(self, key: str, lines: Iterable[Sequence[object]]) -> None:
        """Replace the room's history with these (time, line) pairs, oldest first."""
        self.drop(key)
        for item in lines:
            ts, line = float(item[0]), bytes(item[1])  # type: ignore[arg-type, call-overload]
            self.add(key, ts, 1, (line,))

    def drop(self, key: str) -> None:
        room = self.rooms.pop(key, None)
        if room is None:
            return
        self.live -= len(room.chunks)
        self.nbytes -= sum(c[3] for c in room.chunks)

    def oldest(self) -> int:
        """The serial of the oldest chunk held (0 when none is)."""
        return min((room.chunks[0][0] for room in self.rooms.values() if room.chunks), default=0)

    def keys(self) -> list[str]:
        return list(self.rooms)

    def last_time(self, key: str) -> float:
        room = self.rooms.get(key)
        return room.chunks[-1][1] if room is not None and room.chunks else 0.0

    def snapshot(self) -> list[tuple[str, list[Line]]]:
        """Every room's lines, for a new broker (see events.HistoryCopy)."""
        return [(key, self.lines(key)) for key in self.rooms]

    def merge(self, key: str, lines: Sequence[Sequence[object]]) -> bool:
        """Take another copy of a room's lines if it reaches further than ours (or is longer); True if taken.

        Copies of one room from different workers are the same lines, the ones of a worker that
        saw a little more of the order reaching a little further.
        """
        if not lines:
            return False
        theirs = (float(lines[-1][0]), len(lines))  # type: ignore[arg-type]
        mine = self.rooms.get(key)
        if mine is not None and (self.last_time(key), min(mine.count, self.max_lines)) >= theirs:
            return False
        self.load(key, lines)
        return True

    def replay(self, key: str) -> bytes:
        """The room's lines as a joiner gets them: each with its time, in UTC."""
        return b"".join(stamp(ts) + line for ts, line in self.lines(key))
