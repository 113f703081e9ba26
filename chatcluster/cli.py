"""The `chatcluster` command: start a cluster, or act on a running one.

`start` runs the supervisor in the foreground. The other subcommands find a
running cluster through the pid file in its runtime directory (derived from
the same --config/--port/--runtime-dir as `start`; --pid-file points at the
pid file directly) and act on it with signals, then watch the runtime
directory to report what happened; `status` reads the shared stats file and
psutil. Every failure is one line on stderr naming the problem and the fix,
and a non-zero exit. The commands that only signal a cluster and read its
files import neither the supervisor nor the bus (nor so ZeroMQ): `start` and
`upgrade` import what they need when they run.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from typing import Any

from . import __version__, paths, snapshot
from . import config as cfgmod
from . import stats as S
from .config import MAX_WORKERS
from .paths import StartupError, resolve_runtime_dir, running_pid
from .textfmt import duration

RELOAD_WAIT = 10.0  # seconds `reload` waits for the supervisor's answer
SCALE_WAIT = 30.0  # seconds `scale` waits for new workers to boot, on top of the retired ones' drain


class CliError(Exception):
    pass


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="chatcluster", description="A multi-core telnet chat server.")
    parser.add_argument("--version", action="version", version=f"chatcluster {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    start = sub.add_parser("start", help="run a cluster in the foreground")
    start.add_argument("--config", help="TOML config file (see config/chatcluster.toml)")
    cfgmod.add_arguments(start)

    def locating(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", help="the config file the cluster was started with")
        p.add_argument("--port", help="the cluster's port (default 12345)")
        p.add_argument("--runtime-dir", dest="runtime_dir", help="the cluster's runtime directory")
        p.add_argument("--pid-file", dest="pid_file", help="the cluster's pid file")

    status = sub.add_parser("status", help="show the processes of a running cluster")
    status.add_argument("--json", action="store_true", help="print JSON instead of a table")
    locating(status)
    stop = sub.add_parser("stop", help="stop a running cluster gracefully (TERM)")
    stop.add_argument("--fast", action="store_true", help="stop fast (QUIT): at most 1 s to flush output")
    locating(stop)
    locating(sub.add_parser("reload", help="reload the config file of a running cluster (HUP)"))
    locating(sub.add_parser("upgrade", help="replace every process with the installed code, keeping connections"))
    scale = sub.add_parser("scale", help="set the number of workers of a running cluster")
    scale.add_argument("count", type=int, help=f"number of workers wanted (1 to {cfgmod.WORKERS_PER_CPU} per "
                                              f"CPU, or to {MAX_WORKERS} with --allow-many-workers)")
    scale.add_argument("--allow-many-workers", dest="allow_many", action="store_true",
                       help=f"allow more than {cfgmod.WORKERS_PER_CPU} workers per CPU")
    locating(scale)
    return parser


# -- start --------------------------------------------------------------------------------------


def cmd_start(args: argparse.Namespace) -> int:
    # Imported here, not at the top: they bring the bus and ZeroMQ, which no other command needs.
    from . import upgrade
    from .supervisor import Supervisor, setup_logging

    overrides = cfgmod.overrides_from(args)
    cfg = cfgmod.load(args.config, overrides)
    setup_logging(cfg.log_level)
    given = {k: v for k, v in overrides.items() if v is not None}
    resumed = upgrade.resumed(cfg)
    if resumed is not None:
        # Re-executed by an upgrade: the address, the runtime directory and the pid file are
        # the ones the cluster runs with, whatever the config file says now; our own workers
        # hold the port.
        sup = Supervisor(cfg=resumed.cfg, config_path=args.config, runtime_dir=resumed.runtime_dir,
                         pid_file=resumed.pid_file, overrides=given, resumed=resumed, lock_fd=resumed.lock_fd)
        return sup.run()
    runtime_dir = resolve_runtime_dir(cfg)
    created = paths.prepare_runtime_dir(runtime_dir)
    lock_fd = -1
    try:
        pid_file = os.path.abspath(cfg.pid_file) if cfg.pid_file else paths.default_pid_file(runtime_dir)
        if not os.path.isdir(os.path.dirname(pid_file)):
            raise StartupError(f"cannot write the pid file {pid_file}: {os.path.dirname(pid_file)} does not "
                               f"exist; create it or choose another path with --pid-file")
        for path in dict.fromkeys((pid_file, paths.default_pid_file(runtime_dir))):
            other = running_pid(path)
            if other is not None and other != os.getpid():
                raise StartupError(f"a cluster is already running with pid {other} (pid file {path}); "
                                   f"stop it with `chatcluster stop --port {cfg.port}` or use another --port")
        # Whatever the pid files say (another start may not have written its own yet): one
        # cluster per runtime directory.
        lock_fd = paths.lock_runtime_dir(runtime_dir)
        check_port_free(cfg.host, cfg.port)
        if cfg.history_db and cfg.history_lines > 0:
            prepare_history_db(cfg.history_db)
        if cfg.nats_servers:
            check_nats(cfg)
        if cfg.metrics_listen:
            from .exporter import check_listen

            check_listen(cfg.metrics_listen)
    except (StartupError, cfgmod.ConfigError):
        if lock_fd >= 0:
            os.close(lock_fd)
        if created:
            with contextlib.suppress(OSError):  # not empty: another start is using it
                os.rmdir(runtime_dir)
        raise
    sup = Supervisor(cfg=cfg, config_path=args.config, runtime_dir=runtime_dir, pid_file=pid_file,
                     overrides=given, created_runtime_dir=created, lock_fd=lock_fd)
    return sup.run()


def prepare_history_db(value: str) -> None:
    """The history file is one nobody else could have written (its lines go to clients as they
    are), and private from its creation; a StartupError naming the problem otherwise."""
    from .histdb import check_path

    path = os.path.abspath(os.path.expanduser(value))
    problem = check_path(path)
    if problem:
        raise StartupError(problem)
    try:
        paths.create_private(path)
    except OSError as exc:
        raise StartupError(f"history_db {path} cannot be created ({exc.strerror}); choose another path") from None


def check_port_free(host: str, port: int) -> None:
    """Fail early, with a clear message, when another program holds the port.

    SO_REUSEADDR, as the workers set it: connections of a cluster stopped a moment ago,
    still in TIME-WAIT, must not keep it from starting again, while a socket another
    program listens on still makes the bind fail. No SO_REUSEPORT here on purpose: with
    it, the bind would succeed beside another program's SO_REUSEPORT listener.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    probe = socket.socket(family, socket.SOCK_STREAM)
    try:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
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


