"""An operator's bad day: faults of processes, machines, files and commands, with real processes.

Each test reproduces something that happens to a running cluster outside the
chat protocol: a signal that reaches a child in the first instant of its life,
a whole cluster frozen (`docker pause`, Ctrl-Z, a paused VM) and thawed, a
supervisor killed outright and a new cluster started at once, two starts at
the same moment, a scraper that never finishes its request, a history file
someone else can write, a config file broken while the cluster runs. Waits
are on conditions with deadlines, never on the clock.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest
from conftest import REPO, Cluster, free_port, start_refused, wait_for
from limits_support import raw_socket, recv_until
from test_metrics import _answers, fetch, with_metrics

from chatcluster import exporter
from chatcluster import stats as S

pytestmark = pytest.mark.timeout(120)


def run_python(code: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          cwd=REPO, timeout=timeout)


# -- a signal in the first instant of a child's life --------------------------------------------------


def test_a_stop_signal_that_reaches_a_child_before_it_has_its_own_handlers_is_not_lost() -> None:
    # The supervisor forks with its own handlers installed; until the child has reset them, a
    # TERM meant for the child (a stop right after a scale-up, or right after an upgrade's new
    # generation is forked) ran the supervisor's handler in the child and was forgotten there:
    # the worker served on and was killed 10 s later at the end of the stop. The hook below
    # sends the TERM in exactly that instant, from inside os.fork() in the child.
    result = run_python("""
        import os, signal, sys, time
        from chatcluster.supervisor import Supervisor
        from chatcluster.config import load

        sup = Supervisor(cfg=load(), config_path=None, overrides={}, runtime_dir="/nonexistent",
                         pid_file="/nonexistent/pid")
        sup.wake_r, sup.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.signal(signal.SIGTERM, sup._on_signal)
        signal.set_wakeup_fd(sup.wake_w)
        os.register_at_fork(after_in_child=lambda: os.kill(os.getpid(), signal.SIGTERM))

        def body():
            time.sleep(10)  # a child that missed its TERM sleeps here and exits 0
            return 0

        pid = sup._fork("test", body)
        _, status = os.waitpid(pid, 0)
        print(os.waitstatus_to_exitcode(status))
        print(len(sup.sig_queue))  # the parent never saw the child's TERM
    """)
    assert result.returncode == 0, result.stderr
    code, queued = result.stdout.split()
    assert int(code) == -signal.SIGTERM, f"the child missed its TERM (exit {code})"
    assert int(queued) == 0


def header(cl: Cluster) -> S.Header:
    f = S.StatsFile(os.path.join(cl.runtime_dir, "stats"))
    try:
        return f.header()
    finally:
        f.close()


# -- the whole cluster frozen and thawed ------------------------------------------------------------


def test_a_cluster_frozen_longer_than_worker_timeout_and_thawed_keeps_every_process_and_client(
    make_cluster: Callable[..., Cluster],
) -> None:
    # `docker pause`, `systemctl freeze`, Ctrl-Z then `fg`, a paused VM: every process stops at
    # once and the clock goes on. On thawing, the supervisor saw heartbeats older than
    # worker_timeout and killed every worker and the broker, although none of them was stuck:
    # it had not been watching either.
    cl = make_cluster(2, extra=("--worker-timeout", "2"))
    a, b = cl.clients_on_distinct_workers(2)
    a.say("before")
    b.wait_line(rf"{a.nick}: before")
    workers, broker = sorted(cl.worker_pids()), header(cl).broker_pid
    os.killpg(cl.pid, signal.SIGSTOP)
    try:
        time.sleep(4)  # the fault itself: frozen for twice worker_timeout
    finally:
        os.killpg(cl.pid, signal.SIGCONT)
    thawed = time.monotonic()
    # The supervisor has looked at every heartbeat again since the thaw, a few times over.
    wait_for(lambda: header(cl).supervisor_heartbeat > thawed + 1.0, what="the supervisor's loop after the thaw")
    a.say("after")
    b.wait_line(rf"{a.nick}: after")
    assert sorted(cl.worker_pids()) == workers and header(cl).broker_pid == broker
    assert "no heartbeat" not in cl.read_log()
    assert "did not run for" in cl.read_log()  # said once, so that the log explains the gap


# -- a supervisor killed outright, and a new cluster started at once ---------------------------------


def in_place_of(new: Cluster, old: Cluster) -> Cluster:
    """`new` set up to start on `old`'s port and runtime directory, as an operator's restart would."""
    i = new.args.index("--runtime-dir")
    new.args[i + 1] = old.runtime_dir
    new.runtime_dir = old.runtime_dir
    return new


def test_workers_left_by_a_killed_supervisor_never_talk_to_the_next_clusters_bus(
    make_cluster: Callable[..., Cluster],
) -> None:
    # Workers whose supervisor was killed outright stop by themselves, draining their clients
    # for up to graceful_timeout. Their bus sockets kept reconnecting to RUNTIME_DIR/bus-*, so a
    # cluster started at once in the same place got them as "w1", "w2", ... beside its own
    # workers of the same names: the old ones resynced their rosters into the new broker, whose
    # numbering of w1 then no longer matched the new w1's, and the new w1 never welcomed anyone.
    old = make_cluster(1, extra=("--flood-rate", "0"))
    talker, listener = old.client(), old.client()
    slow = raw_socket(old.port, rcvbuf=2048)  # never reads: keeps the old worker draining
    recv_until(slow, b"Welcome")
    talker.send(b"".join(b"filler %d %s\r\n" % (i, b"x" * 200) for i in range(3000)))
    listener.wait_line(rf"{talker.nick}: filler 2999 x+")
    old_worker = old.worker_pids()[0]
    os.kill(old.pid, signal.SIGKILL)
    wait_for(lambda: "the supervisor (pid" in old.read_log(), what="the old worker noticing its supervisor gone")
    new = in_place_of(make_cluster(1, port=old.port, start=False), old)
    new.start()
    assert psutil.pid_exists(old_worker), "the old worker is gone already: nothing tested"
    a, b = new.client(), new.client()
    a.say("first words of the new cluster")
    b.wait_line(rf"{a.nick}: first words of the new cluster")
    assert psutil.pid_exists(old_worker), "the old worker was gone before the new cluster served"
    log = new.read_log()
    assert "bus gap" not in log and "resync" not in log, log
    slow.close()


# -- two starts in one place ------------------------------------------------------------------------


def test_a_second_start_in_a_running_clusters_runtime_dir_is_refused_whatever_its_pid_file_says(
    make_cluster: Callable[..., Cluster],
) -> None:
    # Two `chatcluster start` at the same moment both passed the pid-file check (neither had
    # written its pid file yet) and both ran: two brokers bound the same bus paths, the second
    # stats file replaced the first, and SO_REUSEPORT split the clients of one port between two
    # clusters that could not see each other (or both hung at boot). A pid file that does not
    # name the running supervisor stands here for "not written yet": the runtime directory
    # itself is held by the cluster that runs in it.
    first = make_cluster(1)
    with open(os.path.join(first.runtime_dir, "chatcluster.pid"), "w") as fh:
        fh.write("999999\n")  # no such process: the check by pid file lets anyone in
    result = start_refused("--workers", "1", "--host", "127.0.0.1", "--port", str(free_port()),
                           "--runtime-dir", first.runtime_dir)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0] == (
        f"chatcluster: error: another chatcluster is running or starting in the runtime directory "
        f"{first.runtime_dir} (supervisor pid {first.pid}); stop it with `chatcluster stop --runtime-dir "
        f"{first.runtime_dir}`, or choose another --runtime-dir"), lines
    # The first cluster never noticed.
    a, b = first.client(), first.client()
    a.say("still one cluster")
    b.wait_line(rf"{a.nick}: still one cluster")


# -- scrapers that never finish ---------------------------------------------------------------------


class Trickle:
    """Connections to the metrics endpoint that send their request one byte every half second,
    each read well within the server's per-read timeout, and never finish it (slowloris)."""

    def __init__(self, port: int, count: int) -> None:
        self.socks = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(count)]
        self.closed: set[int] = set()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        request = b"GET /metrics HTTP/1.1\r\nHost: x\r\n" + b"X-Slow: " + b"a" * 10000
        i = 0
        while not self.stop.wait(0.5):
            for n, s in enumerate(self.socks):
                if n in self.closed:
                    continue
                try:
                    s.send(request[i:i + 1])
                    s.setblocking(False)
                    if s.recv(1, socket.MSG_PEEK) == b"":
                        self.closed.add(n)
                except BlockingIOError:
                    pass
                except OSError:
                    self.closed.add(n)
                finally:
                    s.setblocking(True)
            i += 1

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        for s in self.socks:
            s.close()


