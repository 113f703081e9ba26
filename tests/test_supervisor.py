"""The supervisor with real processes and real signals: stops, scaling, reloads, crashes, hangs, systemd.

Every test starts a real cluster (`make_cluster`), acts on it the way an
operator or the kernel would (signals to the supervisor or to one worker,
a rewritten config file, a port taken by another program, a notify socket
standing in for systemd) and checks what clients, the stats file and the log
show. Waits are on conditions with deadlines, never on the clock.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil
import pytest
from conftest import REPO, WAIT, Client, Cluster, free_port, start_refused, wait_for

from chatcluster import stats as S

pytestmark = pytest.mark.timeout(90)

SHUTDOWN = "*** Server is shutting down"
WELCOME = "*** Welcome to chatcluster! Your nickname is {nick}. Type /help for commands."


def write_config(path: Path, **values: object) -> str:
    """A TOML config file with `values` (sections are optional in chatcluster's files)."""
    lines = []
    for name, value in values.items():
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, str):
            text = '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
        else:
            text = repr(value)
        lines.append(f"{name} = {text}")
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def log_has(cluster: Cluster, pattern: str) -> re.Match[str] | None:
    return re.search(pattern, cluster.read_log())


def wait_log(cluster: Cluster, pattern: str, timeout: float = WAIT) -> re.Match[str]:
    def found() -> re.Match[str] | None:
        if cluster.proc is not None and cluster.proc.poll() is not None:
            m = log_has(cluster, pattern)
            if m:
                return m
            raise AssertionError(f"cluster exited ({cluster.proc.returncode}) before logging {pattern!r}:\n"
                                 f"{cluster.read_log()[-3000:]}")
        return log_has(cluster, pattern)

    return wait_for(found, timeout, f"log line {pattern!r}")  # type: ignore[return-value]


def ready_workers(cluster: Cluster) -> dict[int, S.SlotView]:
    """pid -> slot of every ready worker."""
    return {v.pid: v for v in cluster.stats() if v.pid and v.state == S.READY}


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def chat_works(cluster: Cluster, a: Client, b: Client, text: str) -> None:
    a.say(text)
    b.wait_line(re.escape(f"{a.nick}: {text}"))


# --- graceful and fast stop ----------------------------------------------------------------


def test_graceful_stop_delivers_unread_output_then_the_notice_then_eof(make_cluster: Callable[..., Cluster]) -> None:
    cluster = make_cluster(2, extra=("--flood-rate", "0"))
    sender, receiver = cluster.clients_on_distinct_workers(2)
    witness = cluster.client()
    # A small receive buffer keeps most of what is sent to `receiver` queued in its worker.
    receiver.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    receiver.drain_for_quiet()
    expected = [f"line {i:04d} " + "x" * 60 for i in range(2000)]
    sender.send("".join(text + "\r\n" for text in expected))
    # Once the witness has everything, every line has been sequenced by the bus before the stop.
    witness.wait_line(re.escape(f"{sender.nick}: {expected[-1]}"))

    cluster.signal(signal.SIGTERM)
    receiver.wait_closed()
    said = [line[len(sender.nick) + 2:] for line in receiver.lines if line.startswith(sender.nick + ": ")]
    assert said == expected
    assert receiver.lines[-1] == SHUTDOWN
    assert not receiver.buf
    for c in (sender, witness):
        c.wait_closed()
        assert c.lines[-1] == SHUTDOWN
    assert cluster.wait_exit() == 0
    assert log_has(cluster, r"supervisor\[\d+\] INFO stopped\n")


def test_graceful_stop_cuts_off_a_client_that_never_reads_and_still_exits_0(
    make_cluster: Callable[..., Cluster],
) -> None:
    cluster = make_cluster(1, extra=("--flood-rate", "0", "--graceful-timeout", "2",
                                     "--max-sendq-bytes", str(64 << 20)))
    stuck = cluster.client()
    stuck.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    talker = cluster.client()
    talker.send(("y" * 400 + "\r\n") * 20000)  # 8 MB for `stuck`, more than the kernel buffers
    wait_for(lambda: sum(v.bytes_out for v in cluster.stats()) > 0, what="output towards the stuck client")
    cluster.signal(signal.SIGTERM)
    talker.wait_closed()
    # The worker gives up on `stuck` at its deadline and closes it; nothing waits for it forever.
    assert cluster.wait_exit(timeout=2 + 20) == 0


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGQUIT])
def test_fast_stop_tells_clients_and_exits_0(make_cluster: Callable[..., Cluster], sig: signal.Signals) -> None:
    cluster = make_cluster(2)
    a, b = cluster.clients_on_distinct_workers(2)
    cluster.signal(sig)
    for c in (a, b):
        c.wait_closed()
        assert c.lines[-1] == SHUTDOWN
    assert cluster.wait_exit() == 0
    assert log_has(cluster, r"stopping \(fast\)")


