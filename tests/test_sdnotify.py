"""sd_notify against real AF_UNIX datagram sockets standing in for systemd."""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from chatcluster import sdnotify

pytestmark = pytest.mark.timeout(10)


class Listener:
    """A bound SOCK_DGRAM socket playing systemd's notify socket."""

    def __init__(self, sock: socket.socket, notify_socket: str) -> None:
        self.sock = sock
        self.env = {"NOTIFY_SOCKET": notify_socket}

    def receive(self) -> bytes:
        # The datagram is queued before sendto() returns, so this never waits;
        # the timeout only turns a bug into a failure instead of a hang.
        self.sock.settimeout(5)
        return self.sock.recv(65536)

    def nothing_received(self) -> bool:
        self.sock.setblocking(False)
        try:
            self.sock.recv(65536)
        except BlockingIOError:
            return True
        return False


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[Listener]:
    path = tmp_path / "notify.sock"
    assert len(str(path)) < 100, "tmp_path too long for an AF_UNIX address"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        yield Listener(sock, str(path))


@pytest.fixture
def abstract_listener() -> Iterator[Listener]:
    name = f"chatcluster-test-{os.getpid()}-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        yield Listener(sock, "@" + name)


# --- notify() ---------------------------------------------------------------


def test_lines_are_sent_as_one_datagram_joined_by_newlines(listener: Listener) -> None:
    assert sdnotify.notify("READY=1", "STATUS=serving on port 12345", env=listener.env) is True
    assert listener.receive() == b"READY=1\nSTATUS=serving on port 12345"
    assert listener.nothing_received()


def test_abstract_namespace_socket_is_reached_through_at_sign(abstract_listener: Listener) -> None:
    assert sdnotify.notify("READY=1", env=abstract_listener.env) is True
    assert abstract_listener.receive() == b"READY=1"


def test_text_is_sent_as_utf8(listener: Listener) -> None:
    assert sdnotify.notify("STATUS=caf\u00e9", env=listener.env) is True
    assert listener.receive() == "STATUS=caf\u00e9".encode()


def test_unset_notify_socket_returns_false() -> None:
    assert sdnotify.notify("READY=1", env={}) is False


def test_empty_notify_socket_returns_false() -> None:
    assert sdnotify.notify("READY=1", env={"NOTIFY_SOCKET": ""}) is False


