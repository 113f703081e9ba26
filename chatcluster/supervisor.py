"""The supervisor: starts, watches, replaces and stops the broker and worker processes.

It knows processes, not chat. Signal handlers only queue the signal; the main
loop dispatches to `handle_<name>` methods, in the manner of gunicorn's arbiter:
TERM stops gracefully, INT and QUIT stop fast, HUP reloads the config, TTIN and
TTOU add or retire one worker, USR1 applies `chatcluster scale`. Dead workers
are reaped and respawned (with back-off when they keep dying young), a worker
that cannot boot at all stops the cluster instead of crash-looping, and a
worker whose heartbeat stops is killed and replaced. systemd hears about all
of it through `sdnotify`. Every process of a cluster belongs to a
`generation`; USR2 (`chatcluster upgrade`) re-executes the supervisor and
replaces one generation of workers by the next without dropping a connection
(see `upgrade`).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import select
import signal
import socket
import stat
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from . import sdnotify
from . import stats as S
from . import upgrade as U
from .config import Config, ConfigError, load
from .exporter import MetricsProcess
from .worker import EXIT_BOOT_FAILED

log = logging.getLogger("chatcluster.supervisor")

YOUNG = 5.0  # a process that dies younger than this counts towards back-off
BACKOFF_BASE = 0.25  # delay before the second young restart in a row; doubles after each one
BACKOFF_MAX = 30.0
BOOT_TIMEOUT = 30.0  # a worker not accepting connections by then is killed
FAST_STOP = 1.0  # seconds a fast stop (INT, QUIT) gives the workers
STATUS_EVERY = 2.0  # seconds between STATUS= updates to systemd
RELOAD_CONFIRM = 5.0  # seconds a reload waits for every worker to confirm it applied the new settings
TICK = 0.2  # the main loop wakes at least this often to check heartbeats
MAX_WORKERS = S.SLOTS // 2  # half the stats slots, so that a whole generation can be replaced
HANDLED = ("HUP", "INT", "QUIT", "TERM", "TTIN", "TTOU", "USR1", "USR2", "CHLD")
# Signals that mean something to the supervisor alone. A child ignores them, so that one sent to
# the whole process group (`kill -TTIN -- -PGID`, `systemctl kill` without --kill-who=main) cannot
# stop it (the default action of TTIN and TTOU) or end it (that of HUP, USR1 and USR2). A worker
# installs its own HUP handler once it can reload.
CHILD_IGNORES = ("HUP", "TTIN", "TTOU", "USR1", "USR2")
RUNTIME_FILES = ("bus-in", "bus-out", "config.json", "stats", "scale", "reload.json", *U.FILES)


class StartupError(Exception):
    """The cluster cannot start; the message names the problem and the fix."""


@dataclass
class WorkerProc:
    pid: int
    no: int
    slot: int
    generation: int
    started: float
    ready: bool = False
    retiring: bool = False
    retire_deadline: float = 0.0
    reload_pending: bool = False  # a HUP came while it booted: send it one once it is ready
    killed: str = ""  # why the supervisor killed it, for the log line when it is reaped
    cause: str = "crash"  # why it is replaced when it dies, counted in the stats file (S.RESTART_CAUSES)


@dataclass
class Backoff:
    """Restart bookkeeping for a worker position (or the broker): young deaths in a row, next try."""

    failures: int = 0
    not_before: float = 0.0

    def died(self, age: float, now: float) -> float:
        """Record a death at `age` seconds; return how long to wait before the next start."""
        if age >= YOUNG:
            self.failures = 0
            delay = 0.0
        else:
            self.failures += 1
            # The first young death is restarted at once, like any crash; only a repeat backs off.
            delay = 0.0 if self.failures < 2 else min(BACKOFF_BASE * 2 ** (self.failures - 2), BACKOFF_MAX)
        self.not_before = now + delay
        return delay


@dataclass
class Supervisor:
    cfg: Config
    config_path: str | None
    overrides: dict[str, object]
    runtime_dir: str
    pid_file: str
    created_runtime_dir: bool = False
    workers: dict[int, WorkerProc] = field(default_factory=dict)
    target: int = 0
    broker_pid: int = 0
    broker_control: int = -1
    broker_started: float = 0.0
    broker_backoff: Backoff = field(default_factory=Backoff)
    next_no: int = 1
    generation: int = 1
    backoffs: dict[int, Backoff] = field(default_factory=dict)
    respawns: list[tuple[int, int]] = field(default_factory=list)  # (slot, number of the dead worker)
    sig_queue: list[int] = field(default_factory=list)
    stopping: float | None = None  # when the stop deadline passes, whatever is left is killed
    stop_fast: bool = False
    exit_code: int = 0
    announced_ready: bool = False
    next_status: float = 0.0
    next_watchdog: float = 0.0
    reloads: int = 0  # HUPs so far; also the version of the configuration in config.json
    reload_report: dict[str, object] | None = None  # a reload's outcome, reported once the workers applied it
    reload_waiting: list[int] = field(default_factory=list)  # pids of the workers told to apply it
    reload_deadline: float = 0.0
    upgrade: U.Upgrade | None = None  # while `chatcluster upgrade` (USR2) is under way
    metrics: MetricsProcess | None = None  # the /metrics endpoint's process (metrics_listen)

    # -- setup --------------------------------------------------------------------------------

    def run(self) -> int:
        """Start everything, supervise until stopped, clean up; the exit status of the cluster."""
        self.target = self.cfg.worker_count()
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            # After an upgrade's re-exec the workers are running: keep their slots.
            self.stats = S.StatsFile(os.path.join(self.runtime_dir, "stats"), create=not U.resuming())
            self.metrics = (MetricsProcess.after_exec if U.resuming() else MetricsProcess)(
                self.cfg.metrics_listen, self.runtime_dir, self.stats)
            self.write_live_config()
            self.write_pid_file()
            for name in HANDLED:
                signal.signal(getattr(signal, "SIG" + name), self._on_signal)
            signal.set_wakeup_fd(self.wake_w)
            if not U.resume(self):
                log.info("supervisor starting %d workers on %s:%d (runtime dir %s, pid file %s)", self.target,
                         self.cfg.host, self.cfg.port, self.runtime_dir, self.pid_file)
                self.start_broker()
                while len(self.workers) < self.target:
                    self.spawn_worker()
            self.loop()
        finally:
            self.cleanup()
        return self.exit_code

    def _on_signal(self, signum: int, _frame: object) -> None:
        self.sig_queue.append(signum)

    @property
    def pid_files(self) -> list[str]:
        """--pid-file, and always one in the runtime directory, where the `chatcluster` commands look."""
        return list(dict.fromkeys((self.pid_file, os.path.join(self.runtime_dir, "chatcluster.pid"))))

    def write_pid_file(self) -> None:
        for path in self.pid_files:
            try:
                with open(path + ".tmp", "w") as fh:
                    fh.write(f"{os.getpid()}\n")
                os.replace(path + ".tmp", path)
            except OSError as exc:
                raise StartupError(f"cannot write the pid file {path}: {exc.strerror}; "
                                   f"choose a writable path with --pid-file") from None

    def write_live_config(self) -> None:
        """The running configuration, where workers read it on HUP."""
        self._write_json("config.json", {"version": self.reloads, "values": self.cfg.values})

    def _write_json(self, name: str, value: object) -> None:
        path = os.path.join(self.runtime_dir, name)
        with open(path + ".tmp", "w") as fh:
            json.dump(value, fh)
        os.replace(path + ".tmp", path)

    def write_header(self) -> None:
        self.stats.write_header(os.getpid(), self.broker_pid, self.generation, self.target, self.cfg.port)

    # -- process creation ---------------------------------------------------------------------

    def _fork(self, role: str, body: Callable[[], int | None], keep: tuple[int, ...] = ()) -> int:
        pid = os.fork()
        if pid:
            return pid
        code: int = 1
        try:
            signal.set_wakeup_fd(-1)
            for name in HANDLED:
                ignored = name in CHILD_IGNORES
                signal.signal(getattr(signal, "SIG" + name), signal.SIG_IGN if ignored else signal.SIG_DFL)
            for fd in (self.wake_r, self.wake_w, self.broker_control):
                if fd >= 0 and fd not in keep:
                    os.close(fd)
            set_role(role)
            result = body()
            code = int(result or 0)
        except SystemExit as exc:
            if isinstance(exc.code, str):
                log.error("%s", exc.code)
                code = 1
            else:
                code = int(exc.code or 0)
        except BaseException:
            log.exception("%s crashed", role)
            code = 70
        finally:
            logging.shutdown()
            os._exit(code)

    def start_broker(self) -> None:
        from .bus import run_broker

        if self.broker_control >= 0:
            os.close(self.broker_control)
        r, w = os.pipe()
        self.broker_control = w
        # A broker replacing a dead one rebuilds the roster from these workers.
        live = [f"w{w.no}" for w in self.workers.values()]
        self.broker_pid = self._fork("broker", lambda: run_broker(self.runtime_dir, r, live), keep=(r,))
        os.close(r)
        self.broker_started = time.monotonic()
        self.write_header()
        log.info("broker started, pid %d", self.broker_pid)

    def spawn_worker(self, slot: int | None = None, replacing: int = 0,
                     succeeds: tuple[str, int] | None = None) -> WorkerProc:
        """Fork a worker; `succeeds` (id, pid) names the old worker it takes over from in an upgrade."""
        from . import worker

        used = {w.slot for w in self.workers.values()}
        if slot is None:
            slot = next(i for i in range(S.SLOTS) if i not in used)
        no = self.next_no
        self.next_no += 1
        cfg, runtime_dir, stats, generation = self.cfg, self.runtime_dir, self.stats, self.generation

        def body() -> int:
            if cfg.cpu_affinity:
                pin_to_cpu(slot, no)
            return worker.main(cfg, no, f"w{no}", slot, generation, runtime_dir, stats, succeeds)

        self.stats.begin_slot(slot, no, generation)
        pid = self._fork(f"worker {no}", body)
        proc = WorkerProc(pid, no, slot, generation, time.monotonic())
        self.workers[pid] = proc
        if replacing:
            log.info("worker %d started, pid %d, replacing worker %d", no, pid, replacing)
        elif succeeds:
            log.info("worker %d started, pid %d, to take over from worker %s", no, pid, succeeds[0][1:])
        else:
            log.info("worker %d started, pid %d", no, pid)
        return proc

    # -- the loop -----------------------------------------------------------------------------

    def loop(self) -> None:
        while True:
            self.sleep(self.next_wake(time.monotonic()))
            self.reap()
            while self.sig_queue:
                signum = self.sig_queue.pop(0)
                handler = getattr(self, "handle_" + signal.Signals(signum).name[3:].lower(), None)
                if handler:
                    handler()
            now = time.monotonic()
            if self.reload_report is not None:
                self.check_reload(now)
            if self.upgrade is not None:
                U.tick(self, now)
            if self.stopping is not None:
                if not self.workers or now >= self.stopping:
                    self.finish_stop()
                    return
            else:
                self.check_workers(now)
                self.maintain(now)
            self.write_header()
            self.notify(now)

    def next_wake(self, now: float) -> float:
        wake = now + TICK
        for slot, _ in self.respawns:
            wake = min(wake, self.backoffs[slot].not_before)
        if self.broker_pid == 0 and self.stopping is None:
            wake = min(wake, self.broker_backoff.not_before)
        if sdnotify.watchdog_interval() is not None:
            wake = min(wake, self.next_watchdog)
        return max(0.0, wake - now)

    def sleep(self, timeout: float) -> None:
        """Wait for a signal (the wakeup fd) or the timeout."""
        ready, _, _ = select.select([self.wake_r], [], [], timeout)
        if ready:
            try:
                while os.read(self.wake_r, 4096):
                    pass
            except BlockingIOError:
                pass

    def reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if pid == self.broker_pid:
                self.broker_died(pid, status)
                continue
            if self.metrics is not None and self.metrics.reaped(pid, status, self.stopping is not None):
                continue
            proc = self.workers.pop(pid, None)
            if proc is None:
                if self.upgrade is not None:
                    U.reaped(self, pid, status)  # the check of the installed code; may re-exec
                continue  # not ours: as PID 1 of a container the supervisor reaps orphans too
            self.seen_ready(proc)
            self.stats.clear(proc.slot)
            self.tell_broker(f"GONE w{proc.no}")
            self.worker_died(proc, status)

    def worker_died(self, proc: WorkerProc, status: int) -> None:
        how = describe_exit(status)
        if self.upgrade is not None and U.worker_died(self, proc, how):
            return  # a new worker of an upgrade failed to start: the upgrade is off, the old ones serve
        if self.stopping is not None or proc.retiring:
            log.info("worker %d (pid %d) %s", proc.no, proc.pid, how)
            return
        now = time.monotonic()
        code = os.waitstatus_to_exitcode(status)
        if not proc.ready and code == EXIT_BOOT_FAILED:
            self.halt(f"worker {proc.no} cannot listen on {self.cfg.host}:{self.cfg.port} (see its error above)")
            return
        if not proc.ready and not self.announced_ready and code > 0:
            # Failing on its own before the cluster ever served anyone (an exception, a broker that
            # never answered) is no accident that a restart would cure.
            self.halt(f"worker {proc.no} (pid {proc.pid}) {how} before the cluster was ever ready "
                      f"(see its error above)")
            return
        log.error("worker %d (pid %d) %s%s", proc.no, proc.pid, how, f" after {proc.killed}" if proc.killed else "")
        self.stats.supervisor.count_restart(proc.cause)
        backoff = self.backoffs.setdefault(proc.slot, Backoff())
        delay = backoff.died(now - proc.started, now)
        if delay:
            log.warning("worker slot %d: %d workers in a row died within %.0f s of starting; next start in %.2f s",
                        proc.slot, backoff.failures, YOUNG, delay)
        self.respawns.append((proc.slot, proc.no))

    def broker_died(self, pid: int, status: int) -> None:
        self.broker_pid = 0
        how = describe_exit(status)
        if self.stopping is not None:
            log.info("broker (pid %d) %s", pid, how)
            return
        if not self.announced_ready and os.waitstatus_to_exitcode(status) > 0:
            self.halt(f"the bus broker (pid {pid}) {how} before the cluster was ever ready (see its error above)")
            return
        self.stats.supervisor.broker_restarts += 1
        now = time.monotonic()
        delay = self.broker_backoff.died(now - self.broker_started, now)
        log.error("broker (pid %d) %s; restarting it%s", pid, how, f" in {delay:.2f} s" if delay else "")

    def halt(self, reason: str) -> None:
        """A failure that restarting cannot fix: stop everything and exit non-zero."""
        log.error("%s; stopping the cluster", reason)
        self.exit_code = 1
        self.begin_stop(signal.SIGQUIT)

    def maintain(self, now: float) -> None:
        """Bring the broker and the number of live workers to what is wanted."""
        if self.broker_pid == 0 and self.broker_backoff.not_before <= now:
            self.start_broker()
        live = [w for w in self.workers.values() if not w.retiring]
        for slot, dead_no in list(self.respawns):
            if len(live) >= self.target:
                self.respawns.remove((slot, dead_no))
            elif self.backoffs[slot].not_before <= now:
                self.respawns.remove((slot, dead_no))
                live.append(self.spawn_worker(slot, replacing=dead_no))
        while len(live) + len(self.respawns) < self.target:
            live.append(self.spawn_worker())
        if self.metrics is not None:
            self.metrics.maintain(now, self._fork)
        # Every new worker of an upgrade has an old one to take over from: scale down after it.
        extra = 0 if self.upgrade is not None else len(live) - self.target
        for proc in sorted(live, key=lambda w: -w.no)[: max(0, extra)]:
            log.info("retiring worker %d (pid %d): %d workers wanted", proc.no, proc.pid, self.target)
            proc.retiring = True
            proc.retire_deadline = now + self.cfg.graceful_timeout
            self.kill(proc.pid, signal.SIGTERM)

    def check_workers(self, now: float) -> None:
        """Notice workers becoming ready; kill the ones that hang at boot, in their loop or when retiring."""
        for proc in list(self.workers.values()):
            if proc.killed:
                continue
            view = self.stats.read(proc.slot)
            if not proc.ready:
                if view.pid == proc.pid and view.state == S.READY:
                    proc.ready = True
                    if proc.reload_pending:
                        proc.reload_pending = False
                        self.kill(proc.pid, signal.SIGHUP)
                elif now - proc.started > BOOT_TIMEOUT:
                    proc.cause = "boot_timeout"
                    self.kill_worker(proc, f"not accepting connections {BOOT_TIMEOUT:.0f} s after it started")
                continue
            if proc.retiring and now > proc.retire_deadline:
                self.kill_worker(proc, f"still draining {self.cfg.graceful_timeout:g} s after it was retired")
            elif view.pid == proc.pid and now - view.heartbeat > self.cfg.worker_timeout:
                proc.cause = "heartbeat_timeout"
                self.kill_worker(proc, f"no heartbeat for {now - view.heartbeat:.1f} s "
                                       f"(worker_timeout={self.cfg.worker_timeout:g})")

    def seen_ready(self, proc: WorkerProc) -> bool:
        """Whether the worker is ready, looking at its stats slot in case it became so since the last look."""
        if not proc.ready:
            view = self.stats.read(proc.slot)
            proc.ready = view.pid == proc.pid and view.state in (S.READY, S.STOPPING)
        return proc.ready

    def kill_worker(self, proc: WorkerProc, why: str) -> None:
        log.error("worker %d (pid %d): %s; killing it%s", proc.no, proc.pid, why,
                  "" if proc.retiring else " and starting a replacement")
        proc.killed = why
        self.kill(proc.pid, signal.SIGKILL)

    # -- systemd ------------------------------------------------------------------------------

    def notify(self, now: float) -> None:
        if not self.announced_ready and self.stopping is None:
            ready = [w for w in self.workers.values() if w.ready and not w.retiring]
            if len(ready) >= self.target:
                self.announced_ready = True
                log.info("cluster ready: %d workers accepting on %s:%d", len(ready), self.cfg.host, self.cfg.port)
                sdnotify.ready(self.status_text(), mainpid=os.getpid())
                self.next_status = now + STATUS_EVERY
        if self.announced_ready and now >= self.next_status:
            self.next_status = now + STATUS_EVERY
            sdnotify.status(self.status_text())
        interval = sdnotify.watchdog_interval()
        if interval is not None and now >= self.next_watchdog:
            sdnotify.watchdog()
            self.next_watchdog = now + interval

    def status_text(self) -> str:
        live = [w for w in self.workers.values() if not w.retiring]
        clients = sum(self.stats.read(w.slot).clients for w in self.workers.values())
        text = f"{len(live)} workers, {clients} clients"
        if self.stopping is not None:
            text = f"stopping: {text}"
        return text

    # -- signal handlers ----------------------------------------------------------------------

    def handle_chld(self) -> None:
        self.reap()

    def handle_term(self) -> None:
        self.begin_stop(signal.SIGTERM)

    def handle_int(self) -> None:
        self.begin_stop(signal.SIGQUIT)

    def handle_quit(self) -> None:
        self.begin_stop(signal.SIGQUIT)

    def handle_ttin(self) -> None:
        self.scale_to(self.target + 1, "TTIN")

    def handle_ttou(self) -> None:
        self.scale_to(self.target - 1, "TTOU")

    def handle_usr1(self) -> None:
        """`chatcluster scale N` writes N to RUNTIME_DIR/scale, then sends USR1."""
        path = os.path.join(self.runtime_dir, "scale")
        try:
            with open(path) as fh:
                wanted = int(fh.read().strip())
            os.unlink(path)
        except (OSError, ValueError) as exc:
            log.error("USR1 without a valid scale request in %s (%s); use `chatcluster scale N`", path, exc)
            return
        self.scale_to(wanted, "scale")

    def handle_usr2(self) -> None:
        """`chatcluster upgrade`: every process moves to the installed code, keeping the connections."""
        U.request(self)

    def scale_to(self, wanted: int, why: str) -> None:
        if self.stopping is not None:
            log.warning("%s ignored: the cluster is stopping", why)
            return
        clamped = max(1, min(wanted, MAX_WORKERS))
        if clamped != wanted:
            log.warning("%s: %d workers is out of range; using %d (between 1 and %d)", why, wanted, clamped,
                        MAX_WORKERS)
        log.info("%s: %d -> %d workers", why, self.target, clamped)
        self.target = clamped

    def handle_hup(self) -> None:
        if self.reload_report is not None:
            self.finish_reload()  # the previous reload is reported as it stands
        self.reloads += 1
        sdnotify.reloading("reloading configuration")
        source = self.config_path or "the command line (no --config file)"
        try:
            new = load(self.config_path, self.overrides)
        except ConfigError as exc:
            log.error("reload refused, the running configuration stays in force: %s", exc)
            self.stats.supervisor.reloads_refused += 1
            self._write_json("reload.json", {"seq": self.reloads, "ok": False, "config": self.config_path,
                                             "error": str(exc), "applied": {}, "restart": {}})
            sdnotify.ready(self.status_text())
            return
        self.stats.supervisor.reloads_succeeded += 1
        live, restart = self.cfg.live_changes(new)
        self.cfg = Config(values={**self.cfg.values, **live}, source=new.source)
        self.write_live_config()
        logging.getLogger("chatcluster").setLevel(self.cfg.log_level.upper())
        # Workers still booting get their HUP once ready (check_workers); all are waited for.
        self.reload_waiting = list(self.workers)
        for proc in self.workers.values():
            proc.reload_pending = not self.seen_ready(proc)
            if proc.ready:
                self.kill(proc.pid, signal.SIGHUP)
        log.info("reloaded %s: %s", source,
                 ", ".join(f"{k}={v!r}" for k, v in live.items()) or "no live setting changed")
        if restart:
            log.warning("changed in %s but not applied, a restart is needed: %s", source,
                        ", ".join(f"{k} ({self.cfg.values[k]!r} -> {new.values[k]!r})" for k in restart))
        self.reload_report = {"seq": self.reloads, "ok": True, "config": self.config_path, "error": None,
                              "applied": live, "restart": {k: [self.cfg.values[k], new.values[k]] for k in restart}}
        self.reload_deadline = time.monotonic() + RELOAD_CONFIRM
        self.check_reload(time.monotonic())

    def check_reload(self, now: float) -> None:
        """Report the reload once every worker told about it shows the new version in its stats slot."""
        pending = [proc for pid in self.reload_waiting if (proc := self.workers.get(pid)) is not None
                   and self.stats.read(proc.slot).config_version < self.reloads]
        if not pending or now >= self.reload_deadline:
            self.finish_reload(pending)

    def finish_reload(self, pending: list[WorkerProc] | None = None) -> None:
        assert self.reload_report is not None
        if pending:
            log.warning("reload: %s did not confirm the new configuration within %.0f s",
                        ", ".join(f"worker {p.no} (pid {p.pid})" for p in pending), RELOAD_CONFIRM)
        self.reload_report["unconfirmed"] = [p.no for p in pending or []]
        self._write_json("reload.json", self.reload_report)
        self.reload_report = None
        self.reload_waiting = []
        sdnotify.ready(self.status_text())

    # -- stopping -----------------------------------------------------------------------------

    def begin_stop(self, how: int) -> None:
        """TERM: workers drain for up to graceful_timeout. QUIT: they get FAST_STOP seconds."""
        now = time.monotonic()
        fast = how != signal.SIGTERM
        if self.stopping is not None:
            if fast and not self.stop_fast:
                self.stop_fast = True
                self.stopping = min(self.stopping, now + FAST_STOP)
                log.info("fast stop requested during a graceful stop: %.0f s left", self.stopping - now)
                for pid in self.workers:
                    self.kill(pid, signal.SIGQUIT)
            return
        grace = FAST_STOP if fast else self.cfg.graceful_timeout
        self.stopping = now + grace
        self.stop_fast = fast
        log.info("stopping (%s): %d workers, %g s grace", "fast" if fast else "graceful", len(self.workers), grace)
        sdnotify.stopping(self.status_text())
        for pid in self.workers:
            self.kill(pid, signal.SIGQUIT if fast else signal.SIGTERM)

    def finish_stop(self) -> None:
        for proc in list(self.workers.values()):
            log.warning("worker %d (pid %d) still running at the end of the stop; killing it", proc.no, proc.pid)
            self.kill(proc.pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while self.workers and time.monotonic() < deadline:
            self.sleep(0.05)
            self.reap()
        if self.broker_pid:
            pid = self.broker_pid
            self.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 2
            while self.broker_pid and time.monotonic() < deadline:
                self.sleep(0.05)
                self.reap()
            if self.broker_pid:
                self.kill(pid, signal.SIGKILL)
                self.broker_pid = 0
                try:
                    os.waitpid(pid, 0)
                except ChildProcessError:
                    pass
        if self.metrics is not None:
            self.metrics.stop()
        if self.exit_code:
            log.info("stopped after a failure (exit status %d)", self.exit_code)
        else:
            log.info("stopped")

    def kill(self, pid: int, sig: int) -> None:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass

    def tell_broker(self, line: str) -> None:
        try:
            os.write(self.broker_control, line.encode() + b"\n")
        except OSError as exc:
            if exc.errno not in (errno.EPIPE, errno.EBADF):
                raise

    def cleanup(self) -> None:
        """Leave nothing behind: no process, no file of ours in the runtime directory."""
        for pid in list(self.workers) + ([self.broker_pid] if self.broker_pid else []):
            self.kill(pid, signal.SIGKILL)
        if self.metrics is not None:
            self.metrics.kill()
        for path in self.pid_files:
            try:
                with open(path) as fh:
                    if fh.read().strip() == str(os.getpid()):
                        os.unlink(path)
            except OSError:
                pass
        for name in RUNTIME_FILES:
            try:
                os.unlink(os.path.join(self.runtime_dir, name))
            except OSError:
                pass
        if self.created_runtime_dir:
            try:
                os.rmdir(self.runtime_dir)
            except OSError:
                pass  # something else was put there: leave it


def describe_exit(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"was killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exited with status {os.WEXITSTATUS(status)}"


def pin_to_cpu(index: int, worker_no: int) -> None:
    """Pin this process to CPU `index` mod the CPUs it may use (taskset, cgroups and containers restrict them)."""
    import psutil

    me = psutil.Process()
    allowed = sorted(me.cpu_affinity() or [])
    if not allowed:
        return
    cpu = allowed[index % len(allowed)]
    me.cpu_affinity([cpu])
    log.info("worker %d pinned to CPU %d", worker_no, cpu)


# -- start-up checks and logging ------------------------------------------------------------


def resolve_runtime_dir(cfg: Config, env: dict[str, str] | None = None) -> str:
    """--runtime-dir, else systemd's $RUNTIME_DIRECTORY, else a per-user, per-port private directory."""
    env = dict(os.environ) if env is None else env
    if cfg.runtime_dir:
        return os.path.abspath(cfg.runtime_dir)
    if env.get("RUNTIME_DIRECTORY"):
        return env["RUNTIME_DIRECTORY"].split(":")[0]
    if env.get("XDG_RUNTIME_DIR"):
        return os.path.join(env["XDG_RUNTIME_DIR"], f"chatcluster-{cfg.port}")
    return f"/tmp/chatcluster-{os.getuid()}-{cfg.port}"


