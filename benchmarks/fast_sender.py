"""One client sending as fast as TCP allows, beside a room of ordinary clients, with flood control off.

The ordinary traffic is that of latency.py (CLIENTS clients, SENDERS of them
talking at RATE lines per second in total, every line stamped, about 100
listeners measuring the delay of each line they get). During it, one more
client, on its own process, writes numbered lines as fast as its socket takes
them for BLAST seconds, and a witness client counts the blaster's lines it
receives (all of them must arrive, in order). The question is what the blaster
does to everyone else: their delivery p99 (target <= 50 ms), and whether any
worker stops beating long enough to be killed (it must not).

    python benchmarks/fast_sender.py                  # 200 clients, 10 senders, 200 lines/s, 10 s blast
    python benchmarks/fast_sender.py --quick          # a 3 s blast
    python benchmarks/fast_sender.py --no-blast       # the same room without the blaster, for comparison

Writes benchmarks/results/fast_sender.json (fast_sender-quick.json, ...).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import selectors
import socket
import sys
import time
from multiprocessing.connection import Connection
from typing import Any

import _common
import loadgen
from _common import Server, print_table

PAD = b" " + b"x" * 50 + b"\r\n"


def _welcomed(sock: socket.socket, deadline: float) -> bytes:
    """Read until the welcome line; returns the nickname."""
    buf = b""
    while b"\r\n" not in buf:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        chunk = sock.recv(4096)
        if not chunk:
            raise RuntimeError("the server closed the connection before the welcome line")
        buf += chunk
    line = buf.split(b"\r\n", 1)[0]
    return line.split(b"nickname is ", 1)[1].split(b".", 1)[0]


def blaster_main(host: str, port: int, seconds: float, ctl: Connection) -> None:
    """The blaster and its witness, in a process of their own: report (sent, seen, in_order, blast_s)."""
    deadline = time.monotonic() + 30
    blaster = socket.create_connection((host, port))
    witness = socket.create_connection((host, port))
    nick = _welcomed(blaster, deadline)
    _welcomed(witness, deadline)
    ctl.send("ready")
    ctl.recv()  # go
    prefix = nick + b": B "
    sent = seen = 0
    in_order = True
    buf = b""
    blaster.setblocking(False)
    witness.setblocking(False)
    out = b""
    t0 = time.monotonic()
    end = t0 + seconds
    blast_s = seconds
    sel = selectors.DefaultSelector()
    sel.register(witness, selectors.EVENT_READ, "w")
    sel.register(blaster, selectors.EVENT_READ | selectors.EVENT_WRITE, "b")
    blast_done = False
    last_seen = time.monotonic()
    while True:
        now = time.monotonic()
        if not blast_done and now >= end:
            blast_done = True
            blast_s = now - t0
            sel.modify(blaster, selectors.EVENT_READ, "b")
        if blast_done and (seen >= sent or now - last_seen > 30):
            break
        for key, ev in sel.select(0.05):
            if key.data == "w":
                data = witness.recv(1 << 20)
                if not data:
                    ctl.send({"error": "the witness was disconnected"})
                    return
                last_seen = time.monotonic()
                *lines, buf = (buf + data).split(b"\r\n")
                for line in lines:
                    if line.startswith(prefix):
                        if int(line[len(prefix):len(prefix) + 8]) != seen:
                            in_order = False
                        seen += 1
            else:
                if ev & selectors.EVENT_READ:
                    try:
                        if not blaster.recv(1 << 20):
                            ctl.send({"error": "the blaster was disconnected"})
                            return
                    except BlockingIOError:
                        pass
                if ev & selectors.EVENT_WRITE and not blast_done:
                    if not out:
                        out = b"".join(b"B %08d" % (sent + i) + PAD for i in range(500))
                        sent += 500
                    try:
                        n = blaster.send(out)
                        out = out[n:]
                    except BlockingIOError:
                        pass
    if out:  # a partly written chunk: its unwritten lines were never sent
        sent -= out.count(b"\r\n")
    ctl.send({"sent": sent, "seen": seen, "in_order": in_order, "blast_s": blast_s})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="One client blasting beside a room of ordinary clients.")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--senders", type=int, default=10)
    parser.add_argument("--rate", type=float, default=200.0, help="ordinary lines per second in total")
    parser.add_argument("--duration", type=float, default=15.0, help="seconds of ordinary traffic")
    parser.add_argument("--blast", type=float, default=10.0, help="seconds the blaster sends")
    parser.add_argument("--no-blast", action="store_true")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", default=None)
    parser.add_argument("--server-args", nargs="*", default=[], help="more arguments for chatcluster start")
    args = parser.parse_args(argv)
    if args.quick:
        args.duration, args.blast = 5.0, 3.0
    name = args.json or ("fast_sender" + ("-noblast" if args.no_blast else "") + ("-quick" if args.quick else ""))
    _common.exit_cleanly_on_sigterm()
    _common.raise_open_file_limit()
    busy_before = _common.warn_if_busy()
    server = Server("chatcluster", workers=args.workers, log_name="fast_sender",
                    extra_args=["--worker-timeout", "5", *args.server_args]).start()
    blast: dict[str, Any] = {}
    proc = None
    try:
        workers_before = sorted(p.pid for p in server.workers_of(server.processes()))
        lines_per_sender = max(1, round(args.rate / args.senders * args.duration))
        plans = loadgen.plan_clients(
            server.host, server.port, receivers=args.clients - args.senders, senders=args.senders,
            lines_per_sender=lines_per_sender, processes=2, line_bytes=60, total_rate=args.rate,
            sample_every=1, hot_receivers=100, cold_interval=0.25, connect_rate=3000.0,
            deadline_s=args.duration + 180,
        )
        ctl, child = mp.Pipe()

        def before_go(_load: loadgen.Load) -> dict[str, Any]:
            nonlocal proc
            if args.no_blast:
                return {}
            proc = mp.Process(target=blaster_main, args=(server.host, server.port, args.blast, child), daemon=True)
            proc.start()
            if not ctl.poll(30) or ctl.recv() != "ready":
                raise RuntimeError("the blaster did not connect")
            ctl.send("go")
            return {}

        print(f"{args.clients} clients, {args.senders} senders at {args.rate:g} lines/s for {args.duration:g} s"
              + ("" if args.no_blast else f", one blaster for {args.blast:g} s") + " ...", flush=True)
        out = loadgen.run_load(plans, server=server, connect_timeout=60, run_timeout=args.duration + 120,
                               label="fast_sender", verbose=True, before_go=before_go)
        if proc is not None:
            blast = ctl.recv() if ctl.poll(60) else {"error": "no report from the blaster"}
            proc.join(5)
        out["workers_replaced"] = sorted(p.pid for p in server.workers_of(server.processes())) != workers_before
        out["server_log_heartbeat_kills"] = server.log_tail(100000).count("no heartbeat")
    finally:
        server.stop()
        if proc is not None and proc.is_alive():
            proc.kill()
    lat = out["latency"]
    rows = [("ordinary clients", [out["expected"], out["lost"], lat["samples"], lat["p50_ms"], lat["p99_ms"],
                                  lat["max_ms"], out["server_cpu_pct"]])]
    print_table("Ordinary traffic beside the blaster" if not args.no_blast else "Ordinary traffic, no blaster",
                rows, ["", "expected", "lost", "samples", "p50 ms", "p99 ms", "max ms", "server cpu %"])
    if blast:
        if "error" in blast:
            print(f"blaster: {blast['error']}")
        else:
            rate = blast["sent"] / blast["blast_s"] if blast["blast_s"] else 0
            print(f"blaster: {blast['sent']:,} lines in {blast['blast_s']:.1f} s ({rate:,.0f} lines/s); the witness "
                  f"got {blast['seen']:,}, {'in order' if blast['in_order'] else 'OUT OF ORDER'}")
    print(f"workers replaced: {out['workers_replaced']}; heartbeat kills in the log: "
          f"{out['server_log_heartbeat_kills']}")
    path = _common.write_result(name, "fast_sender", busy_before, {"args": vars(args), "result": out,
                                                                   "blast": blast})
    print(f"\nwrote {path}")
    ok = out["lost"] == 0 and not out["workers_replaced"] and (
        args.no_blast or (blast.get("seen") == blast.get("sent") and blast.get("in_order")))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