# --- TTIN / TTOU -----------------------------------------------------------------------------


def test_ttin_adds_a_worker_and_ttou_retires_one_with_a_notice_to_its_clients(
    make_cluster: Callable[..., Cluster],
) -> None:
    cluster = make_cluster(2)
    cluster.signal(signal.SIGTTIN)
    cluster.wait_ready(3)
    clients = cluster.clients_on_distinct_workers(3)
    newest = max(ready_workers(cluster).values(), key=lambda v: v.worker_no)
    retired = next(c for c in clients if cluster.worker_of(c) == newest.pid)
    staying = [c for c in clients if c is not retired]

    cluster.signal(signal.SIGTTOU)
    retired.wait_closed()
    assert retired.lines[-1] == SHUTDOWN
    wait_for(lambda: gone(newest.pid), what="the retired worker to exit")
    cluster.wait_ready(2)
    assert newest.pid not in ready_workers(cluster)
    chat_works(cluster, staying[0], staying[1], "still here")
    assert not staying[0].closed and not staying[1].closed
    wait_log(cluster, rf"worker {newest.worker_no} \(pid {newest.pid}\) exited with status 0")


def test_ttou_never_goes_below_one_worker(make_cluster: Callable[..., Cluster]) -> None:
    cluster = make_cluster(1)
    (only,) = ready_workers(cluster)
    cluster.signal(signal.SIGTTOU)
    wait_log(cluster, r"TTOU: 0 workers is out of range; using 1")
    cluster.signal(signal.SIGTTIN)
    cluster.wait_ready(2)
    assert only in ready_workers(cluster)
    assert not log_has(cluster, r"retiring worker")


# --- HUP --------------------------------------------------------------------------------------


def test_hup_applies_live_settings_without_disconnecting_anyone(
    make_cluster: Callable[..., Cluster], tmp_path: Path
) -> None:
    config = write_config(tmp_path / "chat.toml", welcome="*** Hello {nick}!", max_line_bytes=512)
    cluster = make_cluster(2, config=config)
    before = cluster.client(welcome=False)
    before.wait_line(r"\*\*\* Hello (\S+)!")
    before.nick = before.wait_line(r"\*\*\* Hello (\S+)!").group(1)
    other = cluster.client(welcome=False)
    other.nick = other.wait_line(r"\*\*\* Hello (\S+)!").group(1)

    write_config(tmp_path / "chat.toml", welcome="*** Howdy {nick}, welcome back!", max_line_bytes=100)
    cluster.signal(signal.SIGHUP)
    wait_log(cluster, r"supervisor\[\d+\] INFO reloaded .*max_line_bytes=100")
    wait_for(lambda: len(re.findall(r"worker \d+: reloaded", cluster.read_log())) >= 2, what="both workers reloaded")

    after = cluster.client(welcome=False)
    after.wait_line(r"\*\*\* Howdy \S+, welcome back!")
    before.say("z" * 150)
    before.wait_line(r"\*\*\* Error: line too long \(max 100 bytes\)")
    chat_works(cluster, before, other, "short enough")
    assert not before.closed and not other.closed


def test_hup_reports_a_changed_port_as_needing_a_restart(
    make_cluster: Callable[..., Cluster], tmp_path: Path
) -> None:
    port = free_port()
    config = write_config(tmp_path / "chat.toml", port=port)
    cluster = make_cluster(1, config=config, port=port, start=False)
    i = cluster.args.index("--port")
    del cluster.args[i:i + 2]  # the port comes from the file alone, so that a change there counts
    cluster.start()
    c = cluster.client()
    other_port = free_port()
    write_config(tmp_path / "chat.toml", port=other_port)
    cluster.signal(signal.SIGHUP)
    wait_log(cluster, rf"a restart is needed: port \({port} -> {other_port}\)")
    chat_works(cluster, c, cluster.client(), "same port still")


