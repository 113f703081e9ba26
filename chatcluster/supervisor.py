"""The supervisor: starts, watches, replaces and stops the broker and worker processes.

It knows processes, not chat. Signal handlers only queue the signal; the main
loop dispatches to `handle_<name>` methods, in the manner of gunicorn's arbiter:
TERM stops gracefully, INT and QUIT stop fast, HUP reloads the config, TTIN and
TTOU add or retire one worker, USR1 applies `chatcluster scale`. Dead workers
are reaped and respawned (with back-off when they keep dying young), a worker
that cannot boot at all stops the cluster instead of crash-looping, and a
worker whose heartbeat stops is killed and replaced. systemd hears about all
of it through `sdnotify`.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import select
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from . import sdnotify
from . import stats as S
from .config import Config, ConfigError, load

log = logging.getLogger("chatcluster.supervisor")

EXIT_BOOT_FAILED = 3
YOUNG = 5.0  # a worker that dies younger than this is restarted with back-off
BOOT_TIMEOUT = 30.0
HANDLED = ("HUP", "INT", "QUIT", "TERM", "TTIN", "TTOU", "USR1", "USR2", "CHLD")


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


@dataclass
class SlotPlan:
    """Respawn bookkeeping for a worker position: how often it died young, when to retry."""

    failures: int = 0
    not_before: float = 0.0


@dataclass
class Supervisor:
    cfg: Config
    config_path: str | None
    overrides: dict[str, object]
    runtime_dir: str
    pid_file: str
    workers: dict[int, WorkerProc] = field(default_factory=dict)
    target: int = 0
    broker_pid: int = 0
    broker_control: int = -1
    broker_started: float = 0.0
    next_no: int = 1
    generation: int = 1
    plans: dict[int, SlotPlan] = field(default_factory=dict)
    respawn_slots: list[int] = field(default_factory=list)
    sig_queue: list[int] = field(default_factory=list)
    stopping: float | None = None
    exit_code: int = 0
    announced_ready: bool = False
    last_status: float = 0.0

    # -- setup --------------------------------------------------------------------------------

    def run(self) -> int:
        self.target = self.cfg.worker_count()
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.stats = S.StatsFile(os.path.join(self.runtime_dir, "stats"), create=True)
        self.write_live_config()
        self.write_pid_file()
        for name in HANDLED:
            signal.signal(getattr(signal, "SIG" + name), self._on_signal)
        signal.set_wakeup_fd(self.wake_w)
        log.info("supervisor starting %d workers on %s:%d (runtime dir %s)", self.target, self.cfg.host,
                 self.cfg.port, self.runtime_dir)
        try:
            self.start_broker()
            while len(self.workers) < self.target:
                self.spawn_worker()
            self.loop()
        finally:
            self.cleanup()
        return self.exit_code

    def _on_signal(self, signum: int, _frame: object) -> None:
        self.sig_queue.append(signum)

    def write_pid_file(self) -> None:
        with open(self.pid_file + ".tmp", "w") as fh:
            fh.write(f"{os.getpid()}\n")
        os.replace(self.pid_file + ".tmp", self.pid_file)

    def write_live_config(self) -> None:
        path = os.path.join(self.runtime_dir, "config.json")
        with open(path + ".tmp", "w") as fh:
            json.dump(self.cfg.values, fh)
        os.replace(path + ".tmp", path)

    # -- process creation ---------------------------------------------------------------------

    def _fork(self, role: str, body: Callable[[], int | None], keep: tuple[int, ...] = ()) -> int:
        pid = os.fork()
        if pid:
            return pid
        code: int = 1
        try:
            signal.set_wakeup_fd(-1)
            for name in HANDLED:
                signal.signal(getattr(signal, "SIG" + name), signal.SIG_DFL)
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
        log.info("broker started, pid %d", self.broker_pid)

    def spawn_worker(self, slot: int | None = None) -> WorkerProc:
        from . import worker

        used = {w.slot for w in self.workers.values()}
        if slot is None:
            slot = next(i for i in range(S.SLOTS) if i not in used)
        no = self.next_no
        self.next_no += 1
        cfg, runtime_dir, stats, generation = self.cfg, self.runtime_dir, self.stats, self.generation

        def body() -> int:
            if cfg.cpu_affinity:
                import psutil

                cpus = os.cpu_count() or 1
                psutil.Process().cpu_affinity([slot % cpus])
            return worker.main(cfg, no, f"w{no}", slot, generation, runtime_dir, stats)

        self.stats.write(slot, 0, S.BOOTING, no, generation, time.time(), time.monotonic(), 0, 0, 0, 0, 0, 0)
        pid = self._fork(f"worker {no}", body)
        proc = WorkerProc(pid, no, slot, generation, time.monotonic())
        self.workers[pid] = proc
        log.info("worker %d started, pid %d", no, pid)
        return proc

    # -- the loop -----------------------------------------------------------------------------

    def loop(self) -> None:
        while True:
            self.sleep(0.2)
            self.reap()
            while self.sig_queue:
                signum = self.sig_queue.pop(0)
                handler = getattr(self, "handle_" + signal.Signals(signum).name[3:].lower(), None)
                if handler:
                    handler()
            now = time.monotonic()
            if self.stopping is not None:
                if not self.workers or now >= self.stopping:
                    self.finish_stop()
                    return
                continue
            self.check_workers(now)
            self.maintain(now)
            self.notify(now)

    def sleep(self, timeout: float) -> None:
        try:
            ready, _, _ = select.select([self.wake_r], [], [], timeout)
        except InterruptedError:
            return
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
            how = describe_exit(status)
            if pid == self.broker_pid:
                self.broker_pid = 0
                if self.stopping is None:
                    log.error("broker (pid %d) %s; restarting it", pid, how)
                    self.start_broker()
                continue
            proc = self.workers.pop(pid, None)
            if proc is None:
                continue
            self.stats.clear(proc.slot)
            self.tell_broker(f"GONE w{proc.no}")
            if self.stopping is not None or proc.retiring:
                log.info("worker %d (pid %d) %s", proc.no, pid, how)
                continue
            log.error("worker %d (pid %d) %s", proc.no, pid, how)
            code = os.waitstatus_to_exitcode(status)
            if not proc.ready and code == EXIT_BOOT_FAILED:
                log.error("worker %d could not boot; stopping the cluster (see the error above)", proc.no)
                self.exit_code = 1
                self.begin_stop(signal.SIGQUIT)
                continue
            plan = self.plans.setdefault(proc.slot, SlotPlan())
            if time.monotonic() - proc.started < YOUNG:
                plan.failures += 1
                delay = min(0.1 * 2 ** (plan.failures - 1), 30.0)
                plan.not_before = time.monotonic() + delay
                if plan.failures > 1:
                    log.warning("worker slot %d keeps dying young; next start in %.1f s", proc.slot, delay)
            else:
                plan.failures = 0
                plan.not_before = 0.0
            self.respawn_slots.append(proc.slot)

    def maintain(self, now: float) -> None:
        live = [w for w in self.workers.values() if not w.retiring]
        for slot in list(self.respawn_slots):
            if len(live) >= self.target:
                self.respawn_slots.remove(slot)
                continue
            if self.plans.get(slot, SlotPlan()).not_before <= now:
                self.respawn_slots.remove(slot)
                live.append(self.spawn_worker(slot))
        while len(live) + len(self.respawn_slots) < self.target:
            live.append(self.spawn_worker())
        extra = len(live) - self.target
        for proc in sorted(live, key=lambda w: -w.no)[: max(0, extra)]:
            log.info("retiring worker %d (pid %d)", proc.no, proc.pid)
            proc.retiring = True
            self.kill(proc.pid, signal.SIGTERM)

    def check_workers(self, now: float) -> None:
        for proc in list(self.workers.values()):
            view = self.stats.read(proc.slot)
            if not proc.ready:
                if view.pid == proc.pid and view.state == S.READY:
                    proc.ready = True
                    self.plans.setdefault(proc.slot, SlotPlan())
                elif now - proc.started > BOOT_TIMEOUT:
                    log.error("worker %d (pid %d) did not become ready within %.0f s; killing it",
                              proc.no, proc.pid, BOOT_TIMEOUT)
                    self.kill(proc.pid, signal.SIGKILL)
                continue
            if view.pid == proc.pid and now - view.heartbeat > self.cfg.worker_timeout:
                log.error("worker %d (pid %d) has not reported for %.1f s (worker_timeout=%g); "
                          "killing and replacing it", proc.no, proc.pid, now - view.heartbeat,
                          self.cfg.worker_timeout)
                self.kill(proc.pid, signal.SIGKILL)

    def notify(self, now: float) -> None:
        ready = [w for w in self.workers.values() if w.ready and not w.retiring]
        if not self.announced_ready and len(ready) >= self.target:
            self.announced_ready = True
            log.info("cluster ready: %d workers accepting on %s:%d", len(ready), self.cfg.host, self.cfg.port)
            sdnotify.ready(self.status_text(), mainpid=os.getpid())
        if now - self.last_status >= 2.0:
            self.last_status = now
            if self.announced_ready:
                sdnotify.status(self.status_text())
            interval = sdnotify.watchdog_interval()
            if interval is not None:
                sdnotify.watchdog()

    def status_text(self) -> str:
        clients = sum(self.stats.read(w.slot).clients for w in self.workers.values())
        return f"{len(self.workers)} workers, {clients} clients"

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
        self.target += 1
        log.info("TTIN: %d workers wanted", self.target)

    def handle_ttou(self) -> None:
        if self.target > 1:
            self.target -= 1
        log.info("TTOU: %d workers wanted", self.target)

    def handle_usr1(self) -> None:
        path = os.path.join(self.runtime_dir, "scale")
        try:
            with open(path) as fh:
                wanted = int(fh.read().strip())
            os.unlink(path)
        except (OSError, ValueError) as exc:
            log.error("USR1 without a valid scale request in %s: %s", path, exc)
            return
        self.target = max(1, wanted)
        log.info("scale: %d workers wanted", self.target)

    def handle_hup(self) -> None:
        sdnotify.reloading("reloading configuration")
        try:
            new = load(self.config_path, self.overrides)
        except ConfigError as exc:
            log.error("reload refused, keeping the running configuration: %s", exc)
            sdnotify.ready(self.status_text())
            return
        live, restart = self.cfg.live_changes(new)
        values = dict(self.cfg.values)
        values.update(live)
        self.cfg = Config(values=values, source=new.source)
        self.write_live_config()
        logging.getLogger("chatcluster").setLevel(self.cfg.log_level.upper())
        for proc in self.workers.values():
            self.kill(proc.pid, signal.SIGHUP)
        log.info("reloaded %s: applied %s", self.config_path or "defaults",
                 ", ".join(f"{k}={v!r}" for k, v in live.items()) or "no live changes")
        if restart:
            log.warning("changed settings that need a restart to apply: %s", ", ".join(restart))
        sdnotify.ready(self.status_text())

    # -- stopping -----------------------------------------------------------------------------

    def begin_stop(self, how: int) -> None:
        now = time.monotonic()
        grace = self.cfg.graceful_timeout if how == signal.SIGTERM else 1.0
        deadline = now + grace + 1.0
        if self.stopping is not None:
            if how == signal.SIGQUIT:
                self.stopping = min(self.stopping, deadline)
                for pid in self.workers:
                    self.kill(pid, signal.SIGQUIT)
            return
        self.stopping = deadline
        log.info("stopping (%s): %d workers, %.0f s grace", "graceful" if how == signal.SIGTERM else "fast",
                 len(self.workers), grace)
        sdnotify.stopping()
        for pid in self.workers:
            self.kill(pid, how)

    def finish_stop(self) -> None:
        for pid in list(self.workers):
            log.warning("worker pid %d still running after the grace period; killing it", pid)
            self.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while self.workers and time.monotonic() < deadline:
            self.sleep(0.05)
            self.reap()
        if self.broker_pid:
            self.kill(self.broker_pid, signal.SIGTERM)
            try:
                os.waitpid(self.broker_pid, 0)
            except ChildProcessError:
                pass
            self.broker_pid = 0
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
        for pid in list(self.workers) + ([self.broker_pid] if self.broker_pid else []):
            self.kill(pid, signal.SIGKILL)
        try:
            with open(self.pid_file) as fh:
                if fh.read().strip() == str(os.getpid()):
                    os.unlink(self.pid_file)
        except OSError:
            pass
        for name in ("bus-in", "bus-out", "config.json", "stats"):
            try:
                os.unlink(os.path.join(self.runtime_dir, name))
            except OSError:
                pass


def describe_exit(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"was killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exited with status {os.WEXITSTATUS(status)}"


# -- start-up checks and logging ------------------------------------------------------------


def resolve_runtime_dir(cfg: Config, env: dict[str, str] | None = None) -> str:
    env = dict(os.environ) if env is None else env
    if cfg.runtime_dir:
        return cfg.runtime_dir
    if env.get("RUNTIME_DIRECTORY"):
        return env["RUNTIME_DIRECTORY"].split(":")[0]
    if env.get("XDG_RUNTIME_DIR"):
        return os.path.join(env["XDG_RUNTIME_DIR"], f"chatcluster-{cfg.port}")
    return f"/tmp/chatcluster-{os.getuid()}-{cfg.port}"


def prepare_runtime_dir(path: str) -> None:
    """Create the private runtime directory, or check that an existing one is ours and private."""
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise StartupError(f"runtime directory {path} cannot be created: {parent} does not exist; "
                           f"create it or choose another directory with --runtime-dir")
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except PermissionError:
        raise StartupError(f"runtime directory {path} cannot be created: permission denied in {parent}; "
                           f"choose a writable location with --runtime-dir") from None
    st = os.lstat(path)
    import stat as st_mod

    if not st_mod.S_ISDIR(st.st_mode):
        raise StartupError(f"runtime directory {path} exists but is not a directory; remove it or "
                           f"choose another with --runtime-dir")
    if st.st_uid != os.getuid():
        raise StartupError(f"runtime directory {path} belongs to another user (uid {st.st_uid}); "
                           f"choose another with --runtime-dir")
    if st.st_mode & 0o077:
        os.chmod(path, 0o700)
    if len(os.path.join(path, "bus-out")) > 100:
        raise StartupError(f"runtime directory {path} is too long for Unix socket paths (max about 90 "
                           f"characters); choose a shorter one with --runtime-dir")


def running_pid(pid_file: str) -> int | None:
    """The pid in `pid_file` if that process is alive, else None."""
    try:
        with open(pid_file) as fh:
            pid = int(fh.read().strip())
    except (OSError, ValueError):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        return pid
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
    handler = logging.StreamHandler(sys.stderr)
    if sdnotify.under_systemd():
        fmt = "%(role)s[%(process)d] %(levelname)s %(message)s"  # journald adds the time
    else:
        fmt = "%(asctime)s %(role)s[%(process)d] %(levelname)s %(message)s"
    handler.setFormatter(logging.Formatter(fmt))
    handler.addFilter(_RoleFilter())
    root = logging.getLogger("chatcluster")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
