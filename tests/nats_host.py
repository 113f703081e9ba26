"""A bridge in a process of its own, for tests that kill, pause or isolate a host.

Usage: python tests/nats_host.py NODE URL[,URL...] [REPLICAS]
Prints one JSON object per line on stdout: {"ready": incarnation} once started, then
every item read from the stream ({"batch": ..., "seq": ...}, {"up": node, "inc": ...},
{"gone": node, "inc": ..., "reason": ...}, {"gap": [first, last]}) and state changes.
Each line on stdin is published as one batch. Exits when stdin closes.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from chatcluster import hosts as H  # noqa: E402
from chatcluster import natsbridge as NB  # noqa: E402


def emit(obj: dict[str, object]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


async def main() -> None:
    node, urls = sys.argv[1], tuple(sys.argv[2].split(","))
    replicas = int(sys.argv[3]) if len(sys.argv) > 3 else 1
    bridge = NB.Bridge(NB.NatsSettings(urls, node, replicas=replicas),
                       on_state=lambda state, detail: emit({"state": state}))
    await bridge.start()
    emit({"ready": bridge.incarnation, "start": bridge.start_seq})

    async def reader() -> None:
        async for item in bridge.read():
            if isinstance(item, NB.Batch):
                emit({"batch": item.data.decode(), "seq": item.seq, "node": item.node})
            elif isinstance(item, H.HostUp):
                emit({"up": item.node, "inc": item.incarnation, "seq": item.seq})
            elif isinstance(item, H.HostGone):
                emit({"gone": item.node, "inc": item.incarnation, "reason": item.reason, "seq": item.seq})
            elif isinstance(item, NB.Gap):
                emit({"gap": [item.first, item.last]})

    task = asyncio.create_task(reader())
    loop = asyncio.get_running_loop()
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line:
            break
        bridge.submit(line.rstrip("\n").encode())
    await bridge.close()
    task.cancel()


if __name__ == "__main__":
    NB.run_forever(main)