def test_hup_with_an_invalid_file_is_refused_and_the_old_config_stays(
    make_cluster: Callable[..., Cluster], tmp_path: Path
) -> None:
    config = write_config(tmp_path / "chat.toml", welcome="*** Hello {nick}!")
    cluster = make_cluster(1, config=config)
    c = cluster.client(welcome=False)
    c.nick = c.wait_line(r"\*\*\* Hello (\S+)!").group(1)
    (tmp_path / "chat.toml").write_text('welcome = "no placeholder here"\n')
    cluster.signal(signal.SIGHUP)
    wait_log(cluster, r"reload refused, the running configuration stays in force: .*welcome must contain \{nick\}")
    later = cluster.client(welcome=False)
    later.nick = later.wait_line(r"\*\*\* Hello (\S+)!").group(1)
    chat_works(cluster, c, later, "nothing changed")

    (tmp_path / "chat.toml").write_text("this is [not toml\n")
    cluster.signal(signal.SIGHUP)
    wait_log(cluster, r"reload refused, .* is not valid TOML")
    assert cluster.proc is not None and cluster.proc.poll() is None
    chat_works(cluster, later, c, "still fine")


# --- crashes and hangs ----------------------------------------------------------------------


def test_killed_worker_is_respawned_and_the_others_are_unaffected(make_cluster: Callable[..., Cluster]) -> None:
    cluster = make_cluster(2)
    victim_client, survivor = cluster.clients_on_distinct_workers(2)
    victim = cluster.worker_of(victim_client)
    os.kill(victim, signal.SIGKILL)
    victim_client.wait_closed()
    wait_for(lambda: len(ready_workers(cluster)) == 2 and victim not in ready_workers(cluster),
             what="a replacement worker")
    wait_log(cluster, rf"worker \d+ \(pid {victim}\) was killed by SIGKILL")
    wait_log(cluster, r"worker 3 started, pid \d+, replacing worker \d")
    assert not survivor.closed
    chat_works(cluster, survivor, cluster.client(), "after the crash")
    newcomer = cluster.client()
    chat_works(cluster, newcomer, survivor, "hello again")


def test_worker_dying_young_again_and_again_is_restarted_with_growing_delays(
    make_cluster: Callable[..., Cluster],
) -> None:
    cluster = make_cluster(2)
    keep = min(ready_workers(cluster).values(), key=lambda v: v.worker_no)
    killed: list[int] = []

    def newcomer() -> int | None:
        return next((pid for pid, v in ready_workers(cluster).items()
                     if v.index != keep.index and pid not in killed), None)

    # The worker in the other slot is killed as soon as it is up, five times: it dies young
    # every time (the first one may have lived long enough not to count).
    for _ in range(5):
        victim: int = wait_for(newcomer, timeout=30, what="a new worker in the second slot")  # type: ignore[assignment]
        os.kill(victim, signal.SIGKILL)
        killed.append(victim)
    wait_log(cluster, r"4 workers in a row died within 5 s of starting; next start in 1.00 s")
    log = cluster.read_log()
    delays = [float(x) for x in re.findall(r"died within 5 s of starting; next start in ([\d.]+) s", log)]
    assert delays[:3] == [0.25, 0.5, 1.0]
    # The start that follows a back-off comes at least that long after the death.
    wait_for(newcomer, timeout=30, what="the worker started after the last back-off")
    log = cluster.read_log()
    stamp = r"(\d\d):(\d\d):(\d\d),(\d{3}) supervisor\[\d+\] \w+ "

    def at(pattern: str) -> float:
        m = re.search(stamp + pattern, log)
        assert m, pattern
        h, mi, sec, ms = (int(g) for g in m.groups()[:4])
        return h * 3600 + mi * 60 + sec + ms / 1000

    for victim, delay in zip(killed[-3:], delays[-3:], strict=True):
        no = re.search(rf"worker (\d+) \(pid {victim}\) was killed", log).group(1)  # type: ignore[union-attr]
        died = at(rf"worker {no} \(pid {victim}\) was killed by SIGKILL")
        restarted = at(rf"worker \d+ started, pid \d+, replacing worker {no}\n")
        assert restarted - died >= delay - 0.01
    assert keep.pid in ready_workers(cluster)


