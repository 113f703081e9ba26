"""Specification of `chatcluster upgrade`: new code in every process, nobody disconnected, nothing lost.

Real clusters, real clients. Where a test needs "new code" it starts the
cluster from a copy of the package (PYTHONPATH, with PYTHONSAFEPATH so the
checkout is not on the path) and changes the copy before upgrading: that is
what installing a new version does to a running server.
"""

from __future__ import annotations

import json
import os
import re
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest
from conftest import REPO, WAIT, Client, Cluster, free_port, skip_greeting, wait_for

Make = Callable[..., Cluster]
UPGRADE_TIMEOUT = 150.0


def upgrade(cl: Cluster) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "chatcluster", "upgrade", "--port", str(cl.port),
                           "--runtime-dir", cl.runtime_dir], capture_output=True, text=True, cwd=REPO,
                          timeout=UPGRADE_TIMEOUT)


def upgraded(cl: Cluster) -> str:
    done = upgrade(cl)
    assert done.returncode == 0, f"upgrade failed: {done.stderr}\n{cl.read_log()[-4000:]}"
    return done.stdout


def generations(cl: Cluster) -> set[int]:
    return {v.generation for v in cl.stats()}


def installed_copy(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A copy of the package to run the cluster from, and the environment that makes Python use it."""
    site = tmp_path / "site"
    shutil.copytree(REPO / "chatcluster", site / "chatcluster", ignore=shutil.ignore_patterns("__pycache__"))
    return site / "chatcluster", {"PYTHONPATH": str(site), "PYTHONSAFEPATH": "1"}


def patch(module: Path, code: str) -> None:
    """Install a changed build: append `code` to one module of the copy."""
    with open(module, "a") as fh:
        fh.write("\n" + code + "\n")


def worker_of_each(cl: Cluster, clients: list[Client]) -> list[int]:
    return [cl.worker_of(c) for c in clients]


# -- moving clients ----------------------------------------------------------------------------


def test_upgrade_moves_every_client_to_a_new_worker_keeping_nick_and_half_typed_line(make_cluster: Make) -> None:
    cl = make_cluster(2)
    a, b = cl.clients_on_distinct_workers(2)
    old_workers = set(cl.worker_pids())
    a.say("before the upgrade")
    b.wait_line(rf"{a.nick}: before the upgrade")
    b.say("me too")
    a.wait_line(rf"{b.nick}: me too")
    seen = [len(a.lines), len(b.lines)]  # everything before the upgrade is read
    a.send("half a li")  # the rest of the line comes after the upgrade
    out = upgraded(cl)
    assert f"(pid {cl.pid}) upgraded" in out  # the supervisor kept its pid (re-exec in place)
    assert "2 clients kept" in out
    new_workers = set(cl.worker_pids())
    assert len(new_workers) == 2 and not new_workers & old_workers
    assert set(worker_of_each(cl, [a, b])) <= new_workers
    a.send("ne\r\n")
    b.wait_line(rf"{a.nick}: half a line")
    b.say(f"/whois {a.nick}")
    b.wait_line(rf"\*\*\* {a.nick} is on worker w[34], connected since .*")
    a.say("/who")
    a.wait_line(rf"\*\*\* 2 users online: {', '.join(sorted([a.nick, b.nick], key=str.lower))}")
    assert not a.closed and not b.closed
    # Nobody saw anyone leave or join: the move is invisible.
    assert a.lines[seen[0]:] == [f"*** 2 users online: {', '.join(sorted([a.nick, b.nick], key=str.lower))}"]
    assert b.lines[seen[1]:-1] == [f"{a.nick}: half a line"]
    assert generations(cl) == {2}


def test_usr2_to_the_supervisor_upgrades(make_cluster: Make) -> None:
    cl = make_cluster(2)
    a, b = cl.client(), cl.client()
    old = set(cl.worker_pids())
    cl.signal(signal.SIGUSR2)
    wait_for(lambda: generations(cl) == {2} and len(cl.worker_pids()) == 2 and not set(cl.worker_pids()) & old,
             timeout=60, what="generation 2 to replace generation 1")
    a.say("after USR2")
    b.wait_line(rf"{a.nick}: after USR2")
    wait_for(lambda: "upgrade complete" in cl.read_log(), what="the supervisor to log the upgrade")


def test_lines_held_by_flood_control_are_delivered_once_and_in_order(make_cluster: Make) -> None:
    cl = make_cluster(2, extra=("--flood-rate", "4", "--flood-burst", "2"))
    a, b = cl.clients_on_distinct_workers(2)
    a.send("".join(f"flood {i}\r\n" for i in range(12)))  # 10 of them wait for tokens
    b.wait_line(rf"{a.nick}: flood 1")
    upgraded(cl)
    b.wait_line(rf"{a.nick}: flood 11", timeout=30)
    got = [line for line in b.lines if line.startswith(f"{a.nick}: flood ")]
    assert got == [f"{a.nick}: flood {i}" for i in range(12)]


def test_output_queued_for_a_slow_reader_is_delivered_after_the_upgrade(make_cluster: Make) -> None:
    cl = make_cluster(2, extra=("--max-sendq-bytes", str(64 << 20), "--flood-rate", "0"))
    slow_sock = socket.socket()
    slow_sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: a small window
    slow_sock.connect(("127.0.0.1", cl.port))
    slow = Client.__new__(Client)
    slow.sock, slow.buf, slow.lines, slow.closed, slow.nick = slow_sock, b"", [], False, ""
    cl.clients.append(slow)
    slow.welcome()
    talker, observer = cl.client(), cl.client()
    filler = "x" * 400  # under max_line_bytes
    count = 12000  # about 5 MB: far more than the kernel buffers between the worker and the slow reader
    talker.send("".join(f"bulk {i} {filler}\r\n" for i in range(count)))
    observer_seen = re.compile(rf"{talker.nick}: bulk {count - 1} ")
    observer.wait(lambda lines: any(observer_seen.match(x) for x in lines), timeout=60,
                  what="the whole bulk at a reading client")
    upgraded(cl)
    queued = [int(n) for n in re.findall(r"sent \d+ clients \((\d+) bytes of output queued\)", cl.read_log())]
    assert sum(queued) > 0, "the slow reader had nothing queued at the handoff: the test proves nothing"
    seen = re.compile(rf"{talker.nick}: bulk (\d+) ")
    slow.wait(lambda lines: any(seen.match(x) and x.startswith(f"{talker.nick}: bulk {count - 1} ") for x in lines),
              timeout=120, what="the whole bulk at the slow reader")
    numbers = [int(m.group(1)) for m in map(seen.match, slow.lines) if m]
    assert numbers == list(range(count))


# -- failures leave the cluster serving ---------------------------------------------------------


def test_an_upgrade_to_code_that_raises_at_import_fails_and_changes_nothing(make_cluster: Make,
                                                                             tmp_path: Path) -> None:
    package, env = installed_copy(tmp_path)
    cl = make_cluster(2, env=env)
    a, b = cl.clients_on_distinct_workers(2)
    before = set(cl.worker_pids())
    patch(package / "worker.py", 'raise RuntimeError("this build is broken")')
    done = upgrade(cl)
    assert done.returncode == 1
    assert "upgrade failed: the installed code failed its check" in done.stderr
    assert "RuntimeError: this build is broken" in done.stderr
    assert set(cl.worker_pids()) == before and generations(cl) == {1}
    a.say("still here")
    b.wait_line(rf"{a.nick}: still here")
    # Fixed, the same cluster upgrades.
    shutil.copy(REPO / "chatcluster" / "worker.py", package / "worker.py")
    upgraded(cl)
    b.say("and now upgraded")
    a.wait_line(rf"{b.nick}: and now upgraded")
    assert not a.closed and not b.closed


def test_an_upgrade_whose_new_workers_cannot_start_leaves_the_old_ones_serving(make_cluster: Make,
                                                                                tmp_path: Path) -> None:
    package, env = installed_copy(tmp_path)
    cl = make_cluster(2, env=env)
    a, b = cl.clients_on_distinct_workers(2)
    before = set(cl.worker_pids())
    patch(package / "worker.py", "def _fail_boot(self, timeout=15.0):\n"
                                 "    raise RuntimeError('this build cannot boot')\n"
                                 "Worker.boot = _fail_boot")
    done = upgrade(cl)
    assert done.returncode == 1
    assert re.search(r"upgrade failed: new worker \d+ exited with status \d+ while starting", done.stderr)
    assert "the running workers keep serving" in done.stderr
    wait_for(lambda: set(cl.worker_pids(ready_only=False)) == before, what="the failed new workers to be gone")
    assert generations(cl) == {1}
    a.say("nothing happened")
    b.wait_line(rf"{a.nick}: nothing happened")
    assert psutil.Process(cl.pid).is_running()


def test_an_upgrade_with_a_broken_config_file_fails_and_changes_nothing(make_cluster: Make,
                                                                        tmp_path: Path) -> None:
    config = tmp_path / "chatcluster.toml"
    config.write_text("[limits]\nflood_rate = 0\n")
    cl = make_cluster(2, config=str(config))
    a, b = cl.clients_on_distinct_workers(2)
    before = set(cl.worker_pids())
    config.write_text("[limits]\nflood_rate = -3\n")
    done = upgrade(cl)
    assert done.returncode == 1
    assert "the configuration does not load with the installed code" in done.stderr
    assert "flood_rate" in done.stderr
    assert set(cl.worker_pids()) == before
    a.say("config still fine")
    b.wait_line(rf"{a.nick}: config still fine")


def test_an_upgrade_to_code_speaking_another_bus_wire_version_is_refused(make_cluster: Make,
                                                                         tmp_path: Path) -> None:
    package, env = installed_copy(tmp_path)
    cl = make_cluster(2, env=env)
    a, b = cl.clients_on_distinct_workers(2)
    before = set(cl.worker_pids())
    patch(package / "wire.py", "WIRE_VERSION = 99")
    done = upgrade(cl)
    assert done.returncode == 1
    assert "cannot take over this cluster in place: it speaks bus wire version 99" in done.stderr
    assert "restart the cluster to move to it" in done.stderr
    assert set(cl.worker_pids()) == before
    a.say("same old bus")
    b.wait_line(rf"{a.nick}: same old bus")


def test_the_new_code_is_what_runs_after_the_upgrade(make_cluster: Make, tmp_path: Path) -> None:
    package, env = installed_copy(tmp_path)
    cl = make_cluster(2, env=env)
    a = cl.client()
    a.say("/help")
    a.wait_line(r"\*\*\* /help - show this list")
    patch(package / "chat.py", 'HELP = HELP + ("*** (this is the upgraded build)",)')
    upgraded(cl)
    a.say("/help")
    a.wait_line(r"\*\*\* \(this is the upgraded build\)")


def test_an_upgrade_after_the_address_and_runtime_dir_changed_in_the_config_keeps_them(make_cluster: Make,
                                                                                         tmp_path: Path) -> None:
    port = free_port()
    runtime_dir = tmp_path / "rt"
    config = tmp_path / "chatcluster.toml"
    config.write_text(f'[server]\nport = {port}\nruntime_dir = "{runtime_dir}"\n')
    cl = make_cluster(2, config=str(config), port=port, start=False)
    for flag in ("--port", "--runtime-dir"):  # both come from the file alone
        i = cl.args.index(flag)
        del cl.args[i:i + 2]
    cl.log_path = os.path.normpath(cl.log_path)
    os.rmdir(cl.runtime_dir)
    cl.runtime_dir = str(runtime_dir)
    cl.start()
    a, b = cl.clients_on_distinct_workers(2)
    other_port = free_port()
    config.write_text(f'[server]\nport = {other_port}\nruntime_dir = "{tmp_path / "elsewhere"}"\nbacklog = 128\n'
                      f'[chat]\nwelcome = "*** Hi again {{nick}}"\n')
    done = upgrade(cl)  # found through the port and runtime directory the cluster runs with
    assert done.returncode == 0, f"upgrade failed: {done.stderr}\n{cl.read_log()[-4000:]}"
    lines = done.stdout.splitlines()
    assert lines[0].startswith(f"chatcluster (pid {cl.pid}) upgraded: generation 2 serves")
    assert lines[1:] == [
        "settings applied: welcome='*** Hi again {nick}'",
        f"changed but not applied, a restart is needed: port ({port} -> {other_port}), backlog (4096 -> 128), "
        f"runtime_dir ('{runtime_dir}' -> '{tmp_path / 'elsewhere'}')",
    ]
    assert generations(cl) == {2} and not (tmp_path / "elsewhere").exists()
    a.say("after the upgrade")
    b.wait_line(rf"{a.nick}: after the upgrade")
    newcomer = cl.client(welcome=False)  # on the port it always had
    newcomer.wait_line(r"\*\*\* Hi again \S+")
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", other_port), timeout=2).close()
    status = subprocess.run([sys.executable, "-m", "chatcluster", "status", "--json", "--port", str(port),
                             "--runtime-dir", str(runtime_dir)], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["port"] == port
    stop = subprocess.run([sys.executable, "-m", "chatcluster", "stop", "--port", str(port), "--runtime-dir",
                           str(runtime_dir)], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert stop.returncode == 0, stop.stderr
    assert cl.wait_exit() == 0
    assert not runtime_dir.exists()  # created by the cluster, so removed by it, upgrade or not


class Notifications:
    """A datagram socket standing in for systemd's NOTIFY_SOCKET; it records who sent each message."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind(path)
        self.messages: list[tuple[int, list[str]]] = []  # (sender pid, lines)

    def wait(self, cond: Callable[[list[str]], bool], what: str, timeout: float = 60.0) -> int:
        """Index of the first message from now on for which cond holds."""
        start = len(self.messages)
        deadline = time.monotonic() + timeout
        while True:
            for i in range(start, len(self.messages)):
                if cond(self.messages[i][1]):
                    return i
            start = len(self.messages)
            left = deadline - time.monotonic()
            assert left > 0, f"no notification {what}; got {self.messages[-8:]}"
            self.sock.settimeout(min(left, 0.5))
            try:
                data, anc, _, _ = self.sock.recvmsg(65536, socket.CMSG_SPACE(12))
            except TimeoutError:
                continue
            pid = next(int.from_bytes(d[:4], sys.byteorder) for lvl, kind, d in anc
                       if lvl == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS)
            self.messages.append((pid, data.decode().split("\n")))


def test_systemd_sees_one_main_process_through_the_upgrade(make_cluster: Make, tmp_path: Path) -> None:
    notes = Notifications(str(tmp_path / "notify"))
    cl = make_cluster(2, env={"NOTIFY_SOCKET": notes.path, "WATCHDOG_USEC": "1000000"})
    notes.wait(lambda m: "READY=1" in m, "READY=1 at start")
    upgraded(cl)
    began = notes.wait(lambda m: "RELOADING=1" in m, "RELOADING=1 when the upgrade begins")
    done = notes.wait(lambda m: "READY=1" in m, "READY=1 when it is over")
    assert began < done
    pings = notes.wait(lambda m: m == ["WATCHDOG=1"], "a watchdog ping from the re-executed supervisor")
    assert pings > done
    # Every message came from the one main process, and none names another main pid.
    assert {pid for pid, _ in notes.messages} == {cl.pid}
    assert not [m for _, m in notes.messages if any(x.startswith("MAINPID=") and x != f"MAINPID={cl.pid}" for x in m)]
    notes.sock.close()


# -- the whole thing under load ------------------------------------------------------------------

CHATTERS = 200
RATE = 40.0  # chat lines per second across all chatters; each goes to every other client
LINE = re.compile(r"(\S+): m (\d+) (\d+)")


class Room:
    """CHATTERS clients and one silent observer, read by one selector thread; chatters speak in turn."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.sel = selectors.DefaultSelector()
        self.socks: list[socket.socket] = []
        self.bufs: list[bytes] = []
        self.lines: list[list[str]] = []
        self.closed: list[bool] = []
        self.nicks: list[str] = []
        self.sent: list[tuple[int, int, float]] = []  # (chatter, seq, time)
        self.sending = False
        self.stop = False
        self.error: BaseException | None = None

    def connect_all(self) -> None:
        for i in range(CHATTERS + 1):
            s = socket.create_connection(("127.0.0.1", self.port), timeout=WAIT)
            skip_greeting(s)
            s.setblocking(False)
            self.socks.append(s)
            self.bufs.append(b"")
            self.lines.append([])
            self.closed.append(False)
            self.sel.register(s, selectors.EVENT_READ, i)
        welcome = re.compile(r"\*\*\* Welcome to chatcluster! Your nickname is (\S+)\. .*")
        deadline = time.monotonic() + 60
        while any(not ls for ls in self.lines):
            assert time.monotonic() < deadline, "not every client got its welcome line"
            self.pump(0.1)
        for ls in self.lines:
            m = welcome.fullmatch(ls[0])
            assert m, ls[:3]
            self.nicks.append(m.group(1))

    def pump(self, timeout: float) -> None:
        for key, _ in self.sel.select(timeout):
            i = key.data
            try:
                chunk = self.socks[i].recv(1 << 20)
            except BlockingIOError:
                continue
            except OSError:
                chunk = b""
            if not chunk:
                self.closed[i] = True
                self.sel.unregister(self.socks[i])
                continue
            self.bufs[i] += chunk
            *complete, self.bufs[i] = self.bufs[i].split(b"\r\n")
            self.lines[i].extend(part.decode() for part in complete)

    def run(self) -> None:
        try:
            seq = 0
            next_send = time.monotonic()
            while not self.stop:
                now = time.monotonic()
                if self.sending and now >= next_send:
                    who = seq % CHATTERS
                    self.socks[who].send(f"m {who} {seq}\r\n".encode())
                    self.sent.append((who, seq, now))
                    seq += 1
                    next_send += 1.0 / RATE
                self.pump(max(0.0, min(0.05, next_send - time.monotonic())) if self.sending else 0.05)
        except BaseException as exc:  # reported by the test thread
            self.error = exc

    def chat(self, i: int) -> list[tuple[int, int]]:
        out = []
        for line in self.lines[i][1:]:
            m = LINE.fullmatch(line)
            assert m, f"client {i} ({self.nicks[i]}) got an unexpected line: {line!r}"
            assert self.nicks[int(m.group(2))] == m.group(1), f"client {i}: line under the wrong nick: {line!r}"
            out.append((int(m.group(2)), int(m.group(3))))
        return out


class ConnectLoop:
    """Connects, waits for the welcome line, closes; over and over. Every failure is kept."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.ok: list[float] = []
        self.failures: list[str] = []
        self.stop = False

    def run(self) -> None:
        while not self.stop:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=WAIT) as s:
                    data = b""
                    while b"Welcome" not in data or not data.endswith(b"\r\n"):
                        chunk = s.recv(4096)
                        if not chunk:
                            raise ConnectionError(f"closed before the welcome line (got {data!r})")
                        data += chunk
                self.ok.append(time.monotonic())
            except OSError as exc:
                self.failures.append(f"{time.monotonic():.3f} {type(exc).__name__}: {exc}")
            time.sleep(0.02)


