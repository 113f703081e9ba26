"""Real terminal clients in real pseudo-terminals, for the tests that check what a user sees.

`Pane` runs one program (Debian's `telnet`, `busybox telnet`, `plink -telnet`, `nc`) in a
tmux pane of fixed size on a tmux server of its own, types into it as a user would (text,
Enter, Backspace, Ctrl-C, Ctrl-Z) and reads the screen back with `tmux capture-pane`, waiting
for a condition with a deadline, never for a fixed time. `Recorder` is a plain socket server
on a kernel-chosen port that logs every byte a client sends, optionally answering it with the
server's own telnet layer, so the tests can see what each real client puts on the wire.

Every process started here (the tmux server and the program in its pane) is stopped by its pid
in close(), also when a test fails.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from client_bytes import LONG, SAMPLE

from chatcluster.protocol import LineReader, Notice, encode_notice

WAIT = 15.0
WIDTH, HEIGHT = 120, 40

_TMUX_CONF = """\
set -g remain-on-exit on
set -g status off
set -g history-limit 2000
set -g default-terminal screen
"""


@dataclass(frozen=True)
class ClientKind:
    """One real client program: how to start it and what its keys do."""

    name: str
    binary: str
    argv: Callable[[str, int], list[str]]
    # Ctrl-C: "interrupt" sends telnet IP; "menu" opens a local menu (one more key leaves it);
    # "exit" ends the program (SIGINT from the terminal).
    ctrl_c: str


CLIENTS = {
    "inetutils": ClientKind("inetutils", "telnet", lambda host, port: ["telnet", host, str(port)], "interrupt"),
    "busybox": ClientKind("busybox", "busybox", lambda host, port: ["busybox", "telnet", host, str(port)], "menu"),
    "plink": ClientKind("plink", "plink", lambda host, port: ["plink", "-batch", "-telnet", "-P", str(port), host],
                        "exit"),
    "nc": ClientKind("nc", "nc", lambda host, port: ["nc", host, str(port)], "exit"),
}


def missing(kind: ClientKind) -> str | None:
    """Why `kind` cannot run here (a one-line reason naming the fix), or None if it can."""
    if shutil.which("tmux") is None:
        return "tmux is not installed; scripts/test.sh installs it (apt-get install tmux)"
    if shutil.which(kind.binary) is None:
        package = {"telnet": "telnet", "busybox": "busybox", "plink": "putty-tools", "nc": "netcat-openbsd"}
        return f"{kind.binary} is not installed; scripts/test.sh installs it (apt-get install {package[kind.binary]})"
    if kind.name == "busybox":
        probe = subprocess.run(["busybox", "--list"], capture_output=True, text=True, timeout=WAIT)
        if "telnet" not in probe.stdout.split():
            return "this busybox has no telnet applet; install Debian's busybox package"
    return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie still answers kill(0); it has ended all the same.
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


class Pane:
    """One program in a WIDTHxHEIGHT tmux pane, on a private tmux server.

    Besides the screen, every byte the terminal receives (the program's output and the tty's
    echo) is logged through `pipe-pane`, so a test can look for stray bytes that a terminal
    would draw and tmux's own screen model hides.
    """

    def __init__(self, argv: list[str], width: int = WIDTH, height: int = HEIGHT) -> None:
        self.dir = tempfile.mkdtemp(prefix="cc-pty-", dir="/tmp")
        conf = os.path.join(self.dir, "tmux.conf")
        with open(conf, "w") as fh:
            fh.write(_TMUX_CONF)
        self.socket = os.path.join(self.dir, "tmux.sock")
        self.log = os.path.join(self.dir, "output")
        self.env = {**os.environ, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}
        self.env.pop("TMUX", None)
        self.base = ["tmux", "-u", "-S", self.socket, "-f", conf]
        self.server_pid = 0
        self.pane_pid = 0
        try:
            # The pane starts idle so that the output log is in place before the program runs.
            self._tmux("new-session", "-d", "-x", str(width), "-y", str(height), "--", "sleep", "3600")
            self.server_pid = int(self._tmux("display-message", "-p", "#{pid}"))
            self._tmux("pipe-pane", "-O", f"cat > {self.log}")
            self._tmux("respawn-pane", "-k", "--", *argv)
            self.pane_pid = int(self._tmux("display-message", "-p", "#{pane_pid}"))
        except BaseException:
            self.close()
            raise

    def _tmux(self, *args: str) -> str:
        done = subprocess.run([*self.base, *args], env=self.env, capture_output=True, timeout=WAIT)
        if done.returncode != 0:
            raise RuntimeError(f"tmux {' '.join(args)} failed: {done.stderr.decode(errors='replace').strip()}")
        return done.stdout.decode("utf-8", "replace")

    # -- typing -------------------------------------------------------------------------------

    def type(self, text: str) -> None:
        """Type `text` literally (no key names), as a user would on the keyboard."""
        self._tmux("send-keys", "-l", "--", text)

    def key(self, *names: str) -> None:
        """Press keys by tmux name: Enter, BSpace, C-c, C-z..."""
        self._tmux("send-keys", *names)

    def line(self, text: str) -> None:
        self.type(text)
        self.key("Enter")

    # -- reading the screen ---------------------------------------------------------------------

    def rows(self) -> list[str]:
        """The visible screen, one string per row, trailing blanks removed."""
        return [row.rstrip() for row in self._tmux("capture-pane", "-p").split("\n")[:-1]]

    def history(self) -> list[str]:
        """Every row since the program started (scrolled-off ones too), wrapped rows joined."""
        out = self._tmux("capture-pane", "-p", "-J", "-S", "-")
        return [row.rstrip() for row in out.split("\n")[:-1]]

    def output(self) -> bytes:
        """Every byte the terminal has received so far."""
        try:
            with open(self.log, "rb") as fh:
                return fh.read()
        except FileNotFoundError:
            return b""

    def dead(self) -> bool:
        return self._tmux("display-message", "-p", "#{pane_dead}").strip() == "1"

    def wait(self, cond: Callable[[list[str]], object], what: str, timeout: float = WAIT) -> object:
        """Poll the screen history until cond(rows) is true; AssertionError with the screen if not."""
        deadline = time.monotonic() + timeout
        while True:
            rows = self.history()
            value = cond(rows)
            if value:
                return value
            if time.monotonic() > deadline:
                screen = "\n".join(f"  |{row}" for row in self.rows())
                raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}; the screen:\n{screen}")
            time.sleep(0.02)

    def wait_row(self, text: str, timeout: float = WAIT) -> int:
        """Wait until a row reads exactly `text`; returns its index in history()."""
        return self.wait(lambda rows: next((i + 1 for i, r in enumerate(rows) if r == text), 0) or None,
                         f"a row reading exactly {text!r}", timeout) - 1  # type: ignore[operator]

    def wait_dead(self, timeout: float = WAIT) -> None:
        deadline = time.monotonic() + timeout
        while not self.dead():
            if time.monotonic() > deadline:
                raise AssertionError("the client program is still running")
            time.sleep(0.02)

    # -- cleaning up ----------------------------------------------------------------------------

    def _children(self) -> list[int]:
        """The tmux server's children: the program in the pane and pipe-pane's logger."""
        pids = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/stat") as fh:
                        if int(fh.read().rsplit(")", 1)[1].split()[1]) == self.server_pid:
                            pids.append(int(entry))
                except (OSError, ValueError, IndexError):
                    continue
        return pids

    def close(self) -> None:
        """Stop the tmux server and the program in its pane, by pid, and remove the socket dir."""
        children = self._children() if self.server_pid else []
        if self.server_pid:
            try:
                subprocess.run([*self.base, "kill-server"], env=self.env, capture_output=True, timeout=WAIT)
            except subprocess.TimeoutExpired:
                pass
        for pid in (self.pane_pid, *children, self.server_pid):
            if not pid:
                continue
            deadline = time.monotonic() + 5
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.02)
            if _alive(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        shutil.rmtree(self.dir, ignore_errors=True)


class Recorder:
    """A one-connection server on 127.0.0.1:<port 0> that logs every byte the client sends.

    With `telnet` set to a negotiation mode it answers as chatcluster's telnet layer would
    (greeting, replies, notices), so the client behaves as it would with the real server;
    with None it answers nothing, as a server without negotiation does. `hello` is sent
    after the greeting, so a test can see that the client is connected.
    """

    def __init__(self, telnet: str | None, hello: bytes = b"hello from the recorder\r\n") -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.telnet = telnet
        self.hello = hello
        self.received = bytearray()
        self.closed = False
        self.lock = threading.Lock()
        self.conn: socket.socket | None = None
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        self.listener.settimeout(WAIT)
        try:
            conn, _ = self.listener.accept()
        except OSError:
            self.closed = True
            return
        self.conn = conn
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_OOBINLINE, 1)
        reader = LineReader(1 << 16, telnet=self.telnet) if self.telnet else None
        try:
            conn.sendall((reader.greeting() if reader else b"") + self.hello)
            while True:
                data = conn.recv(65536)
                if not data:
                    break
                with self.lock:
                    self.received += data
                if reader is not None:
                    events, _, reply = reader.receive(data, 1 << 30)
                    notices = b"".join(encode_notice(e) for e in events if isinstance(e, Notice))
                    if reply or notices:
                        conn.sendall(reply + notices)
        except OSError:
            pass
        finally:
            self.closed = True

    def data(self) -> bytes:
        with self.lock:
            return bytes(self.received)

    def wait_for(self, cond: Callable[[bytes], object], what: str, timeout: float = WAIT) -> object:
        deadline = time.monotonic() + timeout
        while True:
            value = cond(self.data())
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}; received {self.data()!r}")
            time.sleep(0.02)

    def wait_closed(self, timeout: float = WAIT) -> None:
        self.wait_for(lambda _: self.closed, "the client to close the connection", timeout)

    def close(self) -> None:
        self.listener.close()
        if self.conn is not None:
            try:
                self.conn.shutdown(socket.SHUT_RDWR)  # wakes the thread's recv()
            except OSError:
                pass
            self.conn.close()
        self.thread.join(WAIT)


# What a user does in every session, in order: (name, keys). Text is typed literally; names
# in angle brackets are keys. SAMPLE is Latin, a symbol, CJK, an emoji, and the letters whose
# second byte a 7-bit telnet client mistakes for a special key. Ctrl-C comes last, since for
# some clients it ends the program.
ACTIONS: list[tuple[str, list[str]]] = [
    ("ascii", ["hello there", "<Enter>"]),
    ("sample", [SAMPLE, "<Enter>"]),
    ("ctrl-z", ["uvw", "<C-z>"]),
    ("backspace", ["abcd", "<BSpace>", "<BSpace>", "XY", "<Enter>"]),
    ("long", [LONG, "<Enter>"]),
    ("ctrl-c", ["xyz", "<C-c>"]),
]
LINE_ENDINGS = (b"\r\n", b"\r\0", b"\n")


def do(pane: Pane, keys: list[str]) -> None:
    for k in keys:
        if k.startswith("<") and k.endswith(">") and len(k) > 2:
            pane.key(k[1:-1])
        else:
            pane.type(k)


def leave_menu(pane: Pane, kind: ClientKind) -> None:
    """After Ctrl-C, what a user does to get back to the chat: busybox shows a menu that the
    next key leaves (and swallows); the other clients need nothing."""
    if kind.ctrl_c == "menu":
        pane.wait(lambda rows: any(r.startswith("Console escape") for r in rows), "busybox's Ctrl-C menu")
        pane.key("Enter")
        pane.wait(lambda rows: any(r == "continuing..." for r in rows), "busybox leaving its menu")


def record_session(kind: ClientKind, telnet: str | None) -> dict[str, bytes]:
    """Run ACTIONS in `kind` against a Recorder and return the bytes each one put on the wire.

    After each action a marker line `#name` is typed and awaited, so the bytes between two
    markers are exactly what that action sent; "connect" is what the client sent before the
    user typed anything, "enter" how it ends a line. A client that Ctrl-C ends is recorded up
    to its end of stream.
    """
    rec = Recorder(telnet)
    pane = Pane(kind.argv("127.0.0.1", rec.port))
    try:
        pane.wait_row("hello from the recorder")
        names = ["connect"]
        pane.line("#connect")
        for name, keys in ACTIONS:
            rec.wait_for(lambda d: d.rstrip(b"\r\n\0").endswith(b"#" + names[-1].encode())
                         and d.endswith(LINE_ENDINGS), f"the marker after {names[-1]}")
            do(pane, keys)
            names.append(name)
            if name == "ctrl-c" and kind.ctrl_c == "exit":
                rec.wait_closed()
                break
            if name == "ctrl-c":
                leave_menu(pane, kind)
            pane.line("#" + name)
        else:
            rec.wait_for(lambda d: d.rstrip(b"\r\n\0").endswith(b"#ctrl-c"), "the last marker")
        data = rec.data()
    finally:
        pane.close()
        rec.close()
    return split_recording(data, names)


def split_recording(data: bytes, names: list[str]) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    pos = 0
    for name in names:
        marker = b"#" + name.encode()
        at = data.find(marker, pos)
        if at < 0:  # the last action ended the client: no marker after it
            out[name] = data[pos:]
            return out
        out[name] = data[pos:at]
        end = at + len(marker)
        ending = next(e for e in LINE_ENDINGS if data.startswith(e, end))
        out.setdefault("enter", ending)
        pos = end + len(ending)
    return out
