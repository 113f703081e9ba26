"""Upgrading a running cluster to the installed code, process by process, without dropping anyone.

`chatcluster upgrade` (or USR2) asks the supervisor for an upgrade, which
goes through three phases; the supervisor calls in here from its loop:

1. check: a child interpreter imports the installed code and loads the config
   with it (`upgrade_check`). If that fails, nothing has changed: the failure is
   reported and the cluster goes on as it was.
2. re-exec: the supervisor writes its state (broker, workers, counters) to a
   file in the runtime directory and `execv`s itself in place, as gunicorn
   does on USR2 but keeping its pid, so systemd's main pid, the pid file and
   every parent/child relation stay right. Signals are blocked across the exec
   and delivered once the new code has installed its handlers. The new code
   reads the state back, adopts its children, and forks a new generation of
   workers, each paired with an old one whose listener and clients it takes.
   It keeps the address, runtime directory and pid file it runs with, whatever
   the config file says now: settings that cannot change live are reported as
   needing a restart, exactly as a reload reports them, and live ones apply.
3. handoff: once every new worker is ready, each old one gets USR2 and hands
   its listening socket and its clients over (`migrate`), then exits. The bus
   broker is not replaced: it holds the one order that makes the handoff
   lossless, and its wire format is versioned instead.

If the new generation cannot start (a worker exits or hangs at boot) it is
stopped and the old one goes on serving: the supervisor then runs the new code
but nothing changed for anyone connected. The outcome goes to
RUNTIME_DIR/upgrade.json, where the `chatcluster upgrade` command waits for it.
This module knows processes, not chat; it reaches the supervisor only through
the `Host` interface, so that the two do not import each other.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from . import paths, sdnotify
from .config import SETTINGS, Config
from .procs import WorkerProc
from .stats import StatsFile
from .wire import WIRE_VERSION

log = logging.getLogger("chatcluster.upgrade")

STATE_ENV = "CHATCLUSTER_UPGRADE_STATE"  # names the state file in the re-executed supervisor
# Of the state file; the new code reads every format up to its own. Fields added later
# (the running settings, the pid file) are optional, so format 1 still describes it.
STATE_FORMAT = 1
CHECK_TIMEOUT = 60.0
HANDOFF_TIMEOUT = 45.0  # old workers still running by then could not hand over and keep serving
# Signals whose arrival during the exec must not be lost (nor kill the process, their default).
BLOCKED = {signal.SIGCHLD, signal.SIGHUP, signal.SIGINT, signal.SIGQUIT, signal.SIGTERM, signal.SIGTTIN,
           signal.SIGTTOU, signal.SIGUSR1, signal.SIGUSR2}

CHECK, BOOT, HANDOFF = "check", "boot", "handoff"


@dataclass
class Upgrade:
    token: str  # the requester's, echoed in the result so it knows the answer is its own
    began: float  # monotonic; CLOCK_MONOTONIC is the same before and after the exec
    phase: str = CHECK
    check_pid: int = 0
    deadline: float = 0.0
    old_generation: int = 0
    pairs: dict[int, int] = field(default_factory=dict)  # new worker pid -> old worker pid it succeeds
    applied: dict[str, Any] = field(default_factory=dict)  # live settings the new config file changed
    restart: dict[str, list[Any]] = field(default_factory=dict)  # name -> [running, in the file]


class Host(Protocol):
    """What an upgrade reads and changes in the supervisor (`supervisor.Supervisor` is the one host)."""

    cfg: Config
    config_path: str | None
    overrides: dict[str, object]
    runtime_dir: str
    pid_file: str
    created_runtime_dir: bool
    workers: dict[int, WorkerProc]
    target: int
    broker_pid: int
    broker_control: int
    lock_fd: int
    broker_started: float
    next_no: int
    generation: int
    respawns: list[tuple[int, int]]
    sig_queue: list[int]
    stopping: float | None
    announced_ready: bool
    reloads: int
    upgrade: Upgrade | None
    stats: StatsFile

    def check_workers(self, now: float) -> None: ...

    def kill(self, pid: int, sig: int) -> None: ...

    def worker_name(self, no: int) -> str: ...

    def spawn_worker(self, slot: int | None = None, replacing: int = 0,
                     succeeds: tuple[str, int] | None = None) -> WorkerProc: ...

    def write_header(self) -> None: ...

    def status_text(self) -> str: ...


# -- asking for an upgrade (old code) -------------------------------------------------------------


def request(sup: Host) -> None:
    """USR2: validate the installed code in a child before anything changes."""
    path = os.path.join(sup.runtime_dir, paths.UPGRADE_REQUEST)
    token = (paths.read_small(path, 256) or b"").decode(errors="replace").strip()
    with contextlib.suppress(OSError):
        os.unlink(path)
    sup.check_workers(time.monotonic())  # notice the workers that became ready since the last tick
    problem = refusal(sup)
    if problem:
        log.error("upgrade refused: %s", problem)
        sup.stats.supervisor.upgrades_refused += 1
        write_result(sup.runtime_dir, token, False, f"refused: {problem}", sup.generation)
        return
    now = time.monotonic()
    up = Upgrade(token=token, began=now, deadline=now + CHECK_TIMEOUT, old_generation=sup.generation)
    write_state(sup, up)  # the child checks that the new code can read it
    up.check_pid = spawn_check(sup.runtime_dir)
    sup.upgrade = up
    sdnotify.reloading("upgrading to the installed code")
    log.info("upgrade requested: checking the installed code (pid %d)", up.check_pid)


def refusal(sup: Host) -> str | None:
    """Why an upgrade cannot start now, or None."""
    if sup.stopping is not None:
        return "the cluster is stopping"
    if sup.upgrade is not None:
        return "an upgrade is already in progress"
    if not sup.broker_pid:
        return "the bus broker is restarting; try again in a moment"
    if sup.respawns or any(not w.ready and not w.retiring for w in sup.workers.values()):
        return "a worker is starting or restarting; try again in a moment"
    if not any(not w.retiring for w in sup.workers.values()):
        return "there are no workers to upgrade"
    return None


CHECK_CODE = """\
import sys
sys.path[:] = {path!r}
from chatcluster.upgrade_check import main
sys.exit(main({state!r}))
"""


def spawn_check(runtime_dir: str) -> int:
    """Start `python -c` on the installed code, with the import path this process would get on exec.

    The exec'd supervisor runs the same command line in the same directory with the same
    environment, so it computes the same sys.path as this process did at start; the child
    uses exactly that path, so it imports exactly what the exec would import.
    """
    code = CHECK_CODE.format(path=sys.path, state=os.path.join(runtime_dir, paths.UPGRADE_STATE))
    log_fd = paths.create_exclusive(os.path.join(runtime_dir, paths.UPGRADE_CHECK_LOG))
    env = {k: v for k, v in os.environ.items() if k != STATE_ENV}
    try:
        return os.posix_spawn(sys.executable, [sys.executable, "-c", code], env, file_actions=[
            (os.POSIX_SPAWN_DUP2, log_fd, 1),
            (os.POSIX_SPAWN_DUP2, log_fd, 2),
            (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
        ], setsigdef=tuple(BLOCKED))
    finally:
        os.close(log_fd)


def check_new_code(state_path: str) -> None:
    """The check as a supervisor of an earlier release starts it: hand over to `upgrade_check`.

    Such a supervisor runs `chatcluster.upgrade.check_new_code` on the installed code.
    The check imports every module, the importers of this one included, so it lives in
    `upgrade_check`, which nothing imports; a fresh interpreter with this one's import
    path runs it, keeping this process's pid, output and exit status.
    """
    os.execv(sys.executable, [sys.executable, "-c", CHECK_CODE.format(path=sys.path, state=state_path)])


def check_failure(runtime_dir: str, status: int) -> str:
    """The last line the check child wrote (its exception or config error), for the requester."""
    try:
        text = paths.read_small(os.path.join(runtime_dir, paths.UPGRADE_CHECK_LOG)) or b""
    except OSError:
        text = b""
    lines = [line.strip() for line in text.decode(errors="replace").splitlines() if line.strip()]
    how = f"exit status {os.waitstatus_to_exitcode(status)}"
    if os.WIFSIGNALED(status):
        how = f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
    last = lines[-1] if lines else "no output"
    return f"the installed code failed its check ({how}): {last}"


# -- the supervisor's hooks ----------------------------------------------------------------------


def reaped(sup: Host, pid: int, status: int) -> bool:
    """A child exited; True if it was the check child (the upgrade consumes its status)."""
    up = sup.upgrade
    if up is None or pid != up.check_pid or up.phase != CHECK:
        return False
    up.check_pid = 0
    if os.waitstatus_to_exitcode(status) != 0:
        fail(sup, check_failure(sup.runtime_dir, status))
        return True
    problem = refusal_to_exec(sup)
    if problem:
        fail(sup, problem)
        return True
    reexec(sup, up)  # returns only if the exec failed
    return True


def refusal_to_exec(sup: Host) -> str | None:
    if sup.stopping is not None:
        return "the cluster began to stop"
    if sup.respawns or any(not w.ready and not w.retiring for w in sup.workers.values()):
        return "a worker died while the installed code was being checked; try again"
    return None


def worker_died(sup: Host, proc: WorkerProc, how: str) -> bool:
    """A worker died; True if it was one of the new generation at boot (the upgrade fails, no respawn)."""
    up = sup.upgrade
    if up is None or up.phase != BOOT or proc.pid not in up.pairs:
        return False
    log.error("new worker %d (pid %d) %s while starting", proc.no, proc.pid, how)
    abort(sup, f"new worker {proc.no} {how} while starting (see the log)")
    return True


def tick(sup: Host, now: float) -> None:
    up = sup.upgrade
    if up is None:
        return
    if sup.stopping is not None:
        fail(sup, "the cluster began to stop")
        return
    if up.phase == CHECK:
        if now > up.deadline:
            sup.kill(up.check_pid, signal.SIGKILL)
            fail(sup, f"checking the installed code took longer than {CHECK_TIMEOUT:.0f} s")
    elif up.phase == BOOT:
        new = [sup.workers.get(pid) for pid in up.pairs]
        if all(w is not None and w.ready for w in new):
            begin_handoff(sup, up, now)
    elif up.phase == HANDOFF:
        left = [sup.workers[old] for old in up.pairs.values() if old in sup.workers]
        if not left:
            succeed(sup, up)
        elif now > up.deadline:
            for proc in left:
                proc.retiring = False
                proc.retire_deadline = 0.0
            fail(sup, f"{len(left)} old workers ({', '.join(str(w.no) for w in left)}) could not hand over "
                      f"their clients within {HANDOFF_TIMEOUT:.0f} s and keep serving them with the old code")


# -- re-exec (old code) and resume (new code) -------------------------------------------------------


def capture(sup: Host, up: Upgrade) -> dict[str, Any]:
    workers = [{"pid": w.pid, "no": w.no, "slot": w.slot, "generation": w.generation, "started": w.started,
                "ready": w.ready, "retiring": w.retiring, "retire_deadline": w.retire_deadline}
               for w in sup.workers.values()]
    return {"format": STATE_FORMAT, "token": up.token, "began": up.began, "generation": sup.generation,
            "next_no": sup.next_no, "target": sup.target, "broker_pid": sup.broker_pid,
            "broker_control": sup.broker_control, "broker_started": sup.broker_started, "workers": workers,
            "lock_fd": sup.lock_fd,
            "signals": list(sup.sig_queue), "reloads": sup.reloads, "config_path": sup.config_path,
            "overrides": sup.overrides, "created_runtime_dir": sup.created_runtime_dir,
            "host": sup.cfg.host, "port": sup.cfg.port, "runtime_dir": sup.runtime_dir, "pid_file": sup.pid_file,
            "values": sup.cfg.values, "bus_wire": WIRE_VERSION}


def parse_state(state: dict[str, Any]) -> dict[str, Any]:
    """Validate a state file of any format up to ours; ValueError naming the problem."""
    fmt = state.get("format")
    if not isinstance(fmt, int) or not 1 <= fmt <= STATE_FORMAT:
        raise ValueError(f"supervisor state of format {fmt!r}; this code reads formats 1 to {STATE_FORMAT}")
    for key in ("generation", "next_no", "target", "broker_pid", "broker_control", "workers"):
        if key not in state:
            raise ValueError(f"supervisor state lacks {key!r}")
    return state


def write_state(sup: Host, up: Upgrade) -> str:
    path = os.path.join(sup.runtime_dir, paths.UPGRADE_STATE)
    paths.atomic_write(path, json.dumps(capture(sup, up)))
    return path


def reexec(sup: Host, up: Upgrade) -> None:
    """Replace this process's code with the installed one, keeping the pid and the children."""
    path = write_state(sup, up)
    log.info("the installed code passed its check; re-executing the supervisor (pid %d)", os.getpid())
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, BLOCKED)
    os.set_inheritable(sup.broker_control, True)
    if sup.lock_fd >= 0:
        os.set_inheritable(sup.lock_fd, True)  # the runtime directory stays held across the exec
    os.environ[STATE_ENV] = path
    for handler in logging.getLogger("chatcluster").handlers:
        handler.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    argv = [sys.executable, *sys.orig_argv[1:]]
    try:
        os.execv(sys.executable, argv)
    except OSError as exc:
        del os.environ[STATE_ENV]
        os.set_inheritable(sup.broker_control, False)
        if sup.lock_fd >= 0:
            os.set_inheritable(sup.lock_fd, False)
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        fail(sup, f"cannot execute {sys.executable}: {exc.strerror}")


