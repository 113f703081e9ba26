"""The shared stats file: a small header written by the supervisor, one slot per worker.

Workers write their heartbeat and counters into their own slot of a small
memory-mapped file in the runtime directory; the supervisor writes its own pid,
the broker's pid, the generation and the wanted worker count into the header.
The supervisor reads heartbeats from it to find stuck workers, and
`chatcluster status` reads everything from it without talking to any process.
A slot is written with one `pack_into`; a reader may see a slot mid-update,
which for counters and heartbeats is harmless. CLOCK_MONOTONIC is shared by
all processes of the machine, so heartbeats compare across processes.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass

from .paths import create_exclusive

# Twice the most workers config allows: a generation being replaced and the new one coexist.
SLOTS = 2048
MAGIC = b"CCSTATS3"
# supervisor pid, broker pid, generation, wanted workers, port
HEADER = struct.Struct("=iiiii")
# pid, state, worker number, generation, started (unix), heartbeat (monotonic),
# clients in the room, lines in, lines delivered, bytes out, bus gaps, clients dropped by a limit,
# open client connections (including ones not yet welcomed and ones being closed),
# the configuration version (the supervisor's reload count) the worker last applied
SLOT = struct.Struct("=iiiiddQQQQQQQQ")
_STATE = struct.Struct("=i")  # the state field alone, at offset 4 of a slot
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
    connections: int
    config_version: int


@dataclass
class HeaderView:
    supervisor_pid: int
    broker_pid: int
    generation: int
    target: int
    port: int


class StatsFile:
    def __init__(self, path: str, create: bool = False) -> None:
        self.path = path
        if create:
            # A new file, never an existing one opened: anything planted at the name is replaced.
            fd = create_exclusive(path, 0o600, os.O_RDWR)
            os.ftruncate(fd, SIZE)
        else:
            fd = os.open(path, os.O_RDWR)
        try:
            if os.fstat(fd).st_size < SIZE:
                raise ValueError(f"{path} is not a chatcluster stats file of this version")
            self.mem = mmap.mmap(fd, SIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        if create:
            self.mem[: len(MAGIC)] = MAGIC
        elif self.mem[: len(MAGIC)] != MAGIC:
            self.mem.close()
            raise ValueError(f"{path} is not a chatcluster stats file of this version")

    def write_header(self, supervisor_pid: int, broker_pid: int, generation: int, target: int, port: int) -> None:
        HEADER.pack_into(self.mem, len(MAGIC), supervisor_pid, broker_pid, generation, target, port)

    def header(self) -> HeaderView:
        return HeaderView(*HEADER.unpack_from(self.mem, len(MAGIC)))

    def write(self, index: int, *values: float | int) -> None:
        SLOT.pack_into(self.mem, HEADER_SIZE + index * SLOT.size, *values)

    def read(self, index: int) -> SlotView:
        return SlotView(index, *SLOT.unpack_from(self.mem, HEADER_SIZE + index * SLOT.size))

    def clear(self, index: int) -> None:
        self.write(index, 0, FREE, 0, 0, 0.0, 0.0, 0, 0, 0, 0, 0, 0, 0, 0)

    def used(self) -> list[SlotView]:
        mem, state, size = self.mem, _STATE.unpack_from, SLOT.size
        return [self.read(i) for i in range(SLOTS) if state(mem, HEADER_SIZE + i * size + 4)[0] != FREE]

    def close(self) -> None:
        self.mem.close()
