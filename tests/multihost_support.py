"""Test harness for multi-host clusters: chatcluster hosts on one NATS cluster, and clients inside namespaces.

`Host` is a `conftest.Cluster` started with the multi-host settings (its own
node name, port, runtime dir and supervisor), optionally inside a network
namespace on that namespace's address. `RelayClient` is a chat client for a
host in a namespace: a small relay process runs inside the namespace (so the
connection really comes from there), and the test reads and writes lines
through it with the same interface as `conftest.Client`. `Observer.order`
checks that a set of clients saw one order. Every process is ended by PID (or
by the session we created for it) at teardown, also on failure.
"""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from conftest import Client, Cluster
from nats_support import NatsCluster
from netns_support import Netns

REPO = Path(__file__).resolve().parent.parent
RELAY = str(Path(__file__).with_name("relay_client.py"))


class Host(Cluster):
    """One chatcluster host of a multi-host cluster: a Cluster with the NATS settings."""

    def __init__(self, nats: NatsCluster, node: str, workers: int = 2, extra: tuple[str, ...] = (),
                 netns: Netns | None = None, urls: list[str] | None = None, tls_auth: bool = True) -> None:
        args: list[str] = ["--nats-servers", ",".join(urls or nats.urls), "--node-name", node,
                           "--nats-replicas", str(min(3, nats.size))]
        a = nats.auth
        if a is not None and tls_auth:
            args += ["--nats-user", a.user, "--nats-password-file", a.password_file, "--nats-ca-file", a.ca,
                     "--nats-cert-file", a.client_cert, "--nats-key-file", a.client_key]
        self.node = node
        self.netns = netns
        # In a namespace of its own a host has the whole port range to itself.
        super().__init__(workers, extra=(*args, *extra), port=12345 if netns else None)
        self.log_path = os.path.normpath(self.log_path)  # readable after stop() removed the runtime dir
        if netns is not None:
            i = self.args.index("--host")
            self.args[i + 1] = netns.addr
            self.args = netns.argv(self.args)
        self.address = netns.addr if netns else "127.0.0.1"

    def start(self, wait: bool = True) -> Host:
        super().start(wait)
        return self

    def client(self, welcome: bool = True, **kw: object) -> Client:  # type: ignore[override]
        if self.netns is None:
            return super().client(welcome, **kw)
        c = RelayClient(self.netns, self.address, self.port)
        self.clients.append(c)
        if welcome:
            c.welcome()
        return c

    def timed_client(self) -> TimedClient:
        c = TimedClient(self.port, self.address)
        self.clients.append(c)
        c.welcome()
        return c

    def status(self) -> dict[str, Any]:
        argv = [sys.executable, "-m", "chatcluster", "status", "--json", "--runtime-dir", self.runtime_dir,
                "--port", str(self.port)]
        out = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=REPO)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)  # type: ignore[no-any-return]

    def multihost(self) -> dict[str, Any] | None:
        """The bus process's own view (RUNTIME_DIR/multihost.json), None until it has written it."""
        try:
            with open(os.path.join(self.runtime_dir, "multihost.json")) as fh:
                return json.load(fh)  # type: ignore[no-any-return]
        except (OSError, ValueError):
            return None

    def broker_pid(self) -> int:
        """The pid of the host's bus process (the bridge to NATS)."""
        from chatcluster import stats as S

        f = S.StatsFile(os.path.join(self.runtime_dir, "stats"))
        try:
            return f.header().broker_pid
        finally:
            f.close()

    def kill9(self) -> None:
        """kill -9 of the supervisor and every process of the host, at once."""
        assert self.proc is not None
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(10)


def hosts_for(request: Any) -> Iterator[Callable[..., Host]]:
    """The body of a `make_host` fixture: hosts made (and started), all stopped at teardown (logs shown on failure)."""
    made: list[Host] = []

    def make(nats: NatsCluster, node: str, start: bool = True, **kw: Any) -> Host:
        h = Host(nats, node, **kw)
        made.append(h)
        return h.start() if start else h

    yield make
    rep = getattr(request.node, "rep_call", None)
    for h in made:
        if rep is not None and rep.failed:
            sys.stderr.write(f"\n--- host {h.node} (port {h.port}) ---\n{h.read_log()[-8000:]}\n")
        h.stop()


class TimedClient(Client):
    """A Client that notes when each line arrived (time.monotonic()), for measuring stalls."""

    def __init__(self, port: int, host: str = "127.0.0.1") -> None:
        super().__init__(port, host)
        self.times: list[float] = []

    def _pump(self, timeout: float) -> None:
        before = len(self.lines)
        super()._pump(timeout)
        now = time.monotonic()
        self.times.extend(now for _ in range(len(self.lines) - before))

    def longest_pause(self, since: float, pattern: str) -> float:
        """The longest time between two lines matching `pattern` (or `since` and the first) from `since` on."""
        rx = re.compile(pattern)
        ts = [since] + [t for x, t in zip(self.lines, self.times, strict=True) if t >= since and rx.fullmatch(x)]
        return max((b - a for a, b in zip(ts, ts[1:], strict=False)), default=0.0)


class RelayClient(Client):
    """A chat client whose connection is made from inside a network namespace, by tests/relay_client.py.

    The relay passes lines both ways (without CRLF); waiting, matching and the welcome are Client's.
    """

    at_start = False
    greeted = False

    def __init__(self, netns: Netns, host: str, port: int) -> None:
        self.proc = netns.popen([sys.executable, RELAY, host, str(port)], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.buf = b""
        self.lines: list[str] = []
        self.closed = False
        self.nick = ""
        self.q: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read_relay, daemon=True).start()

    def _read_relay(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            self.q.put(raw.decode("utf-8", "replace").rstrip("\n"))
        self.q.put(None)

    def _pump(self, timeout: float) -> None:
        try:
            item = self.q.get(timeout=timeout)
        except queue.Empty:
            return
        while True:
            if item is None:
                self.closed = True
                return
            self.lines.append(item)
            try:
                item = self.q.get_nowait()
            except queue.Empty:
                return

    def send(self, data: bytes | str) -> None:
        assert self.proc.stdin is not None
        text = data.decode() if isinstance(data, bytes) else data
        for line in text.split("\r\n"):
            if line:
                self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)

    def server_side(self) -> tuple[str, int]:
        raise NotImplementedError("the relay's socket lives in another process")


def chat_lines(lines: Iterable[str], pattern: str = r"\S+: m \S+ \d+") -> list[str]:
    """The chat lines among a client's lines that the order tests send (`NICK: m TAG N`)."""
    rx = re.compile(pattern)
    return [x for x in lines if rx.fullmatch(x)]


def assert_one_order(views: dict[str, list[str]]) -> None:
    """Every two clients saw the lines they both received in the same order, each line once."""
    for name, seen in views.items():
        assert len(seen) == len(set(seen)), f"{name} received {len(seen) - len(set(seen))} lines twice"
    names = list(views)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            common = set(views[a]) & set(views[b])
            pa = [x for x in views[a] if x in common]
            pb = [x for x in views[b] if x in common]
            assert pa == pb, f"{a} and {b} saw the lines in different orders"
