"""Real workers inside the test process, on a real broker process and real sockets, turned by hand.

A `Rig` starts the bus broker as a child process and builds `Worker` objects in
this process; a test turns their loops one pass at a time (`until`), which is
what makes rare interleavings reproducible and lets a test look inside a
worker (its registry) between two passes.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from conftest import REPO, Client, free_port

from chatcluster import config as cfgmod
from chatcluster import migrate
from chatcluster import stats as S
from chatcluster import worker as W

BROKER = "import sys; from chatcluster.broker import run_broker; run_broker(sys.argv[1], int(sys.argv[2]))"


class Rig:
    def __init__(self, tmp: Path, **settings: Any) -> None:
        self.runtime_dir = str(tmp / "rt")
        os.mkdir(self.runtime_dir, 0o700)
        self.port = free_port()
        self.cfg = cfgmod.load(None, {"host": "127.0.0.1", "port": self.port, "flood_rate": 0,
                                      "announce_joins": False, **settings})
        self.stats = S.StatsFile(os.path.join(self.runtime_dir, "stats"), create=True)
        r, self.control = os.pipe()
        self.broker = subprocess.Popen([sys.executable, "-c", BROKER, self.runtime_dir, str(r)], pass_fds=(r,),
                                       cwd=REPO)
        os.close(r)
        self.workers: list[W.Worker] = []
        self.clients: list[Client] = []

    def worker(self, no: int, succeeds: tuple[str, int] | None = None) -> W.Worker:
        w = W.Worker(self.cfg, no, f"w{no}", no, 1 if succeeds is None else 2, self.runtime_dir, self.stats,
                     succeeds, migrate.HOOKS)
        self.workers.append(w)
        w.boot()
        return w

    def client(self, *turning: W.Worker) -> Client:
        c = Client(self.port)
        self.clients.append(c)
        until(lambda: any("Welcome" in x for x in c.lines), *turning, clients=[c])
        c.nick = c.lines[0].split("nickname is ")[1].split(".")[0]
        return c

    def close(self) -> None:
        for c in self.clients:
            c.close()
        for w in self.workers:
            for c in list(w.registry.clients()):
                c.sock.close()
            if w.listener is not None:
                w.listener.close()
            w.bus.close()
            w.ctx.term()
        os.close(self.control)  # the broker exits when its control pipe closes
        try:
            self.broker.wait(10)
        except subprocess.TimeoutExpired:
            self.broker.kill()
            self.broker.wait()
        self.stats.close()


@contextlib.contextmanager
def rig_in(tmp: Path, **settings: Any) -> Iterator[Rig]:
    """A Rig that is closed (its broker and workers gone) whatever the test did."""
    r = Rig(tmp, **settings)
    try:
        yield r
    finally:
        r.close()


def turn(w: W.Worker, handoff: bool = True) -> None:
    """One pass of the worker's loop; `handoff=False` leaves its handoff socket unread."""
    w.step(0.005, serve_handoff=handoff)


def until(cond: Callable[[], object], *turning: W.Worker, clients: list[Client] = (), handoff: bool = True,
          timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "the condition was not reached"
        for w in turning:
            turn(w, handoff)
        for c in clients:
            c.drain_for_quiet()
