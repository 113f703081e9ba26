"""Latency and failover stalls of the NATS bridge: one host's batch to every host's reader, through JetStream.

Starts real nats-server clusters on loopback (the test harness in
tests/nats_support.py: free ports, files under a temp dir, every process
stopped at the end), then, with two bridges in this process (one publishes,
one reads, both through `chatcluster.natsbridge`):

- latency: the publisher submits RATE batches of 200 bytes per second for
  `--duration` seconds, each carrying its send time; the reader measures
  submit -> delivery in stream order. On 1 node (R1) and on 3 nodes (R3).
- failover: on 3 nodes (R3), while batches flow at RATE/s, one node is
  stopped: the stream leader by kill -9, a follower by kill -9, the leader by
  a graceful stop (SIGTERM). The stall is the longest pause in deliveries
  from that moment on; also the longest wait for one acknowledgement, and a
  check that every batch arrived once, in order. Each case `--repeat` times,
  each on a fresh cluster.
- the price of `sync_interval: always` (every write flushed to disk before
  the acknowledgement) on the 3-node latency.

    python benchmarks/nats_latency.py            # ~2 min
    python benchmarks/nats_latency.py --quick    # smoke run, ~30 s

Writes benchmarks/results/nats_latency.json (nats_latency-quick.json with --quick).
Needs nats-py and a nats-server of at least 2.11 (bash scripts/test.sh installs both).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import struct
import sys
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))
sys.path.insert(0, str(BENCH.parent / "tests"))  # the NATS cluster harness lives with the tests

from _common import exit_cleanly_on_sigterm, latency_summary, print_table, warn_if_busy, write_result  # noqa: E402
from nats_support import NatsCluster, nats_server_binary  # noqa: E402

from chatcluster import natsbridge as NB  # noqa: E402

logging.getLogger("chatcluster.natsbridge").setLevel(logging.ERROR)  # reconnect notices are expected here

STREAM = "CHATCLUSTER_main"
STAMP = struct.Struct("!qI")  # send time (monotonic ns), batch number


async def flow(cluster: NatsCluster, replicas: int, rate: float, duration: float,
               action: Any = None, action_at: float = 0.0) -> dict[str, Any]:
    """Publish at `rate` for `duration`; optionally run `action()` after `action_at` seconds."""
    urls = tuple(cluster.urls)
    pub = await NB.Bridge(NB.NatsSettings(urls, "pub", replicas=replicas)).start()
    sub = await NB.Bridge(NB.NatsSettings(urls, "sub", replicas=replicas)).start()
    latencies: list[int] = []
    arrivals: list[tuple[int, int]] = []  # (arrival ns, batch number)
    total = int(rate * duration)
    done = asyncio.Event()

    async def reader() -> None:
        async for item in sub.read():
            if isinstance(item, NB.Batch) and item.node == "pub":
                now = time.monotonic_ns()
                sent, n = STAMP.unpack_from(item.data)
                latencies.append(now - sent)
                arrivals.append((now, n))
                if len(arrivals) == total:
                    done.set()

    task = asyncio.create_task(reader())
    await asyncio.sleep(0.5)  # the reader's consumer is in place
    acted_ns = 0
    start = time.monotonic()
    for n in range(total):
        due = start + n / rate
        delay = due - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        if action is not None and not acted_ns and time.monotonic() - start >= action_at:
            acted_ns = time.monotonic_ns()
            await asyncio.get_running_loop().run_in_executor(None, action)
        pub.submit(STAMP.pack(time.monotonic_ns(), n) + b"x" * 188)
    try:
        await asyncio.wait_for(done.wait(), 60)
    except TimeoutError:
        pass
    task.cancel()
    numbers = [n for _, n in arrivals]
    result: dict[str, Any] = {
        **latency_summary(latencies),
        "sent": total, "delivered": len(arrivals), "unique": len(set(numbers)),
        "in_order": numbers == sorted(numbers), "publish_retries": pub.stats.publish_retries,
        "longest_ack_wait_s": pub.stats.longest_ack_wait,
    }
    if acted_ns:
        times = [acted_ns] + [t for t, _ in arrivals if t >= acted_ns]
        result["stall_s"] = max((b - a for a, b in zip(times, times[1:], strict=False)), default=0) / 1e9
        result["pub_reconnected"] = pub.nc is not None and pub.nc.stats.get("reconnects", 0) > 0
    await pub.close(say_bye=False)
    await sub.close(say_bye=False)
    return result


def run_case(size: int, replicas: int, rate: float, duration: float, case: str | None = None,
             sync_always: bool = False) -> dict[str, Any]:
    with NatsCluster(size, sync_always=sync_always) as cluster:
        action = None
        if case is not None:
            def action() -> None:
                leader = cluster.stream_leader(STREAM)
                if case == "leader kill -9":
                    leader.kill()
                elif case == "follower kill -9":
                    next(n for n in cluster.nodes if n is not leader).kill()
                else:
                    leader.stop()
        return asyncio.run(flow(cluster, replicas, rate, duration, action, action_at=duration / 4))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rate", type=float, default=200.0, help="batches per second (default 200)")
    ap.add_argument("--duration", type=float, default=10.0, help="seconds of traffic per latency run")
    ap.add_argument("--repeat", type=int, default=3, help="runs of each failover case (default 3)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 3 s runs, each failover case once")
    ap.add_argument("--json", default=None, help="results name (default nats_latency[-quick])")
    args = ap.parse_args()
    exit_cleanly_on_sigterm()  # the clusters' `with` blocks stop their servers and remove their files
    binary, why = nats_server_binary()
    if binary is None:
        print(f"nats_latency: {why}", file=sys.stderr)
        return 1
    if args.quick:
        args.duration, args.repeat = 3.0, 1
    busy = warn_if_busy()
    latency_rows, results = [], {}
    for label, size, replicas, sync in (("1 node, R1", 1, 1, False), ("3 nodes, R3", 3, 3, False),
                                        ("3 nodes, R3, sync_interval: always", 3, 3, True)):
        r = run_case(size, replicas, args.rate, args.duration, sync_always=sync)
        results[label] = r
        latency_rows.append((label, [r["delivered"], r["sent"], r["p50_ms"], r["p99_ms"], r["max_ms"]]))
    print_table(f"publish -> ordered consumer, {args.rate:.0f} batches/s of 200 B, {args.duration:.0f} s",
                latency_rows, ["", "delivered", "sent", "p50 ms", "p99 ms", "max ms"])
    failover_rows, failovers = [], {}
    for case in ("leader kill -9", "follower kill -9", "leader graceful stop"):
        runs = [run_case(3, 3, args.rate, max(args.duration, 12.0), case) for _ in range(args.repeat)]
        failovers[case] = runs
        stalls = [r["stall_s"] * 1000 for r in runs]
        ok = all(r["delivered"] == r["sent"] == r["unique"] and r["in_order"] for r in runs)
        failover_rows.append((case, [min(stalls), statistics.median(stalls), max(stalls),
                                     max(r["longest_ack_wait_s"] for r in runs) * 1000, ok]))
    print_table(f"failover on 3 nodes (R3), {args.rate:.0f} batches/s, {args.repeat} run(s) each: "
                "longest pause in deliveries (ms)", failover_rows,
                ["", "min", "median", "max", "longest ack wait", "all once, in order"])
    name = args.json or ("nats_latency-quick" if args.quick else "nats_latency")
    path = write_result(name, "nats_latency", busy, {
        "nats_server": binary, "rate": args.rate, "duration_s": args.duration, "latency": results,
        "failover": failovers})
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
