"""Capacity: how many idle connections one machine's server holds, and one broadcast to all of them.

Starts chatcluster (`--workers 6` by default), reads the workers' memory, then
opens up to `--clients` connections from several client processes (at most
19,000 sockets each: the open-files limit is 20,000) bound to several loopback
source addresses (127.0.0.2, 127.0.0.3, ...: about 16,000 connections each, far
from the ~28,000 ephemeral ports per address). Connections are opened at a
fixed overall rate with a bounded number in flight per process (started but not
yet welcomed), so the kernel's accept queues never overflow and no SYN is dropped
or answered with a cookie. A connection counts as held once its welcome line
has arrived.

With everyone in the room, the workers' memory is read again, and one extra
client sends ONE line, which must reach every held connection. Reported: the
connections held, the time to connect them all, the time from the send until
the last connection had the line (and the p50/p99 of that delivery), and worker
memory per idle connection = (worker RSS after - worker RSS before) / connections.

    python benchmarks/capacity.py                          # 100,000 clients, 6 workers (several minutes)
    python benchmarks/capacity.py --clients 2000 --quick   # smoke run
    python benchmarks/capacity.py --server baseline --clients 15000

Targets: 100,000 held, all of them get the line, <= 1 KiB of worker memory per
idle connection. Writes benchmarks/results/capacity.json (capacity-quick.json,
capacity-baseline.json for --quick, --server baseline).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from typing import Any

import _common
import loadgen
from _common import Server, fmt, print_table

TARGET_CLIENTS = 100_000
TARGET_BYTES_PER_CONNECTION = 1024


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Idle connections held, and one line broadcast to all of them.")
    parser.add_argument("--server", choices=_common.SERVER_KINDS, default="chatcluster")
    parser.add_argument("--workers", type=int, default=6, help="chatcluster workers")
    parser.add_argument("--clients", type=int, default=None, help=f"connections to open (default {TARGET_CLIENTS:,})")
    parser.add_argument("--processes", type=int, default=0, help="client processes (0 = enough for 19,000 each)")
    parser.add_argument("--sources", type=int, default=0, help="source addresses (0 = one per 16,000 connections)")
    parser.add_argument("--connect-rate", type=float, default=4000.0, help="new connections per second, overall")
    parser.add_argument("--inflight", type=int, default=64, help="connections in flight per client process")
    parser.add_argument("--settle", type=float, default=2.0, help="seconds to wait before each memory reading")
    parser.add_argument("--timeout", type=float, default=0.0, help="seconds allowed to connect (0 = from the rate)")
    parser.add_argument("--quick", action="store_true", help="smoke run (2,000 clients unless --clients is given)")
    parser.add_argument("--json", default=None, help="results file name (default: capacity[-SERVER][-quick])")
    args = parser.parse_args(argv)
    args.json = args.json or _common.results_name("capacity", args.server, args.quick)
    if args.clients is None:
        args.clients = 2000 if args.quick else TARGET_CLIENTS
    if args.quick:
        args.settle = min(args.settle, 1.0)
        # Small, but through the same paths as a full run: several processes and addresses.
        args.processes = args.processes or 2
        args.sources = args.sources or 2
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    _common.exit_cleanly_on_sigterm()
    _common.raise_open_file_limit()
    busy_before = _common.warn_if_busy()
    connect_timeout = args.timeout or (60.0 + 3 * args.clients / args.connect_rate)
    server = Server(args.server, workers=args.workers, log_name="capacity").start()
    try:
        plans = loadgen.plan_clients(
            server.host,
            server.port,
            receivers=args.clients,
            senders=1,
            lines_per_sender=1,
            processes=args.processes,
            sources=args.sources,
            sample_every=1,
            hot_receivers=0,  # idle sockets cost nothing in epoll: all of them read at once
            connect_rate=args.connect_rate,
            max_inflight=args.inflight,
            max_failures=500,
            deadline_s=connect_timeout + 180,
        )
        time.sleep(args.settle)
        before = server.memory()
        print(
            f"{args.server}: {args.clients:,} connections from {len(plans)} processes and "
            f"{len(plans[0].sources)} source addresses at {args.connect_rate:,.0f}/s ...",
            flush=True,
        )
        after: dict[str, Any] = {}

        def measure_after_connect(load: loadgen.Load) -> dict[str, Any]:
            time.sleep(args.settle)
            after.update(server.memory())
            return {}

        out = loadgen.run_load(
            plans,
            server=server,
            connect_timeout=connect_timeout,
            run_timeout=120.0,
            label=args.server,
            verbose=True,
            before_go=measure_after_connect,
        )
    finally:
        code = server.stop()
    held = out["clients_held"] - out["senders"]  # the idle ones; the extra client is not counted
    got_it = out["received"]
    worker_delta = after.get("worker_rss", 0) - before["worker_rss"]
    per_conn = worker_delta / held if held else math.nan
    summary = {
        "clients_requested": args.clients,
        "connections_held": held,
        "connect_failed": out["connect_failed"],
        "connect_errors": out["connect_errors"],
        "connect_s": out["connect_s"],
        "connect_rate_achieved": held / out["connect_s"] if out["connect_s"] and out["connect_s"] > 0 else math.nan,
        "broadcast_received": got_it,
        "broadcast_missing": out["lost"],
        "broadcast_last_ms": out["seconds"] * 1000 if not math.isnan(out["seconds"]) else math.nan,
        "broadcast_latency": out["latency"],
        "worker_rss_before": before["worker_rss"],
        "worker_rss_after": after.get("worker_rss"),
        "server_rss_before": before["rss"],
        "server_rss_after": after.get("rss"),
        "workers_seen": before["workers"],
        "worker_bytes_per_connection": per_conn,
        "server_exit_code": code,
    }
    lat = out["latency"]
    print_table(
        f"Capacity ({args.server}" + (f", {args.workers} workers)" if args.server == "chatcluster" else ")"),
        [
            ("connections held", [held, f"target {TARGET_CLIENTS:,}"]),
            ("failed connects", [out["connect_failed"], fmt(out["connect_errors"]) if out["connect_errors"] else ""]),
            ("time to connect all (s)", [out["connect_s"], f"{fmt(summary['connect_rate_achieved'])} connections/s"]),
            ("broadcast received by", [got_it, f"of {held:,}; {out['lost']:,} missing"]),
            ("broadcast: last receipt (ms)", [summary["broadcast_last_ms"], "after the send"]),
            ("broadcast: p50 / p99 (ms)", [lat["p50_ms"], f"{fmt(lat['p99_ms'])}"]),
            ("worker RSS before (MiB)", [before["worker_rss"] / 2**20, f"{before['workers']} workers"]),
            ("worker RSS after (MiB)", [after.get("worker_rss", 0) / 2**20, ""]),
            ("server RSS after (MiB)", [after.get("rss", 0) / 2**20, "all processes"]),
            ("worker bytes per connection", [per_conn, f"target <= {TARGET_BYTES_PER_CONNECTION:,}"]),
        ],
        ["", "value", "note"],
    )
    path = _common.write_result(
        args.json,
        "capacity",
        busy_before,
        {
            "args": vars(args),
            "summary": summary,
            "load": out,
            "targets": {"clients": TARGET_CLIENTS, "bytes_per_connection": TARGET_BYTES_PER_CONNECTION},
        },
    )
    print(f"\nwrote {path}")
    return 0 if held == args.clients and out["lost"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
