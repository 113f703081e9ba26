"""The wire protocol between chatcluster and its telnet and nc clients.

This module owns everything between raw socket bytes and chat text: it splits
the stream into lines on any of the terminators telnet and nc clients send,
enforces the line length limit, decodes UTF-8 without ever failing, removes
every character that could control another client's terminal, encodes server
lines with CRLF, and provides the token bucket used for flood control. Telnet
commands and option negotiation belong to the layer below the lines,
`chatcluster.telnet`, which LineReader drives and which edits the unfinished
line through LineReader's small LineSink methods. It is pure: no sockets, no
clock (callers pass the time in), no mutable globals; it returns the bytes the
telnet layer wants sent and never writes anything to a client itself.
"""

from __future__ import annotations

import base64
import binascii
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TypeVar

from .telnet import DATA as TELNET_DATA
from .telnet import OFF, TelnetParser, check_mode, greeting

__all__ = [
    "CRLF",
    "DEFAULT_MAX_LINE_BYTES",
    "Event",
    "Line",
    "LineReader",
    "LineTooLong",
    "Notice",
    "TokenBucket",
    "encode_line",
    "encode_notice",
    "sanitize",
]

CRLF = b"\r\n"

DEFAULT_MAX_LINE_BYTES = 512

_Kind = TypeVar("_Kind")


# ---------------------------------------------------------------------------
# Events


@dataclass(frozen=True, slots=True)
class Line:
    """One complete client line, decoded and sanitised (terminator removed)."""

    text: str


@dataclass(frozen=True, slots=True)
class LineTooLong:
    """The client sent a line longer than `limit` bytes; the rest of it is discarded."""

    limit: int


@dataclass(frozen=True, slots=True)
class Notice:
    """A line for this client alone from the telnet layer: the answer to AYT, or the hint
    after Ctrl-C. The caller sends encode_notice() of it back to the client; it is not chat.

    `new_row` is set when the client's terminal has just echoed the key (`^C`) and its cursor
    is in the middle of a row, so the line must start on a new one.
    """

    text: str
    new_row: bool = False


Event = Line | LineTooLong | Notice


# ---------------------------------------------------------------------------
# Sanitising

# The fast path: text with none of these characters is returned as it is.
# U+2028..U+202E covers the line/paragraph separators and the bidi
# embeddings/overrides in one range.
_UNSAFE = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028-\u202e\u2066-\u2069]")

# Order matters: the escape sequences that introduce strings or parameters
# must be tried before the generic "ESC + final byte" form, and every escape
# form before the single-character class. An unterminated sequence is removed
# up to the end of the text rather than left half in place.
_STRIP = re.compile(
    # CSI, 7-bit and 8-bit: parameters, intermediates, final byte.
    "(?:\x1b\\[|\x9b)[\x30-\x3f]*[\x20-\x2f]*[\x40-\x7e]?"
    # OSC: up to BEL or ST (ESC \ or its 8-bit form).
    "|\x1b\\][^\x07\x1b\x9c]*(?:\x07|\x1b\\\\|\x9c)?"
    # DCS, SOS, PM, APC: up to ST.
    "|\x1b[PX^_][^\x1b\x9c]*(?:\x1b\\\\|\x9c)?"
    # Every other escape: intermediates then one final byte (ESC c, ESC ( B).
    "|\x1b[\x20-\x2f]*[\x30-\x7e]?"
    # Single characters: C0 except TAB, DEL, C1, separators, bidi controls.
    "|[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028-\u202e\u2066-\u2069]"
)


def sanitize(text: str) -> str:
    """Remove everything in `text` that could control a terminal.

    Removed: escape sequences together with everything they introduce, C0
    controls except TAB, DEL, C1 controls (an 8-bit CSI with its parameters),
    U+2028/U+2029, and the bidirectional embeddings, overrides and isolates.
    Every other character is kept.
    """
    if _UNSAFE.search(text) is None:
        return text
    return _STRIP.sub("", text)


def encode_line(text: str) -> bytes:
    """Encode one server line for the wire; `text` is trusted and not sanitised."""
    return text.encode("utf-8") + CRLF