def test_scrapers_that_never_finish_their_request_cannot_keep_prometheus_out(
    make_cluster: Callable[..., Cluster],
) -> None:
    # The endpoint serves 16 connections at once; each read had a 10 s timeout, so 16
    # connections sending a byte every few seconds held every place for ever and each scrape
    # was closed unanswered: monitoring blinded by one script, and the "endpoint down" alert
    # firing for a cluster that is fine.
    cl, port = with_metrics(make_cluster, 1)
    slow = Trickle(port, 3 * exporter.MAX_REQUESTS)
    try:
        wait_for(lambda: len(slow.socks) - len(slow.closed) >= exporter.MAX_REQUESTS,
                 what="the slow connections to be under way")
        for _ in range(3):
            status, body = fetch(port)
            assert status == 200 and "# TYPE chatcluster_clients gauge" in body
    finally:
        slow.close()


@pytest.mark.slow
def test_a_connection_to_the_metrics_endpoint_is_closed_at_its_time_limit_however_it_trickles(
    make_cluster: Callable[..., Cluster],
) -> None:
    cl, port = with_metrics(make_cluster, 1)
    slow = Trickle(port, 2)
    try:
        wait_for(lambda: len(slow.closed) == 2, timeout=exporter.REQUEST_TIMEOUT + 5,
                 what=f"both trickling connections closed by the server within {exporter.REQUEST_TIMEOUT:g} s")
    finally:
        slow.close()


