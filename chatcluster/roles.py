"""What each child process of the cluster runs once forked: a worker, or the bus process.

The supervisor forks and calls one of these; they wire the pieces that must
not know each other (the worker loop and the upgrade's `migrate` plug-in), so
the import graph stays one-way: supervisor -> roles -> worker, migrate, broker.
"""

from __future__ import annotations

from collections.abc import Sequence

from . import broker, migrate, worker
from . import stats as S
from .config import Config


def run_worker(cfg: Config, worker_no: int, worker_id: str, slot: int, generation: int, runtime_dir: str,
               stats: S.StatsFile, succeeds: tuple[str, int] | None = None) -> int:
    """A worker process: `succeeds` (id, pid) names the old worker it takes over from in an upgrade."""
    return worker.main(cfg, worker_no, worker_id, slot, generation, runtime_dir, stats, succeeds, migrate.HOOKS)


def run_broker(runtime_dir: str, control_fd: int, workers: Sequence[str] = (),
               stats: S.StatsFile | None = None, multihost: bool = False) -> None:
    """The bus process; `workers` are the live workers when it replaces a dead one.

    One host: the broker. With `nats_servers` (`multihost`): the bridge to the shared stream, imported
    only then, since it needs nats-py, which a one-host server does without.
    """
    if multihost:
        from . import multihost as M

        M.run_host_bus(runtime_dir, control_fd, workers, stats)
    else:
        broker.run_broker(runtime_dir, control_fd, workers, stats)