@dataclass
class Resumed:
    """What a re-executed supervisor takes over: its predecessor's state, and the settings it keeps."""

    state: dict[str, Any]
    cfg: Config  # the running settings, with the live changes of the config file applied
    runtime_dir: str
    pid_file: str
    applied: dict[str, Any]
    restart: dict[str, list[Any]]
    lock_fd: int = -1  # the descriptor holding the runtime directory, kept across the exec


def resumed(new: Config) -> Resumed | None:
    """In a supervisor just re-executed by an upgrade, before it touches any file: what it takes over.

    None on a plain start. `new` is the configuration as loaded now; the state file says
    what the cluster runs with. As on a reload, live settings take the new values and
    the others keep the running ones (reported as needing a restart): above all the
    address, the runtime directory, where the stats file and the bus sockets are, and the
    pid file, where the `chatcluster` commands look.
    """
    path = os.environ.pop(STATE_ENV, None)
    if path is None:
        return None
    with open(path) as fh:
        state = parse_state(json.load(fh))
    os.unlink(path)
    running = dict(state.get("values") or {})
    if not running:  # written by a release that saved the address alone
        running = {**new.values, "host": state["host"], "port": state["port"]}
    old = Config(values={s.name: running.get(s.name, new.values[s.name]) for s in SETTINGS}, source=new.source)
    live, restart = old.live_changes(new)
    runtime_dir = state.get("runtime_dir") or paths.resolve_runtime_dir(old)
    pid_file = state.get("pid_file") or (os.path.abspath(old.pid_file) if old.pid_file
                                         else paths.default_pid_file(runtime_dir))
    lock_fd = state.get("lock_fd", -1)
    if isinstance(lock_fd, int) and lock_fd >= 0:
        os.set_inheritable(lock_fd, False)
    else:
        # From a release that did not hold the directory: hold it now. Only an upgraded
        # supervisor of the cluster running there can be here, so nobody else holds it.
        try:
            lock_fd = paths.lock_runtime_dir(runtime_dir)
        except (paths.StartupError, OSError) as exc:
            log.warning("cannot hold the runtime directory %s: %s", runtime_dir, exc)
            lock_fd = -1
    return Resumed(state=state, cfg=Config(values={**old.values, **live}, source=new.source),
                   runtime_dir=runtime_dir, pid_file=pid_file, applied=live,
                   restart={k: [old.values[k], new.values[k]] for k in restart}, lock_fd=lock_fd)


