"""Upgrading a running cluster to the installed code, process by process, without dropping anyone.

`chatcluster upgrade` (or USR2) asks the supervisor for an upgrade, which
goes through three phases; the supervisor calls in here from its loop:

1. check: a child interpreter imports the installed code and loads the config
   with it. If that fails, nothing has changed: the failure is reported and the
   cluster goes on as it was.
2. re-exec: the supervisor writes its state (broker, workers, counters) to a
   file in the runtime directory and `execv`s itself in place, as gunicorn
   does on USR2 but keeping its pid, so systemd's main pid, the pid file and
   every parent/child relation stay right. Signals are blocked across the exec
   and delivered once the new code has installed its handlers. The new code
   reads the state back, adopts its children, and forks a new generation of
   workers, each paired with an old one whose listener and clients it takes.
3. handoff: once every new worker is ready, each old one gets USR2 and hands
   its listening socket and its clients over (`migrate`), then exits. The bus
   broker is not replaced: it holds the one order that makes the handoff
   lossless, and its wire format is versioned instead.

If the new generation cannot start (a worker exits or hangs at boot) it is
stopped and the old one goes on serving: the supervisor then runs the new code
but nothing changed for anyone connected. The outcome goes to
RUNTIME_DIR/upgrade.json, where the `chatcluster upgrade` command waits for it.
This module knows processes, not chat.
"""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from . import sdnotify
from .bus import WIRE_VERSION

if TYPE_CHECKING:
    from .supervisor import Supervisor, WorkerProc

log = logging.getLogger("chatcluster.upgrade")

STATE_ENV = "CHATCLUSTER_UPGRADE_STATE"  # names the state file in the re-executed supervisor
STATE_FORMAT = 1  # of the state file; the new code reads every format up to its own
STATE_FILE = "upgrade-state.json"
REQUEST_FILE = "upgrade-request"  # `chatcluster upgrade` puts its token here before sending USR2
RESULT_FILE = "upgrade.json"
CHECK_LOG = "upgrade-check.log"
FILES = (STATE_FILE, REQUEST_FILE, RESULT_FILE, CHECK_LOG)
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


# -- asking for an upgrade (old code) -------------------------------------------------------------


def request(sup: Supervisor) -> None:
    """USR2: validate the installed code in a child before anything changes."""
    token = ""
    path = os.path.join(sup.runtime_dir, REQUEST_FILE)
    with contextlib.suppress(OSError):
        with open(path) as fh:
            token = fh.read().strip()
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