# -- a history file someone else could write ---------------------------------------------------------


def forged_history(path: str) -> None:
    """An SQLite history file holding one line that no client ever sent: a forged server notice
    with terminal escapes (clear the screen, set the window title)."""
    import sqlite3

    from chatcluster.histdb import SCHEMA

    db = sqlite3.connect(path)
    db.executescript(SCHEMA)
    db.execute("INSERT INTO lines(room, ts, line) VALUES (?, ?, ?)",
               ("#news", time.time(), b"*** Server: send your password to admin\x1b[2J\x1b]0;owned\x07\r\n"))
    db.commit()
    db.close()


def shared_dir(tmp_path: Path, mode: int) -> Path:
    d = tmp_path / "shared"
    d.mkdir()
    os.chmod(d, mode)
    return d


def planted_foreign(tmp_path: Path) -> tuple[str, str]:
    if os.getuid() != 0:
        pytest.skip("needs root to give a file to another user")
    d = shared_dir(tmp_path, 0o1777)  # like /tmp: anyone may create a file there first
    path = str(d / "history.db")
    forged_history(path)
    os.chown(path, 65534, 65534)
    return path, f"history_db {path} belongs to another user (uid 65534)"


def planted_writable(tmp_path: Path) -> tuple[str, str]:
    path = str(tmp_path / "history.db")
    forged_history(path)
    os.chmod(path, 0o666)
    return path, f"history_db {path} is writable by others (mode 0666)"


def planted_wal(tmp_path: Path) -> tuple[str, str]:
    path = str(tmp_path / "history.db")
    forged_history(path)
    os.chmod(path, 0o600)
    wal = path + "-wal"
    with open(wal, "wb"):
        pass
    os.chmod(wal, 0o666)  # SQLite replays a WAL into the database when it opens it
    return path, f"history_db {path}: {wal} is writable by others (mode 0666)"


def planted_symlink(tmp_path: Path) -> tuple[str, str]:
    target = tmp_path / "elsewhere.db"
    forged_history(str(target))
    path = str(tmp_path / "history.db")
    os.symlink(target, path)
    return path, f"history_db {path} is a symbolic link"


def open_directory(tmp_path: Path) -> tuple[str, str]:
    d = shared_dir(tmp_path, 0o777)  # no sticky bit: anyone may replace what is in it
    return str(d / "history.db"), f"history_db {d / 'history.db'}: the directory {d} is writable by others"


@pytest.mark.parametrize("plant", [planted_foreign, planted_writable, planted_wal, planted_symlink, open_directory])
def test_a_history_file_that_someone_else_could_have_written_is_refused_at_start(
    tmp_path: Path, plant: Callable[[Path], tuple[str, str]],
) -> None:
    # The broker read such a file back and showed its lines to joiners byte for byte: a forged
    # "*** Server" notice with escape sequences reached every client that joined the room.
    path, problem = plant(tmp_path)
    result = start_refused("--workers", "1", "--host", "127.0.0.1", "--port", str(free_port()),
                           "--runtime-dir", str(tmp_path / "run"), "--history-db", path)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1 and lines[0].startswith(f"chatcluster: error: {problem}"), lines
    assert not os.path.exists(tmp_path / "run")


