"""Every file the server writes: where the runtime directory is, what is in it, and how it is written.

The runtime directory holds the bus sockets, the pid file, the shared stats
file, the running configuration and the answers to the `chatcluster`
commands. This module resolves it, checks that nobody else could have put
anything in it (the rule OpenSSH's StrictModes applies to ~/.ssh), and names
every file in it. Every regular file the server writes goes through
`atomic_write` (a fresh `mkstemp` name in the target directory, then a rename)
or `create_exclusive` (`O_EXCL | O_NOFOLLOW`), so a symlink planted at any
name, in the runtime directory or beside a `--pid-file` in a shared
directory, is replaced or refused, never followed. This module knows files
and directories; it starts no process and opens no socket.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat
import tempfile
from collections.abc import Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .config import Config

# -- the names in the runtime directory -------------------------------------------------------

PID_FILE = "chatcluster.pid"
STATS = "stats"  # the shared memory-mapped stats file (stats.py)
LIVE_CONFIG = "config.json"  # the running configuration, read by the workers on HUP
RELOAD_RESULT = "reload.json"  # the outcome of the last reload, for `chatcluster reload`
SCALE_REQUEST = "scale"  # `chatcluster scale N` writes N here before sending USR1
BUS_IN = "bus-in"  # the broker's ipc:// sockets (bus.py binds them)
BUS_OUT = "bus-out"
BUS_SOCKETS = (BUS_IN, BUS_OUT)
UPGRADE_STATE = "upgrade-state.json"  # the supervisor's state across an upgrade's exec
UPGRADE_REQUEST = "upgrade-request"  # `chatcluster upgrade` puts its token here before sending USR2
UPGRADE_RESULT = "upgrade.json"
UPGRADE_CHECK_LOG = "upgrade-check.log"
UPGRADE_FILES = (UPGRADE_STATE, UPGRADE_REQUEST, UPGRADE_RESULT, UPGRADE_CHECK_LOG)
HANDOFF_PREFIX = "handoff-"  # + the old worker's id: the socket an upgrade's new worker listens on (handoff.py)
# Everything the supervisor removes at exit (the pid file is removed only if it is still ours).
MULTIHOST_STATUS = "multihost.json"  # a multi-host bus process's view of NATS and the hosts, for `status`
RUNTIME_FILES = (*BUS_SOCKETS, LIVE_CONFIG, STATS, SCALE_REQUEST, RELOAD_RESULT, *UPGRADE_FILES, MULTIHOST_STATUS)
# The longest path a Unix socket address takes (108 bytes with the NUL), with room to spare.
MAX_SOCKET_PATH = 100
# atomic_write's temporary names: ".NAME.XXXXXXXX.tmp", unpredictable, in the target directory.
TMP_SUFFIX = ".tmp"

PID_MODE = 0o644  # a pid file may be read by anyone (monitoring); everything else is private


class StartupError(Exception):
    """The cluster cannot start; the message names the problem and the fix."""


# -- writing files --------------------------------------------------------------------------------


def atomic_write(path: str, data: bytes | str, mode: int = 0o600, fsync: bool = True) -> None:
    """Replace `path` with `data` all at once: a reader sees the old file or the new one, never a mix.

    The data goes to a fresh file from `tempfile.mkstemp` in the same directory
    (`O_CREAT | O_EXCL | O_NOFOLLOW`, an unpredictable name), which is then renamed
    over `path`. A rename replaces a symlink at `path` instead of following it, so a
    link planted at the name or at any name beside it never redirects the write.
    With `fsync` the data reaches the disk before the rename and the rename before
    the return, so a machine crash leaves the old file or the new one, not an empty
    or torn one; results read back within seconds do without.
    """
    directory, name = os.path.split(os.path.abspath(path))
    payload = data.encode() if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=TMP_SUFFIX, dir=directory)
    try:
        try:
            if mode != 0o600:
                os.fchmod(fd, mode)
            view = memoryview(payload)
            while view:
                view = view[os.write(fd, view):]
            if fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if fsync:
        fsync_dir(directory)


def fsync_dir(directory: str) -> None:
    """Make a rename in `directory` durable; a no-op where directories cannot be synced."""
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def create_exclusive(path: str, mode: int = 0o600, flags: int = os.O_WRONLY) -> int:
    """A new, empty file at `path`, open with `flags`; whatever had that name is removed first.

    For files that are written in place rather than replaced (the memory-mapped
    stats file, a log a child writes to). `O_EXCL | O_NOFOLLOW` make the open fail
    rather than follow a symlink planted between the unlink and the open.
    """
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    return os.open(path, flags | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)


def read_small(path: str, limit: int = 1 << 20) -> bytes | None:
    """The contents of the regular file at `path` (not through a symlink, never blocking on a FIFO), or None."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        chunks = []
        left = limit
        while left > 0:
            chunk = os.read(fd, min(left, 65536))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)
    except OSError:
        return None
    finally:
        os.close(fd)


