"""Specification of chatcluster.telnet: negotiation, commands and repairs, through the line reader.

Every case gives the exact events and the exact reply bytes, and is checked as the protocol
tests check lines: fed whole, split into two reads at every position, one byte at a time, one
event of budget at a time, and handed to another process (a JSON snapshot) at every position;
a reference model written as the simplest per-byte code must agree with each. The bytes real
clients send come from tests/client_bytes.py, measured on the clients themselves.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from collections.abc import Callable

import pytest
from client_bytes import (
    BUSYBOX_WONT_BINARY,
    INETUTILS_7BIT_LINES,
    INETUTILS_7BIT_SAMPLE,
    INETUTILS_CTRL_C,
    INETUTILS_CTRL_Z,
    INETUTILS_WILL_BINARY,
    LONG,
    PLINK_AFTER_ANSWERS,
    PLINK_OPENING,
    SAMPLE,
    SENT,
    inetutils_sample_switching_to_binary,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from chatcluster import telnet as T
from chatcluster.protocol import Event, Line, LineReader, LineTooLong, Notice, sanitize

IAC, DONT, DO, WONT, WILL, SB, GA, EL, EC, AYT, AO, IP, BRK, DM, NOP, SE = (
    b"\xff", b"\xfe", b"\xfd", b"\xfc", b"\xfb", b"\xfa", b"\xf9", b"\xf8", b"\xf7", b"\xf6", b"\xf5", b"\xf4",
    b"\xf3", b"\xf2", b"\xf1", b"\xf0",
)  # fmt: skip
EOR, ABORT, SUSP, EOF = b"\xef", b"\xee", b"\xed", b"\xec"
BINARY, ECHO, SGA, TM, NAWS, TTYPE = b"\x00", b"\x01", b"\x03", b"\x06", b"\x1f", b"\x18"

GREETING = IAC + DO + BINARY + b"\r\0"
HINT = Notice("*** (Ctrl-C and Ctrl-Z do nothing here: type /quit to leave)", new_row=True)
YES = Notice("*** [Yes]")
WILL_TM = IAC + WILL + TM
UNLIMITED = sys.maxsize
MODES = ("always", "on-iac", "off")
PROPERTY = settings(max_examples=300, deadline=None)


def neg(verb: bytes, option: bytes | int) -> bytes:
    return IAC + verb + (bytes([option]) if isinstance(option, int) else option)


# ---------------------------------------------------------------------------
# Helpers


def reader(mode: str, limit: int = 512) -> tuple[LineReader, bytes]:
    """A reader as the worker makes one at connect: returns it and the greeting it sent."""
    r = LineReader(limit, telnet=mode)
    return r, r.greeting()


def run(chunks: list[bytes], mode: str, limit: int = 512) -> tuple[list[Event], bytes]:
    """Feed `chunks` as separate reads; the events and the reply bytes after the greeting."""
    r, _ = reader(mode, limit)
    events: list[Event] = []
    reply = b""
    for chunk in chunks:
        got, used, rep = r.receive(chunk, UNLIMITED)
        assert used == len(chunk)
        events += got
        reply += rep
    return events, reply


def run_with_budgets(data: bytes, budgets: list[int], mode: str, limit: int = 512) -> tuple[list[Event], bytes]:
    """Feed `data` as a throttled client is fed: at most the budget, the rest kept for later."""
    r, _ = reader(mode, limit)
    events: list[Event] = []
    reply = b""
    rest = data
    for budget in budgets:
        got, used, rep = r.receive(rest, budget)
        assert len(got) <= budget and 0 <= used <= len(rest)
        events += got
        reply += rep
        rest = rest[used:]
    got, used, rep = r.receive(rest, UNLIMITED)
    assert used == len(rest)
    return events + got, reply + rep


def run_with_handover(data: bytes, k: int, mode: str, limit: int = 512) -> tuple[list[Event], bytes]:
    """Read data[:k], move the reader through JSON as an upgrade does, read the rest in the copy."""
    first, _ = reader(mode, limit)
    events, _, reply = first.receive(data[:k], UNLIMITED)
    second = LineReader.from_state(json.loads(json.dumps(first.state())))
    more, _, rep = second.receive(data[k:], UNLIMITED)
    return events + more, reply + rep


def splits(data: bytes) -> list[list[bytes]]:
    return [[data[:k], data[k:]] for k in range(len(data) + 1)]


def bytewise(data: bytes) -> list[bytes]:
    return [data[i : i + 1] for i in range(len(data))]


# ---------------------------------------------------------------------------
# The reference model: the specification as the simplest code, one byte at a time.

_REPAIR = {0xF4: 0x83, 0xF3: 0x9C, 0xED: 0x9A, 0xF5: 0x8F}


def _needs(lead: int) -> int:
    return 1 if 0xC2 <= lead <= 0xDF else 2 if 0xE0 <= lead <= 0xEF else 3 if 0xF0 <= lead <= 0xF4 else 0


def _is_cont(byte: int) -> bool:
    return 0x80 <= byte <= 0xBF


def _inside(line: bytearray) -> bool:
    """Some lead byte near the end announces more continuation bytes than follow it."""
    return any(
        len(line) >= k and k - 1 < _needs(line[-k]) and all(_is_cont(c) for c in line[len(line) - k + 1 :])
        for k in (1, 2, 3)
    )


def _erase(line: bytearray) -> None:
    for k in (2, 3, 4):
        if len(line) >= k and _needs(line[-k]) >= k - 1 and all(_is_cont(c) for c in line[len(line) - k + 1 :]):
            del line[-k:]
            return
    if line:
        del line[-1]


def reference(data: bytes, mode: str, limit: int = 512) -> tuple[list[Event], bytes]:
    events: list[Event] = []
    reply = bytearray()
    line = bytearray()
    dropping = after_cr = False
    negotiating = mode != "off"
    greeted = mode != "on-iac"
    him = {0: "wantyes"} if mode == "always" else {}
    answers: Counter[tuple[str, int]] = Counter()

    def data_byte(b: int) -> None:
        nonlocal dropping, after_cr
        if after_cr:
            after_cr = False
            if b in (0x0A, 0x00):
                return
        if b in (0x0D, 0x0A):
            if not dropping:
                events.append(Line(sanitize(line.decode("utf-8", "replace"))))
            line.clear()
            dropping = False
            after_cr = b == 0x0D
        elif not dropping:
            line.append(b)
            if len(line) > limit:
                events.append(LineTooLong(limit))
                line.clear()
                dropping = True

    def answer(side: str, opt: int, verb: int) -> bool:
        if answers[side, opt] >= T.MAX_ANSWERS:
            return False
        answers[side, opt] += 1
        reply.extend((0xFF, verb, opt))
        return True

    def negotiate(verb: int, opt: int) -> None:
        if opt == 6 and verb in (0xFD, 0xFE):
            if verb == 0xFD:
                reply.extend(WILL_TM)
        elif verb == 0xFB:
            state = him.get(opt, "no")
            if state == "wantyes":
                him[opt] = "yes"
            elif state == "no" and answer("him", opt, 0xFD if opt == 0 else 0xFE) and opt == 0:
                him[opt] = "yes"
        elif verb == 0xFC:
            state = him.get(opt, "no")
            if state == "yes":
                him[opt] = "no"
                answer("him", opt, 0xFE)
            elif state == "wantyes":
                him[opt] = "no"
        elif verb == 0xFD:
            answer("us", opt, 0xFC)

    def command(b: int) -> None:
        nonlocal dropping
        if b in _REPAIR and _inside(line):
            data_byte(_REPAIR[b])
        elif b == 0xF4:
            line.clear()
            dropping = False
            events.append(HINT)
        elif b in (0xF3, 0xED, 0xEE):
            events.append(HINT)
        elif b == 0xF6:
            events.append(YES)
        elif b == 0xF7:
            _erase(line)
        elif b == 0xF8:
            line.clear()
            dropping = False

    state: object = "data"
    for b in data:
        if state == "data":
            if b == 0xFF:
                state = "iac"
                if negotiating and not greeted:
                    greeted = True
                    him[0] = "wantyes"
                    reply.extend(IAC + DO + BINARY)
            else:
                data_byte(b)
        elif state == "iac":
            state = "data"
            if b == 0xFF:
                data_byte(b)
            elif 0xFB <= b <= 0xFE:
                state = b
            elif b == 0xFA:
                state = "sb"
            elif negotiating:
                command(b)
        elif state == "sb":
            if b == 0xFF:
                state = "sb_iac"
        elif state == "sb_iac":
            state = "data" if b == 0xF0 else "sb"
        else:
            assert isinstance(state, int)
            if negotiating:
                negotiate(state, b)
            state = "data"
    return events, bytes(reply)


# ---------------------------------------------------------------------------
# The cases: (mode, input, expected events, expected reply after the greeting)



def case(mode: str, data: bytes, events: list[Event], reply: bytes, *, id: str, limit: int = 512) -> object:
    return pytest.param(mode, data, limit, events, reply, id=id)


OTHER = b"\x2a"  # an option nobody supports
CASES = [
    # Options the client performs (it sends WILL/WONT).
    case("always", neg(WILL, BINARY) + b"hi\n", [Line("hi")], b"", id="will-binary-after-our-do-is-silent"),
    case("always", neg(WONT, BINARY) + b"hi\n", [Line("hi")], b"", id="wont-binary-after-our-do-is-silent"),
    case("always", neg(WILL, BINARY) + neg(WONT, BINARY), [], neg(DONT, BINARY), id="wont-while-yes-gets-dont"),
    case("always", neg(WONT, BINARY) + neg(WILL, BINARY), [], neg(DO, BINARY), id="unsolicited-will-binary-gets-do"),
    case("always", neg(WILL, BINARY) * 3, [], b"", id="repeated-will-binary-is-not-answered"),
    case("always", neg(WILL, ECHO) + neg(WILL, SGA) + neg(WILL, NAWS), [],
         neg(DONT, ECHO) + neg(DONT, SGA) + neg(DONT, NAWS), id="every-other-will-gets-dont"),
    case("always", neg(WONT, ECHO) + neg(WONT, OTHER), [], b"", id="wont-for-an-option-off-gets-nothing"),
    # Options the server performs (the client sends DO/DONT).
    case("always", neg(DO, BINARY), [], neg(WONT, BINARY), id="do-binary-gets-wont"),
    case("always", neg(DO, ECHO) + neg(DO, SGA) + neg(DO, OTHER), [],
         neg(WONT, ECHO) + neg(WONT, SGA) + neg(WONT, OTHER), id="every-other-do-gets-wont"),
    case("always", neg(DONT, ECHO) + neg(DONT, BINARY), [], b"", id="dont-for-an-option-off-gets-nothing"),
    # TIMING-MARK: answered every time, no state.
    case("always", neg(DO, TM) * 6, [], WILL_TM * 6, id="do-timing-mark-always-answered"),
    case("always", neg(DONT, TM) + neg(WONT, TM), [], b"", id="dont-wont-timing-mark-ignored"),
    case("always", neg(WILL, TM), [], neg(DONT, TM), id="will-timing-mark-gets-dont"),
    # Commands.
    case("always", b"ab" + IAC + AYT + b"c\n", [YES, Line("abc")], b"", id="ayt-answers-yes"),
    case("always", b"abc" + IAC + IP + b"def\n", [HINT, Line("def")], b"", id="ip-discards-the-line"),
    case("always", b"ab" + IAC + BRK + b"c\n", [HINT, Line("abc")], b"", id="brk-hints-keeps-line"),
    case("always", b"ab" + IAC + SUSP + b"c\n", [HINT, Line("abc")], b"", id="susp-hints-keeps-line"),
    case("always", b"ab" + IAC + ABORT + b"c\n", [HINT, Line("abc")], b"", id="abort-hints-keeps-line"),
    case("always", IAC + IP + IAC + IP, [HINT, HINT], b"", id="one-hint-per-event"),
    case("always", b"abc" + IAC + EC + b"d\n", [Line("abd")], b"", id="ec-erases-a-character"),
    case("always", "xé".encode() + IAC + EC + b"\n", [Line("x")], b"", id="ec-erases-a-2-byte-character"),
    case("always", "x✓".encode() + IAC + EC + b"\n", [Line("x")], b"", id="ec-erases-a-3-byte-character"),
    case("always", "x😀".encode() + IAC + EC + b"\n", [Line("x")], b"", id="ec-erases-a-4-byte-character"),
    case("always", b"x\xe2\x9c" + IAC + EC + b"\n", [Line("x")], b"", id="ec-erases-an-unfinished-character"),
    case("always", b"x\xa9" + IAC + EC + b"\n", [Line("x")], b"", id="ec-erases-a-stray-continuation-byte"),
    case("always", IAC + EC + b"a\n", [Line("a")], b"", id="ec-on-an-empty-line"),
    case("always", b"a\n" + IAC + EC + b"b\n", [Line("a"), Line("b")], b"", id="ec-never-reaches-the-last-line"),
    case("always", b"abc" + IAC + EL + b"de\n", [Line("de")], b"", id="el-erases-the-line"),
    case("always", b"a" + IAC + AO + b"b" + IAC + NOP + b"c" + IAC + GA + b"d" + IAC + DM + b"e" + IAC + EOR
         + b"f" + IAC + EOF + b"g" + IAC + SE + b"h\n", [Line("abcdefgh")], b"", id="ignored-commands"),
    case("always", b"a" + IAC + b"\x01b\n", [Line("ab")], b"", id="unassigned-command-ignored"),
    case("always", b"a" + IAC + IAC + b"b\n", [Line("a\ufffdb")], b"", id="iac-iac-is-a-data-byte"),
    case("always", b"a" + IAC + SB + NAWS + b"\x00\x50\x00\x18" + IAC + SE + b"b\n", [Line("ab")], b"",
         id="subnegotiation-skipped"),
    case("always", b"a" + IAC + SB + TTYPE + IAC + IAC + b"\n" + IAC + IP + IAC + SE + b"b\n", [Line("ab")],
         b"", id="subnegotiation-skipped-with-escapes-and-commands-inside"),
    case("always", b"hi\r" + IAC + DO + TM + b"\n", [Line("hi")], WILL_TM, id="command-between-cr-and-lf"),
    # The 7-bit repair, with the bytes inetutils sends.
    case("always", bytes.fromhex("e2 fff3 fffd06 93") + b"\n", [Line("✓")], WILL_TM, id="repair-check-mark"),
    case("always", bytes.fromhex("c3 fff3 fffd06") + b"\n", [Line("Ü")], WILL_TM, id="repair-u-umlaut-brk"),
    case("always", bytes.fromhex("d1 fff4 fffd06") + b"\n", [Line("у")], WILL_TM, id="repair-cyrillic-u-ip"),
    case("always", bytes.fromhex("d0 ffed fffd06") + b"\n", [Line("К")], WILL_TM, id="repair-cyrillic-ka-susp"),
    case("always", bytes.fromhex("d1 fff5 fffd06") + b"\n", [Line("я")], WILL_TM, id="repair-cyrillic-ya-ao"),
    case("always", bytes.fromhex("f0 9f fff3") + b"\x80\n", [Line("\U0001f700")], b"",
         id="repair-inside-a-4-byte-character"),
    case("always", b"ab" + IAC + ABORT + b"\n", [HINT, Line("ab")], b"", id="abort-is-never-repaired"),
    case("always", b"\xe2" + IAC + ABORT + b"\n", [HINT, Line("\ufffd")], b"", id="abort-inside-a-character"),
    case("always", b"ab" + IAC + AO + b"\n", [Line("ab")], b"", id="ao-outside-a-character-ignored"),
    case("always", b"\xc3\xa9" + IAC + BRK + b"\n", [HINT, Line("é")], b"", id="after-a-whole-character-no-repair"),
    case("always", INETUTILS_7BIT_SAMPLE + b"\r\n", [Line(SAMPLE)], WILL_TM * 5, id="inetutils-7bit-sample"),
    case("always", b"xyz" + INETUTILS_CTRL_C + b"ok\r\n", [HINT, Line("ok")], WILL_TM, id="inetutils-ctrl-c"),
    case("always", b"xyz" + INETUTILS_CTRL_Z + b"ok\r\n", [HINT, Line("xyzok")], WILL_TM, id="inetutils-ctrl-z"),
    # Line limits with edits.
    case("always", b"1234567" + IAC + EC + b"89\n", [Line("12345689")], b"", id="ec-frees-room-under-the-limit",
         limit=8),
    case("always", b"123456789" + IAC + EL + b"ok\n", [LineTooLong(8), Line("ok")], b"",
         id="el-ends-a-too-long-line", limit=8),
    case("always", b"123456789" + IAC + IP + b"ok\n", [LineTooLong(8), HINT, Line("ok")], b"",
         id="ip-ends-a-too-long-line", limit=8),
    case("always", b"1234567\xe2" + IAC + BRK + b"\x93\n", [LineTooLong(8)], b"",
         id="repaired-byte-counts-towards-the-limit", limit=8),
    # on-iac: nothing until the client's first IAC, then DO BINARY ahead of everything else.
    case("on-iac", "é ✓\n".encode(), [Line("é ✓")], b"", id="on-iac-raw-client-gets-nothing"),
    case("on-iac", bytes.fromhex("e2 fff3 fffd06 93") + b"\n" + IAC + IP, [Line("✓"), HINT],
         neg(DO, BINARY) + WILL_TM, id="on-iac-first-iac-asks-for-binary"),
    case("on-iac", neg(WILL, BINARY) + neg(DO, TM), [], neg(DO, BINARY) + WILL_TM,
         id="on-iac-first-iac-is-will-binary"),
    case("on-iac", IAC + IAC + b"\n", [Line("\ufffd")], neg(DO, BINARY), id="on-iac-escaped-ff-counts"),
    case("on-iac", INETUTILS_7BIT_SAMPLE + b"\r\n" + INETUTILS_WILL_BINARY + b"hi\n",
         [Line(SAMPLE), Line("hi")], neg(DO, BINARY) + WILL_TM * 5, id="on-iac-inetutils-sample"),
    # off: today's protocol, commands removed and nothing answered.
    case("off", neg(DO, TM) + neg(WILL, BINARY) + neg(DO, ECHO) + b"hi\n", [Line("hi")], b"",
         id="off-answers-nothing"),
    case("off", b"abc" + IAC + EC + IAC + EL + IAC + IP + IAC + AYT + b"d\n", [Line("abcd")], b"",
         id="off-commands-do-nothing"),
    case("off", INETUTILS_7BIT_SAMPLE + b"\r\n", [Line("é \ufffd 世界 😀 \ufffd \ufffd \ufffd \ufffd")], b"",
         id="off-7bit-sample-is-not-repaired"),
    case("off", b"a" + IAC + IAC + b"b\n", [Line("a\ufffdb")], b"", id="off-iac-iac-is-data"),
]

ARGS = ("mode", "data", "limit", "events", "reply")


@pytest.mark.parametrize(ARGS, CASES)
def test_whole_input(mode: str, data: bytes, limit: int, events: list[Event], reply: bytes) -> None:
    assert run([data], mode, limit) == (events, reply)


@pytest.mark.parametrize(ARGS, CASES)
def test_every_split_point(mode: str, data: bytes, limit: int, events: list[Event], reply: bytes) -> None:
    for chunks in splits(data):
        assert run(chunks, mode, limit) == (events, reply), chunks


@pytest.mark.parametrize(ARGS, CASES)
def test_one_byte_at_a_time(mode: str, data: bytes, limit: int, events: list[Event], reply: bytes) -> None:
    assert run(bytewise(data), mode, limit) == (events, reply)


@pytest.mark.parametrize(ARGS, CASES)
def test_one_event_of_budget_at_a_time(mode: str, data: bytes, limit: int, events: list[Event], reply: bytes) -> None:
    assert run_with_budgets(data, [1] * (len(data) + 2), mode, limit) == (events, reply)


@pytest.mark.parametrize(ARGS, CASES)
def test_handover_at_every_point(mode: str, data: bytes, limit: int, events: list[Event], reply: bytes) -> None:
    for k in range(len(data) + 1):
        assert run_with_handover(data, k, mode, limit) == (events, reply), k


@pytest.mark.parametrize(ARGS, CASES)
def test_reference_model_agrees(mode: str, data: bytes, limit: int, events: list[Event], reply: bytes) -> None:
    assert reference(data, mode, limit) == (events, reply)


# ---------------------------------------------------------------------------
# Connecting


def test_always_greets_with_do_binary_then_cr_nul() -> None:
    r = LineReader(telnet="always")
    assert r.greeting() == GREETING == T.GREETING == b"\xff\xfd\x00\r\x00"
    assert r.telnet.him_state(0) == "wantyes"


def test_a_reader_starts_as_the_greeting_left_it() -> None:
    # The worker sends the greeting at connect and may make the reader only at the first read.
    r = LineReader(telnet="always")
    assert r.receive(neg(WONT, BINARY) + neg(DO, TM), 5) == ([], 6, WILL_TM)
    assert r.telnet.him_state(0) == "no"


@pytest.mark.parametrize("mode", ["on-iac", "off"])
def test_only_always_greets(mode: str) -> None:
    assert LineReader(telnet=mode).greeting() == b""


def test_on_iac_asks_for_binary_once() -> None:
    r, _ = reader("on-iac")
    assert r.receive(b"hello\n", 9)[2] == b""
    assert r.receive(IAC + NOP, 9)[2] == neg(DO, BINARY)
    assert r.receive(IAC + NOP + IAC + AYT, 9)[2] == b""
    assert r.telnet.him_state(0) == "wantyes"


def test_off_never_sends_a_byte() -> None:
    r, greeting = reader("off")
    every = b"".join(neg(v, o) for v in (WILL, WONT, DO, DONT) for o in range(256))
    commands = b"".join(IAC + bytes([c]) for c in range(0xEC, 0xFA))
    assert greeting == b"" and r.receive(every + commands + b"x\n", UNLIMITED) == ([Line("x")], len(every)
                                                                                 + len(commands) + 2, b"")


@pytest.mark.parametrize("bad", ["yes", "", "ALWAYS", "on_iac"])
def test_an_unknown_mode_is_refused_naming_the_choices(bad: str) -> None:
    with pytest.raises(ValueError, match="always, on-iac, off"):
        LineReader(telnet=bad)


# ---------------------------------------------------------------------------
# Every option, both directions


@pytest.mark.parametrize("mode", ["always", "on-iac"])
def test_every_option_but_binary_and_timing_mark_is_refused(mode: str) -> None:
    for option in range(256):
        r, _ = reader(mode)
        r.receive(IAC + NOP, 1)  # on-iac: the DO BINARY goes out first
        r.receive(neg(WONT, BINARY), 1)  # and is declined, so only the request below is answered
        will = r.receive(neg(WILL, option), 1)[2]
        do = r.receive(neg(DO, option), 1)[2]
        if option == 0:
            assert (will, do) == (neg(DO, 0), neg(WONT, 0))
        elif option == 6:
            assert (will, do) == (neg(DONT, 6), neg(WILL, 6))
        else:
            assert (will, do) == (neg(DONT, option), neg(WONT, option)), option
        assert r.receive(neg(WONT, option) + neg(DONT, option), 1)[2] == (neg(DONT, 0) if option == 0 else b"")


def test_the_server_never_offers_echo_or_suppress_go_ahead() -> None:
    r, greeting = reader("always")
    everything = b"".join(neg(v, o) for _ in range(6) for v in (WILL, WONT, DO, DONT) for o in range(256))
    reply = greeting + r.receive(everything, UNLIMITED)[2]
    triples = [reply[i : i + 3] for i in range(0, len(reply) - 2) if reply[i] == 0xFF]
    assert neg(WILL, ECHO) not in triples and neg(WILL, SGA) not in triples
    assert {t for t in triples if t[1:2] == WILL} == {WILL_TM}


# ---------------------------------------------------------------------------
# RFC 1143's table, both directions: (state, queue, received, option accepted) -> (state, queue, sent)

Q_TABLE = [
    ("no", False, True, True, "yes", False, "yes"),
    ("no", False, True, False, "no", False, "no"),
    ("yes", False, True, True, "yes", False, None),
    ("wantno", False, True, True, "no", False, None),
    ("wantno", True, True, True, "yes", False, None),
    ("wantyes", False, True, True, "yes", False, None),
    ("wantyes", True, True, True, "wantno", False, "no"),
    ("no", False, False, True, "no", False, None),
    ("yes", False, False, True, "no", False, "no"),
    ("wantno", False, False, True, "no", False, None),
    ("wantno", True, False, True, "wantyes", False, "yes"),
    ("wantyes", False, False, True, "no", False, None),
    ("wantyes", True, False, True, "no", False, None),
]


def parser_with(option: int, side: str, state: str, opposite: bool) -> LineReader:
    entry = {"option": option, "him": "no", "him_opposite": False, "him_answers": 0,
             "us": "no", "us_opposite": False, "us_answers": 0}
    entry[side], entry[f"{side}_opposite"] = state, opposite
    r, _ = reader("always")
    snapshot = r.state()
    snapshot["telnet"] = {**snapshot["telnet"], "options": [entry]}  # type: ignore[dict-item]
    return LineReader.from_state(snapshot)


# The server accepts no option of its own, so "us" has no row where it agrees to enable one.
Q_CASES = [("him", *row) for row in Q_TABLE] + [("us", *row) for row in Q_TABLE if row[:4] != ("no", False, True, True)]


@pytest.mark.parametrize(("side", "state", "opposite", "enable", "accepted", "after", "after_opposite", "sent"),
                         Q_CASES)
def test_q_method_table(side: str, state: str, opposite: bool, enable: bool, accepted: bool, after: str,
                        after_opposite: bool, sent: str | None) -> None:
    # Only BINARY from the client is accepted; an option nobody supports plays the table's
    # "we do not agree" rows.
    option = 0 if side == "him" and accepted else 0x2A
    verbs = {"him": (WILL, WONT, DO, DONT), "us": (DO, DONT, WILL, WONT)}[side]
    r = parser_with(option, side, state, opposite)
    reply = r.receive(neg(verbs[0] if enable else verbs[1], option), 1)[2]
    expected = {None: b"", "yes": neg(verbs[2], option), "no": neg(verbs[3], option)}[sent]
    assert reply == expected
    options = r.state()["telnet"]["options"]  # type: ignore[index]
    got = next((o for o in options if o["option"] == option), None)  # an untouched option is left out
    assert ((got[side], got[f"{side}_opposite"]) if got else ("no", False)) == (after, after_opposite)


# ---------------------------------------------------------------------------
# No loops, bounded answers


def other_side(reply: bytes, policy: Callable[[int, int], bytes | None]) -> bytes:
    """What a misbehaving client sends back for each negotiation in `reply`."""
    out = b""
    for i in range(0, len(reply) - 2):
        if reply[i] == 0xFF and 0xFB <= reply[i + 1] <= 0xFE:
            answer = policy(reply[i + 1], reply[i + 2])
            out += answer or b""
    return out


ACK = {0xFD: WILL, 0xFE: WONT, 0xFB: DO, 0xFC: DONT}  # agrees to everything, acknowledges acknowledgements
CONTRADICT = {0xFD: WONT, 0xFE: WILL, 0xFB: DONT, 0xFC: DO}  # says the opposite of everything
INSIST = {0xFE: WILL, 0xFC: DO}  # asks again whenever refused


@pytest.mark.parametrize("policy", [ACK, CONTRADICT, INSIST], ids=["ack", "contradict", "insist"])
@pytest.mark.parametrize("mode", ["always", "on-iac"])
def test_a_client_answering_every_answer_cannot_start_a_loop(mode: str, policy: dict[int, bytes]) -> None:
    r, sent = reader(mode)
    incoming = PLINK_OPENING + neg(WILL, OTHER) + neg(DO, OTHER) + neg(DO, BINARY)
    rounds = 0
    while incoming:
        rounds += 1
        assert rounds <= 2 * T.MAX_ANSWERS + 2, f"still negotiating after {rounds} rounds"
        sent = r.receive(incoming, UNLIMITED)[2]
        incoming = other_side(sent, lambda verb, opt: policy[verb] + bytes([opt]) if verb in policy else None)


def test_a_refused_request_is_answered_at_most_max_answers_times() -> None:
    r, _ = reader("always")
    reply = r.receive((neg(WILL, OTHER) + neg(DO, OTHER)) * 50, UNLIMITED)[2]
    assert reply == (neg(DONT, OTHER) + neg(WONT, OTHER)) * T.MAX_ANSWERS


def test_after_the_limit_a_disable_is_still_applied() -> None:
    r, _ = reader("always")
    toggles = neg(WILL, BINARY) + (neg(WONT, BINARY) + neg(WILL, BINARY)) * 10
    r.receive(toggles, UNLIMITED)
    assert r.telnet.him_state(0) == "no"  # the last WILL was past the limit: refused, silently
    r.receive(neg(WONT, BINARY), 1)
    assert r.telnet.him_state(0) == "no"


def test_a_flood_of_requests_gets_a_bounded_answer() -> None:
    r, greeting = reader("always")
    flood = b"".join(neg(v, o) for v in (WILL, DO) for o in range(256) if o != 6) * 40
    total = 0
    for i in range(0, len(flood), 4096):  # as the worker would read it
        total += len(r.receive(flood[i : i + 4096], UNLIMITED)[2])
    assert total <= 2 * 256 * T.MAX_ANSWERS * 3
    assert r.receive(flood, UNLIMITED)[2] == b""  # and nothing more once every answer is given


def test_timing_marks_are_answered_one_for_one() -> None:
    r, _ = reader("always")
    flood = neg(DO, TM) * 10_000
    assert r.receive(flood, UNLIMITED)[2] == WILL_TM * 10_000  # never more bytes than came in


def test_ayt_and_interrupts_cost_flood_budget() -> None:
    r, _ = reader("always")
    flood = (IAC + AYT + IAC + IP) * 100
    events, used, _ = r.receive(flood, 3)
    assert events == [YES, HINT, YES] and used <= 7  # the IAC of the fourth may be read, not its command
    more, _, _ = r.receive(flood[used:], 1)
    assert more == [HINT]


def test_a_timing_mark_after_ip_is_answered_even_when_the_budget_is_spent() -> None:
    r, _ = reader("always")
    events, used, reply = r.receive(INETUTILS_CTRL_C + b"next\n", 1)
    assert events == [HINT] and reply == WILL_TM and used == len(INETUTILS_CTRL_C)


# ---------------------------------------------------------------------------
# What the real clients send (measured: tests/client_bytes.py)

LINES = {"ascii": [Line("hello there")], "sample": [Line(SAMPLE)], "backspace": [Line("abXY")],
         "long": [Line(LONG)]}


@pytest.mark.parametrize(("client", "mode"), [k for k in SENT if k[1] is not None])
def test_each_real_client_session_reads_as_typed(client: str, mode: str) -> None:
    r, _ = reader(mode, limit=1024)
    session = SENT[client, mode]
    interrupt = client == "inetutils"  # the only one that sends Ctrl-C and Ctrl-Z to the server
    for action, data in session.items():
        if action == "enter":
            continue
        events, used, reply = r.receive(data, UNLIMITED)
        assert used == len(data)
        if action in LINES:
            assert events == LINES[action], action
        elif action in ("ctrl-c", "ctrl-z"):
            assert events == ([HINT] if interrupt else []), action
            assert reply == (WILL_TM if interrupt else b""), action
        else:
            assert events == []


@pytest.mark.parametrize("variant", inetutils_sample_switching_to_binary())
def test_inetutils_switching_to_binary_anywhere_in_the_line_reads_as_typed(variant: bytes) -> None:
    for chunks in splits(variant):
        events, reply = run(chunks, "on-iac")
        assert events == [Line(SAMPLE)]
        assert reply == neg(DO, BINARY) + WILL_TM * variant.count(neg(DO, TM))


def test_plink_opening_gets_refusals_and_one_binary() -> None:
    r, greeting = reader("always")
    reply = r.receive(PLINK_OPENING, UNLIMITED)[2]
    assert greeting == GREETING
    assert reply == (neg(DONT, NAWS) + neg(DONT, b"\x20") + neg(DONT, TTYPE) + neg(DONT, b"\x27") + neg(WONT, ECHO)
                     + neg(DONT, SGA) + neg(WONT, SGA))
    assert r.receive(PLINK_AFTER_ANSWERS, UNLIMITED)[2] == neg(DONT, b"\x24")
    assert r.telnet.him_state(0) == "yes"


def test_busybox_declining_binary_gets_no_answer() -> None:
    r, _ = reader("always")
    assert r.receive(BUSYBOX_WONT_BINARY, 1) == ([], 3, b"")
    assert r.telnet.him_state(0) == "no"


def test_inetutils_7bit_sample_in_every_split_is_repaired() -> None:
    data = INETUTILS_7BIT_SAMPLE + b"\r\n"
    for chunks in splits(data):
        assert run(chunks, "always") == ([Line(SAMPLE)], WILL_TM * 5)


def test_characters_inetutils_loses_without_binary_stay_lost() -> None:
    # ą's second byte never leaves the client, so nothing can put it back; always avoids it.
    assert run([INETUTILS_7BIT_LINES["ą a"]], "on-iac") == ([Line("\ufffd a")], b"")
    assert run([INETUTILS_7BIT_LINES["eĕ"]], "on-iac") == ([Line("eĕ")], b"")


# ---------------------------------------------------------------------------
# Output


def test_escape_output_doubles_iac() -> None:
    assert T.escape_output(b"a\xffb\xff\xff") == b"a\xff\xffb\xff\xff\xff\xff"


def test_escape_output_without_iac_returns_the_same_object() -> None:
    data = "héllo 世界\r\n".encode() * 100
    assert T.escape_output(data) is data


@PROPERTY
@given(st.binary(max_size=300))
def test_escaped_output_reads_back_as_the_same_bytes(data: bytes) -> None:
    # A telnet receiver (ours, off) sees exactly the bytes escaped, whatever they are.
    r = LineReader(1 << 20)
    r.receive(T.escape_output(data) + b"\n", UNLIMITED)
    r2 = LineReader(1 << 20)
    r2.receive(T.escape_output(data.replace(b"\r", b"").replace(b"\n", b"")), UNLIMITED)
    assert r2.pending_bytes() == data.replace(b"\r", b"").replace(b"\n", b"")


# ---------------------------------------------------------------------------
# Handing a connection over


FORMAT_1 = {"format": 1, "max_line_bytes": 512, "partial": "aGFsZiBhIGxp", "telnet": "data", "discard": False,
            "after_cr": False, "overflowed": False}


def test_format_1_snapshot_continues_its_line() -> None:
    r = LineReader.from_state(FORMAT_1)
    assert r.receive(b"ne\n", 5) == ([Line("half a line")], 3, b"")
    assert r.telnet.mode == "off"


@pytest.mark.parametrize("setting", ["always", "on-iac"])
def test_format_1_snapshot_under_negotiation_asks_at_the_first_iac(setting: str) -> None:
    # That client was never greeted: asking mid-session would show stray bytes on nc.
    r = LineReader.from_state(FORMAT_1, telnet=setting)
    assert r.telnet.mode == "on-iac" and r.greeting() == b""
    assert r.receive(b"ne\n", 5) == ([Line("half a line")], 3, b"")
    assert r.receive(INETUTILS_CTRL_C, 5) == ([HINT], 5, neg(DO, BINARY) + WILL_TM)


@pytest.mark.parametrize(("position", "rest", "events", "reply"), [
    ("iac", AYT + b"x\n", [YES, Line("x")], b""),
    ("option", TM + b"x\n", [Line("x")], b""),  # the verb was not kept: skipped, not answered
    ("subneg", b"\x18xterm" + IAC + SE + b"x\n", [Line("x")], b""),
    ("subneg_iac", SE + b"x\n", [Line("x")], b""),
])
def test_format_1_snapshot_mid_command_resumes_it(position: str, rest: bytes, events: list[Event],
                                                  reply: bytes) -> None:
    r = LineReader.from_state({**FORMAT_1, "partial": "", "telnet": position}, telnet="always")
    assert r.receive(rest, UNLIMITED) == (events, len(rest), reply)


def test_snapshot_keeps_mode_options_and_position() -> None:
    r, _ = reader("always")
    r.receive(neg(WILL, BINARY) + neg(DO, OTHER) * 2 + b"ab\xe2" + IAC, UNLIMITED)
    moved = LineReader.from_state(json.loads(json.dumps(r.state())), telnet="off")
    assert moved.telnet.mode == "always" and moved.telnet.him_state(0) == "yes"
    assert moved.receive(BRK + IAC + DO + TM + b"\x93\n", UNLIMITED) == ([Line("ab✓")], 6, WILL_TM)
    assert moved.receive(neg(DO, OTHER) * 5, UNLIMITED)[2] == neg(WONT, OTHER) * (T.MAX_ANSWERS - 2)


@pytest.mark.parametrize(("change", "message"), [
    ({"format": 2}, "format"),
    ({"mode": "sometimes"}, "mode"),
    ({"greeted": "yes"}, "greeted"),
    ({"position": "nowhere"}, "position"),
    ({"options": {}}, "options"),
    ({"options": [{"option": 300}]}, "option"),
    ({"options": [{"option": 1, "him": "maybe", "him_opposite": False, "him_answers": 0, "us": "no",
                   "us_opposite": False, "us_answers": 0}]}, "him"),
    ({"options": [{"option": 1, "him": "no", "him_opposite": False, "him_answers": 99, "us": "no",
                   "us_opposite": False, "us_answers": 0}]}, "answers"),
])
def test_malformed_telnet_state_is_refused(change: dict[str, object], message: str) -> None:
    r, _ = reader("always")
    state = r.state()
    state["telnet"] = {**state["telnet"], **change}  # type: ignore[dict-item]
    with pytest.raises(ValueError, match=message):
        LineReader.from_state(state)


def test_format_1_with_an_unknown_telnet_position_is_refused() -> None:
    with pytest.raises(ValueError, match="telnet state"):
        LineReader.from_state({**FORMAT_1, "telnet": "sideways"})


# ---------------------------------------------------------------------------
# Properties

TOKENS = [
    IAC, IAC + IAC, IAC + SB, IAC + SE, IAC + IP, IAC + BRK, IAC + SUSP, IAC + ABORT, IAC + AO, IAC + AYT,
    IAC + EC, IAC + EL, IAC + NOP, IAC + DM, IAC + GA, IAC + EOR, IAC + EOF, neg(DO, TM), neg(DONT, TM),
    neg(WILL, BINARY), neg(WONT, BINARY), neg(DO, BINARY), neg(DONT, BINARY), neg(WILL, ECHO), neg(DO, ECHO),
    neg(DO, SGA), neg(WILL, OTHER), neg(WONT, OTHER), neg(DO, OTHER), neg(DONT, OTHER), IAC + SB + NAWS,
    b"\r", b"\n", b"\r\n", b"\r\0", b"\0", "é".encode(), "✓".encode(), "😀".encode(), b"\xe2", b"\xf0\x9f",
    b"\x9c", b"\x93", b"\x80", b" ", b"m", b"\x1b[",
]  # fmt: skip

telnet_bytes = st.lists(st.one_of(st.binary(max_size=4), st.sampled_from(TOKENS)), max_size=40).map(b"".join)


@st.composite
def telnet_case(draw: st.DrawFn) -> tuple[str, bytes, list[bytes], int]:
    data = draw(telnet_bytes)
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=8)))
    bounds = [0, *cuts, len(data)]
    return draw(st.sampled_from(MODES)), data, [data[a:b] for a, b in zip(bounds, bounds[1:], strict=False)], \
        draw(st.integers(4, 12))


@PROPERTY
@given(telnet_case())
def test_any_split_gives_the_same_events_and_replies(case: tuple[str, bytes, list[bytes], int]) -> None:
    mode, data, chunks, limit = case
    assert run(chunks, mode, limit) == run([data], mode, limit)


@PROPERTY
@given(telnet_case())
def test_the_reference_model_agrees_on_anything(case: tuple[str, bytes, list[bytes], int]) -> None:
    mode, data, chunks, limit = case
    assert run(chunks, mode, limit) == reference(data, mode, limit)


@PROPERTY
@given(telnet_case(), st.lists(st.integers(1, 3), max_size=30))
def test_budgets_never_change_events_or_replies(case: tuple[str, bytes, list[bytes], int],
                                                 budgets: list[int]) -> None:
    mode, data, _, limit = case
    assert run_with_budgets(data, budgets, mode, limit) == run([data], mode, limit)


@PROPERTY
@given(telnet_case(), st.data())
def test_handover_anywhere_is_invisible(case: tuple[str, bytes, list[bytes], int], draw: st.DataObject) -> None:
    mode, data, _, limit = case
    k = draw.draw(st.integers(0, len(data)))
    assert run_with_handover(data, k, mode, limit) == run([data], mode, limit)


@PROPERTY
@given(telnet_case())
def test_replies_are_never_longer_than_the_input_plus_one_request(case: tuple[str, bytes, list[bytes], int]) -> None:
    mode, data, _, limit = case
    _, reply = run([data], mode, limit)
    assert len(reply) <= len(data) + 3
    triples = [reply[i : i + 3] for i in range(0, len(reply), 3)]
    assert all(t[:1] == IAC for t in triples), reply
    assert not [t for t in triples if t[1:2] == WILL and t != WILL_TM]


@PROPERTY
@given(telnet_case())
def test_lines_and_buffer_stay_within_the_limit(case: tuple[str, bytes, list[bytes], int]) -> None:
    mode, _, chunks, limit = case
    r, _ = reader(mode, limit)
    for chunk in chunks:
        for event in r.receive(chunk, UNLIMITED)[0]:
            if isinstance(event, Line):
                assert len(event.text.encode()) <= limit * 3  # U+FFFD is 3 bytes for 1 bad byte
        assert r.buffered() <= limit