def prepare_runtime_dir(path: str) -> bool:
    """Create the private runtime directory, or check that an existing one is ours and private.

    Returns True when it was created here (and so may be removed at exit).
    """
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise StartupError(f"runtime directory {path} cannot be created: {parent} does not exist; "
                           f"create it or choose another directory with --runtime-dir")
    if len(os.path.join(path, "bus-out")) > 100:
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
    # lstat, not stat: in a shared /tmp a symlink planted by someone else must not be followed.
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise StartupError(f"runtime directory {path} exists but is not a directory; remove it or "
                           f"choose another with --runtime-dir")
    if st.st_uid != os.getuid():
        raise StartupError(f"runtime directory {path} belongs to another user (uid {st.st_uid}); "
                           f"choose another with --runtime-dir")
    if st.st_mode & 0o077:
        os.chmod(path, 0o700)
    if not os.access(path, os.W_OK | os.X_OK):
        raise StartupError(f"runtime directory {path} is not writable; fix its permissions or choose "
                           f"another with --runtime-dir")
    return created


def running_pid(pid_file: str) -> int | None:
    """The pid in `pid_file` if that process is alive and is a chatcluster, else None."""
    try:
        with open(pid_file) as fh:
            pid = int(fh.read().strip())
    except (OSError, ValueError):
        return None
    if pid <= 0:
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