def check_nats(cfg: cfgmod.Config) -> None:
    """Fail early, with one line naming the URL and the cause, when NATS cannot be reached or refuses us."""
    from . import multihost  # nats-py: only with nats_servers
    from .natsbridge import NatsError

    try:
        multihost.check_reachable(cfg.values)
    except NatsError as exc:
        raise StartupError(str(exc)) from None
    except Exception as exc:  # noqa: BLE001 (whatever nats-py raises: one line, not a traceback)
        raise StartupError(f"NATS at {cfg.nats_servers} failed to answer ({type(exc).__name__}: {exc}); check "
                           f"that JetStream is enabled there, or correct --nats-servers") from None


# -- finding a running cluster ------------------------------------------------------------------


def locate(args: argparse.Namespace, strict: bool = True) -> tuple[cfgmod.Config, str, int]:
    """(config, runtime dir, supervisor pid) of the running cluster, or a CliError saying how to find it.

    Not `strict` (status, stop, scale): a config file that no longer validates as a whole is
    only warned about, as long as what finds the cluster in it is readable; reload and upgrade
    are about the file, and refuse it.
    """
    overrides: dict[str, Any] = {"port": args.port, "runtime_dir": args.runtime_dir, "pid_file": args.pid_file}
    try:
        cfg = cfgmod.load(args.config, overrides)
    except cfgmod.ConfigError as exc:
        if strict:
            raise
        cfg = cfgmod.load_locating(args.config, overrides)
        print(f"chatcluster: warning: {exc} (it is only used to find the cluster, through its "
              f"{', '.join(cfgmod.LOCATING)})", file=sys.stderr)
    runtime_dir = resolve_runtime_dir(cfg)
    pid_file = cfg.pid_file or paths.default_pid_file(runtime_dir)
    pid = running_pid(pid_file)
    if pid is None:
        raise CliError(f"no chatcluster is running on port {cfg.port} (no live pid in {pid_file}); "
                       f"start one with `chatcluster start`, or pass the --config/--port/--runtime-dir "
                       f"it was started with")
    return cfg, runtime_dir, pid