def test_a_new_history_file_and_its_companions_are_private(make_cluster: Callable[..., Cluster],
                                                          tmp_path: Path) -> None:
    os.chmod(tmp_path, 0o755)
    path = tmp_path / "history.db"
    cl = make_cluster(1, extra=("--history-db", str(path)))
    a, b = cl.client(), cl.client()
    a.say("/join #news")
    a.wait_line(r"\*\*\* You joined #news.*")
    b.say("/join #news")
    b.wait_line(r"\*\*\* You joined #news; 2 users here.*")
    a.say("written to disk")
    b.wait_line(rf"{a.nick}: written to disk")
    wait_for(lambda: os.path.exists(f"{path}-wal"), what="the write-ahead log")
    for name in (path, f"{path}-wal", f"{path}-shm"):
        if os.path.exists(name):
            assert oct(os.stat(name).st_mode & 0o777) == oct(0o600), name


# -- a config file broken while the cluster runs ------------------------------------------------------


def command(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "chatcluster", *args], capture_output=True, text=True, cwd=REPO,
                          timeout=60)


def test_status_and_stop_find_the_cluster_when_its_config_file_no_longer_validates(
    make_cluster: Callable[..., Cluster], tmp_path: Path,
) -> None:
    # The commands find a cluster through the same --config it was started with. An edit that
    # broke the file (a typo in any setting, an unknown section) made `status` and `stop` fail
    # with the file's error: the operator could neither look at nor stop the running cluster
    # the documented way. They only need to know where it is.
    config = tmp_path / "chatcluster.toml"
    cl = make_cluster(1, config=str(config), start=False)
    config.write_text(f'[server]\nport = {cl.port}\nhost = "127.0.0.1"\nruntime_dir = "{cl.runtime_dir}"\n')
    cl.start()
    config.write_text(config.read_text() + "[chat]\nannounce_joins = \"maybe\"\n[extra]\n")
    status = command("status", "--json", "--config", str(config))
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["pid"] == cl.pid
    warning = status.stderr.strip().splitlines()
    assert len(warning) == 1 and warning[0].startswith(f"chatcluster: warning: config file {config}: "), warning
    assert "it is only used to find the cluster" in warning[0]
    # reload is about the file: it still says what is wrong with it, and changes nothing
    reload = command("reload", "--config", str(config))
    assert reload.returncode == 2 and "unknown section [extra]" in reload.stderr
    stop = command("stop", "--config", str(config))
    assert stop.returncode == 0, stop.stderr
    assert cl.wait_exit(15) == 0


# -- what a stop leaves behind ------------------------------------------------------------------------


def test_a_stop_leaves_no_handoff_socket_of_an_upgrade_it_cut_short_behind(
    make_cluster: Callable[..., Cluster],
) -> None:
    # A stop that comes while an upgrade's new workers wait for their predecessors kills them
    # before they remove their handoff-wN sockets; those stayed in the runtime directory after
    # the cluster exited (and kept a directory the cluster had created from being removed).
    # A new worker killed at that moment leaves exactly this behind:
    cl = make_cluster(1)
    left = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    left.bind(os.path.join(cl.runtime_dir, "handoff-w1"))
    left.close()
    cl.signal(signal.SIGTERM)
    assert cl.wait_exit(15) == 0
    assert sorted(os.listdir(cl.runtime_dir)) == []


# -- how many workers "one per CPU" is ---------------------------------------------------------------


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs a machine with more than one CPU")
def test_workers_0_means_one_per_cpu_the_cluster_may_use() -> None:
    # `workers = 0` counted every CPU of the machine, while the cap counts the CPUs of the
    # affinity mask: in a container given 2 CPUs of a 64-CPU host (cpuset), a default
    # configuration started 64 workers, past its own cap of 8.
    from chatcluster.config import load

    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(before)})
    try:
        assert load().worker_count() == 1
    finally:
        os.sched_setaffinity(0, before)


# -- a hung metrics endpoint --------------------------------------------------------------------------