def refusal(sup: Supervisor) -> str | None:
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
from chatcluster.upgrade import check_new_code
sys.exit(check_new_code({state!r}))
"""


def spawn_check(runtime_dir: str) -> int:
    """Start `python -c` on the installed code, with the import path this process would get on exec.

    The exec'd supervisor runs the same command line in the same directory with the same
    environment, so it computes the same sys.path as this process did at start; the child
    uses exactly that path, so it imports exactly what the exec would import.
    """
    code = CHECK_CODE.format(path=sys.path, state=os.path.join(runtime_dir, STATE_FILE))
    logpath = os.path.join(runtime_dir, CHECK_LOG)
    env = {k: v for k, v in os.environ.items() if k != STATE_ENV}
    return os.posix_spawn(sys.executable, [sys.executable, "-c", code], env, file_actions=[
        (os.POSIX_SPAWN_OPEN, 1, logpath, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600),
        (os.POSIX_SPAWN_DUP2, 1, 2),
        (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
    ], setsigdef=tuple(BLOCKED))


def check_new_code(state_path: str) -> int:
    """Run by the check child, in the NEW code: can it run this cluster? 0 if so.

    An import that raises is the most common failure; it ends this process with its
    traceback, whose last line the supervisor reports.
    """
    from . import cli, config, handoff, migrate, supervisor, worker  # noqa: F401  (importing is the test)

    try:
        with open(state_path) as fh:
            state = parse_state(json.load(fh))
    except (OSError, ValueError) as exc:
        print(f"the installed code cannot read the running supervisor's state: {exc}", file=sys.stderr)
        return 2
    try:
        config.load(state["config_path"], state["overrides"])
    except config.ConfigError as exc:
        print(f"the configuration does not load with the installed code: {exc}", file=sys.stderr)
        return 2
    problem = incompatibility(state)
    if problem:
        print(f"the installed code cannot take over this cluster in place: {problem}; restart the cluster "
              f"to move to it", file=sys.stderr)
        return 2
    return 0


def incompatibility(state: dict[str, Any]) -> str | None:
    """In the NEW code: what an upgrade cannot bridge. The broker and the stats file stay in use."""
    from . import bus
    from . import stats as S

    if state.get("bus_wire") != bus.WIRE_VERSION:
        return (f"it speaks bus wire version {bus.WIRE_VERSION}, the running broker {state.get('bus_wire')} "
                f"(an upgrade keeps the broker)")
    try:
        S.StatsFile(os.path.join(state["runtime_dir"], "stats")).close()
    except (OSError, ValueError) as exc:
        return f"the running workers' stats file is not one it can use ({exc})"
    return None


def check_failure(runtime_dir: str, status: int) -> str:
    """The last line the check child wrote (its exception or config error), for the requester."""
    try:
        with open(os.path.join(runtime_dir, CHECK_LOG), errors="replace") as fh:
            lines = [line.strip() for line in fh if line.strip()]
    except OSError:
        lines = []
    how = f"exit status {os.waitstatus_to_exitcode(status)}"
    if os.WIFSIGNALED(status):
        how = f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
    last = lines[-1] if lines else "no output"
    return f"the installed code failed its check ({how}): {last}"


# -- the supervisor's hooks ----------------------------------------------------------------------


def reaped(sup: Supervisor, pid: int, status: int) -> bool:
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


def refusal_to_exec(sup: Supervisor) -> str | None:
    if sup.stopping is not None:
        return "the cluster began to stop"
    if sup.respawns or any(not w.ready and not w.retiring for w in sup.workers.values()):
        return "a worker died while the installed code was being checked; try again"
    return None


def worker_died(sup: Supervisor, proc: WorkerProc, how: str) -> bool:
    """A worker died; True if it was one of the new generation at boot (the upgrade fails, no respawn)."""
    up = sup.upgrade
    if up is None or up.phase != BOOT or proc.pid not in up.pairs:
        return False
    log.error("new worker %d (pid %d) %s while starting", proc.no, proc.pid, how)
    abort(sup, f"new worker {proc.no} {how} while starting (see the log)")
    return True


def tick(sup: Supervisor, now: float) -> None:
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


def capture(sup: Supervisor, up: Upgrade) -> dict[str, Any]:
    workers = [{"pid": w.pid, "no": w.no, "slot": w.slot, "generation": w.generation, "started": w.started,
                "ready": w.ready, "retiring": w.retiring, "retire_deadline": w.retire_deadline}
               for w in sup.workers.values()]
    return {"format": STATE_FORMAT, "token": up.token, "began": up.began, "generation": sup.generation,
            "next_no": sup.next_no, "target": sup.target, "broker_pid": sup.broker_pid,
            "broker_control": sup.broker_control, "broker_started": sup.broker_started, "workers": workers,
            "signals": list(sup.sig_queue), "reloads": sup.reloads, "config_path": sup.config_path,
            "overrides": sup.overrides, "created_runtime_dir": sup.created_runtime_dir,
            "host": sup.cfg.host, "port": sup.cfg.port, "runtime_dir": sup.runtime_dir, "bus_wire": WIRE_VERSION}


def parse_state(state: dict[str, Any]) -> dict[str, Any]:
    """Validate a state file of any format up to ours; ValueError naming the problem."""
    fmt = state.get("format")
    if not isinstance(fmt, int) or not 1 <= fmt <= STATE_FORMAT:
        raise ValueError(f"supervisor state of format {fmt!r}; this code reads formats 1 to {STATE_FORMAT}")
    for key in ("generation", "next_no", "target", "broker_pid", "broker_control", "workers"):
        if key not in state:
            raise ValueError(f"supervisor state lacks {key!r}")
    return state


def write_state(sup: Supervisor, up: Upgrade) -> str:
    path = os.path.join(sup.runtime_dir, STATE_FILE)
    with open(path + ".tmp", "w") as fh:
        json.dump(capture(sup, up), fh)
    os.replace(path + ".tmp", path)
    return path


def reexec(sup: Supervisor, up: Upgrade) -> None:
    """Replace this process's code with the installed one, keeping the pid and the children."""
    path = write_state(sup, up)
    log.info("the installed code passed its check; re-executing the supervisor (pid %d)", os.getpid())
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, BLOCKED)
    os.set_inheritable(sup.broker_control, True)
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
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        fail(sup, f"cannot execute {sys.executable}: {exc.strerror}")


