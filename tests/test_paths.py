"""paths: every file the server writes is written whole, never through a link, in a directory only it controls.

Real files in a temporary directory; the end-to-end versions (a running
cluster among planted links) are in test_supervisor.py.
"""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path

import pytest

from chatcluster import paths


def test_atomic_write_creates_the_file_with_the_mode_asked_for(tmp_path: Path) -> None:
    paths.atomic_write(str(tmp_path / "a"), "one\n")
    paths.atomic_write(str(tmp_path / "b"), b"two\n", mode=0o644, fsync=False)
    assert (tmp_path / "a").read_text() == "one\n" and stat.S_IMODE(os.stat(tmp_path / "a").st_mode) == 0o600
    assert (tmp_path / "b").read_text() == "two\n" and stat.S_IMODE(os.stat(tmp_path / "b").st_mode) == 0o644
    assert sorted(os.listdir(tmp_path)) == ["a", "b"]


def test_atomic_write_replaces_a_symlink_instead_of_following_it(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    link = tmp_path / "chatcluster.pid"
    link.symlink_to(victim)
    (tmp_path / "chatcluster.pid.tmp").symlink_to(victim)  # the name a naive writer would use
    paths.atomic_write(str(link), "123\n")
    assert victim.read_text() == "precious\n"
    assert not link.is_symlink() and link.read_text() == "123\n"


def test_atomic_write_never_shows_a_partial_file(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    big, small = b"x" * (1 << 20), b"y" * 10
    paths.atomic_write(str(path), small)
    seen: set[bytes] = set()
    stop = threading.Event()

    def read() -> None:
        while not stop.is_set():
            seen.add(path.read_bytes())

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for i in range(40):
            paths.atomic_write(str(path), big if i % 2 else small, fsync=False)
    finally:
        stop.set()
        reader.join()
    assert seen <= {big, small}


def test_atomic_write_leaves_nothing_behind_when_it_fails(tmp_path: Path) -> None:
    (tmp_path / "taken").mkdir()
    with pytest.raises(OSError):
        paths.atomic_write(str(tmp_path / "taken"), "cannot replace a directory\n")
    assert os.listdir(tmp_path) == ["taken"]


def test_create_exclusive_replaces_whatever_had_the_name(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    (tmp_path / "stats").symlink_to(victim)
    fd = paths.create_exclusive(str(tmp_path / "stats"))
    os.write(fd, b"new")
    os.close(fd)
    assert victim.read_text() == "precious\n"
    assert (tmp_path / "stats").read_bytes() == b"new" and not (tmp_path / "stats").is_symlink()


def test_a_pid_file_is_read_neither_through_a_link_nor_from_a_fifo(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.write_text(f"{os.getpid()}\n")
    (tmp_path / "link").symlink_to(real)
    os.mkfifo(tmp_path / "fifo")  # an open for reading would block until a writer came
    assert paths.read_pid(str(real)) == os.getpid()
    assert paths.read_pid(str(tmp_path / "link")) is None
    assert paths.read_pid(str(tmp_path / "fifo")) is None
    assert paths.read_pid(str(tmp_path / "missing")) is None
    (tmp_path / "junk").write_text("not a pid\n")
    assert paths.read_pid(str(tmp_path / "junk")) is None


def test_a_pid_file_is_removed_only_while_it_names_us(tmp_path: Path) -> None:
    pid_file = tmp_path / "cc.pid"
    paths.write_pid_file(str(pid_file), 4242)
    paths.remove_pid_file(str(pid_file), 4343)  # another cluster's now
    assert pid_file.read_text() == "4242\n"
    paths.remove_pid_file(str(pid_file), 4242)
    assert not pid_file.exists()


@pytest.mark.parametrize("mode", [0o770, 0o707, 0o1777, 0o720])
def test_a_runtime_dir_others_could_write_to_is_refused(tmp_path: Path, mode: int) -> None:
    runtime_dir = tmp_path / "rt"
    runtime_dir.mkdir()
    os.chmod(runtime_dir, mode)
    with pytest.raises(paths.StartupError, match=rf"runtime directory {runtime_dir} is writable by others "
                                                 rf"\(mode {mode:04o}\)"):
        paths.prepare_runtime_dir(str(runtime_dir))
    assert stat.S_IMODE(os.stat(runtime_dir).st_mode) == mode


def test_a_runtime_dir_others_could_only_read_is_made_private(tmp_path: Path) -> None:
    runtime_dir = tmp_path / "rt"
    runtime_dir.mkdir()
    os.chmod(runtime_dir, 0o755)
    assert paths.prepare_runtime_dir(str(runtime_dir)) is False
    assert stat.S_IMODE(os.stat(runtime_dir).st_mode) == 0o700


def test_a_symlink_as_runtime_dir_is_refused(tmp_path: Path) -> None:
    (tmp_path / "elsewhere").mkdir(mode=0o700)
    (tmp_path / "rt").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(paths.StartupError, match="exists but is not a directory"):
        paths.prepare_runtime_dir(str(tmp_path / "rt"))


def test_leftovers_of_an_interrupted_write_are_removed_and_nothing_else(tmp_path: Path) -> None:
    for name in (".config.json.abc123.tmp", ".chatcluster.pid.x_9.tmp", ".other.abc.tmp", "keep.tmp", "stats"):
        (tmp_path / name).write_text("")
    paths.remove_temporaries(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == [".other.abc.tmp", "keep.tmp", "stats"]
