"""Where the time goes: each step of a chat line's way through a worker, measured on its own.

A line costs the cluster three kinds of work, and this script times each step in
one process, with real objects (no server, no load generator):

* per message, once per line sent: parsing it (LineReader), the chat rules
  (ChatCore.line), encoding the bus batch, and on every worker decoding it and
  turning it into a broadcast (ChatCore.on_bus);
* per recipient, in Python: queueing the broadcast for each client of the room
  (Worker.apply) and giving each client its output (Worker.flush_dirty), timed
  with a socket whose send() does nothing, so only the Python part shows;
* per send, in the kernel: one send() of a 60-byte line on each of N loopback TCP
  connections whose other ends read, split into user and system time; the
  machine's softirq time over the same sends shows how much of that kernel work
  is TCP receive processing (the receiving half of loopback TCP runs inside the
  sender's send(); see _common.machine_cpu_used on how it is accounted). The
  same send() is then timed cycling over 1,000 to 9,000 connections: its cost
  grows once the connections' kernel state no longer fits in the CPU caches.

    python benchmarks/hotpath.py                 # about 30 s
    python benchmarks/hotpath.py --clients 1000 --rounds 20

Writes benchmarks/results/hotpath.json.
"""

from __future__ import annotations

import argparse
import os
import select
import socket
import sys
import time
import types
from collections.abc import Callable
from typing import Any

import _common
from _common import REPO_ROOT, print_table

sys.path.insert(0, str(REPO_ROOT))

from chatcluster import broker, chat, protocol, wire  # noqa: E402
from chatcluster import events as E  # noqa: E402
from chatcluster import stats as S  # noqa: E402
from chatcluster import worker as W  # noqa: E402
from chatcluster.client import Client  # noqa: E402
from chatcluster.output import Output  # noqa: E402
from chatcluster.registry import Registry  # noqa: E402

LINE = b"#-1,1234:" + b"x" * 50 + b"\n"


def best_of(fn: Callable[[], object], repeat: int, number: int) -> float:
    """Least seconds per call of `fn` over `repeat` runs of `number` calls."""
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        best = min(best, (time.perf_counter() - t0) / number)
    return best


def per_message(number: int) -> dict[str, float]:
    """Seconds per line for each step a line takes once, however many receive it."""
    core = chat.ChatCore("w1")
    core.on_bus(broker.BROKER, [E.Snapshot("w1", core.hello().nonce, [])])
    core.connect(1, "127.0.0.2", time.time())
    core.on_bus("w1", [E.Joined(1, core.local[1].nick, "")])  # the broker's verdict
    reader = protocol.LineReader(512)
    text = LINE.decode().rstrip("\n")
    events = core.line(1, text)
    batch = [e.event for e in events if isinstance(e, chat.Publish)]
    payload = wire.encode("w1", 1, batch)
    theirs = [E.Chat(7, batch[0].text, b"Other")]  # the same line said on worker w2
    return {
        "parse the line (LineReader.feed)": best_of(lambda: reader.feed(LINE), 5, number),
        "chat rules (ChatCore.line)": best_of(lambda: core.line(1, text), 5, number),
        "encode the bus batch": best_of(lambda: wire.encode("w1", 1, batch), 5, number),
        "decode the bus batch (each worker)": best_of(lambda: wire.decode(payload), 5, number),
        "make the broadcast (ChatCore.on_bus, each worker)": best_of(lambda: core.on_bus("w2", theirs), 5, number),
    }


class _NullSocket:
    """A socket whose send() takes everything and does nothing (it is `len`)."""

    __slots__ = ("send", "_fd")

    def __init__(self, fd: int) -> None:
        self.send = len
        self._fd = fd

    def fileno(self) -> int:
        return self._fd


def per_recipient_python(clients: int, rounds: int) -> dict[str, float]:
    """Nanoseconds of Python per recipient: queueing a broadcast, and the flush around send()."""
    registry: Registry[Client, object] = Registry()
    output = Output(registry, types.SimpleNamespace(max_sendq_bytes=1 << 20), lambda c, why: None, 1,
                    S.WorkerCounters())
    for i in range(clients):
        c = Client(_NullSocket(100_000 + i), registry.new_conn(), "127.0.0.2", None, None, 0.0)  # type: ignore[arg-type]
        registry.add(c)
        registry.enter(c)
    line = b"Nick: " + LINE[:-1] + b"\r\n"
    best_queue = best_flush = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        output.stamp = time.monotonic_ns()  # as if from the bus: the latency is measured per recipient too
        output.pass_no += 1
        output.broadcast(line, chat.EMPTY)
        t1 = time.perf_counter()
        while output.dirty:
            output.flush_dirty(W.FLUSH_SLICE)
        output.settle()
        t2 = time.perf_counter()
        best_queue = min(best_queue, t1 - t0)
        best_flush = min(best_flush, t2 - t1)
    return {
        "queue the broadcast for one client (Output.broadcast)": best_queue / clients,
        "flush one client, send() excluded (Output.flush_dirty)": best_flush / clients,
    }