def test_nonexistent_socket_path_returns_false_without_raising(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    env = {"NOTIFY_SOCKET": str(tmp_path / "missing.sock")}
    with caplog.at_level(logging.DEBUG, logger="chatcluster.sdnotify"):
        assert sdnotify.notify("READY=1", env=env) is False
    assert "missing.sock" in caplog.text


def test_socket_whose_reader_is_gone_returns_false(tmp_path: Path) -> None:
    path = tmp_path / "stale.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
    # The path still exists but nobody reads it: ECONNREFUSED.
    assert sdnotify.notify("READY=1", env={"NOTIFY_SOCKET": str(path)}) is False


def test_path_that_is_not_a_socket_returns_false(tmp_path: Path) -> None:
    path = tmp_path / "plain-file"
    path.write_text("")
    assert sdnotify.notify("READY=1", env={"NOTIFY_SOCKET": str(path)}) is False


def test_address_that_is_neither_path_nor_abstract_returns_false() -> None:
    assert sdnotify.notify("READY=1", env={"NOTIFY_SOCKET": "vsock:2:1234"}) is False


def test_no_lines_sends_nothing(listener: Listener) -> None:
    assert sdnotify.notify(env=listener.env) is False
    assert listener.nothing_received()


def test_newline_inside_a_line_is_refused(listener: Listener) -> None:
    with pytest.raises(ValueError, match="newline"):
        sdnotify.notify("STATUS=a\nREADY=1", env=listener.env)
    assert listener.nothing_received()


def test_process_environment_is_used_by_default(listener: Listener, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", listener.env["NOTIFY_SOCKET"])
    assert sdnotify.notify("WATCHDOG=1") is True
    assert listener.receive() == b"WATCHDOG=1"


def test_each_call_leaves_no_socket_open(listener: Listener) -> None:
    before = set(os.listdir("/proc/self/fd"))
    for _ in range(20):
        sdnotify.notify("WATCHDOG=1", env=listener.env)
        listener.receive()
    assert set(os.listdir("/proc/self/fd")) == before


# --- convenience messages ---------------------------------------------------


def test_ready_alone(listener: Listener) -> None:
    assert sdnotify.ready(env=listener.env) is True
    assert listener.receive() == b"READY=1"


def test_ready_with_new_main_pid_and_status(listener: Listener) -> None:
    assert sdnotify.ready("upgraded", mainpid=4242, env=listener.env) is True
    assert listener.receive() == b"READY=1\nMAINPID=4242\nSTATUS=upgraded"


def test_reloading_carries_the_monotonic_clock_in_microseconds(listener: Listener) -> None:
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert sdnotify.reloading(env=listener.env) is True
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    first, second = listener.receive().split(b"\n")
    assert first == b"RELOADING=1"
    key, _, value = second.partition(b"=")
    assert key == b"MONOTONIC_USEC"
    assert before <= int(value) <= after


def test_reloading_with_status(listener: Listener) -> None:
    sdnotify.reloading("reloading configuration", env=listener.env)
    lines = listener.receive().split(b"\n")
    assert lines[0] == b"RELOADING=1"
    assert lines[2] == b"STATUS=reloading configuration"


def test_stopping_with_status(listener: Listener) -> None:
    assert sdnotify.stopping("draining 3 clients", env=listener.env) is True
    assert listener.receive() == b"STOPPING=1\nSTATUS=draining 3 clients"


def test_status_flattens_newlines(listener: Listener) -> None:
    assert sdnotify.status("4 workers\n120 clients", env=listener.env) is True
    assert listener.receive() == b"STATUS=4 workers 120 clients"


def test_watchdog_ping(listener: Listener) -> None:
    assert sdnotify.watchdog(env=listener.env) is True
    assert listener.receive() == b"WATCHDOG=1"


def test_convenience_messages_are_silent_outside_systemd() -> None:
    assert sdnotify.ready("x", env={}) is False
    assert sdnotify.reloading(env={}) is False
    assert sdnotify.stopping(env={}) is False
    assert sdnotify.status("x", env={}) is False
    assert sdnotify.watchdog(env={}) is False


# --- watchdog_interval() ----------------------------------------------------


def test_watchdog_interval_is_half_the_timeout_in_seconds() -> None:
    assert sdnotify.watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 15.0


def test_watchdog_interval_keeps_sub_second_precision() -> None:
    assert sdnotify.watchdog_interval({"WATCHDOG_USEC": "500000"}) == 0.25


def test_watchdog_interval_unset_is_none() -> None:
    assert sdnotify.watchdog_interval({}) is None


@pytest.mark.parametrize("value", ["", "abc", "1.5", "0", "-1000000"])
def test_watchdog_interval_invalid_or_non_positive_is_none(value: str) -> None:
    assert sdnotify.watchdog_interval({"WATCHDOG_USEC": value}) is None


def test_watchdog_interval_for_this_pid() -> None:
    env = {"WATCHDOG_USEC": "10000000", "WATCHDOG_PID": str(os.getpid())}
    assert sdnotify.watchdog_interval(env) == 5.0


def test_watchdog_interval_meant_for_another_pid_is_none() -> None:
    env = {"WATCHDOG_USEC": "10000000", "WATCHDOG_PID": str(os.getpid() + 1)}
    assert sdnotify.watchdog_interval(env) is None


def test_watchdog_interval_with_unparsable_pid_is_none() -> None:
    env = {"WATCHDOG_USEC": "10000000", "WATCHDOG_PID": "main"}
    assert sdnotify.watchdog_interval(env) is None


def test_watchdog_interval_reads_process_environment_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "4000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert sdnotify.watchdog_interval() == 2.0


# --- claim_watchdog() -------------------------------------------------------


def test_claim_watchdog_takes_over_a_predecessors_watchdog() -> None:
    env = {"WATCHDOG_USEC": "10000000", "WATCHDOG_PID": str(os.getpid() + 1)}
    sdnotify.claim_watchdog(env)
    assert env["WATCHDOG_PID"] == str(os.getpid())
    assert sdnotify.watchdog_interval(env) == 5.0


def test_claim_watchdog_without_a_watchdog_changes_nothing() -> None:
    env: dict[str, str] = {}
    sdnotify.claim_watchdog(env)
    assert env == {}


# --- under_systemd() --------------------------------------------------------


@pytest.mark.parametrize(
    "key, value",
    [
        ("JOURNAL_STREAM", "8:12345"),
        ("INVOCATION_ID", "0123456789abcdef0123456789abcdef"),
        ("NOTIFY_SOCKET", "/run/systemd/notify"),
    ],
)
def test_under_systemd_when_any_marker_is_set(key: str, value: str) -> None:
    assert sdnotify.under_systemd({key: value}) is True


def test_not_under_systemd_without_markers() -> None:
    assert sdnotify.under_systemd({"PATH": "/usr/bin", "TERM": "xterm"}) is False


# --- logs_to_journal() ------------------------------------------------------


def test_logs_to_journal_when_journal_stream_names_the_descriptor(tmp_path: Path) -> None:
    with open(tmp_path / "stream", "w") as fh:
        st = os.fstat(fh.fileno())
        assert sdnotify.logs_to_journal({"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}, fd=fh.fileno()) is True


def test_not_logging_to_journal_when_stderr_was_redirected_elsewhere(tmp_path: Path) -> None:
    # A wrapper sent stderr to a file but kept systemd's variable: timestamps stay.
    with open(tmp_path / "journal", "w") as journal, open(tmp_path / "file", "w") as other:
        st = os.fstat(journal.fileno())
        env = {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
        assert sdnotify.logs_to_journal(env, fd=other.fileno()) is False


@pytest.mark.parametrize("value", ["", "8", "a:b", "8:"])
def test_not_logging_to_journal_without_a_usable_journal_stream(value: str) -> None:
    assert sdnotify.logs_to_journal({"JOURNAL_STREAM": value}, fd=2) is False


def test_not_logging_to_journal_when_the_descriptor_is_closed() -> None:
    r, w = os.pipe()
    st = os.fstat(w)
    os.close(r)
    os.close(w)
    assert sdnotify.logs_to_journal({"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}, fd=w) is False
