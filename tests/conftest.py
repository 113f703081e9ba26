"""Test harness: real clusters on free ports, real client sockets, waits with deadlines.

`cluster` starts `python -m chatcluster start` as a child in its own session,
waits until every worker is ready, and kills the whole session on teardown,
whatever happened. `Client` is a line-oriented socket client whose reads wait
for a condition until a deadline, never for a fixed time.
"""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

from chatcluster import stats as S

WAIT = 15.0  # generous: the suite must pass on a loaded 2-core machine
REPO = Path(__file__).resolve().parent.parent


PR_SET_PDEATHSIG = 1


def _stop_with_parent() -> None:
    """In the child, before exec: SIGTERM it when the test process dies.

    Teardown kills every cluster a test starts, but a test run that is itself killed
    (SIGKILL, a CI time-out) runs no teardown; without this the cluster would outlive it.
    """
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_for(cond: Callable[[], object], timeout: float = WAIT, what: str = "condition") -> object:
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.01)


def line_matching(pattern: str) -> Callable[[list[str]], re.Match[str] | None]:
    """A condition for Client.wait: the first received line that matches `pattern` whole."""
    rx = re.compile(pattern)

    def found(lines: list[str]) -> re.Match[str] | None:
        for line in lines:
            m = rx.fullmatch(line)
            if m:
                return m
        return None

    return found


# What a server negotiating telnet sends first (chatcluster.telnet.GREETING): a raw client
# such as nc shows it as nothing at all; Client leaves it out of the lines.
TELNET_GREETING = b"\xff\xfd\x00\r\x00"


def skip_greeting(sock: socket.socket, timeout: float = WAIT) -> bool:
    """Take the telnet greeting off the front of a freshly connected socket, if it is there.

    Nothing else is read: a socket that gets other bytes first (or is closed at once, like a
    connection shed when out of descriptors) is left as it was. True if the greeting was taken.
    """
    sock.settimeout(timeout)
    try:
        head = sock.recv(len(TELNET_GREETING), socket.MSG_PEEK | socket.MSG_WAITALL)
    except (TimeoutError, ConnectionResetError):
        return False
    if head != TELNET_GREETING:
        return False
    sock.recv(len(TELNET_GREETING))
    return True


def strip_greeting(output: bytes) -> bytes:
    """A command-line client's output (or a line of it) without the telnet greeting in front: nc
    passes it on as it came, telnet turns its CR NUL into a lone CR."""
    if output.startswith(TELNET_GREETING):
        output = output[len(TELNET_GREETING):]
    return output.lstrip(b"\r\x00") if output.startswith(b"\r") else output


class Client:
    """A chat client over a plain TCP socket. Lines are str, without CRLF."""

    at_start = True  # the telnet greeting, if any, has not been passed yet
    greeted = False  # the server sent the telnet greeting (it is not in `lines`)

    def __init__(self, port: int, host: str = "127.0.0.1", source: str | None = None) -> None:
        self.sock = socket.create_connection((host, port), timeout=WAIT,
                                             source_address=(source, 0) if source else None)
        self.buf = b""
        self.lines: list[str] = []  # every complete line received, in order
        self.closed = False
        self.nick = ""

    def send(self, data: bytes | str) -> None:
        self.sock.settimeout(WAIT)  # reads leave a short timeout behind; a large write may wait longer
        self.sock.sendall(data.encode() if isinstance(data, str) else data)

    def say(self, text: str) -> None:
        self.send(text + "\r\n")

    def _pump(self, timeout: float) -> None:
        if self.closed:
            return
        self.sock.settimeout(timeout)
        try:
            chunk = self.sock.recv(1 << 20)
        except TimeoutError:
            return
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            self.closed = True
            return
        self.buf += chunk
        if self.at_start:
            if TELNET_GREETING.startswith(self.buf):
                return  # the greeting may still be arriving
            self.at_start = False
            if self.buf.startswith(TELNET_GREETING):
                self.buf = self.buf[len(TELNET_GREETING) :]
                self.greeted = True
        *complete, self.buf = self.buf.split(b"\r\n")
        self.lines.extend(part.decode("utf-8", "replace") for part in complete)

    def wait(self, cond: Callable[[list[str]], object], timeout: float = WAIT, what: str = "") -> object:
        deadline = time.monotonic() + timeout
        while True:
            value = cond(self.lines)
            if value:
                return value
            left = deadline - time.monotonic()
            if left <= 0 or (self.closed and not cond(self.lines)):
                raise AssertionError(f"client {self.nick or '?'}: {what or 'condition'} not met "
                                     f"(closed={self.closed}); last lines: {self.lines[-8:]}")
            self._pump(min(left, 0.2))

    def wait_line(self, pattern: str, timeout: float = WAIT) -> re.Match[str]:
        return self.wait(line_matching(pattern), timeout, f"a line matching {pattern!r}")  # type: ignore[return-value]

    def welcome(self) -> str:
        m = self.wait_line(r"\*\*\* Welcome to chatcluster! Your nickname is (\S+)\. Type /help for commands\.")
        self.nick = m.group(1)
        return self.nick

    def wait_closed(self, timeout: float = WAIT) -> None:
        deadline = time.monotonic() + timeout
        while not self.closed:
            if time.monotonic() > deadline:
                raise AssertionError(f"client {self.nick}: connection still open; last lines {self.lines[-5:]}")
            self._pump(0.2)

    def drain_for_quiet(self) -> None:
        """Read what is already there without waiting for more."""
        self._pump(0.01)

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def server_side(self) -> tuple[str, int]:
        return self.sock.getsockname()


