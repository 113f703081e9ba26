"""What every benchmark shares: the server under test as a process, and the reports.

`Server` starts chatcluster or the asyncio baseline on a free loopback port,
waits for the welcome line, measures CPU and memory over all of the server's
processes with psutil, and stops it (SIGTERM to the PID it started, SIGKILL 15 s
later). Every server started here is also stopped at interpreter exit, so a
benchmark that fails half-way leaves nothing running.

The report helpers print aligned tables and write `benchmarks/results/<name>.json`.
Nothing here generates load: that is `loadgen`.
"""

from __future__ import annotations

import atexit
import json
import math
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import psutil

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"

WELCOME_PREFIX = b"*** Welcome"
SERVER_KINDS = ("chatcluster", "baseline")
STOP_GRACE_S = 15.0


def raise_open_file_limit() -> int:
    """Lift the soft limit on open files to the hard one and return it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (bind to port 0, read it, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def exit_cleanly_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit so that `finally` blocks and atexit run."""

    def _raise(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, _raise)


# --------------------------------------------------------------------------- servers

_running: list[Server] = []


def _stop_all_at_exit() -> None:
    for server in list(_running):
        server.stop()


atexit.register(_stop_all_at_exit)


class Server:
    """One server under test, started as a subprocess of this benchmark.

    kind "chatcluster" runs `python -m chatcluster start` from the repository
    root with flood control off and join notices off; kind "baseline" runs
    `benchmarks/baseline_asyncio.py`. Output goes to a log file in the results
    directory, which is printed when the server fails to come up.
    """

    def __init__(
        self,
        kind: str,
        *,
        workers: int = 2,
        host: str = "127.0.0.1",
        port: int | None = None,
        extra_args: Sequence[str] = (),
        log_name: str = "server",
    ) -> None:
        if kind not in SERVER_KINDS:
            raise ValueError(f"unknown server {kind!r}; choose one of {', '.join(SERVER_KINDS)}")
        self.kind = kind
        self.workers = workers
        self.host = host
        self.port = port or free_port(host)
        self.extra_args = list(extra_args)
        RESULTS_DIR.mkdir(exist_ok=True)
        self.log_path = RESULTS_DIR / f"{log_name}-{kind}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._known: dict[int, psutil.Process] = {}

    # ---- life cycle

    def command(self) -> list[str]:
        if self.kind == "baseline":
            return [
                sys.executable,
                str(BENCH_DIR / "baseline_asyncio.py"),
                "--host",
                self.host,
                "--port",
                str(self.port),
            ]
        return [
            sys.executable,
            "-m",
            "chatcluster",
            "start",
            "--workers",
            str(self.workers),
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--flood-rate",
            "0",
            "--no-announce-joins",
            "--max-clients",
            "200000",
            *self.extra_args,
        ]

    def start(self, ready_timeout: float = 30.0) -> Server:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH", "")]))
        log = open(self.log_path, "wb")  # noqa: SIM115 - handed to the child, closed below
        try:
            self.proc = subprocess.Popen(
                self.command(), cwd=REPO_ROOT, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log
            )
        finally:
            log.close()
        _running.append(self)
        try:
            self._wait_ready(ready_timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last_error = "no answer yet"
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.kind} exited with code {self.proc.returncode} before it was ready; "
                    f"its output ({self.log_path}):\n{self.log_tail()}"
                )
            try:
                if self._got_welcome(min(2.0, max(0.1, deadline - time.monotonic()))):
                    return
                last_error = "connected but no welcome line"
            except OSError as exc:
                last_error = str(exc)
            time.sleep(0.1)
        raise RuntimeError(
            f"{self.kind} did not send a welcome line on {self.host}:{self.port} within {timeout:.0f} s "
            f"({last_error}); its output ({self.log_path}):\n{self.log_tail()}"
        )

    def _got_welcome(self, timeout: float) -> bool:
        with socket.create_connection((self.host, self.port), timeout=timeout) as s:
            data = b""
            while b"\n" not in data:
                chunk = s.recv(4096)
                if not chunk:
                    return False
                data += chunk
            return data.startswith(WELCOME_PREFIX)

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:]) or "(empty)"

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> int | None:
        """SIGTERM the PID we started, SIGKILL after 15 s; then reap leftovers we saw."""
        if self.proc is None:
            return None
        if self in _running:
            _running.remove(self)
        proc = self.proc
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        # Children of ours that outlived their parent (a crashed supervisor):
        # stop exactly those PIDs that we saw as the server's processes.
        for pid, child in self._known.items():
            if pid == proc.pid:
                continue
            try:
                if child.is_running():
                    child.terminate()
                    child.wait(STOP_GRACE_S)
            except psutil.TimeoutExpired:
                child.kill()
            except psutil.Error:
                pass
        return proc.returncode

    # ---- measurements

    def processes(self) -> list[psutil.Process]:
        """The started PID and all its descendants that are alive now."""
        if self.proc is None or self.proc.poll() is not None:
            return []
        try:
            root = psutil.Process(self.proc.pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            return []
        for p in procs:
            # Keep the same psutil.Process objects so cpu/rss reads are cheap
            # and so that stop() knows which PIDs were ours.
            self._known.setdefault(p.pid, p)
        return [self._known[p.pid] for p in procs]

    def workers_of(self, procs: Iterable[psutil.Process]) -> list[psutil.Process]:
        """The processes that hold client connections.

        The baseline is one process. For chatcluster they are the processes
        whose command line or name says "worker"; when none does, every
        descendant that is not named broker or supervisor.
        """
        procs = list(procs)
        if self.kind == "baseline" or not procs:
            return procs[:1]
        root_pid = self.proc.pid if self.proc else -1
        named, others = [], []
        for p in procs:
            try:
                text = (" ".join(p.cmdline()) + " " + p.name()).lower()
            except psutil.Error:
                continue
            if "worker" in text:
                named.append(p)
            elif p.pid != root_pid and "broker" not in text and "supervisor" not in text:
                others.append(p)
        return named or others

    def cpu_seconds(self) -> dict[int, float]:
        """User + system CPU seconds so far, by PID."""
        out: dict[int, float] = {}
        for p in self.processes():
            try:
                t = p.cpu_times()
            except psutil.Error:
                continue
            out[p.pid] = t.user + t.system
        return out

    def memory(self) -> dict[str, int]:
        """RSS in bytes: of all the server's processes, and of its workers alone."""
        procs = self.processes()
        total = workers = 0
        worker_pids = {p.pid for p in self.workers_of(procs)}
        for p in procs:
            try:
                rss = p.memory_info().rss
            except psutil.Error:
                continue
            total += rss
            if p.pid in worker_pids:
                workers += rss
        return {"rss": total, "worker_rss": workers, "processes": len(procs), "workers": len(worker_pids)}


def cpu_used(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU seconds spent between two `Server.cpu_seconds()` readings (processes that
    appeared in between count from zero; ones that vanished are lost)."""
    return sum(t - before.get(pid, 0.0) for pid, t in after.items())


class ServerMonitor:
    """Peak RSS of a server, sampled whenever `tick()` is called (at most twice a second)."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.peak_rss = 0
        self.peak_worker_rss = 0
        self._next = 0.0

    def tick(self) -> None:
        now = time.monotonic()
        if now < self._next:
            return
        self._next = now + 0.5
        mem = self.server.memory()
        self.peak_rss = max(self.peak_rss, mem["rss"])
        self.peak_worker_rss = max(self.peak_worker_rss, mem["worker_rss"])


def chatcluster_available() -> tuple[bool, str]:
    """Whether `python -m chatcluster start --help` works here, and what it printed if not."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH", "")]))
    try:
        done = subprocess.run(
            [sys.executable, "-m", "chatcluster", "start", "--help"],
            cwd=REPO_ROOT,
            env=env,
            capture_output=True,
            timeout=30,
        )
    except subprocess.TimeoutExpired:
        return False, "`python -m chatcluster start --help` did not finish within 30 s"
    if done.returncode != 0:
        return False, (done.stdout + done.stderr).decode(errors="replace").strip()[-2000:]
    return True, ""


# --------------------------------------------------------------------------- figures


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) by nearest rank of an already sorted sequence."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q / 100.0 * len(sorted_values)))
    return float(sorted_values[min(rank, len(sorted_values)) - 1])


def latency_summary(latencies_ns: Sequence[int]) -> dict[str, float | int]:
    """p50 / p99 / max in milliseconds of a latency sample given in nanoseconds."""
    values = sorted(latencies_ns)
    return {
        "samples": len(values),
        "p50_ms": percentile(values, 50) / 1e6,
        "p99_ms": percentile(values, 99) / 1e6,
        "max_ms": (values[-1] / 1e6) if values else math.nan,
    }


def fmt(value: Any, digits: int = 1) -> str:
    """A number for a table: thousands separators, `-` for missing."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:,.{digits}f}"
    return str(value)


def print_table(title: str, rows: Sequence[tuple[str, Sequence[Any]]], header: Sequence[str]) -> None:
    """Print `rows` (label, values...) under `header` with aligned columns."""
    cells = [[str(h) for h in header]] + [[label, *(fmt(v) for v in values)] for label, values in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    print()
    print(title)
    print("  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(cells[0], widths))))
    print("  ".join("-" * w for w in widths))
    for row in cells[1:]:
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))


def write_json(name: str, data: dict[str, Any]) -> Path:
    """Write `benchmarks/results/<name>.json` and return its path."""
    RESULTS_DIR.mkdir(exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"

    def clean(obj: Any) -> Any:
        if isinstance(obj, float) and math.isnan(obj):
            return None
        if isinstance(obj, dict):
            return {k: clean(v) for k, v in obj.items()}
        if isinstance(obj, list | tuple):
            return [clean(v) for v in obj]
        return obj

    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(clean(data), indent=2, sort_keys=False) + "\n")
    tmp.replace(path)
    return path


def machine_info() -> dict[str, Any]:
    return {
        "python": sys.version.split()[0],
        "cpus": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "open_files_limit": resource.getrlimit(resource.RLIMIT_NOFILE)[1],
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
