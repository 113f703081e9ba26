"""Out of file descriptors: refuse waiting connections cleanly instead of spinning on them.

When accept() fails with EMFILE the connection stays in the listener's queue,
and a level-triggered listener would wake every poll: the loop would spin at
100% CPU while serving nobody. The shedder holds one descriptor in reserve;
closing it makes room to accept the waiting connection and close it at once
(the client sees the connection closed), one per pass, and the listener goes
on accepting normally as soon as descriptors are free again. When nothing can
be freed (ENOBUFS, ENOMEM) the caller rests the listener briefly. Warnings are
logged at most once a second. This module knows descriptors, not clients.
"""

from __future__ import annotations

import logging
import os
import socket

from .stats import WorkerCounters

log = logging.getLogger("chatcluster.worker")

LISTEN_PAUSE = 0.1  # how long the listener rests when a connection can be neither accepted nor shed
WARN_EVERY = 1.0


def _open_spare() -> int | None:
    try:
        return os.open(os.devnull, os.O_RDONLY)
    except OSError:
        return None


class Shedder:
    def __init__(self, worker_no: int, counters: WorkerCounters) -> None:
        self.worker_no = worker_no
        self.spare_fd: int | None = _open_spare()
        self.last_warning = -WARN_EVERY
        self.counters = counters

    def shed_one(self, listener: socket.socket, exc: OSError, now: float) -> bool:
        """Refuse one waiting connection; False if none could be, and the listener should rest."""
        if now - self.last_warning >= WARN_EVERY:
            log.warning("worker %d: accept failed (%s); shedding new connections until "
                        "descriptors free up", self.worker_no, exc.strerror)
            self.last_warning = now
        if self.spare_fd is None:
            self.spare_fd = _open_spare()
        shed = False
        if self.spare_fd is not None:
            os.close(self.spare_fd)
            self.spare_fd = None
            try:
                sock, _ = listener.accept()
                sock.close()
                shed = True
                self.counters.refused_emfile += 1
                self.counters.dropped += 1
            except OSError:
                pass
            self.spare_fd = _open_spare()
        return shed

    def close(self) -> None:
        if self.spare_fd is not None:
            os.close(self.spare_fd)
            self.spare_fd = None
