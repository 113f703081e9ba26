"""Latency under a crowd: paced chat traffic in a room of many connected clients.

Each setting starts a fresh server, connects CLIENTS clients (SENDERS of them
talk, the rest only listen), waits for every welcome line, then has the senders
write RATE lines per second in total, evenly spread (sender j starts j/RATE s
after the others, so the merged stream is regular), for `--duration` seconds.
Every line carries its send time; about 100 listeners, spread evenly over the
room, read as soon as data arrives and measure the delay of every line they get.
The other listeners read their sockets about four times a second, spread evenly
over that time (the server cannot tell this from reading at once: its writes
land in the kernel's socket buffers either way), so that the load generator
stays cheap and leaves the CPU to the server.

Default settings and targets (every one is 200,000 deliveries per second):
    1,000 clients, 10 senders, 200 lines/s in total   p99 <= 20 ms
    2,000 clients, 20 senders, 100 lines/s in total
    5,000 clients, 50 senders,  40 lines/s in total
   10,000 clients, 50 senders,  20 lines/s in total   p99 <= 150 ms

    python benchmarks/latency.py                   # chatcluster, four settings, 15 s each
    python benchmarks/latency.py --quick           # smoke run: small settings, 3 s each
    python benchmarks/latency.py --server baseline
    python benchmarks/latency.py --settings 1000:10:200:20,5000:20:50

Writes benchmarks/results/latency.json and, when matplotlib is installed, the
plot of p99 and p50 against connected clients that docs/performance.md shows,
docs/latency_p99.png; with --quick or --server baseline the results get their
own names (latency-quick.json, results/latency_p99-quick.png, ...).
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import _common
import loadgen
from _common import Server, print_table


@dataclass(frozen=True)
class Setting:
    clients: int
    senders: int
    rate: float  # lines per second over all senders
    target_p99_ms: float = math.nan

    @classmethod
    def parse(cls, text: str) -> Setting:
        parts = text.split(":")
        if len(parts) not in (3, 4):
            raise ValueError(f"setting {text!r} should be CLIENTS:SENDERS:RATE or CLIENTS:SENDERS:RATE:TARGET_MS")
        clients, senders = int(parts[0]), int(parts[1])
        if not 0 < senders < clients:
            raise ValueError(f"setting {text!r}: need at least one sender and one listener")
        return cls(clients, senders, float(parts[2]), float(parts[3]) if len(parts) == 4 else math.nan)


# The two targets, and two rooms in between with the same 200,000 deliveries per second, so that
# the plot shows latency against the number of connected clients at one load on the machine.
FULL = [
    Setting(1000, 10, 200.0, 20.0),
    Setting(2000, 20, 100.0),
    Setting(5000, 50, 40.0),
    Setting(10_000, 50, 20.0, 150.0),
]
QUICK = [Setting(100, 5, 100.0, 20.0), Setting(1000, 10, 20.0, 150.0)]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="p50/p99/max delivery latency with many clients connected.")
    parser.add_argument("--server", choices=_common.SERVER_KINDS, default="chatcluster")
    parser.add_argument("--workers", type=int, default=2, help="chatcluster workers")
    parser.add_argument("--settings", default="", help="comma-separated CLIENTS:SENDERS:RATE[:TARGET_MS]")
    parser.add_argument("--duration", type=float, default=15.0, help="seconds of traffic per setting")
    parser.add_argument("--line-bytes", type=int, default=60)
    parser.add_argument("--hot-receivers", type=int, default=100, help="listeners that measure latency")
    parser.add_argument(
        "--cold-interval", type=float, default=0.25, help="seconds between reads of the other listeners"
    )
    parser.add_argument("--processes", type=int, default=0, help="client processes (0 = 2, or more if needed)")
    parser.add_argument("--connect-rate", type=float, default=3000.0, help="new connections per second")
    parser.add_argument("--timeout", type=float, default=0.0, help="seconds allowed per setting (0 = duration + 60)")
    parser.add_argument("--quick", action="store_true", help="small smoke run")
    parser.add_argument("--server-args", default="",
                        help='more arguments for chatcluster start, e.g. "--history-db /tmp/h.db"')
    parser.add_argument("--json", default=None, help="results file name (default: latency[-SERVER][-quick])")
    parser.add_argument(
        "--plot",
        default=None,
        help="PNG to write (default: docs/latency_p99.png for the full run, else results/latency_p99[-NAME].png)",
    )
    args = parser.parse_args(argv)
    args.json = args.json or _common.results_name("latency", args.server, args.quick)
    if args.plot is None and args.json == "latency":
        args.plot = str(_common.DOCS_PLOTS / "latency_p99.png")  # the full run draws the published plot
    elif args.plot is None:
        suffix = args.json[len("latency") :] if args.json.startswith("latency") else "-" + args.json
        args.plot = str(_common.RESULTS_DIR / f"latency_p99{suffix}.png")
    try:
        args.setting_list = [Setting.parse(s) for s in args.settings.split(",") if s] or (QUICK if args.quick else FULL)
    except ValueError as exc:
        parser.error(str(exc))
    if args.quick:
        args.duration = min(args.duration, 3.0)
    return args


def run_setting(setting: Setting, args: argparse.Namespace) -> dict[str, Any]:
    lines_per_sender = max(1, round(setting.rate / setting.senders * args.duration))
    processes = args.processes or max(2, math.ceil(setting.clients / loadgen.MAX_SOCKETS_PER_PROCESS))
    timeout = args.timeout or args.duration + 60.0
    connect_timeout = 60.0 + setting.clients / args.connect_rate * 2
    server = Server(args.server, workers=args.workers, log_name="latency", extra_args=args.server_args.split()).start()
    try:
        plans = loadgen.plan_clients(
            server.host,
            server.port,
            receivers=setting.clients - setting.senders,
            senders=setting.senders,
            lines_per_sender=lines_per_sender,
            processes=processes,
            line_bytes=args.line_bytes,
            total_rate=setting.rate,
            sample_every=1,
            hot_receivers=args.hot_receivers,
            cold_interval=args.cold_interval,
            connect_rate=args.connect_rate,
            deadline_s=connect_timeout + timeout + 60,
        )
        print(
            f"{args.server}: {setting.clients:,} clients, {setting.senders} senders, "
            f"{setting.rate:g} lines/s for {args.duration:g} s ...",
            flush=True,
        )
        out = loadgen.run_load(
            plans,
            server=server,
            connect_timeout=connect_timeout,
            run_timeout=timeout,
            label=f"{args.server} {setting.clients}",
            verbose=True,
        )
    finally:
        server.stop()
    out["setting"] = asdict(setting)
    out["lines_per_sender"] = lines_per_sender
    p99 = out["latency"]["p99_ms"]
    out["target_met"] = None if math.isnan(setting.target_p99_ms) else bool(p99 <= setting.target_p99_ms)
    return out


def plot(results: list[dict[str, Any]], path: Path, title: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("no plot: matplotlib is not installed (pip install matplotlib)", file=sys.stderr)
        return False
    points = sorted((r["clients_held"], r["latency"]["p99_ms"], r["latency"]["p50_ms"], r["setting"]) for r in results)
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    xs = [p[0] for p in points]
    ax.plot(xs, [p[1] for p in points], "o-", label="p99")
    ax.plot(xs, [p[2] for p in points], "s--", label="p50")
    for x, p99, _p50, s in points:
        ax.annotate(
            f"{p99:.1f} ms\n({s['rate']:g} lines/s)", (x, p99), textcoords="offset points", xytext=(6, 6), fontsize=8
        )
        if not math.isnan(s["target_p99_ms"]):
            ax.plot([x], [s["target_p99_ms"]], "r_", markersize=18)
    _common.log_axes(ax)
    ax.margins(x=0.2, y=0.3)
    ax.set_xlabel("connected clients")
    ax.set_ylabel("delivery latency (ms)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(["p99", "p50", "p99 target"] if any(not math.isnan(p[3]["target_p99_ms"]) for p in points) else None)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    _common.exit_cleanly_on_sigterm()
    _common.raise_open_file_limit()
    busy_before = _common.warn_if_busy()
    results = []
    failures = []
    for setting in args.setting_list:
        try:
            results.append(run_setting(setting, args))
        except (RuntimeError, ValueError) as exc:
            failures.append({"setting": asdict(setting), "error": str(exc)})
            print(f"{setting} could not be measured: {exc}", file=sys.stderr)
    rows = []
    for r in results:
        s, lat = r["setting"], r["latency"]
        rows.append(
            (
                f"{s['clients']:,} clients",
                [
                    s["senders"],
                    s["rate"],
                    r["expected"],
                    r["lost"],
                    lat["samples"],
                    lat["p50_ms"],
                    lat["p99_ms"],
                    lat["max_ms"],
                    s["target_p99_ms"],
                    r["target_met"],
                    r["server_cpu_pct"],
                    f"{r['server_cpu_us_per_line']:.2f}",
                    f"{r['server_user_us_per_line']:.2f}/{r['server_system_us_per_line']:.2f}"
                    f"/{r['softirq_us_per_line']:.2f}",
                    r["server_peak_rss"] / 2**20,
                    r["loadgen_cpu_pct"],
                ],
            )
        )
    print_table(
        f"Latency ({args.server}, {args.duration:g} s of traffic per setting)",
        rows,
        [
            "setting",
            "senders",
            "lines/s",
            "expected",
            "lost",
            "samples",
            "p50 ms",
            "p99 ms",
            "max ms",
            "target",
            "met",
            "cpu %",
            "cpu us/line",
            "user/sys/sirq",
            "rss MiB",
            "load cpu %",
        ],
    )
    for r in results:
        if r["connect_failed"] or r["closed_by_server"]:
            print(
                f"{r['setting']['clients']:,} clients: {r['connect_failed']} failed connects "
                f"{r['connect_errors']}, {r['closed_by_server']} closed by the server"
            )
    plotted = bool(results) and plot(
        results,
        Path(args.plot),
        f"{args.server}: p99 delivery latency vs connected clients ({args.workers} workers)"
        if args.server == "chatcluster"
        else "asyncio baseline: p99 delivery latency vs connected clients",
    )
    path = _common.write_result(
        args.json,
        "latency",
        busy_before,
        {
            "args": {k: v for k, v in vars(args).items() if k != "setting_list"},
            "results": results,
            "failures": failures,
            "plot": args.plot if plotted else None,
        },
    )
    print(f"\nwrote {path}" + (f" and {args.plot}" if plotted else ""))
    ok = not failures and all(r["lost"] == 0 for r in results)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
