"""The `chatcluster` commands against a real running cluster, and against none.

Each command runs as its own process (`python -m chatcluster ...`), finds the
cluster through its runtime directory, and must report what happened on
stdout, or one line naming the problem and the fix on stderr with a non-zero
exit.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest
from conftest import REPO, Cluster, free_port, wait_for

from chatcluster import stats as S

pytestmark = pytest.mark.timeout(90)


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "chatcluster", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


def at(cluster: Cluster) -> tuple[str, ...]:
    return ("--port", str(cluster.port), "--runtime-dir", cluster.runtime_dir)


def ready_count(cluster: Cluster) -> int:
    return len(cluster.worker_pids())


# --- status ----------------------------------------------------------------------------------


def test_status_json_lists_every_process_with_its_figures(make_cluster: Callable[..., Cluster]) -> None:
    cluster = make_cluster(2, extra=("--flood-rate", "0"))
    a, b = cluster.clients_on_distinct_workers(2)
    before = {p["pid"]: p for p in json.loads(cli("status", "--json", *at(cluster)).stdout)["processes"]}
    a.say("one")
    a.say("two")
    b.wait_line(rf"{a.nick}: two")
    result = cli("status", "--json", *at(cluster))
    assert result.returncode == 0, result.stderr
    status = json.loads(result.stdout)
    assert status["pid"] == cluster.pid
    assert status["port"] == cluster.port
    assert status["runtime_dir"] == cluster.runtime_dir
    assert status["workers"] == status["workers_wanted"] == 2
    assert status["generation"] == 1
    assert status["clients"] == 2 and status["connections"] == 2
    roles = [p["role"] for p in status["processes"]]
    assert roles == ["supervisor", "broker", "worker 1", "worker 2"]
    for p in status["processes"]:
        assert {"role", "pid", "uptime_s", "cpu_percent", "rss_bytes"} <= p.keys()
        assert p["rss_bytes"] > 0 and p["uptime_s"] >= 0 and p["cpu_percent"] >= 0
    workers = {p["pid"]: p for p in status["processes"] if p["role"].startswith("worker")}
    assert set(workers) == set(cluster.worker_pids())
    for p in workers.values():
        assert p["state"] == "ready"
        assert p["clients"] == 1 and p["connections"] == 1
        assert {"messages_in", "messages_out", "bytes_out", "bus_gaps", "dropped", "heartbeat_age_s"} <= p.keys()
    sender, receiver = cluster.worker_of(a), cluster.worker_of(b)
    assert workers[sender]["messages_in"] - before[sender]["messages_in"] == 2
    assert workers[receiver]["messages_out"] - before[receiver]["messages_out"] == 2
    assert workers[receiver]["bytes_out"] > before[receiver]["bytes_out"]


def test_status_table_shows_a_summary_and_one_row_per_process(make_cluster: Callable[..., Cluster]) -> None:
    cluster = make_cluster(2)
    cluster.client()
    result = cli("status", *at(cluster))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert re.fullmatch(rf"chatcluster on port {cluster.port}: supervisor pid {cluster.pid}, 2 workers "
                        rf"\(2 wanted\), 1 clients, runtime dir {re.escape(cluster.runtime_dir)}", lines[0])
    assert lines[1].split() == ["ROLE", "PID", "STATE", "UPTIME", "BEAT", "CPU%", "RSS", "CLIENTS", "CONNS",
                                "MSG-IN", "MSG-OUT"]
    assert lines[2].startswith(f"supervisor  {cluster.pid} ")
    assert lines[3].startswith("broker ")
    assert [line.split()[:2] for line in lines[4:]] == [["worker", "1"], ["worker", "2"]]
    assert all(" ready " in line for line in lines[4:])


# --- stop --------------------------------------------------------------------------------------


def test_stop_stops_the_cluster_gracefully_and_says_so(make_cluster: Callable[..., Cluster]) -> None:
    cluster = make_cluster(2)
    c = cluster.client()
    result = cli("stop", *at(cluster))
    assert result.returncode == 0, result.stderr
    assert re.fullmatch(rf"chatcluster \(pid {cluster.pid}\) stopped gracefully in [\d.]+ s\n", result.stdout)
    assert cluster.wait_exit() == 0
    c.wait_closed()
    assert c.lines[-1] == "*** Server is shutting down"
    assert not os.path.exists(os.path.join(cluster.runtime_dir, "chatcluster.pid"))


def test_stop_fast(make_cluster: Callable[..., Cluster]) -> None:
    cluster = make_cluster(1)
    result = cli("stop", "--fast", *at(cluster))
    assert result.returncode == 0, result.stderr
    assert f"chatcluster (pid {cluster.pid}) stopped fast" in result.stdout
    assert "stopping (fast)" in cluster.read_log()


def test_commands_find_the_cluster_through_its_config_file(
    make_cluster: Callable[..., Cluster], tmp_path: Path
) -> None:
    port = free_port()
    config = tmp_path / "chat.toml"
    config.write_text(f'port = {port}\nruntime_dir = "{tmp_path / "rt"}"\n')
    cluster = make_cluster(1, config=str(config), port=port, start=False)
    i = cluster.args.index("--runtime-dir")
    del cluster.args[i:i + 2]  # the runtime directory comes from the file alone
    cluster.log_path = os.path.normpath(cluster.log_path)
    os.rmdir(cluster.runtime_dir)
    cluster.runtime_dir = str(tmp_path / "rt")
    cluster.start()
    result = cli("status", "--json", "--config", str(config))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["pid"] == cluster.pid
    result = cli("stop", "--config", str(config))
    assert result.returncode == 0, result.stderr
    assert cluster.wait_exit() == 0
    assert not (tmp_path / "rt").exists()  # created by the cluster, so removed by it


# --- reload ------------------------------------------------------------------------------------


def test_reload_reports_what_was_applied_and_what_needs_a_restart(
    make_cluster: Callable[..., Cluster], tmp_path: Path
) -> None:
    config = tmp_path / "chat.toml"
    config.write_text('[chat]\nwelcome = "*** Hi {nick}"\n')
    cluster = make_cluster(1, config=str(config))
    config.write_text('[chat]\nwelcome = "*** Hey {nick}"\n[server]\nbacklog = 128\n')
    result = cli("reload", *at(cluster))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        f"chatcluster (pid {cluster.pid}) reloaded {config}: welcome='*** Hey {{nick}}'",
        "changed but not applied, a restart is needed: backlog (4096 -> 128)",
    ]
    c = cluster.client(welcome=False)
    c.wait_line(r"\*\*\* Hey \S+")


def test_reload_with_an_invalid_file_fails_and_changes_nothing(
    make_cluster: Callable[..., Cluster], tmp_path: Path
) -> None:
    config = tmp_path / "chat.toml"
    config.write_text("[limits]\nmax_line_bytes = 200\n")
    cluster = make_cluster(1, config=str(config))
    config.write_text("[limits]\nmax_line_bytes = 3\n")
    result = cli("reload", *at(cluster))
    assert result.returncode == 1
    assert result.stderr.startswith("chatcluster: error: reload refused, the running configuration stays in "
                                    f"force: config file {config}: max_line_bytes must be between 16 and 65536")
    c = cluster.client()
    c.say("x" * 150)
    c.say("/nick ok")
    c.wait_line(r"\*\*\* You are now known as ok")
    assert not any("too long" in line for line in c.lines)


# --- scale -------------------------------------------------------------------------------------


def test_scale_up_and_down(make_cluster: Callable[..., Cluster]) -> None:
    cluster = make_cluster(2)
    result = cli("scale", "3", *at(cluster))
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"chatcluster (pid {cluster.pid}) now runs 3 workers (was 2)\n"
    assert ready_count(cluster) == 3
    result = cli("scale", "1", *at(cluster))
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"chatcluster (pid {cluster.pid}) now runs 1 workers (was 3)\n"
    wait_for(lambda: ready_count(cluster) == 1 and len(cluster.stats()) == 1, what="one worker left")
    header = S.StatsFile(os.path.join(cluster.runtime_dir, "stats")).header()
    assert header.target == 1 and header.supervisor_pid == cluster.pid


@pytest.mark.parametrize("count", ["0", "-2", str(10**6)])
def test_scale_to_an_impossible_count_is_refused(make_cluster: Callable[..., Cluster], count: str) -> None:
    cluster = make_cluster(1)
    result = cli("scale", count, *at(cluster))
    assert result.returncode == 1
    assert f"chatcluster: error: cannot scale to {count} workers; choose between 1 and " in result.stderr
    assert ready_count(cluster) == 1


# --- nothing running ---------------------------------------------------------------------------


@pytest.mark.parametrize("command", [["status"], ["status", "--json"], ["stop"], ["reload"], ["scale", "2"]])
def test_commands_say_clearly_when_no_cluster_runs(tmp_path: Path, command: list[str]) -> None:
    port = free_port()
    result = cli(*command, "--port", str(port), "--runtime-dir", str(tmp_path))
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr == (
        f"chatcluster: error: no chatcluster is running on port {port} (no live pid in "
        f"{tmp_path}/chatcluster.pid); start one with `chatcluster start`, or pass the "
        f"--config/--port/--runtime-dir it was started with\n")


def test_a_stale_pid_file_counts_as_nothing_running(tmp_path: Path) -> None:
    # The pid of a live process that is not chatcluster (this test), as a crash could leave behind.
    (tmp_path / "chatcluster.pid").write_text(f"{os.getpid()}\n")
    result = cli("stop", "--runtime-dir", str(tmp_path))
    assert result.returncode == 1
    assert "no chatcluster is running" in result.stderr


def test_a_stale_pid_file_does_not_keep_a_cluster_from_starting(make_cluster: Callable[..., Cluster]) -> None:
    cluster = make_cluster(1, start=False)
    Path(cluster.runtime_dir, "chatcluster.pid").write_text("999999999\n")
    cluster.start()
    assert Path(cluster.runtime_dir, "chatcluster.pid").read_text() == f"{cluster.pid}\n"


def test_stop_after_the_supervisor_was_killed_outright_finds_nothing_running(
    make_cluster: Callable[..., Cluster],
) -> None:
    cluster = make_cluster(1)
    os.kill(cluster.pid, signal.SIGKILL)
    cluster.wait_exit()
    result = cli("stop", *at(cluster))
    # The pid file is left behind by a supervisor killed outright; its pid is dead.
    assert result.returncode == 1
    assert "no chatcluster is running" in result.stderr


# --- what the commands import --------------------------------------------------------------------

# Runs a command in-process, then reports which modules it imported.
IMPORTS_CODE = """\
import json, sys
from chatcluster.cli import main
code = main(sys.argv[1:])
loaded = sorted(m for m in sys.modules if m == "zmq" or m.startswith(("zmq.", "chatcluster.")))
print("MODULES " + json.dumps(loaded), file=sys.stderr)
sys.exit(code)
"""


def modules_loaded_by(*args: str) -> list[str]:
    result = subprocess.run([sys.executable, "-c", IMPORTS_CODE, *args], capture_output=True, text=True,
                            timeout=60, cwd=REPO)
    assert result.returncode == 0, result.stderr
    (line,) = [x for x in result.stderr.splitlines() if x.startswith("MODULES ")]
    loaded: list[str] = json.loads(line[len("MODULES "):])
    return loaded


def test_the_commands_that_signal_a_cluster_import_neither_zmq_nor_the_server(
    make_cluster: Callable[..., Cluster],
) -> None:
    cluster = make_cluster(1)
    for command in (["status"], ["status", "--json"], ["reload"], ["scale", "2"], ["stop"]):
        loaded = modules_loaded_by(*command, *at(cluster))
        assert "chatcluster.cli" in loaded
        heavy = [m for m in loaded if m.split(".")[0] == "zmq" or m in (
            "chatcluster.supervisor", "chatcluster.worker", "chatcluster.bus", "chatcluster.upgrade",
            "chatcluster.migrate")]
        assert heavy == [], f"`chatcluster {' '.join(command)}` imported {heavy}"
    assert cluster.wait_exit() == 0


# --- restart, reload, scale: faults an operator runs into -----------------------------------------


def test_a_restart_right_after_a_stop_with_clients_connected_gets_the_port(
    make_cluster: Callable[..., Cluster],
) -> None:
    cluster = make_cluster(2)
    clients = [cluster.client() for _ in range(6)]
    result = cli("stop", *at(cluster))
    assert result.returncode == 0, result.stderr
    for c in clients:
        c.wait_closed()
        c.close()
    assert cluster.wait_exit() == 0

    def time_wait() -> bool:
        return any(conn.status == psutil.CONN_TIME_WAIT and conn.laddr and conn.laddr.port == cluster.port
                   for conn in psutil.net_connections("tcp"))

    # The server closed those connections first, so they wait on its side of the port.
    wait_for(time_wait, what="connections in TIME-WAIT on the server's port")
    again = make_cluster(2, port=cluster.port)
    a, b = again.clients_on_distinct_workers(2)
    a.say("back at once")
    b.wait_line(rf"{a.nick}: back at once")
    assert time_wait(), "the restart did not happen while the old connections were in TIME-WAIT"


def test_a_reload_with_a_welcome_that_cannot_be_formatted_is_refused_and_the_running_one_stays(
    make_cluster: Callable[..., Cluster], tmp_path: Path
) -> None:
    config = tmp_path / "chat.toml"
    config.write_text('[chat]\nwelcome = "*** Hello {nick}!"\n')
    cluster = make_cluster(2, config=str(config))
    workers = set(cluster.worker_pids())
    for bad, problem in (("*** Hi {nick}! Rules: {}", "has the replacement field {}"),
                         ("*** Hi {nick} {x}", "has the replacement field {x}"),
                         ("*** Hi {nick} :-}", "cannot be formatted")):
        config.write_text(f'[chat]\nwelcome = "{bad}"\n')
        result = cli("reload", *at(cluster))
        assert result.returncode == 1
        assert result.stderr.startswith(
            f"chatcluster: error: reload refused, the running configuration stays in force: config file {config}: "
            f"welcome {problem}"), result.stderr
        # Newcomers on every worker still get the running welcome, and no worker crashed on it.
        for _ in range(4):
            c = cluster.client(welcome=False)
            c.nick = c.wait_line(r"\*\*\* Hello (\S+)!").group(1)
    assert set(cluster.worker_pids()) == workers


def test_scale_past_four_workers_per_cpu_is_refused_unless_allowed(make_cluster: Callable[..., Cluster]) -> None:
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(before)})  # the cluster inherits one CPU: a cap of 4 workers
    try:
        cluster = make_cluster(3, start=False).start(wait=False)
    finally:
        os.sched_setaffinity(0, before)
    cluster.wait_ready(3)
    result = cli("scale", "5", *at(cluster))
    assert result.returncode == 1
    assert result.stderr == ("chatcluster: error: cannot scale to 5 workers; choose between 1 and 4 (4 per CPU on "
                             "the 1 CPU the cluster may use), or pass --allow-many-workers to go up to 1024\n")
    assert ready_count(cluster) == 3
    result = cli("scale", "5", "--allow-many-workers", *at(cluster))
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"chatcluster (pid {cluster.pid}) now runs 5 workers (was 3)\n"
    result = cli("scale", "2", *at(cluster))  # down is always allowed
    assert result.returncode == 0, result.stderr


# --- a tmp cleaner empties the runtime directory -------------------------------------------------


def test_files_deleted_from_the_runtime_dir_are_put_back_and_the_cluster_keeps_working(
    make_cluster: Callable[..., Cluster], tmp_path: Path
) -> None:
    pid_file = tmp_path / "cc.pid"
    cluster = make_cluster(2, extra=("--pid-file", str(pid_file)))
    a, b = cluster.clients_on_distinct_workers(2)
    runtime_dir = Path(cluster.runtime_dir)
    broker = S.StatsFile(str(runtime_dir / "stats")).header().broker_pid
    # What systemd-tmpfiles removes from /tmp after a while: files nobody modified recently.
    deleted = [runtime_dir / name for name in ("bus-in", "bus-out", "chatcluster.pid", "config.json")] + [pid_file]
    for path in deleted:
        path.unlink()

    wait_for(lambda: all(os.path.lexists(p) for p in deleted), what="the deleted files to be put back")
    assert pid_file.read_text() == (runtime_dir / "chatcluster.pid").read_text() == f"{cluster.pid}\n"
    wait_for(lambda: S.StatsFile(str(runtime_dir / "stats")).header().broker_pid not in (0, broker),
             what="a new broker")
    a.say("still talking")
    b.wait_line(rf"{a.nick}: still talking")
    # A worker started now reaches the bus through the new sockets.
    victim = cluster.worker_of(a)
    os.kill(victim, signal.SIGKILL)
    a.wait_closed()
    wait_for(lambda: len(cluster.worker_pids()) == 2 and victim not in cluster.worker_pids(),
             what="a replacement worker")
    newcomer = cluster.client()
    newcomer.say("hello from the new worker")
    b.wait_line(rf"{newcomer.nick}: hello from the new worker")
    log = cluster.read_log()
    assert "worker 1 started" in log and not re.search(r"worker \d+ \(pid \d+\) exited with status", log)
    # The commands find the cluster, through the runtime directory or the pid file.
    result = cli("status", "--json", *at(cluster))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["pid"] == cluster.pid
    result = cli("reload", *at(cluster))
    assert result.returncode == 0, result.stderr
    result = cli("stop", "--pid-file", str(pid_file))
    assert result.returncode == 0, result.stderr
    assert cluster.wait_exit() == 0


def test_a_deleted_runtime_dir_is_created_again_and_stop_still_finds_the_cluster(
    make_cluster: Callable[..., Cluster],
) -> None:
    cluster = make_cluster(2)
    cluster.log_path = os.path.normpath(cluster.log_path)  # beside the runtime directory, reached through it
    a, b = cluster.clients_on_distinct_workers(2)
    runtime_dir = Path(cluster.runtime_dir)
    shutil.rmtree(runtime_dir)
    wait_for(lambda: all((runtime_dir / name).exists() for name in ("chatcluster.pid", "config.json", "bus-in",
                                                                    "bus-out")),
             what="the runtime directory and its files to be back")
    assert os.stat(runtime_dir).st_mode & 0o777 == 0o700
    a.say("the directory is back")
    b.wait_line(rf"{a.nick}: the directory is back")
    # The shared stats file cannot be put back; status says what to do about it.
    result = cli("status", *at(cluster))
    assert result.returncode == 1
    assert result.stderr == (f"chatcluster: error: chatcluster (pid {cluster.pid}) is running but there is no stats "
                             f"file {runtime_dir}/stats; pass the --runtime-dir it was started with, or, if a tmp "
                             f"cleaner deleted it, restart the cluster to see its status\n")
    result = cli("stop", *at(cluster))
    assert result.returncode == 0, result.stderr
    assert cluster.wait_exit() == 0
    assert "the stats file" in cluster.read_log() and not runtime_dir.exists()