class Cluster:
    def __init__(self, workers: int = 4, extra: tuple[str, ...] = (), config: str | None = None,
                 port: int | None = None, env: dict[str, str] | None = None) -> None:
        self.port = port or free_port()
        self.workers = workers
        self.runtime_dir = tempfile.mkdtemp(prefix="cc-", dir="/tmp")
        self.log_path = os.path.join(self.runtime_dir, "..", os.path.basename(self.runtime_dir) + ".log")
        self.args = [sys.executable, "-m", "chatcluster", "start", "--workers", str(workers), "--host",
                     "127.0.0.1", "--port", str(self.port), "--runtime-dir", self.runtime_dir, *extra]
        if config is None and "--max-clients-per-ip" not in extra:
            # Every test client comes from 127.0.0.1: the per-address limit (default 50) is off
            # unless a test is about it.
            self.args += ["--max-clients-per-ip", "0"]
        if config:
            self.args += ["--config", config]
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None
        self.clients: list[Client] = []

    def start(self, wait: bool = True) -> Cluster:
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.args, stdout=self.log, stderr=subprocess.STDOUT, env=self.env,
                                     start_new_session=True, cwd=REPO,
                                     preexec_fn=_stop_with_parent)
        if wait:
            self.wait_ready()
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stats(self) -> list[S.SlotView]:
        try:
            f = S.StatsFile(os.path.join(self.runtime_dir, "stats"))
        except (OSError, ValueError):
            return []
        try:
            return f.used()
        finally:
            f.close()

    def worker_pids(self, ready_only: bool = True) -> list[int]:
        return [v.pid for v in self.stats() if v.pid and (v.state == S.READY or not ready_only)]

    def wait_ready(self, count: int | None = None, timeout: float = 30.0) -> None:
        want = self.workers if count is None else count

        def ready() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"cluster exited with {self.proc.returncode}:\n{self.read_log()}")
            return len(self.worker_pids()) == want

        wait_for(ready, timeout, f"{want} ready workers")

    def read_log(self) -> str:
        try:
            with open(self.log_path, "rb") as fh:
                return fh.read().decode(errors="replace")
        except OSError:
            return ""

    def client(self, welcome: bool = True, **kw: object) -> Client:
        c = Client(self.port, **kw)  # type: ignore[arg-type]
        self.clients.append(c)
        if welcome:
            c.welcome()
        return c

    def worker_of(self, c: Client) -> int:
        """The pid of the worker holding the server side of `c`, seen through psutil."""
        local = c.sock.getsockname()

        def find() -> int | None:
            for pid in self.worker_pids(ready_only=False):
                try:
                    for conn in psutil.Process(pid).net_connections(kind="tcp"):
                        if conn.raddr and (conn.raddr.ip, conn.raddr.port) == local:
                            return pid
                except psutil.Error:
                    continue
            return None

        return wait_for(find, what="the worker of a client")  # type: ignore[return-value]

    def clients_on_distinct_workers(self, n: int, tries: int = 200) -> list[Client]:
        """n welcomed clients, each on a different worker (placement verified)."""
        chosen: dict[int, Client] = {}
        for _ in range(tries):
            c = self.client()
            pid = self.worker_of(c)
            if pid in chosen:
                c.say("/quit")
                c.close()
                continue
            chosen[pid] = c
            if len(chosen) == n:
                return list(chosen.values())
        raise AssertionError(f"could not place clients on {n} distinct workers")

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, sig)

    def wait_exit(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self) -> None:
        for c in self.clients:
            c.close()
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(15)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)  # the session we created: our processes only
            except ProcessLookupError:
                pass
            if self.proc.poll() is None:
                self.proc.wait(10)
        self.log.close()
        shutil.rmtree(self.runtime_dir, ignore_errors=True)


@pytest.fixture
def make_cluster(request: pytest.FixtureRequest) -> Iterator[Callable[..., Cluster]]:
    made: list[Cluster] = []

    def make(*args: object, start: bool = True, **kw: object) -> Cluster:
        c = Cluster(*args, **kw)  # type: ignore[arg-type]
        made.append(c)
        return c.start() if start else c

    yield make
    for c in made:
        failed = getattr(request.node, "rep_call", None)
        if failed is not None and failed.failed:
            sys.stderr.write(f"\n--- cluster log (port {c.port}) ---\n{c.read_log()[-6000:]}\n")
        c.stop()


@pytest.fixture
def cluster(make_cluster: Callable[..., Cluster]) -> Cluster:
    return make_cluster(4)


# A test that starts a whole cluster, NATS or hosts takes seconds: it counts as slow, marked or not,
# so that `-m 'not slow'` leaves the quick tests (pure code, single processes).
CLUSTER_FIXTURES = frozenset({"make_cluster", "cluster", "make_nats", "make_host"})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if CLUSTER_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    rep = outcome.get_result()
    setattr(item, "rep_" + rep.when, rep)


def start_refused(*args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    """Run `chatcluster start ARGS`, expected to refuse; a cluster that starts anyway is killed, and fails the test."""
    proc = subprocess.Popen([sys.executable, "-m", "chatcluster", "start", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=REPO, start_new_session=True,
                            preexec_fn=_stop_with_parent)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"`chatcluster start {' '.join(args)}` started instead of refusing:\n"
                             f"{err[-3000:]}") from None
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
