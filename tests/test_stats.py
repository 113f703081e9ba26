"""The shared stats file: named figures in, the same figures out, for every reader.

Real files in a temporary directory, opened twice where a writer and a reader
are different processes in the cluster (one mapping each, as there).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from chatcluster import stats as S


@pytest.fixture
def path(tmp_path: Path) -> str:
    return str(tmp_path / "stats")


def test_every_named_figure_of_a_slot_reads_back_as_written(path: str) -> None:
    writer = S.StatsFile(path, create=True)
    k = S.WorkerCounters()
    for i, name in enumerate(S.COUNTER_NAMES, start=1):
        setattr(k, name, 1000 + i)
    k.pid, k.state, k.worker_no, k.generation, k.clients, k.connections = 42, S.READY, 7, 3, 5, 6
    k.heartbeat, k.started, k.config_version = 123.5, 1_700_000_000.25, 9
    writer.write_slot(4, k)
    view = S.StatsFile(path).read(4)
    for i, name in enumerate(S.COUNTER_NAMES, start=1):
        assert getattr(view, name) == 1000 + i, name
    assert (view.pid, view.state, view.worker_no, view.generation, view.clients, view.connections) == (
        42, S.READY, 7, 3, 5, 6)
    assert (view.heartbeat, view.started, view.config_version) == (123.5, 1_700_000_000.25, 9)


def test_the_old_slot_names_still_read_the_same_figures(path: str) -> None:
    stats = S.StatsFile(path, create=True)
    k = S.WorkerCounters()
    k.lines_received, k.lines_delivered, k.bytes_delivered, k.bus_gaps = 1, 2, 3, 4
    stats.write_slot(0, k)
    v = stats.read(0)
    assert (v.lines_in, v.lines_out, v.bytes_out, v.gaps) == (1, 2, 3, 4)


def test_an_observation_on_a_bucket_bound_counts_in_that_bucket(path: str) -> None:
    k = S.WorkerCounters()
    k.observe_latency(S.BUCKETS[3])  # Prometheus buckets are "less than or equal"
    k.observe_latency(S.BUCKETS[3] * 1.01)
    k.observe_latency(S.BUCKETS[-1] * 2)  # above every bound
    k.observe_loop(0.0)
    stats = S.StatsFile(path, create=True)
    stats.write_slot(0, k)
    latency = stats.read(0).latency
    assert latency.counts[3] == 1 and latency.counts[4] == 1 and latency.counts[-1] == 1
    assert latency.count == 3
    assert latency.sum == pytest.approx(S.BUCKETS[3] * 2.01 + S.BUCKETS[-1] * 2)
    cumulative = latency.cumulative()
    assert cumulative[-1] == (float("inf"), 3)
    assert [n for _, n in cumulative] == sorted(n for _, n in cumulative)
    assert stats.read(0).loop.counts[0] == 1


def test_a_reader_takes_the_bucket_bounds_from_the_file(path: str) -> None:
    S.StatsFile(path, create=True)
    assert S.StatsFile(path).bounds == S.BUCKETS


def test_a_worker_replacing_another_in_its_slot_counts_on_from_its_figures(path: str) -> None:
    supervisor = S.StatsFile(path, create=True)
    supervisor.begin_slot(2, worker_no=1, generation=1)
    first = supervisor.resume_slot(2, pid=100, worker_no=1, generation=1, started=1.0)
    first.lines_received, first.accepted, first.clients, first.connections = 50, 4, 3, 4
    first.observe_loop(0.001)
    supervisor.write_slot(2, first)
    supervisor.clear(2)  # reaped
    supervisor.begin_slot(2, worker_no=5, generation=1)
    second = supervisor.resume_slot(2, pid=200, worker_no=5, generation=1, started=2.0)
    assert (second.lines_received, second.accepted) == (50, 4)
    assert second.loop == first.loop
    assert (second.clients, second.connections) == (0, 0)  # gauges are the new worker's own
    assert (second.pid, second.worker_no) == (200, 5)


def test_a_freed_slot_is_no_longer_used_but_keeps_its_position_and_counts(path: str) -> None:
    stats = S.StatsFile(path, create=True)
    stats.begin_slot(0, 1, 1)
    k = stats.resume_slot(0, 100, 1, 1, 1.0)
    k.state, k.lines_received, k.clients, k.connections = S.READY, 9, 2, 2
    stats.write_slot(0, k)
    stats.begin_slot(1, 2, 1)
    assert [v.index for v in stats.used()] == [0, 1]
    stats.clear(0)
    assert [v.index for v in stats.used()] == [1]
    assert [v.index for v in stats.positions()] == [0, 1]
    freed = stats.read(0)
    assert (freed.state, freed.pid, freed.clients, freed.connections) == (S.FREE, 0, 0, 0)
    assert freed.lines_received == 9


def test_supervisor_figures_are_written_in_place_and_survive_a_reopening(path: str) -> None:
    first = S.StatsFile(path, create=True)
    first.write_header(10, 11, 1, 4, 12345)
    first.supervisor.reloads_refused += 1
    first.supervisor.count_restart("heartbeat_timeout")
    first.supervisor.count_restart("heartbeat_timeout")
    # A supervisor re-executed by an upgrade opens the same file without creating it.
    again = S.StatsFile(path)
    again.write_header(10, 11, 2, 4, 12345)
    h = again.header()
    assert (h.supervisor_pid, h.broker_pid, h.generation, h.target, h.port) == (10, 11, 2, 4, 12345)
    assert h.reloads_refused == 1 and h.worker_restarts_heartbeat_timeout == 2 and h.worker_restarts_crash == 0
    assert h.supervisor_heartbeat > 0


def test_the_broker_block_reads_back_and_a_new_broker_counts_on_from_it(path: str) -> None:
    stats = S.StatsFile(path, create=True)
    k = stats.broker_counters()
    k.pid, k.heartbeat, k.batches_in, k.bytes_in, k.batches_out, k.bytes_out = 7, 5.5, 1, 2, 3, 4
    stats.write_broker(k)
    again = S.StatsFile(path).broker_counters()
    assert (again.pid, again.heartbeat, again.batches_in, again.bytes_in, again.batches_out, again.bytes_out) == (
        7, 5.5, 1, 2, 3, 4)


def test_the_regions_of_the_three_writers_do_not_overlap(path: str) -> None:
    stats = S.StatsFile(path, create=True)
    k = S.WorkerCounters()
    k.lines_received = 1 << 40
    stats.write_slot(0, k)
    stats.write_broker(S.BrokerCounters(pid=1, heartbeat=1.0, batches_in=1 << 41))
    stats.write_header(1, 2, 3, 4, 5)
    stats.supervisor.upgrades_failed += 1
    assert stats.read(0).lines_received == 1 << 40
    assert stats.broker_counters().batches_in == 1 << 41
    assert stats.header().upgrades_failed == 1 and stats.bounds == S.BUCKETS


def test_a_file_of_another_version_is_refused(path: str) -> None:
    S.StatsFile(path, create=True).close()
    with open(path, "r+b") as fh:
        fh.write(b"CCSTATS3")
    with pytest.raises(ValueError, match="not a chatcluster stats file of this version"):
        S.StatsFile(path)
