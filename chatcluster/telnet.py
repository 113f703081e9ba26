"""The telnet layer of one client connection: RFC 854 commands and RFC 1143 option negotiation.

This module owns the bytes below the lines. It finds the IAC sequences in what a client sends,
answers option requests with RFC 1143's Q method (one state per option and direction, each
request answered at most once, no loops), answers DO TIMING-MARK, applies the editing and
interrupt commands to the unfinished line, puts back the bytes that 7-bit telnet clients turn
into commands, and says which bytes the server must send back. The only option it accepts is the client sending
BINARY, which stops BSD-derived clients from stripping the 8th bit of what the user types.

It is pure: bytes in; data, line edits and reply bytes out, with no sockets and no clock. It
knows nothing of lines: the line reader above it (`protocol.LineReader`) gives it a `LineSink`
and splits the data into lines. It never writes to a client itself (the caller sends the reply
bytes through the client's normal output), and it must not make chat decisions.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final, Protocol, TypeVar

__all__ = [
    "ALWAYS",
    "AYT_ANSWER",
    "DATA",
    "GREETING",
    "INTERRUPT_HINT",
    "LineSink",
    "MAX_ANSWERS",
    "MODES",
    "OFF",
    "ON_IAC",
    "TelnetParser",
    "check_mode",
    "escape_output",
    "greeting",
]

# ---------------------------------------------------------------------------
# The protocol's bytes (RFC 854, 856, 860, 885, 1184)

IAC: Final = 0xFF
DONT: Final = 0xFE
DO: Final = 0xFD
WONT: Final = 0xFC
WILL: Final = 0xFB
SB: Final = 0xFA
GA: Final = 0xF9
EL: Final = 0xF8
EC: Final = 0xF7
AYT: Final = 0xF6
AO: Final = 0xF5
IP: Final = 0xF4
BRK: Final = 0xF3
DM: Final = 0xF2
NOP: Final = 0xF1
SE: Final = 0xF0
EOR: Final = 0xEF
ABORT: Final = 0xEE
SUSP: Final = 0xED
EOF: Final = 0xEC

BINARY: Final = 0x00
ECHO: Final = 0x01
SGA: Final = 0x03
TIMING_MARK: Final = 0x06

# ---------------------------------------------------------------------------
# Settings and texts

ALWAYS: Final = "always"  # ask for BINARY when the client connects
ON_IAC: Final = "on-iac"  # ask for BINARY only once the client has sent an IAC of its own
OFF: Final = "off"  # remove telnet commands and answer nothing (a plain line protocol)
MODES: Final = (ALWAYS, ON_IAC, OFF)

AYT_ANSWER: Final = "*** [Yes]"
INTERRUPT_HINT: Final = "*** (Ctrl-C and Ctrl-Z do nothing here: type /quit to leave)"

# What `always` sends at connect. The CR NUL (a bare carriage return, as telnet spells it)
# puts the cursor of a raw client such as nc back at the start of the line, so the first line
# of text is drawn over the two bytes the terminal may have shown for IAC DO.
GREETING: Final = bytes((IAC, DO, BINARY)) + b"\r\0"

# An option and direction answers the client at most this many times in a connection's
# life. A conforming client asks once and never needs a second answer; the limit ends any
# loop a misbehaving client tries (answering our refusal with the same request again, or
# our DONT with WILL and our DO with WONT) and bounds what a flood of requests can make
# us send to 2 directions x 256 options x 4 answers x 3 bytes = 6 KiB per connection.
MAX_ANSWERS: Final = 4

# BSD-derived clients (inetutils, netkit) without BINARY compare each typed byte with its
# 8th bit cleared against the terminal's special keys, and send a command in its place:
# `✓` (E2 9C 93) goes out as E2, IAC BRK, IAC DO TIMING-MARK, 93. A real Ctrl-C cannot fall
# inside a UTF-8 character, so a command that arrives there is such a byte and is put back.
_REPAIR: Final = {IP: 0x83, BRK: 0x9C, SUSP: 0x9A, AO: 0x8F}
_REPAIR_BYTES: Final = {cmd: bytes([byte]) for cmd, byte in _REPAIR.items()}

# Commands whose handling can produce an event (a line byte or a notice), and so must wait
# when the caller's event budget is spent. Everything else is consumed regardless, so that
# the DO TIMING-MARK a client sends right after IP is answered in the same call as the IP.
_EVENT_COMMANDS: Final = frozenset((IAC, IP, BRK, SUSP, ABORT, AO, AYT))
_DATA_FF: Final = b"\xff"

# ---------------------------------------------------------------------------
# Parser positions: small ints on the hot path, written out by name in state().

_DATA, _IAC, _WILL, _WONT, _DO, _DONT, _SB, _SB_IAC, _SKIP = range(9)
_POSITION_NAMES: Final = ("data", "iac", "will", "wont", "do", "dont", "subneg", "subneg_iac", "skip")
_VERB_POSITION: Final = {WILL: _WILL, WONT: _WONT, DO: _DO, DONT: _DONT}
_POSITION_VERB: Final = {v: k for k, v in _VERB_POSITION.items()}
DATA: Final = _DATA  # the position in which a read without IAC needs no telnet work at all

# RFC 1143 option states, one per option and direction, packed in 6 bits per direction:
# the state (2 bits), the queue bit (set: OPPOSITE) and the answers given (0..MAX_ANSWERS).
_NO, _YES, _WANTNO, _WANTYES = range(4)
_Q_NAMES: Final = ("no", "yes", "wantno", "wantyes")
_OPPOSITE: Final = 4
_SIDE_MASK: Final = 0x3F
_HIM: Final = 0  # the client performs the option (it sends WILL/WONT; we answer DO/DONT)
_US: Final = 6  # the server performs the option (the client sends DO/DONT; we answer WILL/WONT)

_STATE_FORMAT: Final = 1

_T = TypeVar("_T")


def check_mode(mode: str) -> str:
    """`mode` if it is a telnet negotiation mode, else ValueError naming the choices."""
    if mode not in MODES:
        raise ValueError(f"telnet_negotiation must be one of {', '.join(MODES)}; got {mode!r}")
    return mode


def greeting(mode: str) -> bytes:
    """What to send a client the moment it connects, before anything else; b"" if nothing.

    Only `always` has one: IAC DO BINARY, then CR NUL. A parser in mode `always` starts as
    if it had been sent, so it must be sent exactly once, at connect.
    """
    return GREETING if check_mode(mode) == ALWAYS else b""


def escape_output(data: bytes) -> bytes:
    """`data` with every 0xFF doubled, as telnet requires of the server's output.

    Without a 0xFF (always, for UTF-8 text) the same object is returned, not a copy.
    """
    if b"\xff" not in data:
        return data
    return data.replace(b"\xff", b"\xff\xff")


class LineSink(Protocol):
    """What the telnet layer needs from the line reader above it."""

    def full(self) -> bool:
        """True when the caller's event budget for this read is spent."""

    def take_data(self, data: bytes, start: int, end: int) -> int:
        """Data bytes data[start:end]; returns how far it got (less when the budget runs out)."""

    def erase_char(self) -> None:
        """Remove the last character (a whole UTF-8 sequence) of the unfinished line."""

    def erase_line(self) -> None:
        """Discard the unfinished line."""

    def ends_inside_char(self) -> bool:
        """True when the unfinished line ends inside a UTF-8 character."""

    def notice(self, text: str, new_row: bool) -> None:
        """A line to send back to this client alone; `new_row`: start it on a new row."""