def open_stats(runtime_dir: str, pid: int) -> S.StatsFile:
    try:
        return snapshot.open_stats(runtime_dir, pid)
    except snapshot.SnapshotError as exc:
        raise CliError(str(exc)) from None


def send_signal(pid: int, sig: signal.Signals) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        raise CliError(f"chatcluster (pid {pid}) exited before it could be sent {sig.name}") from None
    except PermissionError:
        raise CliError(f"not allowed to signal chatcluster (pid {pid}); run this as its user or as root") from None


def write_request(path: str, text: str) -> None:
    """A request for the supervisor, beside the signal that announces it.

    Readable by all (in a directory only the cluster's user can enter): root sends requests
    to a service that runs as another user, which must be able to read them.
    """
    paths.atomic_write(path, text, mode=0o644, fsync=False)


STOPPED_FOR = 1.0  # seconds a supervisor seen stopped (SIGSTOP) before the command says so


def wait_until(cond: Callable[[], Any], timeout: float, pid: int = 0, sent: str = "") -> Any:
    """`cond()` once true, or its last value at the timeout. With `pid`, a supervisor that stays
    stopped (SIGSTOP, Ctrl-Z) is a CliError at once: it would not answer however long we wait."""
    deadline = time.monotonic() + timeout
    stopped_since = 0.0
    while True:
        value = cond()
        now = time.monotonic()
        if value or now >= deadline:
            return value
        if pid:
            if not stopped(pid):
                stopped_since = 0.0
            elif not stopped_since:
                stopped_since = now
            elif now - stopped_since >= STOPPED_FOR:
                raise CliError(f"sent {sent}, but chatcluster (pid {pid}) is stopped (SIGSTOP, or Ctrl-Z where "
                               f"it runs): it will act on it once continued with `kill -CONT {pid}`")
        time.sleep(0.05)


def stopped(pid: int) -> bool:
    """True while `pid` is stopped by a signal (state T in ps), and so answers nothing."""
    import psutil

    try:
        return bool(psutil.Process(pid).status() == psutil.STATUS_STOPPED)
    except psutil.Error:
        return False


def alive(pid: int) -> bool:
    """True while `pid` runs; an exited process its parent has not reaped yet (a zombie) is gone."""
    import psutil

    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False
    except psutil.Error:
        return True


# -- stop, reload, scale ------------------------------------------------------------------------


def cmd_stop(args: argparse.Namespace) -> int:
    cfg, _, pid = locate(args, strict=False)
    began = time.monotonic()
    send_signal(pid, signal.SIGQUIT if args.fast else signal.SIGTERM)
    # The supervisor kills what is left at graceful_timeout; the rest is room for exiting.
    grace = 1.0 if args.fast else cfg.graceful_timeout
    if wait_until(lambda: not alive(pid), grace + 10, pid, "SIGQUIT" if args.fast else "SIGTERM"):
        print(f"chatcluster (pid {pid}) stopped {'fast' if args.fast else 'gracefully'} "
              f"in {time.monotonic() - began:.1f} s")
        return 0
    raise CliError(f"chatcluster (pid {pid}) is still running {grace + 10:.0f} s after "
                   f"SIG{'QUIT' if args.fast else 'TERM'}; see its log, or kill it with `kill -KILL {pid}`")


def read_json(path: str) -> dict[str, Any] | None:
    """A JSON object the supervisor wrote, or None if there is none (yet) or it does not parse."""
    data = paths.read_small(path)
    try:
        result = json.loads(data) if data is not None else None
    except ValueError:
        return None
    return result if isinstance(result, dict) else None


def read_reload_result(runtime_dir: str) -> dict[str, Any]:
    return read_json(os.path.join(runtime_dir, paths.RELOAD_RESULT)) or {"seq": 0}


def print_settings_report(result: dict[str, Any]) -> None:
    """The settings a reload or an upgrade changed but could not apply, as `reload` has always said it."""
    if result.get("restart"):
        changes = ", ".join(f"{k} ({old!r} -> {new!r})" for k, (old, new) in result["restart"].items())
        print(f"changed but not applied, a restart is needed: {changes}")