def test_worker_stuck_longer_than_worker_timeout_is_killed_and_replaced(
    make_cluster: Callable[..., Cluster],
) -> None:
    cluster = make_cluster(2, extra=("--worker-timeout", "2"))
    stuck_client, fine = cluster.clients_on_distinct_workers(2)
    stuck = cluster.worker_of(stuck_client)
    os.kill(stuck, signal.SIGSTOP)
    try:
        wait_log(cluster, rf"worker \d+ \(pid {stuck}\): no heartbeat for [\d.]+ s \(worker_timeout=2\); "
                          r"killing it and starting a replacement", timeout=30)
        wait_for(lambda: gone(stuck), what="the stuck worker to die")
    finally:
        try:
            os.kill(stuck, signal.SIGCONT)
        except ProcessLookupError:
            pass
    wait_for(lambda: len(ready_workers(cluster)) == 2 and stuck not in ready_workers(cluster),
             what="a replacement worker")
    stuck_client.wait_closed()
    chat_works(cluster, fine, cluster.client(), "the stuck one is gone")


def test_supervisor_killed_outright_leaves_no_worker_behind(make_cluster: Callable[..., Cluster]) -> None:
    cluster = make_cluster(2)
    c = cluster.client()
    workers = list(ready_workers(cluster))
    broker = S.StatsFile(os.path.join(cluster.runtime_dir, "stats")).header().broker_pid
    os.kill(cluster.pid, signal.SIGKILL)
    for pid in [*workers, broker]:
        wait_for(lambda pid=pid: gone(pid), what=f"process {pid} to exit after its supervisor")
    c.wait_closed()
    assert c.lines[-1] == SHUTDOWN


# --- boot failures --------------------------------------------------------------------------


def test_port_taken_by_another_program_fails_at_once_with_a_clear_message(tmp_path: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "chatcluster", "start", "--workers", "2", "--host", "127.0.0.1",
             "--port", str(port), "--runtime-dir", str(tmp_path / "rt")],
            capture_output=True, text=True, timeout=60, cwd=REPO)
    assert result.returncode == 1
    assert (f"chatcluster: error: port {port} on 127.0.0.1 is in use by another program; "
            f"choose another with --port or stop that program") in result.stderr
    assert "worker 1 started" not in result.stderr
    assert not (tmp_path / "rt").exists()


def test_worker_that_cannot_listen_stops_the_cluster_instead_of_looping(make_cluster: Callable[..., Cluster]) -> None:
    cluster = make_cluster(1)
    (worker,) = ready_workers(cluster)
    # Freeze the supervisor, free the port by killing its only worker, and take the port from
    # another program before the supervisor can start a replacement.
    holder = socket.socket()
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)

    def take_port() -> bool:
        # The dead worker's threads may still be closing its descriptors for a moment.
        try:
            holder.bind(("127.0.0.1", cluster.port))
        except OSError:
            return False
        return True

    os.kill(cluster.pid, signal.SIGSTOP)
    try:
        os.kill(worker, signal.SIGKILL)
        wait_for(take_port, what="the dead worker's port to be free")
        holder.listen()
    finally:
        os.kill(cluster.pid, signal.SIGCONT)
    try:
        assert cluster.wait_exit() == 1
    finally:
        holder.close()
    log = cluster.read_log()
    assert re.search(rf"worker 2 cannot listen on 127.0.0.1:{cluster.port}: Address already in use; another "
                     r"program holds the port: stop it or choose another with --port", log)
    assert re.search(r"worker 2 cannot listen on .*; stopping the cluster", log)
    assert len(re.findall(r"worker \d+ started", log)) == 2


# --- systemd notifications ------------------------------------------------------------------


