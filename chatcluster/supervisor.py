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
(see `upgrade`). Workers are started a few at a time, so that the loop keeps
answering signals while many boot, and never more than the CPUs can use
unless allowed (`allow_many_workers`). Files that vanish from the runtime
directory while it runs (a tmp cleaner) are written again, and the broker is
restarted to bind its sockets again. Every path and every write goes through
`paths`.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import select
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from . import paths, sdnotify
from . import stats as S
from . import upgrade as U
from .config import MAX_WORKERS, Config, ConfigError, load, usable_cpus, worker_cap, worker_cap_text
from .exporter import MetricsProcess
from .paths import StartupError
from .procs import EXIT_BOOT_FAILED, YOUNG, Backoff, WorkerProc
from .wire import worker_name

log = logging.getLogger("chatcluster.supervisor")

BOOT_TIMEOUT = 30.0  # a worker not accepting connections by then is killed
FAST_STOP = 1.0  # seconds a fast stop (INT, QUIT) gives the workers
STATUS_EVERY = 2.0  # seconds between STATUS= updates to systemd
RELOAD_CONFIRM = 5.0  # seconds a reload waits for every worker to confirm it applied the new settings
TICK = 0.2  # the main loop wakes at least this often to check heartbeats
# Workers booting at once. Each boot costs CPU (a fork, the bus handshake); hundreds at once
# starved the loop, so signals went unanswered for many seconds. The rest wait their turn.
SPAWN_STEP = 4
RUNTIME_CHECK = 2.0  # seconds between looks for files deleted from the runtime directory
BUS_BIND_GRACE = 10.0  # a broker this old has bound its sockets, even if we never saw them
# A pass of the loop this long after the previous one means the supervisor itself did not run:
# the whole cluster was frozen (docker pause, a cgroup freezer, Ctrl-Z, a paused VM) or starved.
STALLED = 2.0
assert MAX_WORKERS * 2 <= S.SLOTS  # a whole generation can be replaced
HANDLED = ("HUP", "INT", "QUIT", "TERM", "TTIN", "TTOU", "USR1", "USR2", "CHLD")
# Signals that mean something to the supervisor alone. A child ignores them, so that one sent to
# the whole process group (`kill -TTIN -- -PGID`, `systemctl kill` without --kill-who=main) cannot
# stop it (the default action of TTIN and TTOU) or end it (that of HUP, USR1 and USR2). A worker
# installs its own HUP handler once it can reload.
CHILD_IGNORES = ("HUP", "TTIN", "TTOU", "USR1", "USR2")
HANDLED_SIGNALS = frozenset(getattr(signal, "SIG" + name) for name in HANDLED)


