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
import platform
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import IO, Any

import psutil

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
DOCS_PLOTS = REPO_ROOT / "docs"  # where the full runs draw the plots the documentation shows

WELCOME_PREFIX = b"*** Welcome"
# chatcluster's telnet greeting (IAC DO BINARY, CR NUL) comes before the welcome line.
TELNET_GREETING = b"\xff\xfd\x00\r\x00"


def without_greeting(data: bytes) -> bytes:
    return data[len(TELNET_GREETING):] if data.startswith(TELNET_GREETING) else data
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


class CappedLog:
    """Copies a server's output to a file, keeping the first LOG_CAP bytes and the last TAIL.

    A server that logs on every failed accept (the asyncio baseline does, once
    it runs out of file descriptors) would otherwise write hundreds of
    megabytes during a capacity run. A thread reads the pipe to its end, so the
    server never blocks on its own logging.
    """

    LOG_CAP = 1 << 20
    TAIL = 64 << 10

    def __init__(self, pipe: IO[bytes], path: Path) -> None:
        self.pipe = pipe
        self.path = path
        self.written = 0
        self.dropped = 0
        self._tail = bytearray()
        self._lock = threading.Lock()
        self._file = open(path, "wb")  # noqa: SIM115 - closed by the reader thread at end of output
        self._thread = threading.Thread(target=self._copy, name=f"log {path.name}", daemon=True)
        self._thread.start()

    def _copy(self) -> None:
        try:
            while chunk := self.pipe.read1(65536):
                with self._lock:
                    self._tail += chunk
                    del self._tail[: -self.TAIL]
                    if self.written < self.LOG_CAP:
                        self._file.write(chunk)
                        self._file.flush()
                        self.written += len(chunk)
                    else:
                        self.dropped += len(chunk)
        except (OSError, ValueError):
            pass
        finally:
            with self._lock:
                if self.dropped:
                    self._file.write(
                        b"\n[... %d bytes of output left out; its last %d bytes follow ...]\n"
                        % (self.dropped, len(self._tail))
                    )
                    self._file.write(bytes(self._tail))
                self._file.close()

    def tail(self) -> bytes:
        with self._lock:
            return bytes(self._tail)

    def close(self, timeout: float = 5.0) -> None:
        self._thread.join(timeout)


_running: list[Server] = []


def _stop_all_at_exit() -> None:
    for server in list(_running):
        server.stop()


atexit.register(_stop_all_at_exit)


