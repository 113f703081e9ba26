"""The history on disk: a real writer process, a real SQLite file, read back as a new broker would.

The broker's end (`histdb.Writer`) never blocks; the writer process writes in
batches, trims each room and the whole file, and writes what it has when the
pipe closes. Nothing here touches the bus: the records are the bus bytes of
room batches, made with the real wire encoder.
"""

from __future__ import annotations

import os
import sqlite3
import time
from pathlib import Path

import pytest

from chatcluster import events as E
from chatcluster import histdb, wire


def batch(*lines: str, nick: bytes = b"ann") -> bytes:
    return wire.encode("w1", 1, [E.Chat(1, line.encode(), nick) for line in lines], "#h")


def write(path: str, records: list[tuple[str, object]], max_lines: int = 50, max_bytes: int = 1 << 20) -> None:
    writer = histdb.Writer.start(path, max_lines, max_bytes)
    for kind, args in records:
        if kind == "batch":
            writer.batch(*args)  # type: ignore[misc]
        else:
            writer.replace(*args)  # type: ignore[misc]
        writer.flush()
    writer.close(timeout=10.0)
    assert writer.pending is False


def test_batches_are_written_and_read_back_in_order_with_their_times(tmp_path: Path) -> None:
    db = str(tmp_path / "h.db")
    write(db, [("batch", ("#h", 100.0, batch("one", "two"))), ("batch", ("#x", 101.0, batch("elsewhere"))),
               ("batch", ("#h", 102.0, batch("three")))])
    rooms = dict(histdb.load(db, 50))
    assert rooms["#h"] == [(100.0, b"ann: one\r\n"), (100.0, b"ann: two\r\n"), (102.0, b"ann: three\r\n")]
    assert rooms["#x"] == [(101.0, b"ann: elsewhere\r\n")]


def test_each_room_keeps_its_last_lines_and_a_reader_asks_for_fewer(tmp_path: Path) -> None:
    db = str(tmp_path / "h.db")
    write(db, [("batch", ("#h", float(i), batch(f"l{i}"))) for i in range(8)], max_lines=5)
    assert [line for _, line in dict(histdb.load(db, 50))["#h"]] == [b"ann: l%d\r\n" % i for i in range(3, 8)]
    assert [line for _, line in dict(histdb.load(db, 2))["#h"]] == [b"ann: l6\r\n", b"ann: l7\r\n"]


def test_the_file_is_trimmed_to_its_byte_budget_oldest_first(tmp_path: Path) -> None:
    db = str(tmp_path / "h.db")
    records = [("batch", (f"#r{i}", float(i), batch("x" * 93))) for i in range(20)]  # 100 bytes a line
    write(db, records, max_lines=50, max_bytes=1000)
    rooms = dict(histdb.load(db, 50))
    assert sorted(rooms) == [f"#r{i}" for i in range(10, 20)]


def test_a_room_can_be_replaced_by_a_copy(tmp_path: Path) -> None:
    db = str(tmp_path / "h.db")
    write(db, [("batch", ("#h", 1.0, batch("stale"))), ("replace", ("#h", [(2.0, b"a: fresh\r\n")]))])
    assert dict(histdb.load(db, 50))["#h"] == [(2.0, b"a: fresh\r\n")]


def test_history_accumulates_across_writers_as_across_restarts(tmp_path: Path) -> None:
    db = str(tmp_path / "h.db")
    write(db, [("batch", ("#h", 1.0, batch("first run")))])
    write(db, [("batch", ("#h", 2.0, batch("second run")))])
    assert [line for _, line in dict(histdb.load(db, 50))["#h"]] == [b"ann: first run\r\n", b"ann: second run\r\n"]
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_a_missing_file_is_no_history_and_a_bad_path_a_clear_error(tmp_path: Path) -> None:
    assert histdb.load(str(tmp_path / "none.db"), 50) == []
    assert "is a directory" in (histdb.check_path(str(tmp_path)) or "")
    assert "does not exist" in (histdb.check_path(str(tmp_path / "no" / "h.db")) or "")
    with pytest.raises(SystemExit, match="does not exist"):
        histdb.Writer.start(str(tmp_path / "no" / "h.db"), 50, 1 << 20)
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"this is not a database" * 100)
    with pytest.raises(SystemExit, match="fix or remove the file"):
        histdb.load(str(garbage), 50)


def test_the_broker_end_never_blocks_on_a_writer_that_does_not_read(tmp_path: Path) -> None:
    r, w = os.pipe2(os.O_CLOEXEC)
    os.set_blocking(w, False)
    writer = histdb.Writer(pid=os.getpid(), fd=w)  # nobody reads r: the pipe fills up
    payload = batch("y" * 400)
    start = time.monotonic()
    for i in range(2000):
        writer.batch("#h", float(i), payload)
        writer.flush()
    assert time.monotonic() - start < 5.0
    assert writer.pending  # the rest waits in the broker, bounded (histdb.MAX_PENDING)
    assert writer.queued <= histdb.MAX_PENDING
    os.close(r)
    writer.flush()
    assert writer.broken  # the reader is gone: nothing more is queued
    os.close(w)


def test_a_writer_killed_in_the_middle_of_a_record_is_replaced_and_the_next_one_gets_whole_records(
    tmp_path: Path,
) -> None:
    # The pipe takes 1 MiB: a bigger record is handed over in parts. When the writer dies after
    # part of one, the rest of that record must not reach its successor (which would read it as
    # garbage and die in turn); the records after it must.
    import signal

    db = str(tmp_path / "h.db")
    writer = histdb.Writer.start(db, 50, 1 << 30)
    first = writer.pid
    os.kill(first, signal.SIGSTOP)  # reads nothing: the big record stays half in the pipe
    writer.batch("#big", 1.0, batch("z" * 900, nick=b"big"))
    # Random text, so that the encoding cannot make it small: 3 MB, three times what the pipe takes.
    huge = wire.encode("w1", 2, [E.Chat(1, b"q" + os.urandom(500).hex().encode(), b"big") for _ in range(3000)],
                       "#big")
    writer.batch("#big", 2.0, huge)
    writer.flush()
    assert 0 < writer.head_done < len(writer.queue[0])  # part of the huge record went out
    os.kill(first, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while writer.pid == first and time.monotonic() < deadline:
        writer.flush()  # EPIPE once the writer is gone: a new one takes over
        time.sleep(0.01)
    assert writer.pid != first and not writer.broken
    writer.batch("#h", 3.0, batch("after the new writer"))
    while writer.pending and time.monotonic() < deadline:
        writer.flush()
        time.sleep(0.01)
    second = writer.pid
    writer.close(timeout=10.0)
    rooms = dict(histdb.load(db, 50))
    assert rooms["#h"] == [(3.0, b"ann: after the new writer\r\n")]
    assert not any(line.startswith(b"big: q") for _, line in rooms.get("#big", []))
    with pytest.raises(ChildProcessError):
        os.waitpid(first, os.WNOHANG)  # reaped, not left a zombie
    assert second != first
