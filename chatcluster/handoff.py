"""The handoff wire: how a worker passes live connections to its successor during an upgrade.

An old worker connects to a Unix socket its successor listens on in the
runtime directory and sends it messages: each is a 4-byte length and a JSON
object carrying its `format` number, its `kind` and how many file descriptors
ride with it (`SCM_RIGHTS`, on the message's first bytes). The descriptors are
the listening socket and the client sockets themselves; with each client goes
its `ClientState`: nickname, rooms and the room it talks in, unfinished input
line, lines read but not yet processed, unsent output and flood-control
tokens. A reader accepts every
format up to its own (`upgrade()` brings an older message up to date), so a
worker of version N+1 takes clients from one of version N; a message from
newer code is refused with an error that says so. This module only encodes,
sends and reads; `migrate` decides when and what to send.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from . import roster as R
from .protocol import Line, LineReader, LineTooLong, TokenBucket
from .rooms import room_problem

# The handoff message format this code writes; it reads every format up to this one.
# 1: the first. 2: each client also carries its rooms (names) and the room it talks in, and its line
# reader snapshot carries its telnet option state (protocol.LineReader, format 2).
FORMAT = 2
LENGTH = struct.Struct("!I")
# A sanity bound on the announced length. Senders keep messages near FRAME_TARGET, but one
# client's output queue alone may be as large as max_sendq_bytes (up to 1 GiB) in base64.
MAX_FRAME = 2 << 30
FRAME_TARGET = 8 << 20  # senders start a new message once one holds this much
# The kernel passes at most 253 descriptors (SCM_MAX_FD) in one message.
MAX_FDS_PER_FRAME = 200
RECV_SIZE = 1 << 20

# Message kinds. giver -> taker: HELLO (with the listening socket), CLIENTS (with their sockets),
# END. taker -> giver: ACCEPT or REFUSE (answering HELLO), ACK (the clients are adopted).
HELLO, ACCEPT, REFUSE, CLIENTS, END, ACK = "hello", "accept", "refuse", "clients", "end", "ack"


class HandoffError(Exception):
    """A handoff message that cannot be read; the message says what is wrong with it."""


def socket_path(runtime_dir: str, giver: str) -> str:
    """Where the successor of worker `giver` listens for it."""
    return os.path.join(runtime_dir, f"handoff-{giver}")


# -- frames ----------------------------------------------------------------------------------


@dataclass
class Frame:
    kind: str
    body: dict[str, Any]
    fds: list[int]


def encode(kind: str, body: Mapping[str, Any] | None = None, nfds: int = 0) -> bytes:
    """One message: its length, then a JSON object with the format, the kind and the fd count."""
    data = json.dumps({"format": FORMAT, "kind": kind, "fds": nfds, **(body or {})},
                      separators=(",", ":")).encode()
    return LENGTH.pack(len(data)) + data


def send(sock: socket.socket, kind: str, body: Mapping[str, Any] | None = None, fds: Sequence[int] = ()) -> None:
    """Send one message on a blocking socket; its descriptors ride on its first bytes."""
    if len(fds) > MAX_FDS_PER_FRAME:
        raise ValueError(f"{len(fds)} descriptors in one handoff message; at most {MAX_FDS_PER_FRAME}")
    data = encode(kind, body, len(fds))
    sent = socket.send_fds(sock, [data], list(fds)) if fds else sock.send(data)
    if sent < len(data):
        sock.sendall(data[sent:])


def upgrade(message: dict[str, Any]) -> dict[str, Any]:
    """Bring a message of an older format up to FORMAT, or refuse one from newer code.

    Format 1 clients carry no rooms: they are in the default room only, which is what
    `state_from_wire` makes of a client without "rooms"; their line reader snapshot is of
    format 1, which protocol.LineReader.from_state still reads. So nothing needs changing
    here; tests/test_handoff.py keeps a format 1 message that must still be read.
    """
    fmt = message.get("format")
    if isinstance(fmt, bool) or not isinstance(fmt, int) or fmt < 1:
        raise HandoffError(f"handoff message without a valid format number: {fmt!r}")
    if fmt > FORMAT:
        raise HandoffError(f"handoff message of format {fmt} comes from newer code; this code reads formats "
                           f"up to {FORMAT}: upgrade to code at least as new as the running one")
    return message


class FrameReader:
    """Reassemble messages and their descriptors from a stream socket's bytes and SCM_RIGHTS.

    The kernel delivers a message's descriptors with the first of its bytes, and never in
    the same recvmsg as the descriptors of another message, so descriptors queue up in
    order and a complete message takes the count it announces from the front.
    """

    def __init__(self) -> None:
        self.buf = bytearray()
        self.fds: list[int] = []

    def feed(self, data: bytes, fds: Iterable[int] = ()) -> list[Frame]:
        self.fds.extend(fds)
        self.buf += data
        frames: list[Frame] = []
        while len(self.buf) >= LENGTH.size:
            (size,) = LENGTH.unpack_from(self.buf)
            if size > MAX_FRAME:
                raise HandoffError(f"handoff message of {size} bytes announced; at most {MAX_FRAME}")
            if len(self.buf) < LENGTH.size + size:
                break
            raw = bytes(self.buf[LENGTH.size:LENGTH.size + size])
            del self.buf[:LENGTH.size + size]
            try:
                message = json.loads(raw)
            except ValueError as exc:
                raise HandoffError(f"handoff message is not JSON: {exc}") from None
            if not isinstance(message, dict):
                raise HandoffError("handoff message is not a JSON object")
            message = upgrade(message)
            nfds = message.get("fds", 0)
            if isinstance(nfds, bool) or not isinstance(nfds, int) or not 0 <= nfds <= len(self.fds):
                raise HandoffError(f"handoff message announces {nfds!r} descriptors, {len(self.fds)} arrived")
            taken, self.fds = self.fds[:nfds], self.fds[nfds:]
            frames.append(Frame(str(message.get("kind")), message, taken))
        return frames

    def close(self) -> None:
        """Close descriptors that arrived without a complete message to go with them."""
        for fd in self.fds:
            os.close(fd)
        self.fds = []


def receive(sock: socket.socket, reader: FrameReader) -> tuple[list[Frame], bool]:
    """Read a non-blocking socket until it would block: the complete messages, and whether it ended."""
    frames: list[Frame] = []
    while True:
        try:
            data, fds, flags, _ = socket.recv_fds(sock, RECV_SIZE, MAX_FDS_PER_FRAME + 1, socket.MSG_CMSG_CLOEXEC)
        except (BlockingIOError, InterruptedError):
            return frames, False
        except ConnectionResetError:
            return frames, True
        if flags & socket.MSG_CTRUNC:
            for fd in fds:
                os.close(fd)
            raise HandoffError("descriptors were lost in transit (MSG_CTRUNC); is the file limit reached?")
        frames.extend(reader.feed(data, fds))
        if not data:
            return frames, True


# -- client state ----------------------------------------------------------------------------


@dataclass
class ClientState:
    """What a connection carries from one worker to the next, besides its socket."""

    conn: int  # its number on the giver
    ip: str
    nick: str
    since: float
    reader: LineReader  # the unfinished line and telnet parser state
    bucket: TokenBucket  # flood-control tokens
    out: bytes  # output queued and not yet sent, in order
    lines: list[Line | LineTooLong]  # lines read but not yet processed (flood control held them)
    unread: bytes  # bytes received but not yet parsed
    eof: bool  # the client had closed its side
    idle: float  # seconds since it last sent anything
    rooms: list[str] = field(default_factory=list)  # names of its rooms in the order joined ([]: the default room)
    active: str = ""  # name of the room it talks in


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def state_to_wire(s: ClientState, now: float) -> dict[str, Any]:
    lines = [ev.text if type(ev) is Line else {"too_long": ev.limit} for ev in s.lines]  # type: ignore[union-attr]
    return {"conn": s.conn, "ip": s.ip, "nick": s.nick, "since": s.since, "reader": s.reader.state(),
            "bucket": s.bucket.state(now), "out": b64(s.out), "lines": lines, "unread": b64(s.unread),
            "eof": s.eof, "idle": s.idle, "rooms": list(s.rooms), "active": s.active}


def state_from_wire(d: Mapping[str, Any], now: float, telnet: str = "off") -> ClientState:
    """Rebuild one client's state (already brought to FORMAT by `upgrade`); HandoffError if malformed.

    `telnet` is the taker's telnet_negotiation, for a line reader snapshot from code that had no
    telnet layer (see protocol.LineReader.from_state); newer snapshots carry their own mode.
    """
    try:
        lines: list[Line | LineTooLong] = []
        for item in d.get("lines", []):
            if isinstance(item, str):
                lines.append(Line(item))
            else:
                lines.append(LineTooLong(int(item["too_long"])))
        state = ClientState(
            conn=_typed(d, "conn", int), ip=_typed(d, "ip", str), nick=_typed(d, "nick", str),
            since=float(_typed(d, "since", (int, float))),
            reader=LineReader.from_state(_typed(d, "reader", dict), telnet=telnet),
            bucket=TokenBucket.from_state(_typed(d, "bucket", dict), now),
            out=base64.b64decode(_typed(d, "out", str), validate=True), lines=lines,
            unread=base64.b64decode(d.get("unread", ""), validate=True), eof=bool(d.get("eof", False)),
            idle=float(d.get("idle", 0.0)), rooms=[str(r) for r in d.get("rooms", [])],
            active=str(d.get("active", "")))
    except (KeyError, TypeError, ValueError) as exc:
        raise HandoffError(f"client state in a handoff message is malformed: {exc}") from None
    if R.nick_problem(state.nick):
        raise HandoffError(f"client state in a handoff message has an invalid nickname {state.nick!r}")
    for name in [*state.rooms, *([state.active] if state.active else [])]:
        if room_problem(name, 255):
            raise HandoffError(f"client state in a handoff message has an invalid room {name!r}")
    return state


def _typed(d: Mapping[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    value = d.get(key)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ValueError(f"field {key!r} is {value!r}")
    return value