@pytest.mark.timeout(600)
def test_200_clients_chatting_through_two_upgrades_lose_nothing(make_cluster: Make) -> None:
    cl = make_cluster(4, extra=("--flood-rate", "0", "--no-announce-joins"))
    room = Room(cl.port)
    room.connect_all()
    loop = ConnectLoop(cl.port)
    threads = [threading.Thread(target=room.run, daemon=True), threading.Thread(target=loop.run, daemon=True)]
    for t in threads:
        t.start()
    windows: list[tuple[float, float]] = []
    pids = [set(cl.worker_pids())]
    try:
        room.sending = True
        for _ in range(2):
            time.sleep(1.5)  # chat going on before each upgrade
            began = time.monotonic()
            out = upgraded(cl)
            windows.append((began, time.monotonic()))
            assert f"(pid {cl.pid}) upgraded" in out
            kept = re.search(r"(\d+) clients kept", out)
            assert kept and int(kept.group(1)) >= CHATTERS + 1, out
            pids.append(set(cl.worker_pids()))
        time.sleep(1.5)
        room.sending = False
        expected = [len(room.sent) - sum(1 for who, _, _ in room.sent if who == i) for i in range(CHATTERS + 1)]
        wait_for(lambda: room.error is not None or all(
            sum(1 for x in ls if LINE.fullmatch(x)) >= n for ls, n in zip(room.lines, expected, strict=True)),
            timeout=120, what="every chat line at every client")
        # A last line, after everything: one order, so anything duplicated arrives before it.
        last = len(room.sent) + 1_000_000
        room.sent.append((0, last, time.monotonic()))
        room.socks[0].send(f"m 0 {last}\r\n".encode())
        wait_for(lambda: room.error is not None or all(
            any(x.endswith(f": m 0 {last}") for x in room.lines[i]) for i in range(1, CHATTERS + 1)),
            timeout=60, what="the last line at every other client")
    finally:
        room.stop = loop.stop = True
        for t in threads:
            t.join(30)
    assert room.error is None, repr(room.error)
    assert not any(room.closed), f"disconnected: {[room.nicks[i] for i, c in enumerate(room.closed) if c]}"
    assert loop.failures == [], loop.failures[:10]
    for began, ended in windows:
        assert any(began <= t <= ended for t in loop.ok), "no connection completed during an upgrade"
        assert any(began <= t <= ended for _, _, t in room.sent), "no chat line was sent during an upgrade"
    assert len(pids[0] | pids[1] | pids[2]) == 12, "each upgrade replaces all four workers"
    # One order: the observer saw every line exactly once; each chatter saw the same order minus its own.
    order = room.chat(CHATTERS)
    assert sorted(order) == sorted((who, seq) for who, seq, _ in room.sent)
    assert len(set(order)) == len(order)
    for i in range(CHATTERS):
        assert room.chat(i) == [m for m in order if m[0] != i], f"client {i} ({room.nicks[i]}) diverges"
    assert generations(cl) == {3}