def cpu_times_of(procs: Iterable[psutil.Process]) -> dict[int, tuple[float, float]]:
    """(user, system) CPU seconds so far of each process still there, by PID."""
    out: dict[int, tuple[float, float]] = {}
    for p in procs:
        try:
            t = p.cpu_times()
        except psutil.Error:
            continue
        out[p.pid] = (t.user, t.system)
    return out


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
        self._worker_pids: set[int] = set()
        self._pids_seen: set[int] = set()
        self._log: CappedLog | None = None

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
            "--max-clients-per-ip",
            "0",
            *self.extra_args,
        ]

    def start(self, ready_timeout: float = 30.0) -> Server:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH", "")]))
        self.proc = subprocess.Popen(
            self.command(),
            cwd=REPO_ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        assert self.proc.stdout is not None
        self._log = CappedLog(self.proc.stdout, self.log_path)
        _running.append(self)
        try:
            self._wait_ready(ready_timeout)
            self._wait_for_workers(ready_timeout)
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

    def _wait_for_workers(self, timeout: float) -> None:
        """Wait until every chatcluster worker listens: one welcome proves only the first one."""
        if self.kind != "chatcluster" or self.workers <= 0:
            self.workers_of(self.processes())
            return
        deadline = time.monotonic() + timeout
        while True:
            self._worker_pids = set()  # look again
            found = len(self.workers_of(self.processes()))
            if found >= self.workers and self._worker_pids:
                return
            if time.monotonic() >= deadline:
                print(
                    f"warning: only {found} of {self.workers} chatcluster workers listen on port {self.port} "
                    f"after {timeout:.0f} s; memory per worker will be read from those",
                    file=sys.stderr,
                )
                return
            time.sleep(0.1)

    def _got_welcome(self, timeout: float) -> bool:
        with socket.create_connection((self.host, self.port), timeout=timeout) as s:
            data = b""
            while b"\n" not in data:
                chunk = s.recv(4096)
                if not chunk:
                    return False
                data += chunk
            return without_greeting(data).startswith(WELCOME_PREFIX)

    def log_tail(self, lines: int = 30) -> str:
        text = self._log.tail().decode(errors="replace") if self._log else ""
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
        if self._log:
            self._log.close()
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

        The baseline is one process. chatcluster's workers are the processes
        with a listening socket on the server's port (each worker listens on
        its own SO_REUSEPORT socket; the supervisor and the broker do not).
        They are looked up once, while the server has few sockets, and again
        only if one of them has gone (a respawned worker).
        """
        procs = list(procs)
        if self.kind == "baseline" or not procs:
            return procs[:1]
        alive = {p.pid for p in procs}
        if not self._worker_pids or not self._worker_pids <= alive or alive != self._pids_seen:
            # First call, a worker has gone, or a process has appeared (a respawn).
            self._pids_seen = alive
            self._worker_pids = set()
            for p in procs:
                try:
                    listening = any(
                        c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == self.port
                        for c in p.net_connections(kind="tcp")
                    )
                except psutil.Error:
                    continue
                if listening:
                    self._worker_pids.add(p.pid)
        if not self._worker_pids:  # cannot tell: everything but the started process
            root_pid = self.proc.pid if self.proc else -1
            return [p for p in procs if p.pid != root_pid]
        return [p for p in procs if p.pid in self._worker_pids]

    def cpu_seconds(self) -> dict[int, float]:
        """User + system CPU seconds so far, by PID."""
        return {pid: user + system for pid, (user, system) in self.cpu_times().items()}

    def cpu_times(self) -> dict[int, tuple[float, float]]:
        """(user, system) CPU seconds so far, by PID."""
        return cpu_times_of(self.processes())

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

    def cpu_by_role(self, before: dict[int, float], after: dict[int, float]) -> dict[str, float]:
        """CPU seconds between two readings, split into the started process, the workers and the rest."""
        root = self.proc.pid if self.proc else -1
        workers = {p.pid for p in self.workers_of(self.processes())}
        split = {"main": 0.0, "workers": 0.0, "others": 0.0}
        for pid, t in after.items():
            used = t - before.get(pid, 0.0)
            if pid == root:
                split["main" if self.kind == "chatcluster" else "workers"] += used
            elif pid in workers:
                split["workers"] += used
            else:
                split["others"] += used
        return split


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
    print(
        "  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(cells[0], widths, strict=True)))
    )
    print("  ".join("-" * w for w in widths))
    for row in cells[1:]:
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))))


def log_axes(ax: Any) -> None:
    """Log scales on both axes of a matplotlib Axes, labelled with plain numbers (1,000, not 10^3),
    at 1, 2 and 5 times each power of ten, so that a range narrower than a decade has labels too."""
    from matplotlib.ticker import FuncFormatter

    def plain(value: float, _pos: int) -> str:
        return f"{value:,.0f}" if value >= 10 else f"{value:g}"

    def some(value: float, pos: int) -> str:
        lead = f"{value:.0e}"[0]
        return plain(value, pos) if lead in "25" else ""

    ax.set_xscale("log")
    ax.set_yscale("log")
    for axis in (ax.xaxis, ax.yaxis):  # after set_*scale, which installs its own formatters
        axis.set_major_formatter(FuncFormatter(plain))
        axis.set_minor_formatter(FuncFormatter(some))


def results_name(benchmark: str, server: str, quick: bool, default_server: str = "chatcluster") -> str:
    """The default results name: `latency`, `latency-baseline`, `latency-quick`, ...

    Smoke runs and other servers get their own files, so that they never
    overwrite the figures of a full run.
    """
    name = benchmark if server == default_server else f"{benchmark}-{server}"
    return f"{name}-quick" if quick else name


def write_result(name: str, benchmark: str, busy_before: Any, fields: dict[str, Any]) -> Path:
    """Write a benchmark's result file: its own `fields` framed by what every result records."""
    return write_json(
        name,
        {
            "benchmark": benchmark,
            **fields,
            "machine": machine_info(),
            "machine_busy_pct_before": busy_before,
            "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
        },
    )


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


def machine_busy(seconds: float = 1.0) -> float:
    """Percent of all CPUs in use during `seconds` (before a benchmark: by other programs)."""
    return psutil.cpu_percent(interval=seconds)


def warn_if_busy(threshold: float = 20.0) -> float:
    """Print a warning when the machine is already busy; return the percent measured.

    The benchmarks share two cores between the server and the load generator;
    anything else running (a test suite, another benchmark) shows up in the
    figures, in latency most of all.
    """
    busy = machine_busy()
    if busy > threshold:
        print(
            f"warning: the machine is {busy:.0f}% busy before the benchmark starts; other programs "
            "take CPU from the server and the load generator, so the figures will be noisy",
            file=sys.stderr,
            flush=True,
        )
    return busy


def _read(path: str) -> str:
    try:
        with open(path) as fh:
            return fh.read().strip()
    except OSError:
        return ""


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo ("" where there is none)."""
    for line in _read("/proc/cpuinfo").splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name":
            return value.strip()
    return ""


def machine_info() -> dict[str, Any]:
    return {
        "load_average": list(os.getloadavg()),
        "python": sys.version.split()[0],
        "cpus": os.cpu_count(),
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_model": cpu_model(),
        "kernel": platform.release(),
        "tcp_congestion_control": _read("/proc/sys/net/ipv4/tcp_congestion_control"),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "open_files_limit": resource.getrlimit(resource.RLIMIT_NOFILE)[1],
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def machine_cpu() -> dict[str, float]:
    """Seconds every CPU of the machine has spent in each state so far (summed over CPUs)."""
    return dict(psutil.cpu_times()._asdict())


def machine_cpu_used(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Seconds spent in each state between two `machine_cpu()` readings, summed over CPUs.

    `softirq` is mostly TCP receive processing: on loopback the receiving half of every send,
    and the acknowledgements coming back. Most of it runs inside the sender's send() call, and
    with tick-based CPU accounting (no CONFIG_IRQ_TIME_ACCOUNTING, as on the development
    machine) that part is also in the sending process's system time: it overlaps the
    processes' figures rather than adding to them.
    """
    return {k: after[k] - before.get(k, 0.0) for k in after}