def per_send(clients: int, rounds: int) -> dict[str, Any]:
    """One 60-byte send() on each of `clients` loopback TCP connections read by another process.

    The sending process does nothing else while it is timed, so its user and system time is
    the cost of the sends; the machine's softirq time over the same windows is the receiving
    half of loopback TCP (and the acknowledgements), most of it inside those system times.
    """
    _common.raise_open_file_limit()
    data = b"Nick: " + LINE[:-1] + b"\r\n"
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4096)
    port = listener.getsockname()[1]
    readers, senders = [], []
    for _ in range(clients):
        readers.append(socket.create_connection(("127.0.0.1", port)))
        s, _ = listener.accept()
        s.setblocking(False)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as the worker does
        senders.append(s)
    listener.close()
    done_r, done_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the receiving process: read everything, say when a round has arrived
        try:
            for s in senders:
                s.close()
            ep = select.epoll()
            for r in readers:
                r.setblocking(False)
                ep.register(r.fileno(), select.EPOLLIN | select.EPOLLET)
            by_fd = {r.fileno(): r for r in readers}
            want, got = len(data) * clients, 0
            for _ in range(rounds):
                while got < want:
                    for fd, _ev in ep.poll(1.0):
                        try:
                            got += len(by_fd[fd].recv(65536))
                        except BlockingIOError:
                            pass
                got -= want
                os.write(done_w, b".")
        finally:
            os._exit(0)
    for r in readers:
        r.close()
    try:
        wall = user = system = softirq = 0.0
        for _ in range(rounds):
            t0, c0, m0 = time.perf_counter(), os.times(), _common.machine_cpu()
            for s in senders:
                s.send(data)
            t1, c1, m1 = time.perf_counter(), os.times(), _common.machine_cpu()
            wall += t1 - t0
            user += c1.user - c0.user
            system += c1.system - c0.system
            softirq += m1["softirq"] - m0["softirq"]
            os.read(done_r, 1)  # the other side has it all: the next round starts from empty buffers
    finally:
        for s in senders:
            s.close()
        os.waitpid(pid, 0)
        os.close(done_r)
        os.close(done_w)
    n = rounds * clients
    return {
        "sends": n,
        "wall_s_per_send": wall / n,
        "user_s_per_send": user / n,
        "system_s_per_send": system / n,
        "softirq_s_per_send": softirq / n,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Time each step of a chat line's way through a worker.")
    parser.add_argument("--clients", type=int, default=5000, help="room size for the per-recipient steps")
    parser.add_argument("--rounds", type=int, default=40, help="broadcasts timed per step")
    parser.add_argument("--number", type=int, default=20000, help="calls per timing of the per-message steps")
    parser.add_argument(
        "--sweep",
        default="1000,2500,5000,9000",
        help="connection counts to time send() on (one sender cycling over all of them); empty for none",
    )
    parser.add_argument("--json", default="hotpath")
    args = parser.parse_args(argv)
    busy_before = _common.warn_if_busy()
    msg = per_message(args.number)
    rec = per_recipient_python(args.clients, args.rounds)
    send = per_send(min(args.clients, 9000), args.rounds)
    rows = [(f"per message: {k}", [v * 1e9]) for k, v in msg.items()]
    rows += [(f"per recipient: {k}", [v * 1e9]) for k, v in rec.items()]
    rows += [
        ("per send: send() of 60 B, wall", [send["wall_s_per_send"] * 1e9]),
        ("per send: user time", [send["user_s_per_send"] * 1e9]),
        ("per send: system time", [send["system_s_per_send"] * 1e9]),
        ("per send: of which softirq (the receiving half), machine-wide", [send["softirq_s_per_send"] * 1e9]),
    ]
    print_table(
        f"Hot path, one step at a time (room of {args.clients:,}; send() on {min(args.clients, 9000):,} "
        "loopback connections)",
        rows,
        ["step", "ns"],
    )
    sweep = []
    for n in [int(x) for x in args.sweep.split(",") if x]:
        sweep.append({"connections": n, **per_send(n, args.rounds)})
    if sweep:
        print_table(
            "send() of 60 B cycling over N loopback connections (the kernel's cost per send grows once the "
            "connections' state no longer fits in the CPU caches)",
            [
                (
                    f"{r['connections']:,} connections",
                    [r["wall_s_per_send"] * 1e9, r["user_s_per_send"] * 1e9, r["system_s_per_send"] * 1e9],
                )
                for r in sweep
            ],
            ["", "wall ns", "user ns", "system ns"],
        )
    path = _common.write_json(
        args.json,
        {
            "benchmark": "hotpath",
            "args": vars(args),
            "machine": _common.machine_info(),
            "machine_busy_pct_before": busy_before,
            "per_message_ns": {k: v * 1e9 for k, v in msg.items()},
            "per_recipient_python_ns": {k: v * 1e9 for k, v in rec.items()},
            "per_send": send,
            "per_send_sweep": sweep,
            "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
        },
    )
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
