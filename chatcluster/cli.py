"""The `chatcluster` command: start a cluster, or act on a running one.

`start` runs the supervisor in the foreground. The other subcommands find a
running cluster through its pid file (in the runtime directory, which is
derived from the same --config/--port/--runtime-dir/--pid-file as `start`)
and act on it with signals; `status` reads the shared stats file and psutil.
Every failure is one line on stderr naming the problem and the fix, and a
non-zero exit.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from typing import Any

from . import __version__
from . import config as cfgmod
from . import stats as S
from .supervisor import (
    StartupError,
    Supervisor,
    check_port_free,
    prepare_runtime_dir,
    resolve_runtime_dir,
    running_pid,
    setup_logging,
)


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
    for name, text in (("stop", "stop a running cluster gracefully"),
                       ("reload", "reload the config file of a running cluster"),
                       ("upgrade", "replace every process with the installed code, keeping connections")):
        locating(sub.add_parser(name, help=text))
    scale = sub.add_parser("scale", help="set the number of workers of a running cluster")
    scale.add_argument("count", type=int, help="number of workers wanted (at least 1)")
    locating(scale)
    return parser


def load_config(args: argparse.Namespace) -> cfgmod.Config:
    overrides = cfgmod.overrides_from(args)
    return cfgmod.load(getattr(args, "config", None), overrides)


def cmd_start(args: argparse.Namespace) -> int:
    cfg = load_config(args)
    setup_logging(cfg.log_level)
    runtime_dir = resolve_runtime_dir(cfg)
    prepare_runtime_dir(runtime_dir)
    pid_file = cfg.pid_file or os.path.join(runtime_dir, "chatcluster.pid")
    other = running_pid(pid_file)
    if other is not None and other != os.getpid():
        raise StartupError(f"a cluster is already running with pid {other} (pid file {pid_file}); "
                           f"stop it with `chatcluster stop --port {cfg.port}` or use another --port")
    check_port_free(cfg.host, cfg.port)
    overrides = {k: v for k, v in cfgmod.overrides_from(args).items() if v is not None}
    sup = Supervisor(cfg=cfg, config_path=args.config, overrides=overrides, runtime_dir=runtime_dir,
                     pid_file=pid_file)
    return sup.run()


def locate(args: argparse.Namespace) -> tuple[cfgmod.Config, str, str, int]:
    """(config, runtime dir, pid file, supervisor pid) of the running cluster, or a CliError."""
    overrides: dict[str, Any] = {"port": args.port, "runtime_dir": args.runtime_dir, "pid_file": args.pid_file}
    cfg = cfgmod.load(args.config, overrides)
    runtime_dir = resolve_runtime_dir(cfg)
    pid_file = cfg.pid_file or os.path.join(runtime_dir, "chatcluster.pid")
    pid = running_pid(pid_file)
    if pid is None:
        raise CliError(f"no chatcluster is running on port {cfg.port} (no live pid in {pid_file}); "
                       f"start one with `chatcluster start`, or pass the --port/--runtime-dir/--pid-file "
                       f"it was started with")
    return cfg, runtime_dir, pid_file, pid


def wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


def cmd_stop(args: argparse.Namespace) -> int:
    cfg, _, _, pid = locate(args)
    os.kill(pid, signal.SIGTERM)
    if wait_gone(pid, cfg.graceful_timeout + 10):
        print(f"chatcluster (pid {pid}) stopped")
        return 0
    raise CliError(f"chatcluster (pid {pid}) is still running {cfg.graceful_timeout + 10:.0f} s after "
                   f"SIGTERM; see its log, or stop it fast with `kill -QUIT {pid}`")


def cmd_reload(args: argparse.Namespace) -> int:
    _, _, _, pid = locate(args)
    if args.config:
        cfgmod.load(args.config)  # refuse a broken file here, where the user sees the error
    os.kill(pid, signal.SIGHUP)
    print(f"sent SIGHUP to chatcluster (pid {pid}); live settings apply now, see its log for what changed")
    return 0


def cmd_scale(args: argparse.Namespace) -> int:
    if args.count < 1:
        raise CliError(f"cannot scale to {args.count} workers; at least 1 is needed")
    _, runtime_dir, _, pid = locate(args)
    path = os.path.join(runtime_dir, "scale")
    with open(path, "w") as fh:
        fh.write(f"{args.count}\n")
    os.kill(pid, signal.SIGUSR1)
    stats = S.StatsFile(os.path.join(runtime_dir, "stats"))
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        ready = [v for v in stats.used() if v.state == S.READY]
        if len(ready) == args.count and len(stats.used()) == args.count:
            print(f"chatcluster (pid {pid}) now runs {args.count} workers")
            return 0
        time.sleep(0.1)
    raise CliError(f"chatcluster (pid {pid}) did not reach {args.count} workers within 30 s; see its log")


def cmd_upgrade(args: argparse.Namespace) -> int:
    raise CliError("upgrade is not available in this version; restart the cluster to run new code")


def cmd_status(args: argparse.Namespace) -> int:
    import psutil

    _, runtime_dir, _, pid = locate(args)
    stats = S.StatsFile(os.path.join(runtime_dir, "stats"))
    sup = psutil.Process(pid)
    procs: dict[int, psutil.Process] = {pid: sup}
    for child in sup.children(recursive=True):
        procs[child.pid] = child
    for p in procs.values():
        try:
            p.cpu_percent(None)
        except psutil.Error:
            pass
    time.sleep(0.3)
    now = time.time()
    slots = {v.pid: v for v in stats.used()}
    rows: list[dict[str, Any]] = []
    for p in procs.values():
        try:
            with p.oneshot():
                v = slots.get(p.pid)
                role = "supervisor" if p.pid == pid else (f"worker {v.worker_no}" if v else "broker")
                row: dict[str, Any] = {
                    "role": role, "pid": p.pid, "uptime_s": round(now - p.create_time(), 1),
                    "cpu_percent": p.cpu_percent(None), "rss_bytes": p.memory_info().rss,
                }
                if v:
                    row.update(state=S.STATE_NAMES.get(v.state, "?"), clients=v.clients,
                               connections=len(p.net_connections(kind="tcp")),
                               lines_in=v.lines_in, lines_out=v.lines_out, bytes_out=v.bytes_out,
                               bus_gaps=v.gaps, dropped=v.dropped)
                rows.append(row)
        except psutil.Error:
            continue
    rows.sort(key=lambda r: (r["role"] != "supervisor", r["role"] != "broker", r["pid"]))
    if args.json:
        print(json.dumps({"pid": pid, "runtime_dir": runtime_dir, "processes": rows}, indent=2))
        return 0
    cols = ("role", "pid", "state", "uptime_s", "cpu_percent", "rss_bytes", "clients", "connections",
            "lines_in", "lines_out")
    heads = ("ROLE", "PID", "STATE", "UPTIME", "CPU%", "RSS", "CLIENTS", "CONNS", "IN", "OUT")
    table = [heads] + [tuple(_fmt(c, r.get(c, "")) for c in cols) for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(cols))]
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=False)).rstrip())
    return 0


def _fmt(col: str, value: Any) -> str:
    if value == "":
        return "-"
    if col == "rss_bytes":
        return f"{value / (1 << 20):.1f}M"
    if col == "uptime_s":
        return f"{value:.0f}s"
    if col == "cpu_percent":
        return f"{value:.1f}"
    return str(value)


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


if __name__ == "__main__":
    sys.exit(main())