@dataclass
class Supervisor:
    cfg: Config
    config_path: str | None
    overrides: dict[str, object]
    runtime_dir: str
    pid_file: str
    created_runtime_dir: bool = False
    lock_fd: int = -1  # holds the runtime directory (paths.lock_runtime_dir) for the supervisor's life
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
    resumed: U.Resumed | None = None  # set when re-executed by an upgrade: what to take over
    next_runtime_check: float = 0.0
    bus_seen: int = 0  # the broker pid whose sockets were last seen in the runtime directory
    stats_lost: bool = False  # the stats file was deleted; said once in the log
    broker_killed: str = ""  # why the supervisor stopped the running broker, for the log when it is reaped
    pid_files_unwritable: list[str] = field(default_factory=list)  # deleted pid files that could not be rewritten
    runtime_dir_unusable: bool = False  # it was deleted and could not be created again
    metrics: MetricsProcess | None = None  # the /metrics endpoint's process (metrics_listen)
    last_pass: float = 0.0  # when the loop last ran
    # Heartbeats are judged only over time the supervisor was watching: after it did not run for
    # a while (frozen with its children, say), every child gets worker_timeout from here on.
    watching_since: float = 0.0

    # -- setup --------------------------------------------------------------------------------

    def run(self) -> int:
        """Start everything, supervise until stopped, clean up; the exit status of the cluster."""
        self.target = self.cfg.worker_count()
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            # After an upgrade's re-exec the workers are running: keep their slots.
            self.stats = S.StatsFile(os.path.join(self.runtime_dir, paths.STATS), create=self.resumed is None)
            self.metrics = (MetricsProcess.after_exec if self.resumed is not None else MetricsProcess)(
                self.cfg.metrics_listen, self.runtime_dir, self.stats)
            self.write_live_config()
            self.write_pid_file()
            for name in HANDLED:
                signal.signal(getattr(signal, "SIG" + name), self._on_signal)
            signal.set_wakeup_fd(self.wake_w)
            if self.resumed is not None:
                U.resume(self, self.resumed)
            else:
                log.info("supervisor starting %d workers on %s:%d (runtime dir %s, pid file %s)", self.target,
                         self.cfg.host, self.cfg.port, self.runtime_dir, self.pid_file)
                self.start_broker()
                self.maintain(time.monotonic())  # the first workers; the loop starts the rest
            self.loop()
        finally:
            self.cleanup()
        return self.exit_code

    def _on_signal(self, signum: int, _frame: object) -> None:
        self.sig_queue.append(signum)

    @property
    def pid_files(self) -> list[str]:
        """--pid-file, and always one in the runtime directory, where the `chatcluster` commands look."""
        return list(dict.fromkeys((self.pid_file, paths.default_pid_file(self.runtime_dir))))

    def write_pid_file(self, only: list[str] | None = None) -> None:
        for path in self.pid_files if only is None else only:
            try:
                paths.write_pid_file(path, os.getpid())
            except OSError as exc:
                raise StartupError(f"cannot write the pid file {path}: {exc.strerror}; "
                                   f"choose a writable path with --pid-file") from None

    def write_live_config(self) -> None:
        """The running configuration, where workers read it on HUP (and `chatcluster scale` the cap)."""
        self._write_json(paths.LIVE_CONFIG, {"version": self.reloads, "values": self.cfg.values,
                                             "worker_cap": self.worker_cap(), "cpus": usable_cpus()})

    def _write_json(self, name: str, value: object, fsync: bool = True) -> None:
        paths.atomic_write(os.path.join(self.runtime_dir, name), json.dumps(value), fsync=fsync)

    def worker_cap(self) -> int:
        return worker_cap(self.cfg.allow_many_workers)

    def write_header(self) -> None:
        self.stats.write_header(os.getpid(), self.broker_pid, self.generation, self.target, self.cfg.port)

    # -- process creation ---------------------------------------------------------------------

    def _fork(self, role: str, body: Callable[[], int | None], keep: tuple[int, ...] = ()) -> int:
        # Blocked across the fork: until the child has put its own dispositions in place, a
        # signal meant for it (a stop right after a scale-up, or right after an upgrade forked
        # its new generation) would run the supervisor's handler in the child and be forgotten
        # there. Blocked, it waits until the child can act on it.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED_SIGNALS)
        try:
            pid = os.fork()
        except BaseException:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            raise
        if pid:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            return pid
        code: int = 1
        try:
            signal.set_wakeup_fd(-1)
            for name in HANDLED:
                ignored = name in CHILD_IGNORES
                signal.signal(getattr(signal, "SIG" + name), signal.SIG_IGN if ignored else signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            for fd in (self.wake_r, self.wake_w, self.broker_control, self.lock_fd):
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
        from .roles import run_broker

        if self.broker_control >= 0:
            os.close(self.broker_control)
        r, w = os.pipe()
        self.broker_control = w
        # A broker replacing a dead one rebuilds the roster from these workers.
        live = [self.worker_name(w.no) for w in self.workers.values()]
        multihost = bool(self.cfg.nats_servers)
        self.broker_pid = self._fork("broker", lambda: run_broker(self.runtime_dir, r, live, self.stats, multihost),
                                     keep=(r,))
        os.close(r)
        self.broker_started = time.monotonic()
        self.write_header()
        log.info("broker started, pid %d", self.broker_pid)

    def worker_name(self, no: int) -> str:
        """Worker `no`'s name on the bus: qualified with this host's node_name in a multi-host cluster."""
        return worker_name(no, self.cfg.node_name if self.cfg.nats_servers else "")

    def spawn_worker(self, slot: int | None = None, replacing: int = 0,
                     succeeds: tuple[str, int] | None = None) -> WorkerProc:
        """Fork a worker; `succeeds` (id, pid) names the old worker it takes over from in an upgrade."""
        from .roles import run_worker

        used = {w.slot for w in self.workers.values()}
        if slot is None:
            slot = next(i for i in range(S.SLOTS) if i not in used)
        no = self.next_no
        self.next_no += 1
        cfg, runtime_dir, stats, generation = self.cfg, self.runtime_dir, self.stats, self.generation

        def body() -> int:
            if cfg.cpu_affinity:
                pin_to_cpu(slot, no)
            return run_worker(cfg, no, self.worker_name(no), slot, generation, runtime_dir, stats, succeeds)

        self.stats.begin_slot(slot, no, generation)
        pid = self._fork(f"worker {no}", body)
        proc = WorkerProc(pid, no, slot, generation, time.monotonic())
        self.workers[pid] = proc
        if replacing:
            log.info("worker %d started, pid %d, replacing worker %d", no, pid, replacing)
        elif succeeds:
            log.info("worker %d started, pid %d, to take over from worker %s", no, pid,
                     succeeds[0][1:].partition("@")[0])
        else:
            log.info("worker %d started, pid %d", no, pid)
        return proc

    # -- the loop -----------------------------------------------------------------------------

    def loop(self) -> None:
        self.last_pass = time.monotonic()
        while True:
            self.sleep(self.next_wake(time.monotonic()))
            self.check_stall(time.monotonic())
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
                self.check_broker(now)
                if self.metrics is not None:
                    self.metrics.check(now, self.cfg.worker_timeout, self.watching_since)
                if now >= self.next_runtime_check:
                    self.next_runtime_check = now + RUNTIME_CHECK
                    self.check_runtime_dir(now)
                self.maintain(now)
            self.write_header()
            self.notify(now)

    def check_stall(self, now: float) -> None:
        """Notice that the loop did not run for a while, and judge heartbeats only from now on.

        Frozen together with its children (a cgroup freezer, Ctrl-Z, a paused VM), the
        supervisor would otherwise wake to heartbeats older than worker_timeout and kill every
        worker and the broker, none of which was stuck.
        """
        if now - self.last_pass > STALLED:
            log.warning("the supervisor did not run for %.1f s (the cluster was paused, or the machine "
                        "starved it); heartbeats are judged from now on", now - self.last_pass)
            self.watching_since = now
        self.last_pass = now

    def next_wake(self, now: float) -> float:
        wake = now + TICK
        if self.stopping is None and self.spawns_due(now):
            return 0.0  # more workers to start and room to boot them: the next step at once
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
            self.tell_broker(f"GONE {self.worker_name(proc.no)}")
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
        if self.broker_killed:
            how = f"{how} after {self.broker_killed}"
            self.broker_killed = ""
        if self.stopping is not None:
            log.info("broker (pid %d) %s", pid, how)
            return
        if not self.announced_ready and os.waitstatus_to_exitcode(status) > 0:
            self.halt(f"the bus broker (pid {pid}) {how} before the cluster was ever ready (see its error above)")
            return
        if os.waitstatus_to_exitcode(status) == EXIT_BOOT_FAILED:
            # A multi-host bus process that found another host under its node_name: a new one
            # would take the name back and the two hosts would push each other out for ever.
            self.halt(f"the bus process (pid {pid}) {how}: a new one would fail the same way (see its error above)")
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

    def booting(self) -> int:
        """Workers started and not ready yet (the new generation of an upgrade included)."""
        return sum(1 for w in self.workers.values() if not w.ready and not w.retiring)

    def spawns_due(self, now: float) -> bool:
        """Whether `maintain` would start a worker now."""
        if self.broker_pid == 0 or self.booting() >= SPAWN_STEP:
            return False
        live = sum(1 for w in self.workers.values() if not w.retiring)
        if live + len(self.respawns) < self.target:
            return True
        return live < self.target and any(self.backoffs[slot].not_before <= now for slot, _ in self.respawns)

    def maintain(self, now: float) -> None:
        """Bring the broker and the number of live workers to what is wanted, SPAWN_STEP booting at a time."""
        if self.broker_pid == 0 and self.broker_backoff.not_before <= now:
            self.start_broker()
        live = [w for w in self.workers.values() if not w.retiring]
        room = SPAWN_STEP - self.booting()
        for slot, dead_no in list(self.respawns):
            if len(live) >= self.target:
                self.respawns.remove((slot, dead_no))
            elif self.backoffs[slot].not_before <= now and room > 0:
                self.respawns.remove((slot, dead_no))
                live.append(self.spawn_worker(slot, replacing=dead_no))
                room -= 1
        while len(live) + len(self.respawns) < self.target and room > 0:
            live.append(self.spawn_worker())
            room -= 1
        if self.metrics is not None:
            self.metrics.maintain(now, self._fork)
        # Every new worker of an upgrade has an old one to take over from: scale down after it.
        extra = 0 if self.upgrade is not None else len(live) - self.target
        for proc in sorted(live, key=lambda w: -w.no)[: max(0, extra)]:
            log.info("retiring worker %d (pid %d): %d workers wanted", proc.no, proc.pid, self.target)
            proc.retiring = True
            proc.retire_deadline = now + self.cfg.graceful_timeout
            self.kill(proc.pid, signal.SIGTERM)

    def check_broker(self, now: float) -> None:
        """Kill a broker that stopped beating (hung, or stopped with SIGSTOP): like a crash, its
        replacement rebuilds the roster from the workers and they resend what it never sequenced."""
        if not self.broker_pid or self.broker_killed:
            return
        beat = self.stats.broker_counters().heartbeat
        if beat < self.broker_started:
            # Not beaten yet (the figure is its predecessor's): it gets as long as a booting worker.
            if now - max(self.broker_started, self.watching_since) > BOOT_TIMEOUT:
                self.kill_broker(f"no heartbeat {BOOT_TIMEOUT:.0f} s after it started")
        elif now - max(beat, self.watching_since) > self.cfg.worker_timeout:
            self.kill_broker(f"no heartbeat for {now - beat:.1f} s (worker_timeout={self.cfg.worker_timeout:g})")

    def kill_broker(self, why: str) -> None:
        log.error("broker (pid %d): %s; killing it and starting a new one", self.broker_pid, why)
        self.broker_killed = why
        self.kill(self.broker_pid, signal.SIGKILL)

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
                elif now - max(proc.started, self.watching_since) > BOOT_TIMEOUT:
                    proc.cause = "boot_timeout"
                    self.kill_worker(proc, f"not accepting connections {BOOT_TIMEOUT:.0f} s after it started")
                continue
            if proc.retiring and now > proc.retire_deadline:
                self.kill_worker(proc, f"still draining {self.cfg.graceful_timeout:g} s after it was retired")
            elif view.pid == proc.pid and now - max(view.heartbeat, self.watching_since) > self.cfg.worker_timeout:
                proc.cause = "heartbeat_timeout"
                self.kill_worker(proc, f"no heartbeat for {now - view.heartbeat:.1f} s "
                                       f"(worker_timeout={self.cfg.worker_timeout:g})")

    def check_runtime_dir(self, now: float) -> None:
        """Put back what vanished from the runtime directory (a tmp cleaner, an operator's `rm`).

        The pid files and config.json are written again, so that the `chatcluster` commands
        and reloads keep working. Only a broker can bind the bus sockets again, so a broker
        whose sockets are gone is restarted (the broker-restart path loses nothing); without
        that, every worker started from then on would fail to reach the bus. The stats file
        is memory shared by every process and cannot be put back: that is said once.
        """
        found = False
        if not os.path.isdir(self.runtime_dir):
            new = not self.runtime_dir_unusable
            if new:
                log.error("the runtime directory %s was deleted; creating it again", self.runtime_dir)
            try:
                self.created_runtime_dir = paths.prepare_runtime_dir(self.runtime_dir) or self.created_runtime_dir
                self.relock_runtime_dir()
            except (StartupError, OSError) as exc:
                # The workers and the broker keep serving through the connections they have;
                # only restarts and the commands need the directory. Said once, tried each time.
                if new:
                    log.error("cannot create the runtime directory again (%s); the cluster goes on serving, "
                              "but a broker or worker that dies cannot be replaced until it exists", exc)
                self.runtime_dir_unusable = True
                return
            self.runtime_dir_unusable = False
            found = True
        lost = [path for path in self.pid_files if not os.path.lexists(path)]
        if lost:
            new = lost != self.pid_files_unwritable  # one that cannot be written is said once, tried each time
            found = found or new
            if new:
                log.warning("the pid file %s was deleted; writing it again", " and ".join(lost))
            try:
                self.write_pid_file(only=lost)
            except StartupError as exc:
                if new:
                    log.error("%s", exc)
                self.pid_files_unwritable = lost
            else:
                self.pid_files_unwritable = []
        if paths.missing_files(self.runtime_dir, (paths.LIVE_CONFIG,)):
            found = True
            log.warning("%s was deleted from %s; writing it again", paths.LIVE_CONFIG, self.runtime_dir)
            try:
                self.write_live_config()
            except OSError as exc:
                log.error("cannot write %s again: %s", os.path.join(self.runtime_dir, paths.LIVE_CONFIG), exc)
        if self.broker_pid and not self.broker_killed and self.upgrade is None:
            gone = paths.missing_files(self.runtime_dir, paths.BUS_SOCKETS)
            if not gone:
                self.bus_seen = self.broker_pid
            elif self.bus_seen == self.broker_pid or now - self.broker_started > BUS_BIND_GRACE:
                found = True
                log.error("the bus socket%s %s %s deleted from %s; restarting the broker (pid %d) so that it "
                          "binds %s again", "s" if len(gone) > 1 else "", " and ".join(gone),
                          "were" if len(gone) > 1 else "was", self.runtime_dir, self.broker_pid,
                          "them" if len(gone) > 1 else "it")
                self.broker_killed = "its bus sockets were deleted"
                self.kill(self.broker_pid, signal.SIGKILL)
        if not self.stats_lost and paths.missing_files(self.runtime_dir, (paths.STATS,)):
            found = self.stats_lost = True
            log.error("the stats file %s was deleted; the cluster goes on serving, but `chatcluster status` "
                      "cannot show it until it is restarted", os.path.join(self.runtime_dir, paths.STATS))
        if found:
            log.warning("files were deleted from the runtime directory %s while the cluster ran, as a tmp cleaner "
                        "does; keep the directory out of tmp cleaning (see \"Runtime directory\" in "
                        "docs/deploy.md)", self.runtime_dir)

    def relock_runtime_dir(self) -> None:
        """Hold the runtime directory made again after it was deleted, as the first one was held."""
        try:
            fd = paths.lock_runtime_dir(self.runtime_dir)
        except (StartupError, OSError) as exc:
            log.error("cannot hold the runtime directory made again: %s", exc)
            return
        if self.lock_fd >= 0:
            os.close(self.lock_fd)
        self.lock_fd = fd

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
        """`chatcluster scale N [--allow-many-workers]` writes `N [allow-many]` to RUNTIME_DIR/scale, then USR1."""
        path = os.path.join(self.runtime_dir, paths.SCALE_REQUEST)
        data = paths.read_small(path, 256)
        try:
            os.unlink(path)
        except OSError:
            pass
        words = (data or b"").decode(errors="replace").split()
        try:
            wanted = int(words[0])
            if words[1:] not in ([], ["allow-many"]):
                raise ValueError(f"unexpected {' '.join(words[1:])!r}")
        except (IndexError, ValueError) as exc:
            log.error("USR1 without a valid scale request in %s (%s); use `chatcluster scale N`", path,
                      exc if data is not None else "no such file")
            return
        self.scale_to(wanted, "scale", allow_many=words[1:] == ["allow-many"])

    def handle_usr2(self) -> None:
        """`chatcluster upgrade`: every process moves to the installed code, keeping the connections."""
        U.request(self)

    def scale_to(self, wanted: int, why: str, allow_many: bool = False) -> None:
        if self.stopping is not None:
            log.warning("%s ignored: the cluster is stopping", why)
            return
        cap = MAX_WORKERS if allow_many else self.worker_cap()
        if wanted > cap and wanted > self.target:
            # Past the cap is refused, not clamped: hundreds of booting workers starve every CPU.
            log.warning("%s refused: %d workers is more than %d, the cap of %s; staying at %d (set "
                        "allow_many_workers, or use `chatcluster scale N --allow-many-workers`, to go further)",
                        why, wanted, cap, worker_cap_text(), self.target)
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
            self._write_json(paths.RELOAD_RESULT, {"seq": self.reloads, "ok": False, "config": self.config_path,
                                                   "error": str(exc), "applied": {}, "restart": {}}, fsync=False)
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
        self._write_json(paths.RELOAD_RESULT, self.reload_report, fsync=False)
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
            paths.remove_pid_file(path, os.getpid())
        for name in paths.RUNTIME_FILES:
            try:
                os.unlink(os.path.join(self.runtime_dir, name))
            except OSError:
                pass
        paths.remove_temporaries(self.runtime_dir)
        paths.remove_handoff_sockets(self.runtime_dir)
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


# -- logging ---------------------------------------------------------------------------------


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
