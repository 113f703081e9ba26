"""The shared stats file: one fixed-size slot per worker, written by the worker, read by anyone.

Workers write their heartbeat and counters into their own slot of a small
memory-mapped file in the runtime directory. The supervisor reads heartbeats
from it to find stuck workers, and `chatcluster status` reads counters from
it without talking to any process. A slot is written with one `pack_into`;
a reader may see a slot mid-update, which for counters and heartbeats is
harmless. CLOCK_MONOTONIC is shared by all processes of the machine, so
heartbeats compare across processes.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass

SLOTS = 256
MAGIC = b"CCSTATS1"
# pid, state, worker number, generation, started (unix), heartbeat (monotonic),
# clients, lines in, lines delivered, bytes out, bus gaps, clients dropped by a limit
SLOT = struct.Struct("=iiiiddQQQQQQ")
HEADER_SIZE = 64
SIZE = HEADER_SIZE + SLOTS * SLOT.size

FREE, BOOTING, READY, STOPPING = 0, 1, 2, 3
STATE_NAMES = {FREE: "free", BOOTING: "booting", READY: "ready", STOPPING: "stopping"}


@dataclass
class SlotView:
    index: int
    pid: int
    state: int
    worker_no: int
    generation: int
    started: float
    heartbeat: float
    clients: int
    lines_in: int
    lines_out: int
    bytes_out: int
    gaps: int
    dropped: int


class StatsFile:
    def __init__(self, path: str, create: bool = False) -> None:
        self.path = path
        if create:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
            os.ftruncate(fd, SIZE)
        else:
            fd = os.open(path, os.O_RDWR)
        try:
            self.mem = mmap.mmap(fd, SIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        if create:
            self.mem[: len(MAGIC)] = MAGIC
        elif self.mem[: len(MAGIC)] != MAGIC:
            raise ValueError(f"{path} is not a chatcluster stats file")

    def write(self, index: int, *values: float | int) -> None:
        SLOT.pack_into(self.mem, HEADER_SIZE + index * SLOT.size, *values)

    def read(self, index: int) -> SlotView:
        return SlotView(index, *SLOT.unpack_from(self.mem, HEADER_SIZE + index * SLOT.size))

    def clear(self, index: int) -> None:
        self.write(index, 0, FREE, 0, 0, 0.0, 0.0, 0, 0, 0, 0, 0, 0)

    def used(self) -> list[SlotView]:
        return [v for v in (self.read(i) for i in range(SLOTS)) if v.state != FREE]

    def close(self) -> None:
        self.mem.close()