def resume(sup: Host, r: Resumed) -> None:
    """In the re-executed supervisor: take over the old one's children and start the new generation.

    Called with the signal handlers installed, so the signals blocked across the exec
    can be delivered (queued for the loop) right away.
    """
    # Before any fork: children inherit the signal mask, and a worker must hear its signals.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, BLOCKED)
    state = r.state
    up = Upgrade(token=state["token"], began=state["began"], phase=BOOT, old_generation=state["generation"],
                 applied=r.applied, restart=r.restart)
    sup.target = state["target"]
    sup.next_no = state["next_no"]
    sup.broker_pid = state["broker_pid"]
    sup.broker_control = state["broker_control"]
    os.set_inheritable(sup.broker_control, False)
    sup.broker_started = state["broker_started"]
    sup.reloads = state["reloads"]
    sup.created_runtime_dir = state["created_runtime_dir"]
    sup.announced_ready = True
    sup.sig_queue.extend(state["signals"])
    source = sup.config_path or "the command line (no --config file)"
    if r.applied:
        log.info("upgrade: applied from %s: %s", source, ", ".join(f"{k}={v!r}" for k, v in r.applied.items()))
    if r.restart:
        log.warning("changed in %s but not applied, a restart is needed: %s", source,
                    ", ".join(f"{k} ({was!r} -> {now!r})" for k, (was, now) in r.restart.items()))
    old: list[WorkerProc] = []
    for w in state["workers"]:
        proc = WorkerProc(w["pid"], w["no"], w["slot"], w["generation"], w["started"], ready=w["ready"],
                          retiring=True, retire_deadline=w["retire_deadline"] if w["retiring"] else float("inf"))
        sup.workers[proc.pid] = proc
        if not w["retiring"]:
            old.append(proc)
    sup.generation = state["generation"] + 1
    sup.upgrade = up
    log.info("supervisor re-executed with the installed code; starting generation %d (%d workers) to take "
             "over from generation %d", sup.generation, len(old), up.old_generation)
    for proc in old:
        new = sup.spawn_worker(succeeds=(sup.worker_name(proc.no), proc.pid))
        up.pairs[new.pid] = proc.pid
    sup.write_header()


