"""Scaling: what one message costs the server as the room doubles, at the same message rate.

The same paced traffic (by default 10 senders, 10 lines/s in total, 10 s) runs in
rooms of 2,500, 5,000, 10,000 and 20,000 connected clients, each on a fresh
server. Every line reaches every other client, so the work per message should
grow with the room and no faster: doubling the clients may at most double the
server's CPU per message. The script prints, for each room, the server CPU per
message (per line sent) and per delivered line, split into user and system time,
the machine's softirq time per delivered line (loopback TCP receive work, most of
it inside the server's system time: see _common.machine_cpu_used), the latency,
and the ratio of CPU per message to the previous room (target <= 2.0 for a
doubling).

    python benchmarks/scaling.py                           # 2,500 .. 20,000 clients (~2 min)
    python benchmarks/scaling.py --quick                   # 500 and 1,000 clients, 3 s each
    python benchmarks/scaling.py --clients 1000,2000 --rate 50

Writes benchmarks/results/scaling.json (scaling-quick.json for --quick) and,
when matplotlib is installed, the CPU per message and p99 against the room size
as docs/scaling.png, the plot docs/performance.md shows (results/NAME.png for
other runs, or the path given with --plot).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

import _common
import latency
from _common import print_table

TARGET_RATIO = 2.0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Server CPU per message as the room doubles, at one message rate.")
    parser.add_argument("--server", choices=_common.SERVER_KINDS, default="chatcluster")
    parser.add_argument("--workers", type=int, default=2, help="chatcluster workers")
    parser.add_argument("--clients", default="2500,5000,10000,20000", help="comma-separated room sizes")
    parser.add_argument("--senders", type=int, default=10)
    parser.add_argument("--rate", type=float, default=10.0, help="lines per second over all senders")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of traffic per room")
    parser.add_argument("--line-bytes", type=int, default=60)
    parser.add_argument("--hot-receivers", type=int, default=100, help="listeners that measure latency")
    parser.add_argument("--cold-interval", type=float, default=0.25, help="seconds between reads of the others")
    parser.add_argument("--processes", type=int, default=0, help="client processes (0 = 2, or more if needed)")
    parser.add_argument("--connect-rate", type=float, default=3000.0, help="new connections per second")
    parser.add_argument("--timeout", type=float, default=0.0, help="seconds allowed per room (0 = duration + 60)")
    parser.add_argument("--quick", action="store_true", help="small smoke run")
    parser.add_argument("--json", default=None, help="results file name (default: scaling[-SERVER][-quick])")
    parser.add_argument(
        "--plot", default=None, help="PNG to write (default: docs/scaling.png for the full run, else results/NAME.png)"
    )
    args = parser.parse_args(argv)
    args.json = args.json or _common.results_name("scaling", args.server, args.quick)
    if args.quick:
        args.clients = "500,1000" if args.clients == parser.get_default("clients") else args.clients
        args.duration = min(args.duration, 3.0)
    if args.plot is None and args.json == "scaling":
        args.plot = str(_common.DOCS_PLOTS / "scaling.png")  # the full run draws the published plot
    elif args.plot is None:
        args.plot = str(_common.RESULTS_DIR / f"{args.json}.png")
    try:
        args.sizes = sorted({int(x) for x in args.clients.split(",") if x})
    except ValueError:
        parser.error(f"--clients {args.clients!r} should be comma-separated numbers, e.g. 2500,5000")
    if not args.sizes or args.sizes[0] <= args.senders:
        parser.error("every room needs more clients than --senders")
    return args


def plot(results: list[dict[str, Any]], path: Path, title: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("no plot: matplotlib is not installed (pip install matplotlib)", file=sys.stderr)
        return False
    xs = [r["clients_held"] for r in results]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4.2), dpi=120)
    per_msg = [r["server_cpu_us_per_message"] / 1000 for r in results]
    ax1.plot(xs, per_msg, "o-", label="measured")
    if per_msg and not math.isnan(per_msg[0]):
        ax1.plot(xs, [per_msg[0] * x / xs[0] for x in xs], "k:", label="linear from the smallest room")
    _common.log_axes(ax1)
    ax1.set_xlabel("connected clients")
    ax1.set_ylabel("server CPU per message (ms)")
    ax1.grid(True, which="both", alpha=0.3)
    ax1.legend(fontsize=8)
    ax2.plot(xs, [r["latency"]["p99_ms"] for r in results], "o-", label="p99")
    ax2.plot(xs, [r["latency"]["p50_ms"] for r in results], "s--", label="p50")
    _common.log_axes(ax2)
    ax2.set_xlabel("connected clients")
    ax2.set_ylabel("delivery latency (ms)")
    ax2.grid(True, which="both", alpha=0.3)
    ax2.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
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
    results: list[dict[str, Any]] = []
    failures = []
    for clients in args.sizes:
        setting = latency.Setting(clients, args.senders, args.rate)
        try:
            results.append(latency.run_setting(setting, args))
        except (RuntimeError, ValueError) as exc:
            failures.append({"clients": clients, "error": str(exc)})
            print(f"{clients:,} clients could not be measured: {exc}", file=sys.stderr)
    rows = []
    previous: dict[str, Any] | None = None
    worst_ratio = math.nan
    for r in results:
        ratio = math.nan
        if previous is not None:
            growth = r["clients_held"] / previous["clients_held"]
            # Normalised to a doubling, so that rooms that are not exact doubles compare too.
            ratio = (r["server_cpu_us_per_message"] / previous["server_cpu_us_per_message"]) ** (
                math.log(2) / math.log(growth)
            )
            worst_ratio = ratio if math.isnan(worst_ratio) else max(worst_ratio, ratio)
        r["cpu_per_message_ratio_per_doubling"] = ratio
        previous = r
        lat = r["latency"]
        rows.append(
            (
                f"{r['clients_held']:,} clients",
                [
                    r["lines_sent"],
                    r["received"],
                    r["lost"],
                    lat["p50_ms"],
                    lat["p99_ms"],
                    r["server_cpu_pct"],
                    r["server_cpu_us_per_message"],
                    ratio,
                    f"{r['server_cpu_us_per_line']:.2f}",
                    f"{r['server_user_us_per_line']:.2f}",
                    f"{r['server_system_us_per_line']:.2f}",
                    f"{r['softirq_us_per_line']:.2f}",
                    r["loadgen_cpu_pct"],
                ],
            )
        )
    print_table(
        f"Scaling ({args.server}, {args.senders} senders, {args.rate:g} lines/s in total, "
        f"{args.duration:g} s per room)",
        rows,
        [
            "room",
            "lines sent",
            "delivered",
            "lost",
            "p50 ms",
            "p99 ms",
            "cpu %",
            "cpu us/msg",
            "x per 2x",
            "cpu us/line",
            "user",
            "system",
            "softirq",
            "load cpu %",
        ],
    )
    print(
        "\ncpu us/msg: server CPU per line sent; x per 2x: its growth when the room doubles "
        f"(target <= {TARGET_RATIO:g}); user/system: the server's split of cpu us/line; softirq: the "
        "machine's softirq time per delivered line (loopback TCP receive work, mostly inside the system time)."
    )
    plotted = bool(results) and plot(
        results,
        Path(args.plot),
        f"{args.server}: CPU per message and latency as the room grows ({args.rate:g} lines/s, {args.workers} workers)",
    )
    path = _common.write_result(
        args.json,
        "scaling",
        busy_before,
        {
            "args": {k: v for k, v in vars(args).items() if k != "sizes"},
            "results": results,
            "worst_ratio_per_doubling": worst_ratio,
            "target_ratio_per_doubling": TARGET_RATIO,
            "failures": failures,
            "plot": args.plot if plotted else None,
        },
    )
    print(f"\nwrote {path}" + (f" and {args.plot}" if plotted else ""))
    ok = not failures and all(r["lost"] == 0 for r in results)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
