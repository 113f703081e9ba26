"""The metrics endpoint: a small process of its own that serves `/metrics` over HTTP.

Why a process and not a thread of the supervisor: the supervisor forks
workers, and forking a process that runs threads is fragile (a lock held by
another thread at the moment of the fork stays held for ever in the child);
and a scraper that connects and never sends its request, or reads its answer
a byte a second, must not be able to delay signal handling or worker
supervision in any way. The endpoint process only reads the shared stats file
and /proc (through `snapshot`), so it can die or hang without harming anyone:
the supervisor restarts it (`MetricsProcess`), like any child, with back-off.
It beats by writing a byte to a pipe the supervisor reads, twice a second;
one that stops beating for `worker_timeout` (stopped, or deadlocked) is killed
and replaced like a hung worker.
It answers `/metrics` with prometheus_client's WSGI app and 404 for anything
else; each connection gets a thread and a time limit for all of it (not only
for each read: a scraper sending a byte now and then would never reach a
per-read timeout), and there is a cap on how many are served at once. When
every place is taken, the one that has waited longest for its request is
closed to make room, so connections that never finish their request cannot
keep a real scrape out.

The supervisor-side part (`MetricsProcess`, `check_listen`) imports neither
prometheus_client nor zmq; `serve()` runs in the endpoint process.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from . import stats as S
from .config import ConfigError, parse_listen

log = logging.getLogger("chatcluster.exporter")

EXIT_LISTEN_FAILED = 2  # the endpoint could not bind its address: restarted with back-off
REQUEST_TIMEOUT = 10.0  # seconds a connection may last, from accept to the end of the answer
MAX_REQUESTS = 16  # connections served at once; past it, the oldest still sending its request makes room
YOUNG = 5.0  # an endpoint process that dies younger than this is restarted with back-off
BACKOFF_MAX = 30.0
STOP_WAIT = 2.0  # seconds the supervisor gives it to exit on TERM before KILL
BOOT_GRACE = 30.0  # seconds a new endpoint may take to its first heartbeat (imports, bind)


def check_listen(listen: str) -> None:
    """At start: the metrics address can be bound, or a ConfigError naming the problem and the fix."""
    try:
        host, port = parse_listen(listen)
    except ValueError as exc:
        raise ConfigError(f"--metrics-listen {listen}: {exc}") from None
    try:
        sock = _bind(host, port)
    except OSError as exc:
        raise ConfigError(_bind_error(listen, host, port, exc)) from None
    sock.close()


def _bind(host: str, port: int) -> socket.socket:
    family, _, _, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
    except OSError:
        sock.close()
        raise
    return sock


def _bind_error(listen: str, host: str, port: int, exc: OSError) -> str:
    if isinstance(exc, socket.gaierror):
        return f"--metrics-listen {listen}: cannot resolve {host} ({exc.strerror}); give an IP address"
    if exc.errno == errno.EADDRINUSE:
        return (f"--metrics-listen {listen}: port {port} is in use by another program; choose another "
                f"with --metrics-listen")
    if exc.errno == errno.EADDRNOTAVAIL:
        return (f"--metrics-listen {listen}: {host} is not an address of this machine; choose another "
                f"with --metrics-listen")
    if exc.errno == errno.EACCES:
        return (f"--metrics-listen {listen}: port {port} is privileged and this user may not bind it; "
                f"choose a port above 1023")
    return f"--metrics-listen {listen}: cannot bind {host}:{port} ({exc.strerror})"


# -- the supervisor's side ----------------------------------------------------------------------


@dataclass
class MetricsProcess:
    """The supervisor's handle on the endpoint process: start it, notice its death, restart, stop.

    Every method returns at once, except `stop()`, which waits at most STOP_WAIT seconds at the
    end of a stop. The endpoint's pid goes into the stats file's header, where `status` finds it
    and where a supervisor re-executed by an upgrade finds the old one, to replace it with one
    running the new code.
    """

    listen: str
    runtime_dir: str
    stats: S.StatsFile
    pid: int = 0
    started: float = 0.0
    beats: int = -1  # the read end of the endpoint's heartbeat pipe
    last_beat: float = 0.0
    beaten: bool = False  # it has beaten at least once (booted)
    failures: int = 0
    not_before: float = 0.0
    old_pid: int = 0  # an endpoint of the code before an upgrade, told to exit

    def __post_init__(self) -> None:
        self.stats.supervisor.exporter_pid = 0

    @classmethod
    def after_exec(cls, listen: str, runtime_dir: str, stats: S.StatsFile) -> MetricsProcess:
        """In a supervisor re-executed by an upgrade: the old code's endpoint makes way for a new one."""
        old = stats.supervisor.exporter_pid
        proc = cls(listen, runtime_dir, stats)
        if old > 0:
            try:
                os.kill(old, signal.SIGTERM)
                proc.old_pid = old
            except ProcessLookupError:
                pass
        return proc

    def maintain(self, now: float, fork: Callable[[str, Callable[[], int | None]], int]) -> None:
        """Start the endpoint when it should run and does not (its port free, its back-off over)."""
        if not self.listen or self.pid or self.old_pid or now < self.not_before:
            return
        listen, runtime_dir, parent, stats = self.listen, self.runtime_dir, os.getpid(), self.stats
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

        def body() -> int:
            os.close(r)
            return serve(listen, runtime_dir, parent, w, stats)

        try:
            self.pid = fork("metrics", body)
        finally:
            os.close(w)
        self._close_beats()
        self.beats = r
        self.started = self.last_beat = now
        self.beaten = False
        self.stats.supervisor.exporter_pid = self.pid
        log.info("metrics endpoint started, pid %d, serving http://%s/metrics", self.pid, listen)

    def check(self, now: float, timeout: float, watching_since: float = 0.0) -> None:
        """Kill an endpoint that stopped beating for `timeout` seconds (of time the caller was
        watching since `watching_since`); it is reaped and restarted like one that died."""
        if not self.pid or self.beats < 0:
            return
        try:
            while os.read(self.beats, 4096):
                self.last_beat, self.beaten = now, True
        except BlockingIOError:
            pass
        except OSError:
            return
        silent = now - max(self.last_beat, watching_since)
        if silent > (timeout if self.beaten else max(timeout, BOOT_GRACE)):
            log.error("metrics endpoint (pid %d): no heartbeat for %.1f s (worker_timeout=%g); killing it and "
                      "starting a new one", self.pid, silent, timeout)
            _kill(self.pid, signal.SIGKILL)
            self._close_beats()

    def _close_beats(self) -> None:
        if self.beats >= 0:
            os.close(self.beats)
            self.beats = -1

    def reaped(self, pid: int, status: int, stopping: bool = False) -> bool:
        """A child exited; True if it was the endpoint (restarted later by `maintain` unless stopping)."""
        if pid == self.old_pid:
            self.old_pid = 0
            return True
        if pid != self.pid or not pid:
            return False
        now = time.monotonic()
        self.pid = 0
        self._close_beats()
        self.stats.supervisor.exporter_pid = 0
        if now - self.started < YOUNG:
            self.failures += 1
            delay = min(0.5 * 2 ** (self.failures - 1), BACKOFF_MAX)
        else:
            self.failures = 0
            delay = 0.0
        self.not_before = now + delay
        code = os.waitstatus_to_exitcode(status)
        how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with status {code}"
        if stopping:
            log.info("metrics endpoint (pid %d) %s", pid, how)
        else:
            log.error("metrics endpoint (pid %d) %s; restarting it%s", pid, how, f" in {delay:.1f} s" if delay else "")
        return True

    def stop(self) -> None:
        """TERM the endpoint and wait for it (KILL after STOP_WAIT); the supervisor is stopping."""
        for pid in (self.pid, self.old_pid):
            if pid:
                _kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_WAIT
        for pid in (self.pid, self.old_pid):
            while pid and time.monotonic() < deadline:
                try:
                    if os.waitpid(pid, os.WNOHANG)[0]:
                        break
                except ChildProcessError:
                    break
                time.sleep(0.02)
            else:
                if pid:
                    _kill(pid, signal.SIGKILL)
                    try:
                        os.waitpid(pid, 0)
                    except ChildProcessError:
                        pass
        self.pid = self.old_pid = 0
        self._close_beats()
        self.stats.supervisor.exporter_pid = 0

    def kill(self) -> None:
        """Last resort at exit: nothing of ours may outlive the supervisor."""
        for pid in (self.pid, self.old_pid):
            if pid:
                _kill(pid, signal.SIGKILL)


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