def remove_temporaries(directory: str) -> None:
    """Remove what an interrupted `atomic_write` of one of our files left in `directory`."""
    prefixes = tuple(f".{name}." for name in (*RUNTIME_FILES, PID_FILE))
    try:
        names = os.listdir(directory)
    except OSError:
        return
    for name in names:
        if name.startswith(prefixes) and name.endswith(TMP_SUFFIX):
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(directory, name))


def remove_handoff_sockets(directory: str) -> None:
    """Remove the handoff sockets of an upgrade's new workers that were killed before they could."""
    try:
        names = os.listdir(directory)
    except OSError:
        return
    for name in names:
        if name.startswith(HANDOFF_PREFIX):
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(directory, name))


# -- pid files ------------------------------------------------------------------------------------


def write_pid_file(path: str, pid: int) -> None:
    atomic_write(path, f"{pid}\n", mode=PID_MODE)


def read_pid(path: str) -> int | None:
    """The pid written in `path`, or None when there is no such file or it holds no pid."""
    data = read_small(path, 64)
    if data is None:
        return None
    try:
        pid = int(data.strip())
    except ValueError:
        return None
    return pid if pid > 0 else None


def running_pid(pid_file: str) -> int | None:
    """The pid in `pid_file` if that process is alive and is a chatcluster, else None."""
    pid = read_pid(pid_file)
    if pid is None:
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            if b"chatcluster" not in fh.read():
                return None  # a stale pid file whose pid now belongs to another program
    except OSError:
        pass  # /proc hidden from us (hidepid): trust the pid file
    return pid


def remove_pid_file(path: str, pid: int) -> None:
    """Remove `path` if it still names `pid`: a pid file another cluster has taken over stays."""
    if read_pid(path) == pid:
        with contextlib.suppress(OSError):
            os.unlink(path)


# -- the runtime directory ------------------------------------------------------------------------


def resolve_runtime_dir(cfg: Config, env: Mapping[str, str] | None = None) -> str:
    """--runtime-dir, else systemd's $RUNTIME_DIRECTORY, else a per-user, per-port private directory."""
    env = os.environ if env is None else env
    if cfg.runtime_dir:
        return os.path.abspath(str(cfg.runtime_dir))
    if env.get("RUNTIME_DIRECTORY"):
        return env["RUNTIME_DIRECTORY"].split(":")[0]
    if env.get("XDG_RUNTIME_DIR"):
        return os.path.join(env["XDG_RUNTIME_DIR"], f"chatcluster-{cfg.port}")
    return f"/tmp/chatcluster-{os.getuid()}-{cfg.port}"


def default_pid_file(runtime_dir: str) -> str:
    return os.path.join(runtime_dir, PID_FILE)


def prepare_runtime_dir(path: str) -> bool:
    """Create the private runtime directory, or check that an existing one is ours and private.

    Returns True when it was created here (and so may be removed at exit).
    """
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise StartupError(f"runtime directory {path} cannot be created: {parent} does not exist; "
                           f"create it or choose another directory with --runtime-dir")
    if len(os.path.join(path, BUS_OUT)) > MAX_SOCKET_PATH:
        raise StartupError(f"runtime directory {path} is too long for Unix socket paths (max about 90 "
                           f"characters); choose a shorter one with --runtime-dir")
    created = False
    try:
        os.mkdir(path, 0o700)
        created = True
    except FileExistsError:
        pass
    except PermissionError:
        raise StartupError(f"runtime directory {path} cannot be created: permission denied in {parent}; "
                           f"choose a writable location with --runtime-dir") from None
    check_runtime_dir(path)
    return created


def check_runtime_dir(path: str) -> None:
    """Refuse a runtime directory that anyone but us could have written to; make it 0700 otherwise.

    Anything in a directory others could write to may have been planted (a symlink named
    `stats` pointing at a file of ours), so such a directory is refused rather than adopted:
    tightening its mode now would not remove what is already in it.
    """
    # lstat, not stat: in a shared /tmp a symlink planted by someone else must not be followed.
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        raise StartupError(f"runtime directory {path} exists but is not a directory (it is a symbolic link to "
                           f"{os.readlink(path)}); pass the directory itself with --runtime-dir")
    if not stat.S_ISDIR(st.st_mode):
        raise StartupError(f"runtime directory {path} exists but is not a directory; remove it or "
                           f"choose another with --runtime-dir")
    if st.st_uid != os.getuid():
        raise StartupError(f"runtime directory {path} belongs to another user (uid {st.st_uid}); "
                           f"choose another with --runtime-dir")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise StartupError(f"runtime directory {path} is writable by others (mode "
                           f"{stat.S_IMODE(st.st_mode):04o}), so its files cannot be trusted; remove it "
                           f"(chatcluster creates it with mode 0700) or choose another with --runtime-dir")
    if st.st_mode & 0o077:
        os.chmod(path, 0o700)  # readable by others, never writable: nothing can have been planted
    if not os.access(path, os.W_OK | os.X_OK):
        raise StartupError(f"runtime directory {path} is not writable; fix its permissions or choose "
                           f"another with --runtime-dir")