def cmd_reload(args: argparse.Namespace) -> int:
    _, runtime_dir, pid = locate(args)
    before = read_reload_result(runtime_dir).get("seq", 0)
    send_signal(pid, signal.SIGHUP)

    def answered() -> dict[str, Any] | None:
        result = read_reload_result(runtime_dir)
        return result if result.get("seq", 0) != before else None

    result = wait_until(answered, RELOAD_WAIT, pid, "SIGHUP")
    if result is None:
        raise CliError(f"sent SIGHUP to chatcluster (pid {pid}) but it did not report back within "
                       f"{RELOAD_WAIT:.0f} s; see its log")
    if not result["ok"]:
        raise CliError(f"reload refused, the running configuration stays in force: {result['error']}")
    source = result["config"] or "the command line (no --config file)"
    applied = ", ".join(f"{k}={v!r}" for k, v in result["applied"].items()) or "no live setting changed"
    print(f"chatcluster (pid {pid}) reloaded {source}: {applied}")
    print_settings_report(result)
    if result.get("unconfirmed"):
        workers = ", ".join(f"worker {no}" for no in result["unconfirmed"])
        print(f"warning: {workers} did not confirm the new settings; see the log")
    return 0


def cmd_scale(args: argparse.Namespace) -> int:
    if not 1 <= args.count <= MAX_WORKERS:
        raise CliError(f"cannot scale to {args.count} workers; choose between 1 and {MAX_WORKERS}")
    cfg, runtime_dir, pid = locate(args, strict=False)
    stats = open_stats(runtime_dir, pid)
    before = stats.header().target
    # The cap as the running supervisor computed it (its CPUs, its allow_many_workers).
    live = read_json(os.path.join(runtime_dir, paths.LIVE_CONFIG)) or {}
    cap, cpus = live.get("worker_cap"), live.get("cpus")
    if not isinstance(cap, int) or not isinstance(cpus, int):  # config.json gone: this process's view
        values = live.get("values")
        allow_many = values.get("allow_many_workers") if isinstance(values, dict) else cfg.allow_many_workers
        cap, cpus = cfgmod.worker_cap(bool(allow_many)), cfgmod.usable_cpus()
    if args.count > cap and args.count > before and not args.allow_many:
        raise CliError(f"cannot scale to {args.count} workers; choose between 1 and {cap} "
                       f"({cfgmod.worker_cap_text(cpus)}), or pass --allow-many-workers to go up to "
                       f"{MAX_WORKERS}")
    request = f"{args.count}{' allow-many' if args.allow_many else ''}\n"
    write_request(os.path.join(runtime_dir, paths.SCALE_REQUEST), request)
    send_signal(pid, signal.SIGUSR1)

    def reached() -> bool:
        used = stats.used()
        return (stats.header().target == args.count and len(used) == args.count
                and all(v.state == S.READY for v in used))

    timeout = cfg.graceful_timeout + SCALE_WAIT
    if wait_until(reached, timeout, pid, f"a request for {args.count} workers (SIGUSR1)"):
        print(f"chatcluster (pid {pid}) now runs {args.count} workers (was {before})")
        return 0
    raise CliError(f"chatcluster (pid {pid}) did not reach {args.count} ready workers within {timeout:.0f} s; "
                   f"see its log")


def cmd_upgrade(args: argparse.Namespace) -> int:
    """USR2 with a token in RUNTIME_DIR/upgrade-request; the supervisor answers in upgrade.json."""
    from . import upgrade  # its time limits; it brings the bus, which the other commands do without

    # Seconds to wait: the check, the new generation's boot and the handoff each have their own limit.
    wait = upgrade.CHECK_TIMEOUT + 30.0 + upgrade.HANDOFF_TIMEOUT + 15.0
    _, runtime_dir, pid = locate(args)
    token = os.urandom(8).hex()
    write_request(os.path.join(runtime_dir, paths.UPGRADE_REQUEST), token + "\n")
    send_signal(pid, signal.SIGUSR2)

    def answered() -> dict[str, Any] | None:
        result = read_json(os.path.join(runtime_dir, paths.UPGRADE_RESULT))
        if result is not None and result.get("token") == token:
            return result
        if not alive(pid):
            raise CliError(f"chatcluster (pid {pid}) exited during the upgrade; see its log")
        return None

    result = wait_until(answered, wait, pid, "SIGUSR2")
    if result is None:
        raise CliError(f"sent USR2 to chatcluster (pid {pid}) but it did not report an outcome within "
                       f"{wait:.0f} s; see its log")
    if not result["ok"]:
        raise CliError(f"upgrade failed: {result['message']}")
    print(f"chatcluster (pid {pid}) upgraded: {result['message']}")
    if result.get("applied"):
        print("settings applied: " + ", ".join(f"{k}={v!r}" for k, v in result["applied"].items()))
    print_settings_report(result)
    return 0