def check_port_free(host: str, port: int) -> None:
    """Fail early, with a clear message, when another program holds the port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    probe = socket.socket(family, socket.SOCK_STREAM)
    try:
        # No SO_REUSEPORT here on purpose: this bind must fail if anyone at all holds the port.
        probe.bind((host, port))
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise StartupError(f"port {port} on {host} is in use by another program; choose another "
                               f"with --port or stop that program") from None
        if exc.errno == errno.EADDRNOTAVAIL:
            raise StartupError(f"address {host} is not an address of this machine; choose another "
                               f"with --host") from None
        if exc.errno == errno.EACCES:
            raise StartupError(f"port {port} is privileged and this user may not bind it; choose a port "
                               f"above 1023 with --port") from None
        raise StartupError(f"cannot bind {host}:{port}: {exc.strerror}") from None
    finally:
        probe.close()


_role = "supervisor"


def set_role(role: str) -> None:
    global _role
    _role = role


class _RoleFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.role = _role
        return True


def setup_logging(level: str) -> None:
    """One line per event on stderr: `[time] role[pid] LEVEL message`; no time when journald adds it."""
    handler = logging.StreamHandler(sys.stderr)
    if sdnotify.logs_to_journal():
        fmt = "%(role)s[%(process)d] %(levelname)s %(message)s"
    else:
        fmt = "%(asctime)s %(role)s[%(process)d] %(levelname)s %(message)s"
    handler.setFormatter(logging.Formatter(fmt))
    handler.addFilter(_RoleFilter())
    root = logging.getLogger("chatcluster")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