def test_a_hung_metrics_endpoint_is_killed_and_replaced(make_cluster: Callable[..., Cluster]) -> None:
    # The supervisor restarted an endpoint that died, but one that hung (stopped, deadlocked)
    # held its port for ever: every scrape timed out, and nothing in the log said why.
    cl, port = with_metrics(make_cluster, 1, "--worker-timeout", "2")
    hung = header(cl).exporter_pid
    os.kill(hung, signal.SIGSTOP)
    try:
        wait_for(lambda: header(cl).exporter_pid not in (0, hung), what="a new metrics endpoint")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(hung, signal.SIGCONT)
    wait_for(lambda: _answers(port), what="the new endpoint to answer")
    assert f"metrics endpoint (pid {hung}): no heartbeat for" in cl.read_log()
    wait_for(lambda: not psutil.pid_exists(hung) or psutil.Process(hung).status() == psutil.STATUS_ZOMBIE,
             what="the hung endpoint gone")


# -- a supervisor stopped with SIGSTOP or Ctrl-Z ------------------------------------------------------


@pytest.mark.parametrize("what", [["reload"], ["stop"], ["scale", "2"]])
def test_commands_say_at_once_that_the_supervisor_is_stopped_and_how_to_continue_it(
    make_cluster: Callable[..., Cluster], what: list[str],
) -> None:
    # A supervisor stopped with SIGSTOP (or Ctrl-Z in the terminal it runs in) acts on no
    # signal; the commands waited out their time (10 s for reload, 20 s for stop, 40 s for
    # scale) and then said "did not report back; see its log", where nothing is written.
    cl = make_cluster(1)
    os.kill(cl.pid, signal.SIGSTOP)
    try:
        result = command(*what, "--port", str(cl.port), "--runtime-dir", cl.runtime_dir)
    finally:
        os.kill(cl.pid, signal.SIGCONT)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1, result
    assert lines[0].endswith(f"chatcluster (pid {cl.pid}) is stopped (SIGSTOP, or Ctrl-Z where it runs): it "
                             f"will act on it once continued with `kill -CONT {cl.pid}`"), lines
    if what == ["stop"]:
        assert cl.wait_exit(15) == 0  # the TERM was queued and taken once continued


# -- a tmp cleaner deletes the stats file ------------------------------------------------------------


def test_metrics_go_on_after_the_stats_file_was_deleted(make_cluster: Callable[..., Cluster]) -> None:
    # Every process keeps the stats file mapped, so the cluster goes on counting after a tmp
    # cleaner deletes it; but the endpoint opened it by name at each scrape, and answered 500
    # (with a traceback in the log) at every scrape from then on: monitoring blind until a restart.
    cl, port = with_metrics(make_cluster, 1)
    a, b = cl.client(), cl.client()
    os.unlink(os.path.join(cl.runtime_dir, "stats"))
    a.say("counted after the deletion")
    b.wait_line(rf"{a.nick}: counted after the deletion")

    def counted() -> bool:
        status, body = fetch(port)
        assert status == 200, body
        return 'chatcluster_lines_received_total{worker="0"} 1.0' in body

    wait_for(counted, what="the line counted on /metrics")
    assert 'chatcluster_clients{worker="0"} 2.0' in fetch(port)[1]


def test_a_runtime_dir_given_as_a_symlink_is_refused_with_the_directory_to_use_instead(tmp_path: Path) -> None:
    # "exists but is not a directory" alone puzzles whoever sees a directory at the end of it.
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    (tmp_path / "link").symlink_to(real)
    result = start_refused("--workers", "1", "--host", "127.0.0.1", "--port", str(free_port()),
                           "--runtime-dir", str(tmp_path / "link"))
    assert result.returncode == 1
    assert result.stderr == (f"chatcluster: error: runtime directory {tmp_path / 'link'} exists but is not a "
                             f"directory (it is a symbolic link to {real}); pass the directory itself with "
                             f"--runtime-dir\n")


# -- a live setting that must reach the clients already connected -------------------------------------


def server_sndbuf(port: int, client_port: int) -> int:
    """The kernel send buffer of the server's side of the connection from `client_port` (ss's `tb`)."""
    out = subprocess.run(["ss", "-tmnH", "state", "established", f"( sport = :{port} and dport = :{client_port} )"],
                         capture_output=True, text=True, timeout=30).stdout
    found = re.search(r"\btb(\d+)", out)
    assert found, out
    return int(found.group(1))