# -- handoff and outcome (new code) ----------------------------------------------------------------


def begin_handoff(sup: Host, up: Upgrade, now: float) -> None:
    up.phase = HANDOFF
    up.deadline = now + HANDOFF_TIMEOUT
    log.info("generation %d is ready; the old workers hand their clients over", sup.generation)
    for old_pid in up.pairs.values():
        proc = sup.workers.get(old_pid)
        if proc is not None:
            proc.retire_deadline = up.deadline + sup.cfg.graceful_timeout
            sup.kill(old_pid, signal.SIGUSR2)


def succeed(sup: Host, up: Upgrade) -> None:
    new = [sup.workers[pid] for pid in up.pairs if pid in sup.workers]
    clients = sum(sup.stats.read(w.slot).clients for w in new)
    elapsed = time.monotonic() - up.began
    message = (f"generation {sup.generation} serves with the installed code: {len(new)} workers, "
               f"{clients} clients kept, in {elapsed:.1f} s")
    log.info("upgrade complete: %s", message)
    sup.stats.supervisor.upgrades_succeeded += 1
    write_result(sup.runtime_dir, up.token, True, message, sup.generation, clients=clients,
                 applied=up.applied, restart=up.restart)
    end(sup)


def abort(sup: Host, why: str) -> None:
    """The new generation failed to start: stop it; the old one never stopped serving."""
    up = sup.upgrade
    assert up is not None
    now = time.monotonic()
    for new_pid, old_pid in up.pairs.items():
        new = sup.workers.get(new_pid)
        if new is not None:
            new.retiring = True
            new.retire_deadline = now + 5.0
            sup.kill(new_pid, signal.SIGTERM)
        old = sup.workers.get(old_pid)
        if old is not None:
            old.retiring = False
            old.retire_deadline = 0.0
    sup.generation = up.old_generation
    paths.remove_handoff_sockets(sup.runtime_dir)
    fail(sup, f"{why}; the running workers keep serving")


def fail(sup: Host, message: str) -> None:
    up = sup.upgrade
    assert up is not None
    if up.check_pid:
        sup.kill(up.check_pid, signal.SIGKILL)
    log.error("upgrade failed: %s", message)
    sup.stats.supervisor.upgrades_failed += 1
    write_result(sup.runtime_dir, up.token, False, message, sup.generation)
    end(sup)


def end(sup: Host) -> None:
    sup.upgrade = None
    with contextlib.suppress(OSError):
        os.unlink(os.path.join(sup.runtime_dir, paths.UPGRADE_STATE))
    sup.write_header()
    if sup.stopping is None:
        sdnotify.ready(sup.status_text())


def write_result(runtime_dir: str, token: str, ok: bool, message: str, generation: int, **extra: Any) -> None:
    # Read back within seconds by the waiting command: no fsync needed.
    result = {"token": token, "ok": ok, "message": message, "generation": generation, **extra}
    paths.atomic_write(os.path.join(runtime_dir, paths.UPGRADE_RESULT), json.dumps(result), fsync=False)