class NotifySocket:
    """A bound AF_UNIX datagram socket standing in for systemd's NOTIFY_SOCKET."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.messages: list[list[str]] = []

    def wait(self, cond: Callable[[list[str]], bool], timeout: float = 30.0, what: str = "") -> list[str]:
        """The first message (not seen before) for which cond holds; every message is kept."""
        seen = len(self.messages)
        deadline = time.monotonic() + timeout
        while True:
            for msg in self.messages[seen:]:
                if cond(msg):
                    return msg
            seen = len(self.messages)
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no notify message {what}; got {self.messages[-10:]}")
            self.sock.settimeout(min(left, 0.5))
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            self.messages.append(data.decode().split("\n"))

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notify_socket(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NotifySocket]:
    path = os.path.join(str(tmp_path_factory.mktemp("n", numbered=True)), "notify")
    assert len(path) < 100
    ns = NotifySocket(path)
    yield ns
    ns.close()


def test_ready_is_sent_only_once_every_worker_accepts_connections(
    make_cluster: Callable[..., Cluster], notify_socket: NotifySocket
) -> None:
    cluster = make_cluster(2, env={"NOTIFY_SOCKET": notify_socket.path}, start=False)
    cluster.start(wait=False)
    ready = notify_socket.wait(lambda m: "READY=1" in m, what="READY=1")
    # At that moment every worker is listening: no connection is refused and each is served.
    assert len(ready_workers(cluster)) == 2
    assert f"MAINPID={cluster.pid}" in ready
    assert "STATUS=2 workers, 0 clients" in ready
    clients = [cluster.client() for _ in range(6)]
    assert all(c.nick for c in clients)
    assert not any("READY=1" in m for m in notify_socket.messages[:notify_socket.messages.index(ready)])
    notify_socket.wait(lambda m: m == ["STATUS=2 workers, 6 clients"], what="a STATUS= line with the clients")


def test_reload_is_bracketed_by_reloading_and_ready_and_stop_sends_stopping(
    make_cluster: Callable[..., Cluster], notify_socket: NotifySocket
) -> None:
    cluster = make_cluster(1, env={"NOTIFY_SOCKET": notify_socket.path})
    notify_socket.wait(lambda m: "READY=1" in m, what="READY=1")
    cluster.signal(signal.SIGHUP)
    reloading = notify_socket.wait(lambda m: "RELOADING=1" in m, what="RELOADING=1")
    assert any(line.startswith("MONOTONIC_USEC=") for line in reloading)
    notify_socket.wait(lambda m: "READY=1" in m, what="READY=1 after the reload")
    cluster.signal(signal.SIGTERM)
    notify_socket.wait(lambda m: "STOPPING=1" in m, what="STOPPING=1")
    assert cluster.wait_exit() == 0


def test_watchdog_pings_follow_watchdog_usec(make_cluster: Callable[..., Cluster], notify_socket: NotifySocket) -> None:
    # WATCHDOG_USEC=1 s: a ping every 0.5 s, four for each STATUS= line (every 2 s).
    cluster = make_cluster(1, env={"NOTIFY_SOCKET": notify_socket.path, "WATCHDOG_USEC": "1000000"})
    notify_socket.wait(lambda m: "READY=1" in m, what="READY=1")
    pings = 0

    def counted(m: list[str]) -> bool:
        nonlocal pings
        pings += m == ["WATCHDOG=1"]
        return pings >= 8

    notify_socket.wait(counted, what="8 WATCHDOG=1 pings")
    statuses = sum(1 for m in notify_socket.messages if m[0].startswith("STATUS="))
    assert statuses <= 4, notify_socket.messages
    assert cluster.proc is not None and cluster.proc.poll() is None


def test_watchdog_is_not_pinged_faster_than_half_its_timeout(
    make_cluster: Callable[..., Cluster], notify_socket: NotifySocket
) -> None:
    make_cluster(1, env={"NOTIFY_SOCKET": notify_socket.path, "WATCHDOG_USEC": "60000000"})
    notify_socket.wait(lambda m: "READY=1" in m, what="READY=1")
    status_seen = 0

    def three_statuses(m: list[str]) -> bool:
        nonlocal status_seen
        status_seen += m[0].startswith("STATUS=")
        return status_seen >= 3

    notify_socket.wait(three_statuses, what="three STATUS= lines (at least 4 s)")
    # One ping at start, the next is due 30 s later.
    assert sum(1 for m in notify_socket.messages if m == ["WATCHDOG=1"]) == 1


def test_watchdog_meant_for_another_process_is_not_pinged(
    make_cluster: Callable[..., Cluster], notify_socket: NotifySocket
) -> None:
    env = {"NOTIFY_SOCKET": notify_socket.path, "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"}
    make_cluster(1, env=env)
    notify_socket.wait(lambda m: "READY=1" in m, what="READY=1")
    notify_socket.wait(lambda m: m[0].startswith("STATUS="), what="a STATUS= line")
    notify_socket.wait(lambda m: m[0].startswith("STATUS="), what="another STATUS= line")
    assert ["WATCHDOG=1"] not in notify_socket.messages


# --- files, directories, logging ------------------------------------------------------------


def test_pid_file_is_written_at_start_and_removed_at_exit(
    make_cluster: Callable[..., Cluster], tmp_path: Path
) -> None:
    pid_file = tmp_path / "cc.pid"
    cluster = make_cluster(1, extra=("--pid-file", str(pid_file)))
    assert pid_file.read_text() == f"{cluster.pid}\n"
    in_runtime_dir = Path(cluster.runtime_dir) / "chatcluster.pid"
    assert in_runtime_dir.read_text() == f"{cluster.pid}\n"
    cluster.signal(signal.SIGTERM)
    assert cluster.wait_exit() == 0
    assert not pid_file.exists()
    assert not in_runtime_dir.exists()
    assert os.listdir(cluster.runtime_dir) == []


def run_start(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "chatcluster", "start", "--host", "127.0.0.1",
                           "--port", str(free_port()), *args],
                          capture_output=True, text=True, timeout=60, cwd=REPO)


def test_runtime_dir_with_a_missing_parent_is_a_clear_error(tmp_path: Path) -> None:
    result = run_start("--runtime-dir", str(tmp_path / "missing" / "rt"))
    assert result.returncode == 1
    assert (f"chatcluster: error: runtime directory {tmp_path}/missing/rt cannot be created: {tmp_path}/missing "
            f"does not exist; create it or choose another directory with --runtime-dir") in result.stderr


def test_runtime_dir_that_is_a_file_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "rt").write_text("")
    result = run_start("--runtime-dir", str(tmp_path / "rt"))
    assert result.returncode == 1
    assert f"runtime directory {tmp_path}/rt exists but is not a directory" in result.stderr


def test_pid_file_in_a_missing_directory_is_a_clear_error(tmp_path: Path) -> None:
    result = run_start("--runtime-dir", str(tmp_path / "rt"), "--pid-file", str(tmp_path / "nope" / "cc.pid"))
    assert result.returncode == 1
    assert (f"cannot write the pid file {tmp_path}/nope/cc.pid: {tmp_path}/nope does not exist; create it or "
            f"choose another path with --pid-file") in result.stderr


def test_an_existing_runtime_dir_is_made_private(make_cluster: Callable[..., Cluster]) -> None:
    cluster = make_cluster(1, start=False)
    os.chmod(cluster.runtime_dir, 0o755)
    cluster.start()
    assert os.stat(cluster.runtime_dir).st_mode & 0o777 == 0o700


def test_second_cluster_on_the_same_runtime_dir_is_refused(make_cluster: Callable[..., Cluster]) -> None:
    cluster = make_cluster(1)
    result = run_start("--runtime-dir", cluster.runtime_dir)
    assert result.returncode == 1
    assert f"a cluster is already running with pid {cluster.pid}" in result.stderr


def test_log_lines_name_role_and_pid_with_timestamps_outside_systemd(make_cluster: Callable[..., Cluster]) -> None:
    cluster = make_cluster(1)
    (worker,) = ready_workers(cluster)
    stamp = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+"
    wait_log(cluster, rf"(?m)^{stamp} supervisor\[{cluster.pid}\] INFO cluster ready")
    log = cluster.read_log()
    assert re.search(rf"^\S+ \S+ worker 1\[{worker}\] INFO worker 1 \(w1\) ready", log, re.M)


def test_log_lines_have_no_timestamps_when_stderr_is_the_journal(make_cluster: Callable[..., Cluster]) -> None:
    cluster = make_cluster(1, start=False)
    cluster.log = open(cluster.log_path, "wb")
    st = os.fstat(cluster.log.fileno())
    cluster.env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
    cluster.log.close()
    cluster.start()
    wait_log(cluster, rf"(?m)^supervisor\[{cluster.pid}\] INFO cluster ready")
    assert not re.search(r"(?m)^\d", cluster.read_log())


def test_a_client_refused_by_a_limit_is_logged(make_cluster: Callable[..., Cluster]) -> None:
    cluster = make_cluster(1, extra=("--max-clients", "1"))
    cluster.client()
    refused = cluster.client(welcome=False)
    refused.wait_line(r"\*\*\* Error: server full")
    refused.wait_closed()
    wait_log(cluster, r"worker 1\[\d+\] INFO worker 1: refusing 127.0.0.1 \(conn 2\): \*\*\* Error: server full")


def test_cpu_affinity_pins_each_worker_to_one_cpu(make_cluster: Callable[..., Cluster]) -> None:
    allowed = sorted(psutil.Process().cpu_affinity() or [])
    cluster = make_cluster(2, extra=("--cpu-affinity",))
    pinned = {v.index: psutil.Process(pid).cpu_affinity() for pid, v in ready_workers(cluster).items()}
    assert pinned == {i: [allowed[i % len(allowed)]] for i in pinned}
    assert sorted(pinned) == [0, 1]


# --- what the server writes, and where --------------------------------------------------------


def test_a_port_another_program_listens_on_is_refused_even_when_it_allows_address_reuse(tmp_path: Path) -> None:
    # The start-up check binds with SO_REUSEADDR so that TIME-WAIT does not block a restart;
    # a listener still blocks it, whatever options that listener set.
    with socket.socket() as holder:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        result = start_refused("--workers", "1", "--host", "127.0.0.1", "--port", str(port),
                               "--runtime-dir", str(tmp_path / "rt"))
    assert result.returncode == 1
    assert result.stderr == (f"chatcluster: error: port {port} on 127.0.0.1 is in use by another program; "
                             f"choose another with --port or stop that program\n")


def test_a_runtime_dir_others_can_write_to_is_refused_and_left_as_it_is(tmp_path: Path) -> None:
    runtime_dir = tmp_path / "rt"
    runtime_dir.mkdir()
    os.chmod(runtime_dir, 0o777)
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    (runtime_dir / "stats").symlink_to(victim)  # planted while anyone could write there
    result = start_refused("--workers", "1", "--host", "127.0.0.1", "--port", str(free_port()),
                           "--runtime-dir", str(runtime_dir))
    assert result.returncode == 1
    assert result.stderr == (
        f"chatcluster: error: runtime directory {runtime_dir} is writable by others (mode 0777), so its files "
        f"cannot be trusted; remove it (chatcluster creates it with mode 0700) or choose another with "
        f"--runtime-dir\n")
    assert victim.read_text() == "precious\n"
    assert os.stat(runtime_dir).st_mode & 0o777 == 0o777
    assert (runtime_dir / "stats").is_symlink()


# Every name the server writes in its runtime directory, and the names beside a pid file that a
# write through a predictable temporary name would use.
RUNTIME_NAMES = ("bus-in", "bus-out", "chatcluster.pid", "config.json", "stats", "scale", "reload.json",
                 "upgrade-state.json", "upgrade-request", "upgrade.json", "upgrade-check.log")


@pytest.mark.slow
def test_symlinks_planted_at_every_name_the_server_writes_are_never_followed(
    make_cluster: Callable[..., Cluster], tmp_path: Path
) -> None:
    shared = tmp_path / "shared"  # a directory like /tmp, where anyone may plant a link
    shared.mkdir()
    os.chmod(shared, 0o1777)
    victims = tmp_path / "victims"
    victims.mkdir()
    pid_file = shared / "chatcluster.pid"
    cluster = make_cluster(1, extra=("--pid-file", str(pid_file)), start=False)
    planted: dict[Path, Path] = {}
    for directory, names in ((Path(cluster.runtime_dir), RUNTIME_NAMES), (shared, (pid_file.name,))):
        for name in names:
            for link in (directory / name, directory / f"{name}.tmp"):
                target = victims / f"{directory.name}-{link.name}"
                target.write_text(f"precious {link.name}\n")
                link.symlink_to(target)
                planted[link] = target

    cluster.start()
    assert pid_file.read_text() == f"{cluster.pid}\n" and not pid_file.is_symlink()
    # Every command that makes the server write a file: a reload, a scale, an upgrade, a stop.
    for command in (["reload"], ["scale", "2"], ["upgrade"], ["stop"]):
        result = subprocess.run([sys.executable, "-m", "chatcluster", *command, "--pid-file", str(pid_file),
                                 "--runtime-dir", cluster.runtime_dir], capture_output=True, text=True,
                                cwd=REPO, timeout=150)
        assert result.returncode == 0, f"{command}: {result.stderr}\n{cluster.read_log()[-3000:]}"
    assert cluster.wait_exit() == 0
    for link, target in planted.items():
        assert target.read_text() == f"precious {link.name}\n", f"{link} was followed"
    assert sorted(p.name for p in victims.iterdir()) == sorted(t.name for t in planted.values())


# --- how many workers, and how fast they are started ------------------------------------------


@contextmanager
def one_cpu() -> Iterator[int]:
    """Processes started inside run on one CPU (as under `taskset -c N`); the cap is then 4 workers."""
    before = os.sched_getaffinity(0)
    cpu = min(before)
    os.sched_setaffinity(0, {cpu})
    try:
        yield cpu
    finally:
        os.sched_setaffinity(0, before)


def test_more_workers_than_four_per_cpu_are_refused_at_start_unless_allowed(tmp_path: Path) -> None:
    with one_cpu():
        result = start_refused("--workers", "5", "--host", "127.0.0.1", "--port", str(free_port()),
                               "--runtime-dir", str(tmp_path / "rt"))
    assert result.returncode == 2
    assert result.stderr == (
        "chatcluster: error: --workers: workers 5 is more than 4, the cap of 4 per CPU on the 1 CPU the cluster "
        "may use; choose fewer, or set allow_many_workers = true (--allow-many-workers) to run up to 1024\n")


def test_ttin_past_four_workers_per_cpu_is_refused_unless_allowed(make_cluster: Callable[..., Cluster]) -> None:
    with one_cpu():
        cluster = make_cluster(4, start=False).start(wait=False)
    cluster.wait_ready(4)
    cluster.signal(signal.SIGTTIN)
    wait_log(cluster, r"TTIN refused: 5 workers is more than 4, the cap of 4 per CPU on the 1 CPU the cluster "
                      r"may use; staying at 4 \(set allow_many_workers")
    assert len(ready_workers(cluster)) == 4 and not log_has(cluster, r"worker 5 started")
    cluster.signal(signal.SIGTTOU)
    cluster.wait_ready(3)
    cluster.signal(signal.SIGTTIN)
    cluster.wait_ready(4)


def test_signals_are_answered_while_many_workers_boot(make_cluster: Callable[..., Cluster]) -> None:
    from chatcluster.supervisor import SPAWN_STEP

    wanted = 3 * SPAWN_STEP + 1
    cluster = make_cluster(1, extra=("--allow-many-workers", "--graceful-timeout", "2"))
    broker = S.StatsFile(os.path.join(cluster.runtime_dir, "stats")).header().broker_pid
    # With the broker frozen no new worker can finish booting, so the scale-up stays under way
    # for as long as the test needs.
    os.kill(broker, signal.SIGSTOP)
    try:
        Path(cluster.runtime_dir, "scale").write_text(f"{wanted}\n")
        cluster.signal(signal.SIGUSR1)
        wait_log(cluster, rf"scale: 1 -> {wanted} workers")
        wait_for(lambda: len(re.findall(r"worker \d+ started, pid", cluster.read_log())) > SPAWN_STEP,
                 what="the first workers of the scale-up")
        cluster.signal(signal.SIGTERM)
        wait_log(cluster, r"stopping \(graceful\)")
    finally:
        os.kill(broker, signal.SIGCONT)
    assert cluster.wait_exit() == 0
    log = cluster.read_log()
    started = re.findall(r"worker \d+ started, pid", log[:log.index("stopping (graceful)")])
    # The first worker and one step of the scale-up: the rest waits for those to boot.
    assert len(started) == 1 + SPAWN_STEP
    assert len(re.findall(r"worker \d+ started, pid", log)) == 1 + SPAWN_STEP