def resuming() -> bool:
    """True in a supervisor that was just re-executed by an upgrade."""
    return STATE_ENV in os.environ


def resume(sup: Supervisor) -> bool:
    """In the re-executed supervisor: take over the old one's children and start the new generation.

    Returns False when this is a plain start. Called with the signal handlers installed, so
    the signals blocked across the exec can be delivered (queued for the loop) right away.
    """
    from .supervisor import WorkerProc

    path = os.environ.pop(STATE_ENV, None)
    if path is None:
        return False
    # Before any fork: children inherit the signal mask, and a worker must hear its signals.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, BLOCKED)
    with open(path) as fh:
        state = parse_state(json.load(fh))
    os.unlink(path)
    up = Upgrade(token=state["token"], began=state["began"], phase=BOOT, old_generation=state["generation"])
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
    if (sup.cfg.host, sup.cfg.port) != (state["host"], state["port"]):
        log.warning("the address changed in the configuration to %s:%d; an upgrade keeps serving %s:%d, "
                    "a restart moves to the new one", sup.cfg.host, sup.cfg.port, state["host"], state["port"])
        sup.cfg = type(sup.cfg)(values={**sup.cfg.values, "host": state["host"], "port": state["port"]},
                                source=sup.cfg.source)
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
        new = sup.spawn_worker(succeeds=(f"w{proc.no}", proc.pid))
        up.pairs[new.pid] = proc.pid
    sup.write_header()
    return True


# -- handoff and outcome (new code) ----------------------------------------------------------------


def begin_handoff(sup: Supervisor, up: Upgrade, now: float) -> None:
    up.phase = HANDOFF
    up.deadline = now + HANDOFF_TIMEOUT
    log.info("generation %d is ready; the old workers hand their clients over", sup.generation)
    for old_pid in up.pairs.values():
        proc = sup.workers.get(old_pid)
        if proc is not None:
            proc.retire_deadline = up.deadline + sup.cfg.graceful_timeout
            sup.kill(old_pid, signal.SIGUSR2)


def succeed(sup: Supervisor, up: Upgrade) -> None:
    new = [sup.workers[pid] for pid in up.pairs if pid in sup.workers]
    clients = sum(sup.stats.read(w.slot).clients for w in new)
    elapsed = time.monotonic() - up.began
    message = (f"generation {sup.generation} serves with the installed code: {len(new)} workers, "
               f"{clients} clients kept, in {elapsed:.1f} s")
    log.info("upgrade complete: %s", message)
    sup.stats.supervisor.upgrades_succeeded += 1
    write_result(sup.runtime_dir, up.token, True, message, sup.generation, clients=clients)
    end(sup)


def abort(sup: Supervisor, why: str) -> None:
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
    for path in glob.glob(os.path.join(sup.runtime_dir, "handoff-*")):
        with contextlib.suppress(OSError):
            os.unlink(path)
    fail(sup, f"{why}; the running workers keep serving")


def fail(sup: Supervisor, message: str) -> None:
    up = sup.upgrade
    assert up is not None
    if up.check_pid:
        sup.kill(up.check_pid, signal.SIGKILL)
    log.error("upgrade failed: %s", message)
    sup.stats.supervisor.upgrades_failed += 1
    write_result(sup.runtime_dir, up.token, False, message, sup.generation)
    end(sup)


def end(sup: Supervisor) -> None:
    sup.upgrade = None
    with contextlib.suppress(OSError):
        os.unlink(os.path.join(sup.runtime_dir, STATE_FILE))
    sup.write_header()
    if sup.stopping is None:
        sdnotify.ready(sup.status_text())


def write_result(runtime_dir: str, token: str, ok: bool, message: str, generation: int, **extra: Any) -> None:
    path = os.path.join(runtime_dir, RESULT_FILE)
    with open(path + ".tmp", "w") as fh:
        json.dump({"token": token, "ok": ok, "message": message, "generation": generation, **extra}, fh)
    os.replace(path + ".tmp", path)


def read_result(runtime_dir: str) -> dict[str, Any] | None:
    try:
        with open(os.path.join(runtime_dir, RESULT_FILE)) as fh:
            result: dict[str, Any] = json.load(fh)
            return result
    except (OSError, ValueError):
        return None
