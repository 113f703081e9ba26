"""The rooms' history on disk, when `history_db` names a file: a writer process, and reading it back at start.

The broker must never wait for a disk. `Writer` is its end: it forks a writer
process and hands it each room's chat batches (the bus bytes, undecoded) over
a pipe, without ever blocking (what the pipe will not take waits in a bounded
buffer in the broker; past the bound the oldest is dropped and counted). A
writer that dies (the OOM killer, a crash) is replaced by a new one, with
back-off when it keeps dying young, on the same descriptor number, so the
broker's poller never notices. The
writer process decodes the batches and writes them to SQLite (the standard
library's sqlite3, WAL mode, synchronous=NORMAL) in one transaction per
quarter second, trims each room to its last `history_lines` lines and the
whole file to about `history_max_bytes` of lines, and writes what it still
has when the pipe closes (the broker stopping or dying), then exits. `load`
reads each room's last lines back when a broker starts. Without `history_db`
nothing imports this module and nothing touches the disk.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import marshal
import os
import select
import signal
import sqlite3
import struct
import time
from collections import deque
from collections.abc import Iterable

from . import paths
from .chat import format_line
from .wire import UNREADABLE_PAYLOAD, decode

log = logging.getLogger("chatcluster.histdb")

LENGTH = struct.Struct("!I")
FLUSH_EVERY = 0.25  # seconds between two transactions of the writer
TRIM_EVERY = 5.0  # seconds between two trims of the file
MAX_PENDING = 64 << 20  # bytes the broker holds for a writer that falls behind
YOUNG = 5.0  # a writer that dies younger than this is replaced after a delay, doubling up to RESTART_MAX
RESTART_MAX = 60.0
F_SETPIPE_SZ = 1031
SCHEMA = """
CREATE TABLE IF NOT EXISTS lines (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    room TEXT NOT NULL,
    ts REAL NOT NULL,
    line BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS lines_by_room ON lines(room, id);
"""


def connect(path: str) -> sqlite3.Connection:
    db = sqlite3.connect(path, timeout=10.0, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    db.executescript(SCHEMA)
    return db


def load(path: str, max_lines: int) -> list[tuple[str, list[tuple[float, bytes]]]]:
    """Each room's last `max_lines` lines, oldest first; [] for a file that does not exist yet.

    The lines go to joiners as they are, so a file anyone else could have written is refused
    (`check_path`) before it is read.
    """
    problem = check_path(path)
    if problem:
        raise SystemExit(problem)
    if not os.path.exists(path):
        return []
    try:
        db = connect(path)
    except sqlite3.Error as exc:
        raise SystemExit(f"history_db {path} cannot be opened ({exc}); fix or remove the file, or set "
                         f"another history_db") from None
    try:
        rows = db.execute(
            "SELECT room, ts, line FROM (SELECT room, ts, line, id, ROW_NUMBER() OVER "
            "(PARTITION BY room ORDER BY id DESC) AS rn FROM lines) WHERE rn <= ? ORDER BY id",
            (max_lines,)).fetchall()
    except sqlite3.Error as exc:
        raise SystemExit(f"history_db {path} cannot be read ({exc}); fix or remove the file") from None
    finally:
        db.close()
    rooms: dict[str, list[tuple[float, bytes]]] = {}
    for room, ts, line in rows:
        rooms.setdefault(room, []).append((float(ts), bytes(line)))
    return list(rooms.items())


def check_path(path: str) -> str | None:
    """Why `path` cannot be a history database, or None: see also paths.data_file_problem."""
    path = os.path.abspath(os.path.expanduser(path))
    parent = os.path.dirname(path) or "."
    if os.path.isdir(path):
        return f"history_db {path} is a directory; name a file in it, for example {path.rstrip('/')}/history.db"
    if not os.path.isdir(parent):
        return f"history_db {path}: the directory {parent} does not exist; create it or choose another path"
    if not os.access(parent, os.W_OK):
        return f"history_db {path}: the directory {parent} is not writable by this user"
    return paths.data_file_problem(path, "history_db")


# -- the broker's end -----------------------------------------------------------------------------


class Writer:
    """The broker's handle on the writer process: queue records, write what the pipe takes."""

    def __init__(self, pid: int, fd: int, path: str = "", max_lines: int = 0, max_bytes: int = 0,
                 close: tuple[int, ...] = ()) -> None:
        self.pid = pid
        self.fd = fd
        self.queue: deque[bytes] = deque()
        self.queued = 0
        self.head_done = 0  # bytes of queue[0] already in the pipe
        self.dropped = 0  # records dropped because the writer fell too far behind
        self.broken = False  # the writer is gone; a new one starts at restart_at
        self.spawn_args = (path, max_lines, max_bytes, close)
        self.started = time.monotonic()
        self.failures = 0
        self.restart_at = 0.0
        self.dead: list[int] = []  # writers gone but not reaped yet

    @classmethod
    def start(cls, path: str, max_lines: int, max_bytes: int, close: Iterable[int] = ()) -> Writer:
        problem = check_path(path)
        if problem:
            raise SystemExit(problem)
        pid, w = cls._spawn(path, max_lines, max_bytes, tuple(close))
        return cls(pid, w, path, max_lines, max_bytes, tuple(close))

    @staticmethod
    def _spawn(path: str, max_lines: int, max_bytes: int, close: tuple[int, ...]) -> tuple[int, int]:
        """Fork a writer process; (its pid, the write end of its pipe, non-blocking)."""
        r, w = os.pipe2(os.O_CLOEXEC)
        pid = os.fork()
        if pid == 0:  # the writer process
            code = 1
            try:
                os.close(w)
                for fd in close:
                    os.close(fd)
                code = run_writer(path, r, max_lines, max_bytes)
            except BaseException:
                log.exception("history writer crashed")
            finally:
                logging.shutdown()
                os._exit(code)
        os.close(r)
        os.set_blocking(w, False)
        try:
            fcntl.fcntl(w, F_SETPIPE_SZ, 1 << 20)
        except OSError:
            pass  # the default 64 KiB will do
        return pid, w

    @property
    def pending(self) -> bool:
        """Whether there is something for the writer's pipe now.

        The broker asks at every turn of its loop (at least four times a second), which is
        also when a writer that died is replaced once its back-off is over.
        """
        if self.broken:
            self._revive(time.monotonic())
        return bool(self.queue) and not self.broken

    @property
    def replaceable(self) -> bool:
        """Whether a writer that dies can be replaced: one made by `start`, which knows the file."""
        return bool(self.spawn_args[0])

    def _put(self, record: tuple[object, ...]) -> None:
        if self.broken:
            if not self.replaceable:
                return
            self._revive(time.monotonic())  # what comes meanwhile waits for the new writer, bounded
        data = marshal.dumps(record)
        self.queue.append(LENGTH.pack(len(data)) + data)
        self.queued += LENGTH.size + len(data)
        while self.queued > MAX_PENDING and self.queue:
            self.queued -= len(self.queue.popleft())
            self.dropped += 1
            if self.dropped in (1, 10, 100) or self.dropped % 1000 == 0:
                log.warning("history writer falls behind: %d batches not written to disk", self.dropped)

    def batch(self, key: str, ts: float, payload: bytes) -> None:
        self._put(("B", key, ts, payload))

    def replace(self, key: str, lines: list[tuple[float, bytes]]) -> None:
        self._put(("R", key, lines))

    def flush(self) -> None:
        """Write what the pipe takes now; never blocks."""
        queue = self.queue
        while queue and not self.broken:
            if len(queue) > 1 and len(queue[0]) < 1 << 20:
                parts, size = [], 0
                while queue and size < 1 << 20:
                    part = queue.popleft()
                    parts.append(part)
                    size += len(part)
                queue.appendleft(b"".join(parts))  # one write for many records
            data = queue[0]
            try:
                n = os.write(self.fd, memoryview(data)[self.head_done:])
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno != errno.EPIPE:
                    raise
                self._gone()
                return
            self.queued -= n
            self.head_done += n
            if self.head_done < len(data):
                return
            queue.popleft()
            self.head_done = 0

    def _gone(self) -> None:
        """The writer died: drop the rest of a record it got only part of, and replace it."""
        now = time.monotonic()
        self.broken = True
        if not self.replaceable:
            log.error("history writer (pid %d) is gone; history is no longer written to disk", self.pid)
            return
        self.dead.append(self.pid)
        self._reap()
        if self.head_done:
            data, pos = self.queue[0], 0
            while pos < self.head_done:  # the first record boundary at or after what was written
                (n,) = LENGTH.unpack_from(data, pos)
                pos += LENGTH.size + n
            self.queued -= pos - self.head_done
            self.queue[0] = data[pos:]
            if not self.queue[0]:
                self.queue.popleft()
            self.head_done = 0
        if now - self.started < YOUNG:
            self.failures += 1
            # The first young death is replaced at once, like any crash; only a repeat backs off.
            delay = 0.0 if self.failures < 2 else min(2.0 ** (self.failures - 2), RESTART_MAX)
        else:
            self.failures, delay = 0, 0.0
        self.restart_at = now + delay
        log.error("history writer (pid %d) is gone; starting a new one%s (lines it had not written yet are lost)",
                  self.pid, f" in {delay:.0f} s" if delay else "")
        self._revive(now)

    def _revive(self, now: float) -> None:
        """Start the new writer once its time has come, on the descriptor number the broker polls."""
        self._reap()
        if now < self.restart_at or not self.replaceable:
            return
        try:
            pid, w = self._spawn(*self.spawn_args)
        except OSError as exc:
            self.restart_at = now + RESTART_MAX
            log.error("cannot start a new history writer (%s); trying again in %.0f s", exc, RESTART_MAX)
            return
        os.dup2(w, self.fd, inheritable=False)
        os.close(w)
        os.set_blocking(self.fd, False)
        self.pid, self.started, self.broken = pid, now, False
        log.info("history writer started again, pid %d", pid)

    def _reap(self) -> None:
        for pid in list(self.dead):
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done = pid
            if done:
                self.dead.remove(pid)

    def close(self, timeout: float) -> None:
        """Hand over the rest, close the pipe (the writer writes what it has and exits), wait for it."""
        deadline = time.monotonic() + timeout
        if self.broken and self.queue:
            self.restart_at = 0.0  # a last writer for what is left, back-off or not
            self._revive(time.monotonic())
        while self.pending and time.monotonic() < deadline:
            self.flush()
            if self.pending:
                select.select([], [self.fd], [], max(0.0, deadline - time.monotonic()))
        os.close(self.fd)
        self._reap()
        while time.monotonic() < deadline:
            try:
                pid, _ = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:
                return
            if pid:
                return
            time.sleep(0.01)
        log.warning("history writer (pid %d) still writing at exit; it finishes on its own", self.pid)


# -- the writer process ---------------------------------------------------------------------------


class Store:
    """The writer's side of the database: batches of records in, trimmed rooms out."""

    def __init__(self, path: str, max_lines: int, max_bytes: int) -> None:
        self.db = connect(path)
        self.max_lines = max_lines
        self.max_bytes = max_bytes
        self.touched: set[str] = set()
        (self.size,) = self.db.execute("SELECT COALESCE(SUM(LENGTH(line)), 0) FROM lines").fetchone()
        self.written = 0

    def write(self, records: list[tuple[object, ...]]) -> None:
        rows: list[tuple[str, float, bytes]] = []
        db = self.db
        db.execute("BEGIN")
        try:
            for record in records:
                if record[0] == "B":
                    _, key, ts, payload = record
                    try:
                        _, _, events = decode(payload)  # type: ignore[arg-type]
                    except UNREADABLE_PAYLOAD:
                        continue
                    rows.extend((str(key), float(ts), line) for ev in events  # type: ignore[arg-type]
                                if (line := format_line(ev)))
                    self.touched.add(str(key))
                elif record[0] == "R":
                    if rows:
                        self._insert(rows)
                        rows = []
                    _, key, lines = record
                    self._delete("DELETE FROM lines WHERE room = ? RETURNING LENGTH(line)", (key,))
                    self._insert([(str(key), float(ts), bytes(line)) for ts, line in lines])  # type: ignore[union-attr]
            if rows:
                self._insert(rows)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def _insert(self, rows: list[tuple[str, float, bytes]]) -> None:
        self.db.executemany("INSERT INTO lines(room, ts, line) VALUES (?, ?, ?)", rows)
        self.size += sum(len(r[2]) for r in rows)
        self.written += len(rows)

    def _delete(self, sql: str, args: tuple[object, ...]) -> None:
        self.size -= sum(n for (n,) in self.db.execute(sql, args).fetchall())

    def trim(self) -> None:
        db = self.db
        db.execute("BEGIN")
        for key in self.touched:
            self._delete("DELETE FROM lines WHERE room = ? AND id <= (SELECT id FROM lines WHERE room = ? "
                          "ORDER BY id DESC LIMIT 1 OFFSET ?) RETURNING LENGTH(line)", (key, key, self.max_lines))
        self.touched.clear()
        if self.size > self.max_bytes:
            # The oldest lines go first, whatever their room, until the rest fits.
            excess, cutoff = self.size - self.max_bytes, None
            for row_id, n in db.execute("SELECT id, LENGTH(line) FROM lines ORDER BY id"):
                excess -= n
                cutoff = row_id
                if excess <= 0:
                    break
            if cutoff is not None:
                self._delete("DELETE FROM lines WHERE id <= ? RETURNING LENGTH(line)", (cutoff,))
        db.execute("COMMIT")

    def close(self) -> None:
        self.db.close()


def run_writer(path: str, fd: int, max_lines: int, max_bytes: int) -> int:
    """The writer process: read records until the pipe closes, writing them in batches."""
    # The cluster's stop signals are for the broker; the writer stops when the broker's pipe closes.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    store = Store(path, max_lines, max_bytes)
    buf = b""
    records: list[tuple[object, ...]] = []
    last_flush = last_trim = time.monotonic()
    ended = False
    while not ended:
        ready, _, _ = select.select([fd], [], [], FLUSH_EVERY)
        if ready:
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                ended = True
            buf += chunk
            while len(buf) >= LENGTH.size:
                (n,) = LENGTH.unpack_from(buf)
                if len(buf) < LENGTH.size + n:
                    break
                records.append(marshal.loads(buf[LENGTH.size:LENGTH.size + n]))
                buf = buf[LENGTH.size + n:]
        now = time.monotonic()
        if records and (ended or now - last_flush >= FLUSH_EVERY):
            store.write(records)
            records = []
            last_flush = now
        if ended or now - last_trim >= TRIM_EVERY:
            store.trim()
            last_trim = now
    store.close()
    return 0