# -- the endpoint process -----------------------------------------------------------------------


def app_for(runtime_dir: str, supervisor_pid: int, stats: S.StatsFile | None = None) -> Callable[..., Iterable[bytes]]:
    """The WSGI app: /metrics from a registry holding only the cluster's collector; 404 elsewhere."""
    from prometheus_client import CollectorRegistry, make_wsgi_app

    from .metrics import ClusterCollector

    registry = CollectorRegistry(auto_describe=False)
    registry.register(ClusterCollector(runtime_dir, supervisor_pid, stats))
    metrics = make_wsgi_app(registry)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ.get("PATH_INFO") != "/metrics":
            start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8")])
            return [b"Not found: chatcluster serves its metrics at /metrics\n"]
        result: Iterable[bytes] = metrics(environ, start_response)
        return result

    return app


class Connections:
    """The endpoint's open connections: a cap on how many, and a time limit on each.

    Each connection's thread reads with a per-read timeout, which a scraper sending one byte
    every few seconds never reaches; so the whole connection has REQUEST_TIMEOUT, enforced from
    the accepting thread by shutting the socket down (its thread then ends on its own). When
    MAX_REQUESTS connections are open, a new one takes the place of the oldest that has not
    finished sending its request; if every one is answering already, the new one is closed.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.open: dict[socket.socket, list[Any]] = {}  # socket -> [accepted at, request read, cut]

    def admit(self, sock: socket.socket, now: float) -> bool:
        with self.lock:
            live = [(info[0], s) for s, info in self.open.items() if not info[2]]
            if len(live) >= MAX_REQUESTS:
                waiting = [(at, s) for at, s in live if not self.open[s][1]]
                if not waiting:
                    return False
                self._cut(min(waiting, key=lambda pair: pair[0])[1])
            self.open[sock] = [now, False, False]
            return True

    def requested(self, sock: socket.socket) -> None:
        with self.lock:
            if sock in self.open:
                self.open[sock][1] = True

    def done(self, sock: socket.socket) -> None:
        with self.lock:
            self.open.pop(sock, None)

    def expire(self, now: float) -> None:
        with self.lock:
            for sock, info in self.open.items():
                if not info[2] and now - info[0] > REQUEST_TIMEOUT:
                    self._cut(sock)

    def _cut(self, sock: socket.socket) -> None:
        """End a connection from outside its thread: its reads and writes fail, and it closes it."""
        self.open[sock][2] = True
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


BEAT = b"."


def serve(listen: str, runtime_dir: str, supervisor_pid: int, beat_fd: int = -1,
          stats: S.StatsFile | None = None) -> int:
    """The endpoint process: serve until the supervisor is gone (or TERM, the default action).

    `beat_fd` is the write end of the heartbeat pipe: a byte at every turn of the accepting
    loop (at least every half second) tells the supervisor the endpoint is not stuck. `stats`
    is the supervisor's mapping of the stats file, inherited through the fork: read through it,
    the figures stay available when a tmp cleaner deletes the file's name.
    """
    from wsgiref.simple_server import WSGIRequestHandler

    from prometheus_client.exposition import ThreadingWSGIServer

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the supervisor's to handle
    host, port = parse_listen(listen)
    conns = Connections()

    class Handler(WSGIRequestHandler):
        timeout = REQUEST_TIMEOUT  # a socket timeout on every read and write of the connection

        def parse_request(self) -> bool:
            ok: bool = super().parse_request()
            if ok:
                conns.requested(self.request)
            return ok

        def log_message(self, format: str, *args: Any) -> None:
            pass  # one line per scrape would drown the log

    class Server(ThreadingWSGIServer):
        def process_request(self, request: Any, client_address: Any) -> None:
            if not conns.admit(request, time.monotonic()):
                self.shutdown_request(request)  # every place is serving an answer: come back later
                return
            super().process_request(request, client_address)

        def process_request_thread(self, request: Any, client_address: Any) -> None:
            try:
                super().process_request_thread(request, client_address)
            finally:
                conns.done(request)

        def service_actions(self) -> None:
            if os.getppid() != supervisor_pid:
                raise SystemExit(0)  # the supervisor is gone: nothing left to report on
            conns.expire(time.monotonic())
            if beat_fd >= 0:
                try:
                    os.write(beat_fd, BEAT)
                except BlockingIOError:
                    pass  # the supervisor has not read the last ones yet: it knows we live

        def handle_error(self, request: Any, client_address: Any) -> None:
            log.debug("metrics request from %s failed", client_address, exc_info=True)

    Server.address_family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                               flags=socket.AI_PASSIVE)[0][0]
    try:
        server = Server((host, port), Handler)
    except OSError as exc:
        log.error("%s", _bind_error(listen, host, port, exc))
        return EXIT_LISTEN_FAILED
    server.set_app(app_for(runtime_dir, supervisor_pid, stats))
    log.info("serving metrics on http://%s/metrics", listen)
    server.serve_forever(poll_interval=0.5)
    return 0
