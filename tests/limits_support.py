"""Pieces shared by the limit and hostile-client tests: clients that read on a
thread, raw sockets with chosen buffer sizes, bulk chat traffic, and a watch on
the workers' memory.

A chat client that stops reading while others chat is exactly what these
tests provoke on purpose, so every well-behaved client here reads all the
time on its own thread (`Reader`): the tests check what it received, never
that it kept up with a wall clock.
"""

from __future__ import annotations

import re
import socket
import threading
import time
from collections.abc import Callable

import psutil
from conftest import line_matching, skip_greeting

WAIT = 15.0
_NUMBERED = re.compile(r"(\S+): (\S+) (\d{8}) ")


class Reader:
    """Drains a socket on a thread and keeps every complete line (str, no CRLF)."""

    def __init__(self, sock: socket.socket, pending: bytes = b"", name: str = "") -> None:
        self.sock = sock
        self.name = name
        self.buf = pending
        self.lines: list[str] = []
        self.nbytes = 0
        # Highest number seen per (sender, tag) among chat_lines() traffic, for pump().
        self.progress: dict[tuple[str, str], int] = {}
        self.closed = False
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        self.sock.settimeout(0.2)
        while not self._stop:
            try:
                chunk = self.sock.recv(1 << 18)
            except TimeoutError:
                continue
            except OSError:
                chunk = b""
            if not chunk:
                self.closed = True
                return
            self.nbytes += len(chunk)
            self.buf += chunk
            *complete, self.buf = self.buf.split(b"\r\n")
            for part in complete:
                line = part.decode("utf-8", "replace")
                self.lines.append(line)
                m = _NUMBERED.match(line)
                if m:
                    self.progress[(m.group(1), m.group(2))] = int(m.group(3))

    def wait(self, cond: Callable[[list[str]], object], timeout: float = WAIT, what: str = "condition") -> object:
        deadline = time.monotonic() + timeout
        while True:
            value = cond(self.lines)
            if value:
                return value
            if self.closed and not cond(self.lines):
                raise AssertionError(f"{self.name}: connection closed before {what}; last lines {self.lines[-5:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name}: timed out after {timeout:.0f} s waiting for {what}; "
                                     f"last lines {self.lines[-5:]}")
            time.sleep(0.01)

    def wait_line(self, pattern: str, timeout: float = WAIT) -> re.Match[str]:
        return self.wait(line_matching(pattern), timeout, f"a line matching {pattern!r}")  # type: ignore[return-value]

    def wait_closed(self, timeout: float = WAIT) -> None:
        deadline = time.monotonic() + timeout
        while not self.closed:
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name}: connection still open after {timeout:.0f} s; "
                                     f"last lines {self.lines[-5:]}")
            time.sleep(0.01)

    def stop(self) -> None:
        self._stop = True
        self._thread.join(5)


def raw_socket(port: int, rcvbuf: int | None = None, source: str | None = None,
               greeting: bool = False) -> socket.socket:
    """A connected client socket; `rcvbuf` is set before connecting so the window stays small.

    The server's telnet greeting is taken off first unless `greeting` (these clients speak no
    telnet; what the server says after it is what they check).
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    if source is not None:
        sock.bind((source, 0))
    sock.settimeout(WAIT)
    sock.connect(("127.0.0.1", port))
    if not greeting:
        skip_greeting(sock)
        sock.settimeout(WAIT)
    return sock


def recv_until(sock: socket.socket, marker: bytes, timeout: float = WAIT) -> bytes:
    """Read until `marker` has arrived; everything read is returned."""
    deadline = time.monotonic() + timeout
    data = b""
    while marker not in data:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"no {marker!r} within {timeout:.0f} s; got {data[-200:]!r}")
        sock.settimeout(left)
        chunk = sock.recv(65536)
        if not chunk:
            raise AssertionError(f"connection closed before {marker!r}; got {data[-200:]!r}")
        data += chunk
    return data


def read_to_end(sock: socket.socket, timeout: float = WAIT) -> tuple[bytes, bool]:
    """Everything until the server closes: (data, True), or (data, False) at the deadline."""
    deadline = time.monotonic() + timeout
    parts: list[bytes] = []
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return b"".join(parts), False
        sock.settimeout(min(left, 0.5))
        try:
            chunk = sock.recv(1 << 18)
        except TimeoutError:
            continue
        except ConnectionResetError:
            return b"".join(parts), True
        if not chunk:
            return b"".join(parts), True
        parts.append(chunk)


def chat_lines(tag: str, count: int, size: int = 200) -> list[bytes]:
    """`count` numbered lines of about `size` bytes, each ending in CRLF."""
    pad = "x" * max(0, size - len(tag) - 12)
    return [f"{tag} {i:08d} {pad}\r\n".encode() for i in range(count)]


def numbers_from(lines: list[str], sender: str, tag: str) -> list[int]:
    """The numbers of `tag` lines from `sender`, in the order they were received."""
    rx = re.compile(rf"{re.escape(sender)}: {re.escape(tag)} (\d{{8}}) x*")
    return [int(m.group(1)) for m in map(rx.fullmatch, lines) if m]


def pump(sock: socket.socket, sender: str, tag: str, count: int, size: int, to: Reader,
         window: int = 256, timeout: float = 120.0) -> threading.Thread:
    """Send `count` chat_lines() as fast as `to` receives them, at most `window` lines ahead.

    The window keeps a test's well-behaved readers from falling behind a sender
    that is faster than they are (which max_sendq_bytes rightly punishes).
    """
    lines = chat_lines(tag, count, size)
    errors: list[BaseException] = []

    def run() -> None:
        deadline = time.monotonic() + timeout
        try:
            for start in range(0, count, window):
                while to.progress.get((sender, tag), -1) < start - window:
                    if to.closed or time.monotonic() > deadline:
                        return
                    time.sleep(0.001)
                sock.sendall(b"".join(lines[start:start + window]))
        except OSError as exc:
            errors.append(exc)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def send_in_thread(sock: socket.socket, data: bytes) -> threading.Thread:
    def run() -> None:
        try:
            sock.sendall(data)
        except OSError:
            pass

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


class MemoryWatch:
    """Samples the summed RSS of some processes on a thread and keeps the peak."""

    def __init__(self, pids: list[int], every: float = 0.02) -> None:
        self.procs = [psutil.Process(pid) for pid in pids]
        self.baseline = self.rss()
        self.peak = self.baseline
        self.every = every
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def rss(self) -> int:
        total = 0
        for p in self.procs:
            try:
                total += p.memory_info().rss
            except psutil.Error:
                pass
        return total

    def _run(self) -> None:
        while not self._stop:
            self.peak = max(self.peak, self.rss())
            time.sleep(self.every)

    def stop(self) -> int:
        """Stop sampling; returns the peak growth over the baseline, in bytes."""
        self._stop = True
        self._thread.join(5)
        self.peak = max(self.peak, self.rss())
        return self.peak - self.baseline