def encode_notice(notice: Notice) -> bytes:
    """Encode a telnet layer's Notice for the wire, on a row of its own."""
    return (CRLF if notice.new_row else b"") + encode_line(notice.text)


# ---------------------------------------------------------------------------
# Reading lines

_CR = 0x0D
_LF = 0x0A
_NUL = 0x00

_TERMINATOR = re.compile(b"[\r\n]")

# Format 2 moved the telnet parser's state into a nested, versioned object of its own;
# format 1 kept only the parser's position and is still read.
_STATE_FORMAT = 2
_LEGACY_FORMAT = 1

# feed() is feed_some() without a limit.
_UNLIMITED = sys.maxsize

# LineReader._out between reads: nothing appends to it then, since the budget is 0.
_NO_READ: list[Event] = []


class LineReader:
    """Turn the byte stream of one client into events, with the telnet layer below the lines.

    Feed it whatever recv() returned; it keeps the unfinished line, and the telnet parser's
    position and option states, between calls, so events and replies never depend on how
    the stream was split into reads.

    Telnet (`chatcluster.telnet`) sees the bytes first: its commands are removed before the
    stream is split and measured, so an IAC sequence between a CR and its LF does not stop
    the LF from being swallowed, and does not count towards the line length. `telnet` is the
    negotiation mode: `off` (the default) removes commands and answers nothing; `always` and
    `on-iac` negotiate, edit the unfinished line on EC, EL and IP, and produce replies.

    Through its LineSink methods (full, take_data, erase_char, erase_line, ends_inside_char,
    notice) the telnet layer acts on the unfinished line.
    """

    __slots__ = ("_max", "_buf", "_mode", "_telnet", "_discard", "_after_cr", "_overflowed", "_out", "_limit")

    def __init__(self, max_line_bytes: int = DEFAULT_MAX_LINE_BYTES, telnet: str = OFF) -> None:
        self._max = _check_limit(max_line_bytes)
        self._buf = bytearray()
        self._mode = check_mode(telnet)
        # Made at the client's first IAC: a client that never sends one (nc, a bot, most
        # of a benchmark's thousands) costs no telnet state at all.
        self._telnet: TelnetParser | None = None
        # True from the moment a line crosses the limit until its terminator.
        self._discard = False
        # True right after a CR ended a line: one LF or NUL that follows is
        # part of that terminator, even if it arrives in the next read.
        self._after_cr = False
        # Set when the limit was lowered below the unfinished line; the
        # LineTooLong is reported by the next feed(), since a setter cannot
        # return events.
        self._overflowed = False
        # The event list and budget of the read being parsed, for the LineSink methods;
        # between reads a shared empty list (never appended to) and a spent budget, so that
        # a reader keeps no events alive and allocates nothing for them.
        self._out = _NO_READ
        self._limit = 0

    @property
    def max_line_bytes(self) -> int:
        return self._max

    @max_line_bytes.setter
    def max_line_bytes(self, value: int) -> None:
        self._max = _check_limit(value)
        if len(self._buf) > self._max:
            self._buf.clear()
            self._discard = True
            self._overflowed = True

    @property
    def telnet(self) -> TelnetParser:
        """The telnet layer below this reader (its mode and option states)."""
        if self._telnet is None:
            self._telnet = TelnetParser(self._mode)
        return self._telnet

    def buffered(self) -> int:
        """Bytes held for the unfinished line; never more than max_line_bytes."""
        return len(self._buf)

    def pending_bytes(self) -> bytes:
        """The unfinished line's bytes, telnet commands already removed."""
        return bytes(self._buf)

    def greeting(self) -> bytes:
        """What to send the client once, when it connects, before anything else (b"" if nothing).

        The telnet layer of mode `always` starts as if this had been sent (see telnet.greeting).
        """
        return greeting(self._mode)

    def feed(self, data: bytes) -> list[Event]:
        """Consume `data` and return the events it completes, in order; replies are dropped."""
        return self.receive(data, _UNLIMITED)[0]

    def feed_some(self, data: bytes, max_events: int) -> tuple[list[Event], int]:
        """receive() without the reply bytes, for callers that send nothing back."""
        events, used, _ = self.receive(data, max_events)
        return events, used

    def receive(self, data: bytes, max_events: int) -> tuple[list[Event], int, bytes]:
        """Consume `data`, stopping as soon as `max_events` events are out.

        Returns the events, how many bytes of `data` were consumed, and the bytes the
        telnet layer must send back to the client (b"" for almost every read). The caller
        keeps the unconsumed rest and feeds it later. Flood control uses this to parse no
        more lines than a client has tokens for, so what it holds for a throttled client is
        the unread bytes of one recv(), never a list of parsed lines. Stopping early is the
        same as splitting the stream there, so the events and replies are those one call
        without a limit would give. Telnet commands that cannot produce an event are
        consumed even when the budget is spent.
        """
        if isinstance(max_events, bool) or not isinstance(max_events, int) or max_events < 1:
            raise ValueError(f"max_events must be a positive integer, got {max_events!r}")
        out: list[Event] = []
        if self._overflowed:
            self._overflowed = False
            out.append(LineTooLong(self._max))
            if max_events == 1:
                return out, 0, b""
        if not data:
            return out, 0, b""
        telnet = self._telnet
        if (telnet is None or telnet.position == TELNET_DATA) and b"\xff" not in data:
            if b"\r" not in data:
                return out, self._feed_plain(data, out, max_events), b""
            return out, self._split(data, 0, len(data), out, max_events), b""
        if telnet is None:
            telnet = self._telnet = TelnetParser(self._mode)
        self._out, self._limit = out, max_events
        used = telnet.feed(data, self)
        self._out, self._limit = _NO_READ, 0
        return out, used, telnet.take_reply()

    def _feed_plain(self, data: bytes, out: list[Event], limit: int) -> int:
        # Most reads are whole LF-terminated lines with no telnet commands and
        # no CR; they are split with bytes.find and never looked at per byte.
        start = 0
        if self._after_cr:
            self._after_cr = False
            if data[0] == _LF or data[0] == _NUL:
                start = 1
        while True:
            end = data.find(b"\n", start)
            if end < 0:
                self._take(data, start, len(data), out)
                return len(data)
            self._finish(data, start, end, out)
            start = end + 1
            if len(out) >= limit:
                return start

    # -- the LineSink the telnet layer acts through -------------------------------------------

    def full(self) -> bool:
        """True when the current read has produced as many events as its budget allows."""
        return len(self._out) >= self._limit

    def take_data(self, data: bytes, start: int, end: int) -> int:
        """Split data[start:end], which holds no telnet command, into lines; returns how far it got."""
        return self._split(data, start, end, self._out, self._limit)

    def _split(self, data: bytes, start: int, end: int, out: list[Event], limit: int) -> int:
        pos = start
        while pos < end:
            # Every step below adds at most one event, so checking here is exact.
            if len(out) >= limit:
                return pos
            if self._after_cr:
                self._after_cr = False
                first = data[pos]
                if first == _LF or first == _NUL:
                    pos += 1
                    continue
            match = _TERMINATOR.search(data, pos, end)
            if match is None:
                self._take(data, pos, end, out)
                return end
            stop = match.start()
            self._finish(data, pos, stop, out)
            pos = stop + 1
            if data[stop] == _CR:
                # The LF or NUL of a CR LF / CR NUL, when it is in this read, goes with it.
                if pos == end:
                    self._after_cr = True
                elif data[pos] == _LF or data[pos] == _NUL:
                    pos += 1
        return pos

    def erase_char(self) -> None:
        """Remove the unfinished line's last character: its whole UTF-8 sequence, or one byte
        that does not end a sequence (a stray continuation byte, an invalid byte)."""
        buf = self._buf
        if not buf:
            return
        i = len(buf) - 1
        follow = 0
        while follow < 3 and i > 0 and 0x80 <= buf[i] <= 0xBF:
            i -= 1
            follow += 1
        if follow and _continuations(buf[i]) >= follow:
            del buf[i:]
        else:
            del buf[-1]

    def erase_line(self) -> None:
        """Discard the unfinished line; a line being dropped as too long ends here too, so
        what the user types next is a line of its own."""
        self._buf.clear()
        self._discard = False

    def ends_inside_char(self) -> bool:
        """True when the unfinished line ends with the start of a UTF-8 character whose
        continuation bytes have not all arrived."""
        buf = self._buf
        i = len(buf) - 1
        follow = 0
        while follow < 3 and i >= 0 and 0x80 <= buf[i] <= 0xBF:
            i -= 1
            follow += 1
        return i >= 0 and _continuations(buf[i]) > follow

    def notice(self, text: str, new_row: bool) -> None:
        """A line for this client alone from the telnet layer (see Notice)."""
        self._out.append(Notice(text, new_row))

    # -- lines --------------------------------------------------------------------------------

    def _take(self, data: bytes, start: int, end: int, out: list[Event]) -> None:
        # Part of a line whose terminator has not arrived yet. Bounds are
        # passed rather than a slice so a huge read is never copied only to
        # be thrown away.
        if self._discard or start >= end:
            return
        if end - start > self._max - len(self._buf):
            self._buf.clear()
            self._discard = True
            out.append(LineTooLong(self._max))
            return
        self._buf += data[start:end]

    def _finish(self, data: bytes, start: int, end: int, out: list[Event]) -> None:
        # data[start:end] is the last piece of a line and a terminator follows.
        if self._discard:
            self._discard = False
            return
        if end - start > self._max - len(self._buf):
            self._buf.clear()
            out.append(LineTooLong(self._max))
            return
        if self._buf:
            self._buf += data[start:end]
            text = self._buf.decode("utf-8", "replace")
            self._buf.clear()
        else:
            text = data[start:end].decode("utf-8", "replace")
        out.append(Line(sanitize(text)))

    # -- handing a connection over ------------------------------------------------------------

    def state(self) -> dict[str, object]:
        """A JSON-serialisable snapshot of everything this reader holds, telnet included.

        from_state() on it gives a reader that continues the stream exactly
        as this one would, so a connection can move to another process in the
        middle of a line or of a telnet command.
        """
        return {
            "format": _STATE_FORMAT,
            "max_line_bytes": self._max,
            "partial": base64.b64encode(self._buf).decode("ascii"),
            "discard": self._discard,
            "after_cr": self._after_cr,
            "overflowed": self._overflowed,
            "telnet": self.telnet.state(),
        }

    @classmethod
    def from_state(cls, state: Mapping[str, object], telnet: str = OFF) -> LineReader:
        """Rebuild a reader from a state() snapshot; ValueError if it is not one.

        Format 2 snapshots carry their telnet mode and option states. Format 1 snapshots,
        written before the server negotiated, carry only the parser's position; `telnet` is
        the receiving server's negotiation setting for them (see
        TelnetParser.from_legacy_position).
        """
        version = state.get("format")
        if version != _STATE_FORMAT and version != _LEGACY_FORMAT:
            raise ValueError(
                f"line reader state has format {version!r}, expected {_LEGACY_FORMAT} or {_STATE_FORMAT}; "
                "it was written by an incompatible chatcluster version"
            )
        reader = cls(_field(state, "max_line_bytes", int))
        try:
            partial = base64.b64decode(_field(state, "partial", str), validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ValueError(f"line reader state: 'partial' is not valid base64 ({exc})") from None
        if len(partial) > reader._max:
            raise ValueError(
                f"line reader state: partial line of {len(partial)} bytes exceeds "
                f"max_line_bytes={reader._max}"
            )
        if version == _LEGACY_FORMAT:
            parser = TelnetParser.from_legacy_position(_field(state, "telnet", str), telnet)
        else:
            parser = TelnetParser.from_state(_field(state, "telnet", dict))
        reader._mode = parser.mode
        reader._telnet = parser
        reader._buf = bytearray(partial)
        reader._discard = _field(state, "discard", bool)
        reader._after_cr = _field(state, "after_cr", bool)
        reader._overflowed = _field(state, "overflowed", bool)
        return reader

    def __repr__(self) -> str:
        return (
            f"LineReader(max_line_bytes={self._max}, buffered={len(self._buf)}, "
            f"telnet={self._telnet or self._mode!r}, discard={self._discard}, after_cr={self._after_cr})"
        )


def _continuations(lead: int) -> int:
    """How many continuation bytes the UTF-8 lead byte `lead` announces; 0 if it is no lead byte."""
    if 0xC2 <= lead <= 0xDF:
        return 1
    if 0xE0 <= lead <= 0xEF:
        return 2
    if 0xF0 <= lead <= 0xF4:
        return 3
    return 0


def _check_limit(value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"max_line_bytes must be a positive integer, got {value!r}")
    return value


def _field(state: Mapping[str, object], key: str, kind: type[_Kind]) -> _Kind:
    value = state.get(key)
    # bool is an int subclass: a flag must not pass for a number.
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise ValueError(f"state field {key!r} must be {kind.__name__}, got {value!r}")
    return value


def _number(state: Mapping[str, object], key: str) -> float:
    value = state.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"state field {key!r} must be a number, got {value!r}")
    return float(value)


