"""The systemd notification protocol, without libsystemd.

A service started with `Type=notify` tells systemd how it is doing by sending
datagrams of `KEY=VALUE` lines to the AF_UNIX socket named in `$NOTIFY_SOCKET`
(a filesystem path, or `@name` for the abstract namespace): `READY=1` when
the port is served, `RELOADING=1` and `STOPPING=1` around reloads and stops,
`STATUS=` for `systemctl status`, `WATCHDOG=1` as a keep-alive, and
`MAINPID=` when another process takes over as the main one (an upgraded
supervisor). Outside systemd every call is a cheap no-op returning False, and
no call ever raises because the socket is missing or broken: the server must
run the same with or without a service manager. This module only speaks the
protocol; when to say what is the supervisor's business.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping, MutableMapping

__all__ = [
    "notify",
    "watchdog_interval",
    "under_systemd",
    "logs_to_journal",
    "ready",
    "reloading",
    "stopping",
    "status",
    "watchdog",
    "claim_watchdog",
]

log = logging.getLogger(__name__)

# systemd reads the socket promptly; the bound only keeps a wedged manager
# from wedging the supervisor's main loop along with it.
_SEND_TIMEOUT = 1.0


def _address(value: str) -> str | None:
    """Turn `$NOTIFY_SOCKET` into a socket address; None when unusable."""
    if value.startswith("@"):
        # Linux abstract namespace: a leading NUL byte instead of the '@'.
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    # Newer systemd also speaks vsock: ("vsock:CID:PORT") to VMs; not needed here.
    return None


def notify(*lines: str, env: Mapping[str, str] | None = None) -> bool:
    """Send `lines` as one datagram to `$NOTIFY_SOCKET`; True when it was sent.

    Returns False, without raising, when the variable is unset or the socket
    cannot be reached. A fresh socket is used for every call: it costs one
    syscall pair at the rate systemd messages are sent, and leaves no fd to be
    inherited by forked workers.
    """
    for line in lines:
        if "\n" in line:
            # A newline would smuggle a second assignment into the datagram.
            raise ValueError(f"sd_notify line must not contain a newline: {line!r}")
    environ = os.environ if env is None else env
    target = environ.get("NOTIFY_SOCKET", "")
    if not target or not lines:
        return False
    address = _address(target)
    if address is None:
        log.debug("NOTIFY_SOCKET=%r is not a path or an abstract name; not notifying", target)
        return False
    payload = "\n".join(lines).encode("utf-8")
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.settimeout(_SEND_TIMEOUT)
            sock.sendto(payload, address)
    except OSError as exc:
        log.debug("sd_notify to %r failed: %s", target, exc)
        return False
    return True


def watchdog_interval(env: Mapping[str, str] | None = None) -> float | None:
    """Seconds between `WATCHDOG=1` pings, or None when this process must not ping.

    systemd sets `WATCHDOG_USEC` (the timeout) and `WATCHDOG_PID` (the one
    process it is meant for). Pinging at half the timeout is what
    sd_watchdog_enabled(3) recommends. Forked workers inherit the variables
    but not the pid, so they get None here.
    """
    environ = os.environ if env is None else env
    try:
        usec = int(environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    pid_text = environ.get("WATCHDOG_PID")
    if pid_text is not None:
        try:
            if int(pid_text) != os.getpid():
                return None
        except ValueError:
            return None
    return usec / 2 / 1_000_000


def under_systemd(env: Mapping[str, str] | None = None) -> bool:
    """True when started by systemd (journald stdout, a unit invocation, or a notify socket)."""
    environ = os.environ if env is None else env
    return any(environ.get(key) for key in ("JOURNAL_STREAM", "INVOCATION_ID", "NOTIFY_SOCKET"))


def logs_to_journal(env: Mapping[str, str] | None = None, fd: int = 2) -> bool:
    """True when `fd` (stderr) is the journal stream systemd connected, so lines need no timestamps.

    systemd puts the device and inode of that stream in `$JOURNAL_STREAM` ("DEV:INODE");
    comparing them with the descriptor (as sd_journal_stream_fd(3) suggests) tells a
    stderr that still goes to journald from one a wrapper redirected to a file.
    """
    environ = os.environ if env is None else env
    dev, sep, ino = environ.get("JOURNAL_STREAM", "").partition(":")
    if not sep:
        return False
    try:
        st = os.fstat(fd)
        return (st.st_dev, st.st_ino) == (int(dev), int(ino))
    except (OSError, ValueError):
        return False


def claim_watchdog(env: MutableMapping[str, str] | None = None) -> None:
    """Make this process the one the watchdog variables are meant for.

    A supervisor started by `chatcluster upgrade` inherits `WATCHDOG_PID` of
    the supervisor it replaces; without this it would never ping and systemd
    would kill the service one `WatchdogSec=` after the upgrade. Call it only
    in a process that is (about to be announced as) the main process.
    """
    environ = os.environ if env is None else env
    if "WATCHDOG_USEC" in environ:
        environ["WATCHDOG_PID"] = str(os.getpid())


def _status_line(text: str) -> str:
    return "STATUS=" + " ".join(text.splitlines())


def ready(
    status: str | None = None, *, mainpid: int | None = None, env: Mapping[str, str] | None = None
) -> bool:
    """`READY=1`, optionally with a status text and a new main pid (after an upgrade)."""
    lines = ["READY=1"]
    if mainpid is not None:
        lines.append(f"MAINPID={mainpid}")
    if status is not None:
        lines.append(_status_line(status))
    return notify(*lines, env=env)


def reloading(status: str | None = None, *, env: Mapping[str, str] | None = None) -> bool:
    """`RELOADING=1` with the CLOCK_MONOTONIC timestamp `Type=notify-reload` (systemd 253+) expects.

    Follow it with `ready()` once the new configuration is in force.
    """
    monotonic_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    lines = ["RELOADING=1", f"MONOTONIC_USEC={monotonic_usec}"]
    if status is not None:
        lines.append(_status_line(status))
    return notify(*lines, env=env)


def stopping(status: str | None = None, *, env: Mapping[str, str] | None = None) -> bool:
    """`STOPPING=1`: the graceful stop has begun."""
    lines = ["STOPPING=1"]
    if status is not None:
        lines.append(_status_line(status))
    return notify(*lines, env=env)


def status(text: str, *, env: Mapping[str, str] | None = None) -> bool:
    """A one-line status for `systemctl status` (newlines become spaces)."""
    return notify(_status_line(text), env=env)


def watchdog(*, env: Mapping[str, str] | None = None) -> bool:
    """One keep-alive ping; send it every `watchdog_interval()` seconds."""
    return notify("WATCHDOG=1", env=env)
