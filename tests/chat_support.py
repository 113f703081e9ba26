"""Pieces shared by the end-to-end chat and identity tests.

Finding the broker process, waiting until the supervisor has announced the
cluster ready, sending numbered lines and checking what each client received
of them, and reading a real command-line client (`nc`, `telnet`) line by line
on a thread so that a test waits for output with a deadline, never a sleep.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import threading
import time
from collections.abc import Iterable

import psutil
from conftest import WAIT, Client, Cluster, strip_greeting, wait_for

LOST = "*** Notice: some messages may have been lost"
WHO = r"\*\*\* \d+ users? online: .*"


def announced(cluster: Cluster) -> None:
    """Wait until the supervisor has seen every worker ready and said so."""
    wait_for(lambda: "cluster ready" in cluster.read_log(), what="the cluster to be announced ready")


def broker_pid(cluster: Cluster) -> int:
    """The supervisor's child that is not a worker."""

    def find() -> int | None:
        workers = set(cluster.worker_pids(ready_only=False))
        try:
            others = [p.pid for p in psutil.Process(cluster.pid).children() if p.pid not in workers]
        except psutil.Error:
            return None
        return others[0] if len(others) == 1 else None

    return wait_for(find, what="exactly one broker process")  # type: ignore[return-value]


def new_broker(cluster: Cluster, old: int) -> int:
    return wait_for(lambda: (pid := broker_pid(cluster)) != old and pid, what="a new broker")  # type: ignore[return-value]


def no_gaps(cluster: Cluster) -> None:
    assert sum(v.gaps for v in cluster.stats()) == 0, "the stats file counts bus gaps"
    assert "gap" not in cluster.read_log().lower(), "the log reports a bus gap"


def who(c: Client) -> list[str]:
    """Send /who and return the names of its reply."""
    mark = len(c.lines)
    c.say("/who")
    line = c.wait(lambda lines: next((x for x in lines[mark:] if re.fullmatch(WHO, x)), None),
                  what="a /who reply")
    return str(line).split(": ", 1)[1].split(", ")


def wait_who(c: Client, names: Iterable[str], timeout: float = WAIT) -> list[str]:
    """Ask /who until it lists exactly `names` (sorted as the server sorts them)."""
    want = sorted(names, key=lambda n: (n.lower(), n))
    deadline = time.monotonic() + timeout
    while True:
        got = who(c)
        if got == want:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"/who to {c.nick} lists {got}, expected {want}")
        time.sleep(0.05)


def numbers_from(c: Client, sender: str, tag: str) -> list[int]:
    """The numbers of lines `sender: TAG n` that `c` received, in the order received."""
    rx = re.compile(rf"{re.escape(sender)}: {re.escape(tag)} (\d+)")
    return [int(m.group(1)) for line in c.lines if (m := rx.fullmatch(line))]


def send_numbered(c: Client, tag: str, numbers: Iterable[int]) -> None:
    c.send("".join(f"{tag} {i}\r\n" for i in numbers))


def wait_numbers(c: Client, sender: str, tag: str, last: int, timeout: float = WAIT) -> None:
    c.wait(lambda _: last in numbers_from(c, sender, tag), timeout, f"{sender}: {tag} {last}")


class LineProc:
    """A command-line client as a subprocess: stdin is ours, stdout is read line by line on a thread."""

    def __init__(self, *argv: str) -> None:
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT)
        self.lines: list[str] = []
        self.done = False
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            # The telnet greeting comes before the welcome line: raw from nc, a CR from telnet.
            self.lines.append(strip_greeting(raw).decode("utf-8", "replace").rstrip("\r\n"))
        self.done = True

    def type(self, text: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text.encode() + b"\n")
        self.proc.stdin.flush()

    def end_input(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()

    def wait_line(self, pattern: str, timeout: float = WAIT) -> re.Match[str]:
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            for line in list(self.lines):
                m = rx.fullmatch(line)
                if m:
                    return m
            if time.monotonic() > deadline or (self.done and not any(rx.fullmatch(x) for x in self.lines)):
                raise AssertionError(f"{self.proc.args[0]}: no line matching {pattern!r}; got {self.lines[-8:]}")
            time.sleep(0.01)

    def wait_exit(self, timeout: float = WAIT) -> int:
        return self.proc.wait(timeout)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()  # our own child, by its handle
            self.proc.wait(5)


def have(binary: str) -> bool:
    return shutil.which(binary) is not None