# -- status -------------------------------------------------------------------------------------


def collect_status(runtime_dir: str, pid: int, sample: float = 0.3) -> dict[str, Any]:
    """Every process of the cluster with its resources and, for workers, its counters: the same
    snapshot the metrics endpoint exports."""
    try:
        return snapshot.take(runtime_dir, pid, sample).status()
    except snapshot.SnapshotError as exc:
        raise CliError(str(exc)) from None


STATUS_COLUMNS = (
    ("role", "ROLE"), ("pid", "PID"), ("state", "STATE"), ("uptime_s", "UPTIME"), ("heartbeat_age_s", "BEAT"),
    ("cpu_percent", "CPU%"),
    ("rss_bytes", "RSS"), ("clients", "CLIENTS"), ("connections", "CONNS"), ("messages_in", "MSG-IN"),
    ("messages_out", "MSG-OUT"),
)


def render_status(status: dict[str, Any]) -> str:
    lines = [f"chatcluster on port {status['port']}: supervisor pid {status['pid']}, {status['workers']} workers "
             f"({status['workers_wanted']} wanted), {status['clients']} clients, runtime dir "
             f"{status['runtime_dir']}"]
    table = [tuple(head for _, head in STATUS_COLUMNS)]
    table += [tuple(_fmt(key, r.get(key)) for key, _ in STATUS_COLUMNS) for r in status["processes"]]
    widths = [max(len(row[i]) for row in table) for i in range(len(STATUS_COLUMNS))]
    for row in table:
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    if status.get("nats"):
        lines += render_nats(status["nats"])
    return "\n".join(lines)


def render_nats(n: dict[str, Any]) -> list[str]:
    """The multi-host part of `status`: the NATS link, the stream, and how far behind each host is."""
    link = f"connected to {n.get('url')}" if n.get("state") == "connected" else str(n.get("state"))
    lines = [f"NATS: {link}, stream {n.get('stream')} at {n.get('stream_last_seq')} "
             f"(this host applied {n.get('applied_seq')}, lag {n.get('lag')}; {n.get('outbox', 0)} waiting to be "
             f"sent, {n.get('undelivered', 0)} batches undelivered), snapshot at {n.get('snapshot_seq')}"]
    if n.get("age_s", 0) > 5:
        lines.append(f"  (as of {n['age_s']:.0f} s ago: the bus process has not updated it since)")
    for h in n.get("hosts", []):
        me = " (this one)" if h.get("self") else ""
        lines.append(f"  host {h.get('node')}{me}: applied {h.get('applied_seq')}, lag {h.get('lag')}")
    return lines


def _fmt(key: str, value: Any) -> str:
    if value is None:
        return "-"
    if key == "rss_bytes":
        return f"{value / (1 << 20):.1f}M"
    if key == "uptime_s":
        return duration(value)
    if key == "cpu_percent":
        return f"{value:.1f}"
    if key == "heartbeat_age_s":
        return f"{value:.1f}s"
    return str(value)


def cmd_status(args: argparse.Namespace) -> int:
    _, runtime_dir, pid = locate(args, strict=False)
    status = collect_status(runtime_dir, pid)
    if args.json:
        print(json.dumps(status, indent=2))
    else:
        print(render_status(status))
    return 0


COMMANDS = {"start": cmd_start, "status": cmd_status, "stop": cmd_stop, "reload": cmd_reload,
            "scale": cmd_scale, "upgrade": cmd_upgrade}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except (cfgmod.ConfigError, StartupError, CliError) as exc:
        print(f"chatcluster: error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, cfgmod.ConfigError) else 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `chatcluster status | head`: the reader left; say nothing more.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