# ---------------------------------------------------------------------------
# Flood control

# Float rounding can leave a bucket a hair short of a token at the exact
# moment wait() promised one; a millionth of a message is not worth a retry.
_EPSILON = 1e-6


class TokenBucket:
    """IRC-style flood control: `burst` messages at once, then `rate` per second.

    The caller passes a monotonic `now` to every call, so the bucket is pure
    and its tests need no clock. A rate of zero or less means unlimited.
    """

    __slots__ = ("_rate", "_burst", "_tokens", "_stamp")

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self._rate = float(rate)
        self._burst = _check_burst(burst)
        self._tokens = float(self._burst)
        self._stamp = now

    @property
    def rate(self) -> float:
        return self._rate

    @property
    def burst(self) -> int:
        return self._burst

    def _refill(self, now: float) -> None:
        # A clock that appears to run backwards (it should not, but `now`
        # comes from the caller) adds nothing and does not move the stamp,
        # or the same interval would be credited twice.
        if now > self._stamp:
            if self._rate > 0:
                self._tokens = min(float(self._burst), self._tokens + (now - self._stamp) * self._rate)
            self._stamp = now

    def take(self, now: float) -> bool:
        """Spend one token if there is one; False means the message must wait."""
        self._refill(now)
        if self._rate <= 0:
            return True
        if self._tokens + _EPSILON >= 1.0:
            self._tokens = max(0.0, self._tokens - 1.0)
            return True
        return False

    def available(self, now: float) -> int:
        """How many take() calls would succeed from `now` on; sys.maxsize when unlimited."""
        self._refill(now)
        if self._rate <= 0:
            return _UNLIMITED
        return int(self._tokens + _EPSILON)

    def wait(self, now: float) -> float:
        """Seconds from `now` until take() will succeed; 0.0 if it would now."""
        self._refill(now)
        if self._rate <= 0 or self._tokens + _EPSILON >= 1.0:
            return 0.0
        return (1.0 - self._tokens) / self._rate

    def configure(self, rate: float, burst: int) -> None:
        """Apply new settings, keeping the tokens the client has (up to the new burst).

        Time since the last call is credited at the new rate, since there is
        no `now` here to settle it at the old one.
        """
        self._burst = _check_burst(burst)
        if rate <= 0:
            # While unlimited the bucket stays full, so a later limit starts
            # the client with a full burst instead of an empty bucket.
            self._tokens = float(self._burst)
        self._rate = float(rate)
        self._tokens = min(self._tokens, float(self._burst))

    def state(self, now: float) -> dict[str, object]:
        """A JSON-serialisable snapshot; it holds no timestamp, so clocks need not agree."""
        self._refill(now)
        return {"rate": self._rate, "burst": self._burst, "tokens": self._tokens}

    @classmethod
    def from_state(cls, state: Mapping[str, object], now: float) -> TokenBucket:
        """Rebuild a bucket from a state() snapshot; `now` may come from another clock."""
        bucket = cls(_number(state, "rate"), _field(state, "burst", int), now)
        bucket._tokens = min(float(bucket._burst), max(0.0, _number(state, "tokens")))
        return bucket

    def __repr__(self) -> str:
        return f"TokenBucket(rate={self._rate}, burst={self._burst}, tokens={self._tokens:.3f})"


def _check_burst(burst: int) -> int:
    if isinstance(burst, bool) or not isinstance(burst, int) or burst < 1:
        raise ValueError(f"burst must be an integer of at least 1, got {burst!r}")
    return burst
