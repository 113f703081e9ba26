"""Fan-out blast: a few senders write as fast as they can to a room of receivers.

200 receivers and 4 senders join (and every one of them has its welcome line)
before the first line is sent; then each sender writes 5,000 lines of 60 bytes
as fast as its socket takes them. Every line must reach the other 203 clients:
4 x 5,000 x 203 = 4,060,000 deliveries. The same load runs against chatcluster
(`--workers 2`) and against the asyncio baseline, one after the other, each on a
fresh server, and the script prints both and the ratio of delivered lines/s.

    python benchmarks/fanout.py                      # both servers, full size
    python benchmarks/fanout.py --quick              # smoke run: 50 receivers, 2,000 lines each
    python benchmarks/fanout.py --server baseline    # one server only
    python benchmarks/fanout.py --server chatcluster --scrape-every 0.1   # with /metrics scraped meanwhile

Targets: 0 lost, chatcluster >= 20x the baseline's lines/s.
Writes benchmarks/results/fanout.json (fanout-quick.json for --quick,
fanout-SERVER.json for one server).
"""

from __future__ import annotations

import argparse
import math
import sys
import threading
import time
import urllib.request
from typing import Any

import _common
import loadgen
from _common import Server, fmt, print_table

TARGET_RATIO = 20.0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Fan-out blast: chatcluster against the asyncio baseline.")
    parser.add_argument("--server", choices=["both", *_common.SERVER_KINDS], default="both")
    parser.add_argument("--workers", type=int, default=2, help="chatcluster workers")
    parser.add_argument("--server-args", default="", help="more arguments for chatcluster start, space-separated")
    parser.add_argument("--receivers", type=int, default=200)
    parser.add_argument("--senders", type=int, default=4)
    parser.add_argument("--lines", type=int, default=5000, help="lines per sender")
    parser.add_argument("--line-bytes", type=int, default=60, help="bytes per line, newline included")
    parser.add_argument("--processes", type=int, default=2, help="client processes")
    parser.add_argument("--sample-every", type=int, default=0, help="stamp every Nth line (0 = 500 per sender)")
    parser.add_argument("--hot-receivers", type=int, default=20, help="receivers that read at once and measure latency")
    parser.add_argument(
        "--cold-interval",
        type=float,
        default=0.002,
        help="seconds between reads of the receivers that do not measure latency (0 = read at once)",
    )
    parser.add_argument(
        "--repeat", type=int, default=3, help="runs per server, each on a fresh server; the median counts"
    )
    parser.add_argument("--timeout", type=float, default=180.0, help="seconds allowed for one run")
    parser.add_argument(
        "--scrape-every", type=float, default=0.0,
        help="chatcluster only: turn on its metrics endpoint and scrape /metrics this often (seconds) during "
             "the run, to see that scraping leaves the result unchanged (0 = no endpoint)",
    )
    parser.add_argument("--quick", action="store_true", help="small smoke run")
    parser.add_argument("--json", default=None, help="results file name (default: fanout[-SERVER][-quick])")
    args = parser.parse_args(argv)
    name = "fanout-scraped" if args.scrape_every > 0 else "fanout"  # never overwrites the plain figures
    args.json = args.json or _common.results_name(name, args.server, args.quick, default_server="both")
    if args.quick:
        args.receivers = min(args.receivers, 50)
        args.lines = min(args.lines, 2000)
        args.timeout = min(args.timeout, 60.0)
        args.repeat = 1
    if args.line_bytes < 48:
        parser.error("--line-bytes must be at least 48: a line carries a timestamp and a sequence number")
    return args