def lock_runtime_dir(path: str) -> int:
    """Hold the runtime directory for this cluster: the returned descriptor carries an exclusive flock.

    Two `chatcluster start` at the same moment both pass the pid-file check (neither has
    written its pid file yet); the lock is what keeps the second out. It lives as long as the
    descriptor, so it goes with the supervisor however it ends (never stale), and an upgrade
    keeps it across its exec. Children do not inherit it.
    """
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        pid = lock_holder(path) or running_pid(default_pid_file(path))
        who = f" (supervisor pid {pid})" if pid is not None else ""
        raise StartupError(f"another chatcluster is running or starting in the runtime directory {path}{who}; "
                           f"stop it with `chatcluster stop --runtime-dir {path}`, or choose another "
                           f"--runtime-dir") from None
    return fd


def lock_holder(path: str) -> int | None:
    """The pid holding the flock on `path`, from /proc/locks (None if it cannot be told)."""
    try:
        st = os.stat(path)
        with open("/proc/locks") as fh:
            table = fh.read()
    except OSError:
        return None
    where = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    for line in table.splitlines():
        fields = line.split()
        # "1: FLOCK  ADVISORY  WRITE 4242 00:2d:1234 0 EOF"
        if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == where and fields[4].isdigit():
            return int(fields[4])
    return None


# SQLite's companions of a database file: what it writes beside it, and replays from on open.
SQLITE_COMPANIONS = ("-wal", "-shm", "-journal")


def data_file_problem(path: str, setting: str) -> str | None:
    """Why the data file at `path` (the value of `setting`) cannot be trusted, or None.

    What is read back from it goes to clients as it is (a room's history), so nobody but
    us may have been able to write it or to replace it: the rule OpenSSH applies to
    ~/.ssh. The file and SQLite's companions beside it must be regular files (not
    symbolic links), ours, and not writable by group or others; its directory may be
    reached through symbolic links (systemd's StateDirectory= under DynamicUser= is one)
    but must belong to us or root and be writable by nobody else, unless it has the
    sticky bit (like /tmp), where nobody can replace a file of ours.
    """
    parent = os.path.dirname(path)
    try:
        st = os.stat(parent)
    except OSError as exc:
        return (f"{setting} {path}: the directory {parent} cannot be used ({exc.strerror}); create it or "
                f"choose another path")
    if st.st_uid not in (0, os.getuid()):
        return (f"{setting} {path}: the directory {parent} belongs to another user (uid {st.st_uid}), who could "
                f"replace the file; use a directory of your own (for example /var/lib/chatcluster)")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not st.st_mode & stat.S_ISVTX:
        return (f"{setting} {path}: the directory {parent} is writable by others (mode "
                f"{stat.S_IMODE(st.st_mode):04o}), who could replace the file; use a directory only you can "
                f"write to (for example /var/lib/chatcluster)")
    for name in (path, *(path + suffix for suffix in SQLITE_COMPANIONS)):
        what = f"{setting} {path}" if name == path else f"{setting} {path}: {name}"
        try:
            st = os.lstat(name)
        except FileNotFoundError:
            continue
        except OSError as exc:
            return f"{what} cannot be checked ({exc.strerror})"
        if stat.S_ISLNK(st.st_mode):
            return f"{what} is a symbolic link; name the file itself (a link could lead anywhere)"
        if not stat.S_ISREG(st.st_mode):
            return f"{what} is not a regular file; remove it or choose another path"
        if st.st_uid != os.getuid():
            return (f"{what} belongs to another user (uid {st.st_uid}), so what it holds cannot be trusted; "
                    f"remove it (chatcluster creates it) or choose another path")
        if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            return (f"{what} is writable by others (mode {stat.S_IMODE(st.st_mode):04o}), so what it holds "
                    f"cannot be trusted; make it private (chmod 600) or remove it")
    return None


def create_private(path: str) -> None:
    """An empty file at `path`, mode 0600, unless one is there already; never through a symlink.

    SQLite would create a database with mode 0644 (minus the umask) and gives its -wal and
    -shm the database's mode: created here first, all three are private.
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        return
    os.close(fd)


def missing_files(runtime_dir: str, names: tuple[str, ...]) -> list[str]:
    """Which of `names` are no longer in `runtime_dir` (a tmp cleaner, an operator's `rm`)."""
    gone = []
    for name in names:
        try:
            os.lstat(os.path.join(runtime_dir, name))
        except FileNotFoundError:
            gone.append(name)
        except OSError:
            pass
    return gone