@pytest.mark.skipif(shutil.which("ss") is None, reason="ss (iproute2) not installed")
def test_a_reloaded_send_buffer_reaches_the_clients_already_connected(
    make_cluster: Callable[..., Cluster], tmp_path: Path,
) -> None:
    # send_buffer_bytes is marked live, and the reload reported it applied, but only sockets
    # accepted afterwards got it: everyone connected kept the old buffer (the kernel doubles the
    # value set, hence the factor 2).
    config = tmp_path / "chatcluster.toml"
    config.write_text("[limits]\nsend_buffer_bytes = 65536\n")
    cl = make_cluster(1, config=str(config))
    old = cl.client()
    assert server_sndbuf(cl.port, old.server_side()[1]) == 2 * 65536
    config.write_text("[limits]\nsend_buffer_bytes = 16384\n")
    result = command("reload", "--port", str(cl.port), "--runtime-dir", cl.runtime_dir, "--config", str(config))
    assert result.returncode == 0 and "send_buffer_bytes=16384" in result.stdout, result
    new = cl.client()
    assert server_sndbuf(cl.port, new.server_side()[1]) == 2 * 16384
    assert server_sndbuf(cl.port, old.server_side()[1]) == 2 * 16384


# -- the history writer killed ------------------------------------------------------------------------


def lines_on_disk(path: str) -> list[bytes]:
    import sqlite3

    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return [bytes(r[0]) for r in db.execute("SELECT line FROM lines ORDER BY id")]
    except sqlite3.OperationalError:
        return []  # the schema is not there yet
    finally:
        db.close()


def test_a_killed_history_writer_is_replaced_and_history_goes_on_reaching_the_disk(
    make_cluster: Callable[..., Cluster], tmp_path: Path,
) -> None:
    # The broker's writer process is the one that grows with the disk's backlog, the OOM
    # killer's natural choice. Once it was gone, the broker logged "history is no longer written
    # to disk" and kept it so until the broker itself was restarted: every line from then on was
    # lost at the next full stop, and the dead writer stayed a zombie.
    path = str(tmp_path / "history.db")
    cl = make_cluster(1, extra=("--history-db", path))
    a, b = cl.client(), cl.client()
    for c in (a, b):
        c.say("/join #kept")
        c.wait_line(r"\*\*\* You joined #kept.*")
    a.say("before the kill")
    b.wait_line(rf"{a.nick}: before the kill")
    wait_for(lambda: any(b"before the kill" in line for line in lines_on_disk(path)), what="the first line on disk")
    broker = psutil.Process(header(cl).broker_pid)
    (writer,) = broker.children()
    writer.kill()
    wait_for(lambda: not writer.is_running() or writer.status() == psutil.STATUS_ZOMBIE, what="the writer dead")
    a.say("after the kill")
    b.wait_line(rf"{a.nick}: after the kill")
    wait_for(lambda: any(b"after the kill" in line for line in lines_on_disk(path)), what="the second line on disk")
    (new,) = [p for p in broker.children() if p.status() != psutil.STATUS_ZOMBIE]
    assert new.pid != writer.pid
    assert f"history writer (pid {writer.pid}) is gone; starting a new one" in cl.read_log()


# -- rooms on /metrics --------------------------------------------------------------------------------


def test_rooms_and_their_members_are_exported_and_agree_with_status(make_cluster: Callable[..., Cluster]) -> None:
    # The README lists chatcluster_rooms and chatcluster_room_members, "exported once the
    # server has rooms"; the server has rooms, but nothing ever wrote their totals where the
    # endpoint reads, so neither was ever exported.
    cl, port = with_metrics(make_cluster, 2)
    a, b = cl.client(), cl.client()

    def totals() -> tuple[float, float] | None:
        status, body = fetch(port)
        assert status == 200
        found = dict(re.findall(r"^chatcluster_(rooms|room_members) (\S+)$", body, re.M))
        return (float(found["rooms"]), float(found["room_members"])) if len(found) == 2 else None

    wait_for(lambda: totals() == (1.0, 2.0), what="one room (the default one) with two members")
    a.say("/join #news")
    a.wait_line(r"\*\*\* You joined #news.*")
    b.say("/join #news")
    b.wait_line(r"\*\*\* You joined #news.*")
    b.say("/join #sport")
    b.wait_line(r"\*\*\* You joined #sport.*")
    wait_for(lambda: totals() == (3.0, 5.0), what="three rooms: #lobby and #news with two members, #sport with one")
    status = json.loads(command("status", "--json", "--port", str(cl.port), "--runtime-dir", cl.runtime_dir).stdout)
    assert (status["rooms"]["rooms"], status["rooms"]["members"]) == (3, 5)
    text = fetch(port)[1]
    if shutil.which("promtool"):
        check = subprocess.run(["promtool", "check", "metrics"], input=text, text=True, capture_output=True,
                               timeout=30)
        assert check.returncode == 0 and not check.stdout.strip(), check