def run_repeated(kind: str, args: argparse.Namespace) -> dict[str, Any]:
    """`--repeat` runs on fresh servers: the run with the median lines/s, plus every run's figures."""
    runs = []
    for i in range(args.repeat):
        if args.repeat > 1:
            print(f"{kind}: run {i + 1} of {args.repeat}", flush=True)
        runs.append(run_one(kind, args))
    ranked = sorted(runs, key=lambda r: -1.0 if math.isnan(r["lines_per_s"]) else r["lines_per_s"])
    median = dict(ranked[len(ranked) // 2])
    median["runs_lines_per_s"] = [r["lines_per_s"] for r in runs]
    median["runs_lost"] = [r["lost"] for r in runs]
    median["lost_all_runs"] = sum(r["lost"] for r in runs)
    return median


class Scraper:
    """Scrapes a metrics endpoint every `every` seconds on a thread, as Prometheus would, only faster."""

    def __init__(self, port: int, every: float) -> None:
        self.url = f"http://127.0.0.1:{port}/metrics"
        self.every = every
        self.ok = self.failed = 0
        self.slowest = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self, timeout: float = 15.0) -> Scraper:
        """Once the endpoint answers (the supervisor starts it just after the workers)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(self.url, timeout=5) as answer:
                    answer.read()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{self.url} did not answer within {timeout:.0f} s") from None
                time.sleep(0.05)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            began = time.monotonic()
            try:
                with urllib.request.urlopen(self.url, timeout=10) as answer:
                    answer.read()
                self.ok += 1
            except OSError:
                self.failed += 1
            self.slowest = max(self.slowest, time.monotonic() - began)

    def stop(self) -> dict[str, Any]:
        self._stop.set()
        self._thread.join(15)
        return {"every_s": self.every, "scrapes": self.ok, "failed": self.failed,
                "slowest_ms": round(self.slowest * 1000, 1)}


def run_one(kind: str, args: argparse.Namespace) -> dict[str, Any]:
    scrape = kind == "chatcluster" and args.scrape_every > 0
    metrics_port = _common.free_port() if scrape else 0
    extra = ["--metrics-listen", f"127.0.0.1:{metrics_port}"] if scrape else []
    if kind == "chatcluster":
        extra += args.server_args.split()
    server = Server(kind, workers=args.workers, log_name="fanout", extra_args=extra).start()
    scraper = Scraper(metrics_port, args.scrape_every).start() if scrape else None
    try:
        sample_every = args.sample_every or max(1, args.lines // 500)
        plans = loadgen.plan_clients(
            server.host,
            server.port,
            receivers=args.receivers,
            senders=args.senders,
            lines_per_sender=args.lines,
            processes=args.processes,
            line_bytes=args.line_bytes,
            sample_every=sample_every,
            hot_receivers=args.hot_receivers,
            cold_interval=args.cold_interval,
            connect_rate=2000.0,
            deadline_s=args.timeout + 90,
        )
        out = loadgen.run_load(
            plans, server=server, connect_timeout=60.0, run_timeout=args.timeout, label=kind, verbose=True
        )
        out["sample_every"] = sample_every
        if scraper is not None:
            out["scraping"] = scraper.stop()
            print(f"  scraped /metrics {out['scraping']['scrapes']} times ({out['scraping']['failed']} failed, "
                  f"slowest {out['scraping']['slowest_ms']} ms)", flush=True)
        return out
    finally:
        if scraper is not None:
            scraper.stop()
        code = server.stop()
        if code not in (0, None, -15):
            print(f"  {kind} exited with code {code}; see {server.log_path}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    _common.exit_cleanly_on_sigterm()
    _common.raise_open_file_limit()
    busy_before = _common.warn_if_busy()
    kinds = list(_common.SERVER_KINDS) if args.server == "both" else [args.server]
    results: dict[str, dict[str, Any]] = {}
    failures: dict[str, str] = {}
    for kind in kinds:
        try:
            print(f"{kind}: {args.receivers} receivers, {args.senders} senders x {args.lines:,} lines", flush=True)
            results[kind] = run_repeated(kind, args)
        except RuntimeError as exc:
            failures[kind] = str(exc)
            print(f"{kind} could not be measured: {exc}", file=sys.stderr)

    rows = []
    for kind, r in results.items():
        lat = r["latency"]
        rows.append(
            (
                kind,
                [
                    r["clients_held"],
                    r["expected"],
                    r["received"],
                    r["lost_all_runs"],
                    f"{r['seconds']:.3f}",
                    r["lines_per_s"],
                    lat["p50_ms"],
                    lat["p99_ms"],
                    lat["max_ms"],
                    r["server_cpu_s"],
                    r["server_cpu_pct"],
                    f"{r['server_cpu_us_per_line']:.3f}",
                    r["server_peak_rss"] / 2**20,
                    r["loadgen_cpu_pct"],
                ],
            )
        )
    print_table(
        f"Fan-out: {args.senders} senders x {args.lines:,} lines of {args.line_bytes} B to {args.receivers} "
        f"receivers (median of {args.repeat} run(s); lost: over all runs)",
        rows,
        [
            "server",
            "clients",
            "expected",
            "received",
            "lost",
            "seconds",
            "lines/s",
            "p50 ms",
            "p99 ms",
            "max ms",
            "cpu s",
            "cpu %",
            "cpu us/line",
            "rss MiB",
            "load cpu %",
        ],
    )
    ratio = math.nan
    if "chatcluster" in results and "baseline" in results:
        base = results["baseline"]["lines_per_s"]
        ratio = results["chatcluster"]["lines_per_s"] / base if base else math.nan
        print(f"\nchatcluster / baseline delivered lines/s: {fmt(ratio)}x (target >= {TARGET_RATIO:.0f}x)")
    for kind, r in results.items():
        if args.repeat > 1:
            print(f"{kind}: lines/s of each run: {', '.join(fmt(x) for x in r['runs_lines_per_s'])}")
        if r["lost_all_runs"]:
            print(f"{kind}: {r['lost_all_runs']:,} lines lost over {args.repeat} run(s) (target 0)")
        if r["connect_failed"] or r["bad_welcome"] or r["closed_by_server"]:
            print(
                f"{kind}: {r['connect_failed']} failed connects {r['connect_errors']}, "
                f"{r['bad_welcome']} unexpected first lines, {r['closed_by_server']} closed by the server"
            )
    path = _common.write_result(
        args.json,
        "fanout",
        busy_before,
        {
            "args": vars(args),
            "results": results,
            "ratio_lines_per_s": ratio,
            "target_ratio": TARGET_RATIO,
            "failures": failures,
        },
    )
    print(f"\nwrote {path}")
    ok = not failures and all(r["lost_all_runs"] == 0 for r in results.values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