class TelnetParser:
    """The telnet state of one connection: parser position, option states, mode.

    Feed it every byte the client sends, in order, through feed(); it keeps its position
    between calls, so what it does never depends on how the stream was split into reads.
    Reply bytes collect until take_reply(). In mode `always` it starts as the greeting
    left it (BINARY asked for): the caller sends greeting(ALWAYS) when the client connects.

    It is kept small, since a worker holds one per telnet client: each option's two
    directions are packed in one small int (RFC 1143 state, queue bit, answers given),
    BINARY's in a slot of its own, the others in a dict made only when one is touched.
    """

    __slots__ = ("position", "_mode", "_greeted", "_binary", "_options", "_reply")

    def __init__(self, mode: str = OFF) -> None:
        self._mode = check_mode(mode)
        # Read by the line reader to choose its fast path: while this is DATA, a read
        # with no IAC in it is all data and needs no telnet work.
        self.position = _DATA
        # Whether IAC DO BINARY has gone out: at connect for `always`, at the client's
        # first IAC for `on-iac`; `off` never sends it.
        self._greeted = mode != ON_IAC
        self._binary = _WANTYES if mode == ALWAYS else _NO
        self._options: dict[int, int] | None = None
        self._reply: bytearray | None = None

    @property
    def mode(self) -> str:
        return self._mode

    def take_reply(self) -> bytes:
        """The bytes to send back that collected since the last call."""
        if self._reply is None:
            return b""
        reply = bytes(self._reply)
        self._reply = None  # rare: not worth keeping a buffer per client
        return reply

    def him_state(self, option: int) -> str:
        """The Q-method state of `option` performed by the client: no, yes, wantno, wantyes."""
        return _Q_NAMES[self._get(option) >> _HIM & 3]

    def us_state(self, option: int) -> str:
        """The Q-method state of `option` performed by the server."""
        return _Q_NAMES[self._get(option) >> _US & 3]

    # -- parsing ----------------------------------------------------------------------------

    def feed(self, data: bytes, sink: LineSink) -> int:
        """Parse `data`, hand its data bytes and line edits to `sink`; returns bytes consumed.

        Stops early only when the sink's budget is spent and what comes next could produce
        an event; the caller feeds the rest later, and the result is the same as if the
        stream had been split there.
        """
        n = len(data)
        pos = 0
        while pos < n:
            position = self.position
            if position == _DATA:
                iac = data.find(b"\xff", pos)
                end = n if iac < 0 else iac
                if end > pos:
                    if sink.full():
                        return pos
                    reached = sink.take_data(data, pos, end)
                    if reached < end:
                        return reached
                if iac < 0:
                    return n
                pos = iac + 1
                self.position = _IAC
                if not self._greeted:
                    self._greet()
            elif position == _IAC:
                byte = data[pos]
                if byte in _EVENT_COMMANDS and sink.full():
                    return pos
                pos += 1
                self._command(byte, sink)
            elif position == _SB:
                # A subnegotiation is skipped whole: no option we accept has one.
                iac = data.find(b"\xff", pos)
                if iac < 0:
                    return n
                pos = iac + 1
                self.position = _SB_IAC
            elif position == _SB_IAC:
                # Only IAC SE ends a subnegotiation; IAC IAC is an escaped data byte inside
                # it and anything else is malformed, and both are dropped with the payload.
                self.position = _DATA if data[pos] == SE else _SB
                pos += 1
            elif position == _SKIP:
                # The option byte of a request read before this connection was handed over
                # from a version that kept no option state: it cannot be answered rightly.
                self.position = _DATA
                pos += 1
            else:
                self.position = _DATA
                self._negotiate(_POSITION_VERB[position], data[pos])
                pos += 1
        return n

    def _command(self, byte: int, sink: LineSink) -> None:
        if byte == IAC:
            self.position = _DATA
            sink.take_data(_DATA_FF, 0, 1)
            return
        if WILL <= byte <= DONT:
            self.position = _VERB_POSITION[byte]
            return
        if byte == SB:
            self.position = _SB
            return
        self.position = _DATA
        if self._mode == OFF:
            return
        if byte in _REPAIR and sink.ends_inside_char():
            sink.take_data(_REPAIR_BYTES[byte], 0, 1)
        elif byte == IP:
            sink.erase_line()
            sink.notice(INTERRUPT_HINT, True)
        elif byte == BRK or byte == SUSP or byte == ABORT:
            sink.notice(INTERRUPT_HINT, True)
        elif byte == AYT:
            # Asked from the client's `telnet>` prompt, after which the cursor is at the
            # start of a row; an interrupt key is echoed (`^C`) and leaves it mid-row.
            sink.notice(AYT_ANSWER, False)
        elif byte == EC:
            sink.erase_char()
        elif byte == EL:
            sink.erase_line()
        # AO outside a character, NOP, GA, DM (the end of a Synch), EOR, EOF, a stray SE and
        # unassigned codes: nothing to do.

    # -- options (RFC 1143) -------------------------------------------------------------------

    def _get(self, option: int) -> int:
        if option == BINARY:
            return self._binary
        return self._options.get(option, 0) if self._options else 0

    def _put(self, option: int, packed: int) -> None:
        if option == BINARY:
            self._binary = packed
        elif self._options is None:
            self._options = {option: packed}
        else:
            self._options[option] = packed

    def _greet(self) -> None:
        self._greeted = True
        self._ask(BINARY, _HIM, DO)

    def _send(self, verb: int, option: int) -> None:
        if self._reply is None:
            self._reply = bytearray()
        self._reply += bytes((IAC, verb, option))

    def _negotiate(self, verb: int, option: int) -> None:
        if self._mode == OFF:
            return
        if option == TIMING_MARK and (verb == DO or verb == DONT):
            # RFC 860: the client stops showing output until the mark comes back, so it is
            # answered every time, at once, and leaves no state behind. DONT needs nothing.
            if verb == DO:
                self._send(WILL, TIMING_MARK)
            return
        if verb == WILL or verb == WONT:
            # Only BINARY from the client: it makes BSD-derived clients send 8-bit bytes.
            self._receive(option, _HIM, verb == WILL, option == BINARY, DO, DONT)
        else:
            # Nothing the client could ask us to do is accepted: BINARY from the server turns
            # off the client's output processing (every line is indented), ECHO and SGA put it
            # in character mode (backspace arrives as DEL, lines end in CR NUL).
            self._receive(option, _US, verb == DO, False, WILL, WONT)

    def _receive(self, option: int, shift: int, enable: bool, agree: bool, yes: int, no: int) -> None:
        """RFC 1143 on receiving WILL/DO (`enable`) or WONT/DONT for one direction of `option`.

        `shift` picks the direction's bits (_HIM: the client's option, _US: ours); `yes` and
        `no` are the verbs that answer for it (DO/DONT, or WILL/WONT). An answer to a request
        the client started (enable while NO, disable while YES) counts against MAX_ANSWERS;
        past it, enabling is refused and disabling applied, both without a word.
        """
        packed = self._get(option)
        side = packed >> shift & _SIDE_MASK
        state, opposite, answers = side & 3, bool(side & _OPPOSITE), side >> 3
        send = 0
        if enable:
            if state == _NO:
                if answers >= MAX_ANSWERS:
                    return
                answers += 1
                if agree:
                    state, send = _YES, yes
                else:
                    send = no
            elif state == _WANTNO:
                # Without a queued change this is an error (DONT answered by WILL); the
                # option stays off. With one, the client's WILL is what we now want.
                state, opposite = (_YES if opposite else _NO), False
            elif state == _WANTYES:
                if opposite:
                    state, opposite, send = _WANTNO, False, no
                else:
                    state = _YES
            # YES: already on; an acknowledgement is never answered.
        else:
            if state == _YES:
                state = _NO
                if answers < MAX_ANSWERS:
                    answers += 1
                    send = no
            elif state == _WANTNO:
                if opposite:
                    state, opposite, send = _WANTYES, False, yes
                else:
                    state = _NO
            elif state == _WANTYES:
                state, opposite = _NO, False
            # NO: already off; nothing to say.
        side = state | (_OPPOSITE if opposite else 0) | answers << 3
        self._put(option, packed & ~(_SIDE_MASK << shift) | side << shift)
        if send:
            self._send(send, option)

    def _ask(self, option: int, shift: int, yes: int) -> None:
        """RFC 1143: we want one direction of `option` enabled (`yes` asks for it)."""
        packed = self._get(option)
        side = packed >> shift & _SIDE_MASK
        state = side & 3
        if state == _NO:
            side = side & ~3 | _WANTYES
            self._send(yes, option)
        elif state == _WANTNO:
            side |= _OPPOSITE
        elif state == _WANTYES:
            side &= ~_OPPOSITE
        # YES: already enabled.
        self._put(option, packed & ~(_SIDE_MASK << shift) | side << shift)

    # -- handing a connection over ---------------------------------------------------------

    def state(self) -> dict[str, object]:
        """A JSON-serialisable snapshot: mode, parser position, every option touched.

        It holds no reply bytes: callers take them after every feed, so there are none
        between reads.
        """
        if self._reply is not None:
            raise ValueError("telnet state: take_reply() before state(), the reply would be lost")
        touched = dict(self._options or {})
        if self._binary:
            touched[BINARY] = self._binary
        options = []
        for number, packed in sorted(touched.items()):
            entry: dict[str, object] = {"option": number}
            for name, shift in (("him", _HIM), ("us", _US)):
                side = packed >> shift & _SIDE_MASK
                entry[name] = _Q_NAMES[side & 3]
                entry[f"{name}_opposite"] = bool(side & _OPPOSITE)
                entry[f"{name}_answers"] = side >> 3
            options.append(entry)
        return {
            "format": _STATE_FORMAT,
            "mode": self._mode,
            "greeted": self._greeted,
            "position": _POSITION_NAMES[self.position],
            "options": options,
        }

    @classmethod
    def from_state(cls, state: Mapping[str, object]) -> TelnetParser:
        """Rebuild a parser from a state() snapshot; ValueError if it is not one."""
        if state.get("format") != _STATE_FORMAT:
            raise ValueError(
                f"telnet state has format {state.get('format')!r}, expected {_STATE_FORMAT}; "
                "it was written by an incompatible chatcluster version"
            )
        mode = _field(state, "mode", str)
        if mode not in MODES:
            raise ValueError(f"telnet state: unknown mode {mode!r}")
        parser = cls(mode)
        parser._greeted = _field(state, "greeted", bool)
        parser.position = _name(_POSITION_NAMES, _field(state, "position", str), "position")
        entries = state.get("options")
        if not isinstance(entries, list):
            raise ValueError(f"telnet state field 'options' must be a list, got {entries!r}")
        parser._binary = _NO
        seen: set[int] = set()
        for entry in entries:
            if not isinstance(entry, Mapping):
                raise ValueError(f"telnet state: option entry {entry!r} is not an object")
            number = _field(entry, "option", int)
            if not 0 <= number <= 255 or number in seen:
                raise ValueError(f"telnet state: bad or repeated option number {number!r}")
            seen.add(number)
            packed = 0
            for name, shift in (("him", _HIM), ("us", _US)):
                answers = _field(entry, f"{name}_answers", int)
                if not 0 <= answers <= MAX_ANSWERS:
                    raise ValueError(f"telnet state: {name}_answers={answers} is out of range")
                side = _name(_Q_NAMES, _field(entry, name, str), name) | answers << 3
                if _field(entry, f"{name}_opposite", bool):
                    side |= _OPPOSITE
                packed |= side << shift
            parser._put(number, packed)
        return parser

    @classmethod
    def from_legacy_position(cls, position: str, mode: str) -> TelnetParser:
        """A parser for a line reader snapshot of format 1, which kept only a parser position.

        That connection was never sent the greeting and holds no option state, so any mode
        but `off` continues as `on-iac`: the client is asked for BINARY at its first IAC.
        A pending option byte is skipped unanswered, as the old version would have done.
        """
        parser = cls(OFF if check_mode(mode) == OFF else ON_IAC)
        legacy = {"data": _DATA, "iac": _IAC, "option": _SKIP, "subneg": _SB, "subneg_iac": _SB_IAC}
        if position not in legacy:
            raise ValueError(f"line reader state: unknown telnet state {position!r}")
        parser.position = legacy[position]
        return parser

    def __repr__(self) -> str:
        return (
            f"TelnetParser(mode={self._mode!r}, position={_POSITION_NAMES[self.position]}, "
            f"greeted={self._greeted}, options={len(self._options or ()) + bool(self._binary)})"
        )


def _field(state: Mapping[str, object], key: str, kind: type[_T]) -> _T:
    value = state.get(key)
    # bool is an int subclass: a flag must not pass for a number.
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise ValueError(f"telnet state field {key!r} must be {kind.__name__}, got {value!r}")
    return value


def _name(names: tuple[str, ...], value: str, what: str) -> int:
    if value not in names:
        raise ValueError(f"telnet state: unknown {what} {value!r}")
    return names.index(value)

