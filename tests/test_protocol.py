"""Specification of chatcluster.protocol: lines, telnet, sanitising, flood control.

Every reader case is checked three ways, as h11 does: fed whole, split into
two reads at every byte position, and fed one byte at a time. The events must
be identical each way.
"""

from __future__ import annotations

import json
import random
import sys
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chatcluster import chat as C
from chatcluster import events as E
from chatcluster import roster as R
from chatcluster.protocol import (
    CRLF,
    Event,
    Line,
    LineReader,
    LineTooLong,
    TokenBucket,
    encode_line,
    sanitize,
)

IAC, DONT, DO, WONT, WILL, SB, GA, AYT, IP, NOP, SE = (
    b"\xff", b"\xfe", b"\xfd", b"\xfc", b"\xfb", b"\xfa", b"\xf9", b"\xf6", b"\xf4", b"\xf1", b"\xf0",
)  # fmt: skip
ESC = "\x1b"

# The characters no Line may ever contain, written from the specification and
# not from the module's own pattern, so the two can catch each other out.
FORBIDDEN = frozenset(
    [chr(c) for c in range(0x00, 0x20) if c != 0x09]
    + [chr(c) for c in range(0x7F, 0xA0)]
    + ["\u2028", "\u2029"]
    + [chr(c) for c in range(0x202A, 0x202F)]
    + [chr(c) for c in range(0x2066, 0x206A)]
)

PROPERTY = settings(max_examples=300, deadline=None)


# ---------------------------------------------------------------------------
# Helpers


def feed_all(chunks: list[bytes], limit: int = 512) -> list[Event]:
    reader = LineReader(limit)
    events: list[Event] = []
    for chunk in chunks:
        events += reader.feed(chunk)
    return events


def two_chunk_splits(data: bytes) -> Iterator[list[bytes]]:
    for k in range(len(data) + 1):
        yield [data[:k], data[k:]]


def one_byte_at_a_time(data: bytes) -> list[bytes]:
    return [data[i : i + 1] for i in range(len(data))]


def feed_with_budgets(data: bytes, budgets: list[int], limit: int) -> list[Event]:
    """Feed `data` through feed_some() as a throttled client would: parse at most
    the budget, keep the unconsumed rest, feed it again with the next budget."""
    reader = LineReader(limit)
    events: list[Event] = []
    rest = data
    for budget in budgets:
        got, used = reader.feed_some(rest, budget)
        assert len(got) <= budget
        assert 0 <= used <= len(rest)
        events += got
        rest = rest[used:]
    return events + reader.feed(rest)


def events_with_handover(data: bytes, k: int, limit: int = 512) -> list[Event]:
    """Read data[:k] in one reader, move it through JSON, read the rest in the copy."""
    first = LineReader(limit)
    events = first.feed(data[:k])
    second = LineReader.from_state(json.loads(json.dumps(first.state())))
    return events + second.feed(data[k:])


def reference_events(data: bytes, limit: int) -> list[Event]:
    """The specification as the simplest possible code: strip telnet, then split."""
    stream = bytearray()
    i = 0
    while i < len(data):
        if data[i] != 0xFF:
            stream.append(data[i])
            i += 1
        elif i + 1 >= len(data):
            break
        elif data[i + 1] == 0xFF:
            stream.append(0xFF)
            i += 2
        elif 0xFB <= data[i + 1] <= 0xFE:
            i += 3
        elif data[i + 1] == 0xFA:
            i += 2
            while i < len(data):
                if data[i] == 0xFF:
                    i += 2
                    if data[i - 1 : i] == SE:
                        break
                else:
                    i += 1
        else:
            i += 2

    events: list[Event] = []
    line = bytearray()
    discarding = False
    i = 0
    while i < len(stream):
        byte = stream[i]
        i += 1
        if byte in b"\r\n":
            if byte == 0x0D and i < len(stream) and stream[i] in b"\n\0":
                i += 1
            if not discarding:
                events.append(Line(sanitize(line.decode("utf-8", "replace"))))
            line.clear()
            discarding = False
        elif not discarding:
            line.append(byte)
            if len(line) > limit:
                events.append(LineTooLong(limit))
                line.clear()
                discarding = True
    return events


# ---------------------------------------------------------------------------
# The reader's cases: (input, line limit, expected events)

CASES = [
    pytest.param(b"hello\n", 512, [Line("hello")], id="lf"),
    pytest.param(b"hello\r\nworld\r\n", 512, [Line("hello"), Line("world")], id="crlf"),
    pytest.param(b"hello\r\0world\r\0", 512, [Line("hello"), Line("world")], id="cr-nul"),
    pytest.param(b"one\rtwo\r", 512, [Line("one"), Line("two")], id="lone-cr-then-text"),
    pytest.param(b"a\r\n\nb\n", 512, [Line("a"), Line(""), Line("b")], id="only-one-lf-after-cr-swallowed"),
    pytest.param(b"a\r\r\nb\n", 512, [Line("a"), Line(""), Line("b")], id="cr-cr-lf"),
    pytest.param(b"\n\r\n \t \n", 512, [Line(""), Line(""), Line(" \t ")], id="empty-lines"),
    pytest.param(b"abc\ndef", 512, [Line("abc")], id="unterminated-tail-held"),
    pytest.param(b"a\0b\n", 512, [Line("ab")], id="nul-inside-line"),
    pytest.param(
        IAC + DO + b"\x18hi" + IAC + WILL + b"\x01 there" + IAC + DONT + b"\x03" + IAC + WONT + b"\x22\n",
        512,
        [Line("hi there")],
        id="iac-negotiation",
    ),
    pytest.param(b"a" + IAC + SB + b"\x18\x00xterm" + IAC + SE + b"b\n", 512, [Line("ab")], id="iac-sb"),
    pytest.param(
        b"a" + IAC + SB + b"\x1f" + IAC + IAC + b"\x00\n" + IAC + SE + b"b\n",
        512,
        [Line("ab")],
        id="iac-sb-with-escaped-iac-and-newline",
    ),
    pytest.param(b"a" + IAC + IAC + b"b\n", 512, [Line("a\ufffdb")], id="iac-iac"),
    pytest.param(
        b"a" + IAC + NOP + b"b" + IAC + GA + b"c" + IAC + AYT + b"d" + IAC + IP + b"e\n",
        512,
        [Line("abcde")],
        id="iac-two-byte-commands",
    ),
    pytest.param(b"a\r" + IAC + NOP + b"\nb\n", 512, [Line("a"), Line("b")], id="iac-between-cr-and-lf"),
    pytest.param(b"a\r" + IAC + IAC + b"\n", 512, [Line("a"), Line("\ufffd")], id="iac-iac-after-cr"),
    pytest.param(b"a" + IAC + DO + b"\nb\n", 512, [Line("ab")], id="option-byte-is-not-a-newline"),
    pytest.param(b"12345678\n", 8, [Line("12345678")], id="exactly-the-limit"),
    pytest.param(b"123456789\nok\n", 8, [LineTooLong(8), Line("ok")], id="limit-plus-one"),
    pytest.param(b"123456789abcdef", 8, [LineTooLong(8)], id="too-long-before-terminator"),
    pytest.param(b"123456789\r\nok\r\n", 8, [LineTooLong(8), Line("ok")], id="too-long-ended-by-crlf"),
    pytest.param(b"123456789\rok\n", 8, [LineTooLong(8), Line("ok")], id="too-long-ended-by-lone-cr"),
    pytest.param(
        b"aaaaaaaaaaaa\nbb\ncccccc\n", 4, [LineTooLong(4), Line("bb"), LineTooLong(4)], id="too-long-twice"
    ),
    pytest.param(b"ab" + IAC + DO + b"\x01" + IAC + NOP + b"cd\n", 4, [Line("abcd")], id="iac-not-counted"),
    pytest.param(b"ab" + IAC + IAC + b"cd\n", 4, [LineTooLong(4)], id="iac-iac-counts-one-byte"),
    pytest.param(b"a\xc3(b\xed\xa0\x80c\n", 512, [Line("a\ufffd(b\ufffd\ufffd\ufffdc")], id="invalid-utf8"),
    pytest.param("héllo 世界 🎉\n".encode(), 512, [Line("héllo 世界 🎉")], id="unicode"),
    pytest.param(b"\x1b[1;31mred\x1b[0m\n", 512, [Line("red")], id="colour-codes"),
    pytest.param(b"\x1b[2J\x1b[H\x1b[10;20Hx\x1b[A\n", 512, [Line("x")], id="clear-screen-cursor-moves"),
    pytest.param(b"\x1b]0;pwned\x07hi\n", 512, [Line("hi")], id="osc-title"),
    pytest.param("a\u202eb\u2066c\u2069\n".encode(), 512, [Line("abc")], id="bidi"),
    pytest.param("a\u0085b\u009b31mc\n".encode(), 512, [Line("abc")], id="c1"),
    pytest.param(b"a\tb\n", 512, [Line("a\tb")], id="tab-kept"),
    pytest.param(b"a\x07b\x08c\x7fd\n", 512, [Line("abcd")], id="bel-bs-del"),
]


@pytest.mark.parametrize(("data", "limit", "expected"), CASES)
def test_whole_input_gives_the_expected_events(data: bytes, limit: int, expected: list[Event]) -> None:
    assert feed_all([data], limit) == expected


@pytest.mark.parametrize(("data", "limit", "expected"), CASES)
def test_events_are_the_same_for_every_split_point(data: bytes, limit: int, expected: list[Event]) -> None:
    for chunks in two_chunk_splits(data):
        assert feed_all(chunks, limit) == expected, chunks


@pytest.mark.parametrize(("data", "limit", "expected"), CASES)
def test_events_are_the_same_one_byte_at_a_time(data: bytes, limit: int, expected: list[Event]) -> None:
    assert feed_all(one_byte_at_a_time(data), limit) == expected


@pytest.mark.parametrize(("data", "limit", "expected"), CASES)
def test_handover_at_any_point_continues_identically(data: bytes, limit: int, expected: list[Event]) -> None:
    for k in range(len(data) + 1):
        assert events_with_handover(data, k, limit) == expected, k


@pytest.mark.parametrize(("data", "limit", "expected"), CASES)
def test_reference_model_agrees_with_every_case(data: bytes, limit: int, expected: list[Event]) -> None:
    assert reference_events(data, limit) == expected


# ---------------------------------------------------------------------------
# Line endings and buffering


def test_lf_after_cr_in_the_next_read_is_swallowed() -> None:
    reader = LineReader()
    assert reader.feed(b"hi\r") == [Line("hi")]
    assert reader.feed(b"\n") == []
    assert reader.feed(b"there\n") == [Line("there")]


def test_nul_after_cr_in_the_next_read_is_swallowed() -> None:
    reader = LineReader()
    assert reader.feed(b"hi\r") == [Line("hi")]
    assert reader.feed(b"\0there\n") == [Line("there")]


def test_lone_cr_is_reported_at_once_without_waiting_for_the_next_byte() -> None:
    assert LineReader().feed(b"hi\r") == [Line("hi")]


def test_unfinished_line_is_buffered_and_exposed_without_telnet_commands() -> None:
    reader = LineReader()
    assert reader.feed(b"ab" + IAC + NOP + b"c") == []
    assert reader.buffered() == 3
    assert reader.pending_bytes() == b"abc"


def test_many_lines_in_one_read_come_out_in_order() -> None:
    data = b"".join(b"line %d\n" % i for i in range(1000))
    assert LineReader().feed(data) == [Line(f"line {i}") for i in range(1000)]


def test_empty_read_gives_no_events() -> None:
    assert LineReader().feed(b"") == []


# ---------------------------------------------------------------------------
# Line length limit


def test_default_limit_is_512_bytes() -> None:
    reader = LineReader()
    assert reader.max_line_bytes == 512
    assert reader.feed(b"x" * 512 + b"\n") == [Line("x" * 512)]
    assert reader.feed(b"x" * 513 + b"\n") == [LineTooLong(512)]


def test_limit_counts_bytes_not_characters() -> None:
    assert LineReader(4).feed("éé\n".encode()) == [Line("éé")]
    assert LineReader(4).feed("ééé\n".encode()) == [LineTooLong(4)]


def test_too_long_line_is_reported_once_however_much_more_arrives() -> None:
    reader = LineReader(8)
    events = []
    for _ in range(100):
        events += reader.feed(b"x" * 100)
    events += reader.feed(b"\nok\n")
    assert events == [LineTooLong(8), Line("ok")]


def test_a_mebibyte_without_newline_keeps_the_buffer_within_the_limit() -> None:
    reader = LineReader(512)
    events: list[Event] = []
    for _ in range((1 << 20) // 4096):
        events += reader.feed(b"x" * 4096)
        assert reader.buffered() <= 512
    assert events == [LineTooLong(512)]
    assert reader.feed(b"\nhi\n") == [Line("hi")]


def test_a_mebibyte_in_one_read_keeps_the_buffer_within_the_limit() -> None:
    reader = LineReader(512)
    assert reader.feed(b"\xff\xff" * (1 << 19)) == [LineTooLong(512)]
    assert reader.buffered() <= 512


def test_lowering_the_limit_below_the_unfinished_line_reports_it_too_long() -> None:
    reader = LineReader(100)
    reader.feed(b"x" * 50)
    reader.max_line_bytes = 10
    assert reader.buffered() <= 10
    assert reader.feed(b"yyy\nok\n") == [LineTooLong(10), Line("ok")]


def test_raising_the_limit_applies_to_the_unfinished_line() -> None:
    reader = LineReader(10)
    reader.feed(b"x" * 10)
    reader.max_line_bytes = 20
    assert reader.feed(b"y" * 10 + b"\n") == [Line("x" * 10 + "y" * 10)]


@pytest.mark.parametrize("bad", [0, -1, True, 2.5])
def test_limit_must_be_a_positive_integer(bad: object) -> None:
    with pytest.raises(ValueError, match="max_line_bytes"):
        LineReader(bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_line_bytes"):
        LineReader().max_line_bytes = bad  # type: ignore[assignment]


# ---------------------------------------------------------------------------
# Handing a connection to another process


def test_reader_state_is_json_serialisable() -> None:
    reader = LineReader(64)
    reader.feed(b"partial \xff\xfe\x80" + IAC + SB + b"\x18")
    assert json.loads(json.dumps(reader.state())) == reader.state()


def test_handover_mid_line_continues_the_line() -> None:
    data = "héllo wörld\n".encode()
    for k in range(len(data) + 1):
        assert events_with_handover(data, k) == [Line("héllo wörld")]


def test_handover_mid_iac_sequence_keeps_parsing_it() -> None:
    data = b"ab" + IAC + SB + b"\x18\x00xterm" + IAC + SE + b"c" + IAC + DO + b"\x01d" + IAC + IAC + b"\n"
    reader = LineReader()
    reader.feed(data[:5])
    assert reader.state()["telnet"]["position"] == "subneg"  # type: ignore[index]
    for k in range(len(data) + 1):
        assert events_with_handover(data, k) == [Line("abcd\ufffd")]


def test_handover_after_a_pending_cr_still_swallows_the_lf() -> None:
    data = b"one\r\ntwo\r\0three\n"
    reader = LineReader()
    reader.feed(data[:4])
    assert reader.state()["after_cr"] is True
    for k in range(len(data) + 1):
        assert events_with_handover(data, k) == [Line("one"), Line("two"), Line("three")]


def test_handover_in_discard_mode_keeps_discarding() -> None:
    data = b"x" * 20 + b"\r\nok\n"
    reader = LineReader(8)
    reader.feed(data[:12])
    assert reader.state()["discard"] is True
    for k in range(len(data) + 1):
        assert events_with_handover(data, k, limit=8) == [LineTooLong(8), Line("ok")]


def test_handover_after_lowering_the_limit_still_reports_the_line_too_long() -> None:
    reader = LineReader(100)
    reader.feed(b"x" * 50)
    reader.max_line_bytes = 10
    moved = LineReader.from_state(json.loads(json.dumps(reader.state())))
    assert moved.max_line_bytes == 10
    assert moved.feed(b"\nok\n") == [LineTooLong(10), Line("ok")]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"format": 99}, "format"),
        ({"partial": "not base64!"}, "base64"),
        ({"partial": "eHh4eHh4eHh4eA=="}, "exceeds"),
        ({"telnet": "sideways"}, "telnet"),
        ({"discard": 1}, "discard"),
        ({"max_line_bytes": "8"}, "max_line_bytes"),
    ],
)
def test_malformed_reader_state_is_refused(change: dict[str, object], message: str) -> None:
    state = LineReader(8).state() | change
    with pytest.raises(ValueError, match=message):
        LineReader.from_state(state)


# ---------------------------------------------------------------------------
# sanitize()


def test_sanitize_returns_plain_text_unchanged() -> None:
    text = "hello, world: 1 < 2 & [brackets] ~tilde~"
    assert sanitize(text) == text


def test_sanitize_keeps_tab() -> None:
    assert sanitize("a\tb") == "a\tb"


def test_sanitize_keeps_printable_unicode() -> None:
    text = "héllo 世界 🎉 مرحبا שלום ñ Ω \u00a0 \u00ad"
    assert sanitize(text) == text


def test_sanitize_removes_colour_codes() -> None:
    assert sanitize(f"{ESC}[1;31mred{ESC}[0m plain {ESC}[38;2;255;0;0mrgb{ESC}[m") == "red plain rgb"


def test_sanitize_removes_cursor_movement() -> None:
    assert sanitize(f"a{ESC}[10;20Hb{ESC}[3Ac{ESC}[?25ld{ESC}[s{ESC}[u") == "abcd"


def test_sanitize_removes_clear_screen() -> None:
    assert sanitize(f"{ESC}[2J{ESC}[Hhi{ESC}[K") == "hi"


def test_sanitize_removes_osc_title_ended_by_bel() -> None:
    assert sanitize(f"{ESC}]0;you are hacked\x07hello") == "hello"


def test_sanitize_removes_osc_ended_by_string_terminator() -> None:
    assert sanitize(f"{ESC}]8;;http://evil/{ESC}\\link{ESC}]8;;{ESC}\\") == "link"


def test_sanitize_removes_unterminated_osc_to_the_end() -> None:
    assert sanitize(f"hi{ESC}]2;title without end") == "hi"


@pytest.mark.parametrize("introducer", ["P", "X", "^", "_"])
def test_sanitize_removes_dcs_sos_pm_apc_strings(introducer: str) -> None:
    assert sanitize(f"a{ESC}{introducer}payload\x07still{ESC}\\b") == "ab"
    assert sanitize(f"a{ESC}{introducer}unterminated") == "a"


def test_sanitize_removes_two_and_three_byte_escapes() -> None:
    assert sanitize(f"a{ESC}cb{ESC}7c{ESC}8d{ESC}(0e{ESC}#8f") == "abcdef"


def test_sanitize_removes_lone_escape_at_the_end() -> None:
    assert sanitize(f"abc{ESC}") == "abc"


def test_sanitize_removes_incomplete_csi_at_the_end() -> None:
    assert sanitize(f"abc{ESC}[12;") == "abc"


def test_sanitize_removes_c0_controls() -> None:
    controls = "".join(chr(c) for c in range(0x20) if c != 0x09)
    assert sanitize(f"a{controls}b") == "ab"


def test_sanitize_removes_del() -> None:
    assert sanitize("a\x7fb") == "ab"


def test_sanitize_removes_c1_controls() -> None:
    assert sanitize("a\u0080b\u0085c\u009dd\u009fe") == "abcde"


def test_sanitize_removes_8bit_csi_with_its_parameters() -> None:
    assert sanitize("a\u009b1;31mred\u009b2Jb") == "aredb"


def test_sanitize_removes_line_and_paragraph_separators() -> None:
    assert sanitize("a\u2028b\u2029c") == "abc"


def test_sanitize_removes_bidi_overrides_and_isolates() -> None:
    bidi = "".join(chr(c) for c in [*range(0x202A, 0x202F), *range(0x2066, 0x206A)])
    assert sanitize(f"user{bidi}txt.exe") == "usertxt.exe"


def test_sanitize_keeps_text_around_a_broken_escape() -> None:
    # ESC then a control: both go, what follows is harmless printable text.
    assert sanitize(f"{ESC}\x00[31mx") == "[31mx"


# ---------------------------------------------------------------------------
# Encoding server lines


def test_encode_line_is_utf8_with_crlf() -> None:
    assert encode_line("héllo 🎉") == "héllo 🎉".encode() + b"\r\n"


def test_encode_line_of_empty_text_is_just_crlf() -> None:
    assert encode_line("") == CRLF == b"\r\n"


# ---------------------------------------------------------------------------
# Properties

TOKENS = [
    b"\r", b"\n", b"\r\n", b"\r\0", b"\0", IAC, IAC + IAC, IAC + SB, IAC + SE, IAC + DO, IAC + WILL,
    IAC + NOP, b"\x1b[", b"\x1b]", b"\x1b\\", b"\x07", b"\xc2\x9b", b"\xc2\x85", "é".encode(),
    "🎉".encode(), "\u202e".encode(), "\u2028".encode(), b"\x7f", b"\t", b" ", b"m",
]  # fmt: skip

client_bytes = st.lists(st.one_of(st.binary(max_size=6), st.sampled_from(TOKENS)), max_size=40).map(b"".join)


@st.composite
def chunked(draw: st.DrawFn) -> tuple[bytes, list[bytes], int]:
    data = draw(client_bytes)
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=8)))
    bounds = [0, *cuts, len(data)]
    chunks = [data[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]
    return data, chunks, draw(st.integers(1, 12))


@PROPERTY
@given(chunked())
def test_lines_never_contain_a_forbidden_character(case: tuple[bytes, list[bytes], int]) -> None:
    _, chunks, limit = case
    for event in feed_all(chunks, limit):
        if isinstance(event, Line):
            assert not FORBIDDEN.intersection(event.text), event


@PROPERTY
@given(chunked())
def test_buffer_never_exceeds_the_limit(case: tuple[bytes, list[bytes], int]) -> None:
    _, chunks, limit = case
    reader = LineReader(limit)
    for chunk in chunks:
        reader.feed(chunk)
        assert reader.buffered() <= limit
        assert len(reader.pending_bytes()) == reader.buffered()


@PROPERTY
@given(chunked())
def test_events_do_not_depend_on_chunking(case: tuple[bytes, list[bytes], int]) -> None:
    data, chunks, limit = case
    assert feed_all(chunks, limit) == feed_all([data], limit)


@PROPERTY
@given(chunked())
def test_reader_matches_the_reference_model(case: tuple[bytes, list[bytes], int]) -> None:
    data, chunks, limit = case
    assert feed_all(chunks, limit) == reference_events(data, limit)


@PROPERTY
@given(st.binary(max_size=200), st.lists(st.integers(0, 200), max_size=6))
def test_feed_never_raises_on_arbitrary_bytes(data: bytes, cuts: list[int]) -> None:
    bounds = [0, *sorted(min(c, len(data)) for c in cuts), len(data)]
    feed_all([data[a:b] for a, b in zip(bounds, bounds[1:], strict=False)], limit=16)


@PROPERTY
@given(client_bytes, st.data())
def test_handover_anywhere_is_invisible(data: bytes, draw: st.DataObject) -> None:
    k = draw.draw(st.integers(0, len(data)))
    assert events_with_handover(data, k, limit=8) == feed_all([data], limit=8)


@PROPERTY
@given(st.text())
def test_sanitized_text_has_no_forbidden_character(text: str) -> None:
    assert not FORBIDDEN.intersection(sanitize(text))


@PROPERTY
@given(st.text())
def test_sanitize_is_idempotent(text: str) -> None:
    once = sanitize(text)
    assert sanitize(once) == once


@PROPERTY
@given(st.text().filter(lambda t: not FORBIDDEN.intersection(t) and ESC not in t))
def test_sanitize_keeps_text_without_controls_as_is(text: str) -> None:
    assert sanitize(text) == text


# ---------------------------------------------------------------------------
# TokenBucket


def test_bucket_allows_a_burst_then_refuses() -> None:
    bucket = TokenBucket(rate=1.0, burst=5, now=100.0)
    assert [bucket.take(100.0) for _ in range(6)] == [True] * 5 + [False]


def test_bucket_refills_at_its_rate() -> None:
    bucket = TokenBucket(rate=2.0, burst=3, now=0.0)
    for _ in range(3):
        bucket.take(0.0)
    assert not bucket.take(0.4)
    assert bucket.take(0.5)
    assert not bucket.take(0.5)
    assert bucket.take(1.0)


def test_bucket_refill_is_capped_at_the_burst() -> None:
    bucket = TokenBucket(rate=10.0, burst=2, now=0.0)
    assert [bucket.take(3600.0) for _ in range(3)] == [True, True, False]


def test_wait_is_zero_while_a_token_is_available() -> None:
    bucket = TokenBucket(rate=1.0, burst=1, now=0.0)
    assert bucket.wait(0.0) == 0.0


def test_wait_is_the_time_until_the_next_token() -> None:
    bucket = TokenBucket(rate=4.0, burst=1, now=10.0)
    bucket.take(10.0)
    assert bucket.wait(10.0) == pytest.approx(0.25)
    assert bucket.wait(10.1) == pytest.approx(0.15)
    assert bucket.wait(10.25) == 0.0


@PROPERTY
@given(
    st.floats(0.01, 1000.0),
    st.integers(1, 10),
    st.floats(0.0, 1e7),
    st.lists(st.floats(0.0, 2.0), max_size=20),
)
def test_take_succeeds_after_waiting_the_reported_time(
    rate: float, burst: int, start: float, gaps: list[float]
) -> None:
    bucket = TokenBucket(rate, burst, start)
    now = start
    for gap in gaps:
        now += gap
        bucket.take(now)
    now += bucket.wait(now)
    assert bucket.take(now)


def test_zero_rate_is_unlimited() -> None:
    bucket = TokenBucket(rate=0.0, burst=1, now=0.0)
    assert all(bucket.take(0.0) for _ in range(10_000))
    assert bucket.wait(0.0) == 0.0


def test_negative_rate_is_unlimited() -> None:
    bucket = TokenBucket(rate=-1.0, burst=1, now=0.0)
    assert all(bucket.take(0.0) for _ in range(100))


def test_configure_keeps_tokens_but_caps_them_at_the_new_burst() -> None:
    bucket = TokenBucket(rate=1.0, burst=10, now=0.0)
    bucket.take(0.0)
    bucket.configure(rate=1.0, burst=3)
    assert [bucket.take(0.0) for _ in range(4)] == [True, True, True, False]


def test_configure_does_not_refill_a_raised_burst() -> None:
    bucket = TokenBucket(rate=1.0, burst=2, now=0.0)
    bucket.take(0.0)
    bucket.configure(rate=1.0, burst=10)
    assert [bucket.take(0.0) for _ in range(2)] == [True, False]


def test_configure_changes_the_refill_rate() -> None:
    bucket = TokenBucket(rate=1.0, burst=1, now=0.0)
    bucket.take(0.0)
    bucket.configure(rate=10.0, burst=1)
    assert bucket.wait(0.0) == pytest.approx(0.1)


def test_configure_from_unlimited_to_limited_starts_full() -> None:
    bucket = TokenBucket(rate=0.0, burst=2, now=0.0)
    for _ in range(50):
        bucket.take(0.0)
    bucket.configure(rate=1.0, burst=2)
    assert [bucket.take(0.0) for _ in range(3)] == [True, True, False]


def test_configure_to_unlimited_lifts_the_limit() -> None:
    bucket = TokenBucket(rate=1.0, burst=1, now=0.0)
    bucket.take(0.0)
    bucket.configure(rate=0.0, burst=1)
    assert bucket.take(0.0)


def test_clock_going_backwards_adds_no_tokens() -> None:
    bucket = TokenBucket(rate=1.0, burst=1, now=10.0)
    bucket.take(10.0)
    assert not bucket.take(5.0)
    assert not bucket.take(10.5)
    assert bucket.take(11.0)


def test_bucket_state_is_json_serialisable() -> None:
    bucket = TokenBucket(rate=2.5, burst=4, now=0.0)
    bucket.take(0.0)
    assert json.loads(json.dumps(bucket.state(0.0))) == bucket.state(0.0)


def test_bucket_state_round_trip_keeps_tokens_and_settings() -> None:
    bucket = TokenBucket(rate=2.0, burst=3, now=50.0)
    for _ in range(3):
        bucket.take(50.0)
    state = json.loads(json.dumps(bucket.state(50.25)))
    # The new process has an unrelated clock; only elapsed time there counts.
    moved = TokenBucket.from_state(state, now=7.0)
    assert (moved.rate, moved.burst) == (2.0, 3)
    assert moved.wait(7.0) == pytest.approx(0.25)
    assert not moved.take(7.2)
    assert moved.take(7.25)


@pytest.mark.parametrize(
    "state",
    [{"rate": "1", "burst": 1, "tokens": 0.0}, {"rate": 1.0, "burst": 0, "tokens": 0.0}, {"rate": 1.0}],
)
def test_malformed_bucket_state_is_refused(state: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        TokenBucket.from_state(state, now=0.0)


@pytest.mark.parametrize("bad", [0, -3, 1.5, True])
def test_burst_must_be_a_positive_integer(bad: object) -> None:
    with pytest.raises(ValueError, match="burst"):
        TokenBucket(rate=1.0, burst=bad, now=0.0)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------
# Parsing no more than a budget (flood control)


def test_feed_some_stops_after_the_budget_and_says_how_much_it_used() -> None:
    reader = LineReader()
    events, used = reader.feed_some(b"one\ntwo\nthree\n", 2)
    assert events == [Line("one"), Line("two")]
    assert used == len(b"one\ntwo\n")
    assert reader.feed(b"three\n") == [Line("three")]


def test_feed_some_consumes_everything_when_the_budget_is_not_reached() -> None:
    reader = LineReader()
    assert reader.feed_some(b"one\ntw", 5) == ([Line("one")], 6)
    assert reader.feed(b"o\n") == [Line("two")]


def test_feed_some_stops_inside_telnet_input_and_resumes_there() -> None:
    data = b"a" + IAC + DO + b"\x01\r\nb" + IAC + SB + b"\x18\nx" + IAC + SE + b"\r\0c\n"
    reader = LineReader()
    events, used = reader.feed_some(data, 1)
    assert events == [Line("a")]
    assert reader.feed(data[used:]) == [Line("b"), Line("c")]


def test_feed_some_counts_a_too_long_line_as_one_event() -> None:
    reader = LineReader(4)
    events, used = reader.feed_some(b"123456789\nok\n", 1)
    assert events == [LineTooLong(4)]
    assert reader.feed(b"123456789\nok\n"[used:]) == [Line("ok")]


def test_feed_some_with_a_budget_of_one_reports_a_lowered_limit_first() -> None:
    reader = LineReader(100)
    reader.feed(b"x" * 50)
    reader.max_line_bytes = 10
    assert reader.feed_some(b"\nok\n", 1) == ([LineTooLong(10)], 0)
    assert reader.feed(b"\nok\n") == [Line("ok")]


@pytest.mark.parametrize("bad", [0, -1, True, 1.5])
def test_feed_some_budget_must_be_a_positive_integer(bad: object) -> None:
    with pytest.raises(ValueError, match="max_events"):
        LineReader().feed_some(b"x\n", bad)  # type: ignore[arg-type]


@pytest.mark.parametrize(("data", "limit", "expected"), CASES)
def test_one_event_at_a_time_gives_the_expected_events(data: bytes, limit: int, expected: list[Event]) -> None:
    assert feed_with_budgets(data, [1] * (len(data) + 2), limit) == expected


@PROPERTY
@given(chunked(), st.lists(st.integers(1, 4), max_size=30))
def test_budgets_never_change_the_events(case: tuple[bytes, list[bytes], int], budgets: list[int]) -> None:
    data, _, limit = case
    assert feed_with_budgets(data, budgets, limit) == feed_all([data], limit)


def test_available_counts_whole_tokens() -> None:
    bucket = TokenBucket(rate=2.0, burst=5, now=0.0)
    assert bucket.available(0.0) == 5
    for _ in range(5):
        bucket.take(0.0)
    assert bucket.available(0.0) == 0
    assert bucket.available(0.74) == 1
    assert bucket.available(1.0) == 2


def test_available_is_unlimited_without_a_rate() -> None:
    assert TokenBucket(rate=0.0, burst=1, now=0.0).available(0.0) == sys.maxsize


@PROPERTY
@given(st.floats(0.01, 1000.0), st.integers(1, 10), st.lists(st.floats(0.0, 2.0), max_size=20))
def test_available_is_exactly_what_take_allows(rate: float, burst: int, gaps: list[float]) -> None:
    bucket = TokenBucket(rate, burst, 0.0)
    now = 0.0
    for gap in gaps:
        now += gap
        n = bucket.available(now)
        assert all(bucket.take(now) for _ in range(n))
        assert not bucket.take(now)


# ---------------------------------------------------------------------------
# What other clients receive, through the chat rules


class OneWorker:
    """A ChatCore whose publications come straight back as its bus, with a record
    of the bytes each client receives; nothing but the pure modules."""

    def __init__(self) -> None:
        self.core = C.ChatCore("w1", rng=random.Random(7))
        self.roster = R.Roster()  # the broker's, deciding what comes back
        self.room: set[int] = set()
        self.received: dict[int, bytearray] = {}
        self.core.hello()  # draws the nonce the snapshot must carry
        self.run_bus([E.Snapshot("w1", self.core.nonce, [])])

    def run(self, effects: list[C.Effect]) -> None:
        published: list[tuple[object, ...]] = []
        for e in effects:
            if isinstance(e, C.Publish):
                published.append(e.event)
            elif isinstance(e, C.Send):
                self.received.setdefault(e.conn, bytearray()).extend(e.data)
            elif isinstance(e, C.Broadcast):
                for conn in self.room - e.exclude:
                    self.received.setdefault(conn, bytearray()).extend(e.data)
            elif isinstance(e, C.Enter):
                self.room.add(e.conn)
            elif isinstance(e, C.Close):
                self.room.discard(e.conn)
        if published:
            self.run_bus(published)

    def run_bus(self, events: list[tuple[object, ...]]) -> None:
        self.run(self.core.on_bus("w1", self.roster.decide_batch("w1", events)))  # type: ignore[arg-type]

    def nick(self, conn: int) -> str:
        m = self.roster.get("w1", conn)
        return m.nick if m else ""


client_line = st.one_of(
    client_bytes,
    st.tuples(
        st.sampled_from([b"/me ", b"/nick ", b"//", b"/quit ", b"*** ", b"/", b"/ME\t", b"\x1b[2K\r*** "]),
        client_bytes,
    ).map(b"".join),
)


@PROPERTY
@given(st.lists(client_line, min_size=1, max_size=6))
def test_what_others_receive_starts_with_the_senders_nick_and_cannot_control_a_terminal(
    inputs: list[bytes],
) -> None:
    world = OneWorker()
    sender, other = 1, 2
    world.run(world.core.connect(sender, "127.0.0.1", 0.0))
    world.run(world.core.connect(other, "127.0.0.2", 0.0))
    reader = LineReader()
    for data in inputs:
        for event in reader.feed(data + b"\n"):
            if not isinstance(event, Line):
                continue
            before = world.nick(sender)
            world.received[other] = bytearray()
            world.run(world.core.line(sender, event.text))
            names = {before, world.nick(sender)} - {""}
            got = bytes(world.received[other])
            assert got == b"" or got.endswith(CRLF)
            for line in got.decode("utf-8").split("\r\n")[:-1]:
                assert not FORBIDDEN.intersection(line), line
                assert any(line.startswith((f"{n}: ", f"* {n} ", f"*** {n} ")) for n in names), (line, names)


# ---------------------------------------------------------------------------
# The hooks the telnet layer edits the unfinished line through


def reader_holding(data: bytes, limit: int = 512) -> LineReader:
    reader = LineReader(limit)
    assert reader.feed(data) == []
    return reader


@pytest.mark.parametrize(
    ("held", "after"),
    [
        (b"abc", b"ab"),
        ("aé".encode(), b"a"),
        ("a✓".encode(), b"a"),
        ("a😀".encode(), b"a"),
        (b"a\xe2\x9c", b"a"),  # a character still arriving goes whole
        (b"a\xf0", b"a"),
        (b"a\xa9", b"a"),  # a stray continuation byte is one character
        (b"\xc3\xa9\xa9", b"\xc3\xa9"),  # one continuation too many: only it goes
        (b"a\xa9\xa9\xa9\xa9", b"a\xa9\xa9\xa9"),
        (b"\xfe", b""),
        (b"", b""),
    ],
)
def test_erase_char_removes_one_whole_character(held: bytes, after: bytes) -> None:
    reader = reader_holding(held)
    reader.erase_char()
    assert reader.pending_bytes() == after


def test_erase_line_clears_the_line_and_ends_a_too_long_one() -> None:
    reader = LineReader(4)
    assert reader.feed(b"123456") == [LineTooLong(4)]
    reader.erase_line()
    assert reader.pending_bytes() == b""
    assert reader.feed(b"ok\n") == [Line("ok")]


@pytest.mark.parametrize(
    ("held", "inside"),
    [
        (b"", False),
        (b"abc", False),
        ("é".encode(), False),
        ("😀".encode(), False),
        (b"\xc3", True),
        (b"a\xe2", True),
        (b"a\xe2\x9c", True),
        (b"\xf0\x9f\x98", True),
        (b"\xc3\xa9\xa9", False),  # ends in a stray continuation byte, not inside a character
        (b"\xa9\xa9\xa9", False),
        (b"\xc0", False),  # never a lead byte in UTF-8
        (b"\xf5", False),
        (b"\xed\xa0", True),
    ],
)
def test_ends_inside_char(held: bytes, inside: bool) -> None:
    assert reader_holding(held).ends_inside_char() is inside


def test_take_data_splits_lines_and_respects_the_budget() -> None:
    reader = LineReader()
    events, used, reply = reader.receive(b"one\r\ntwo\r\nthree\r\n", 2)
    assert events == [Line("one"), Line("two")] and used == len(b"one\r\ntwo\r\n") and reply == b""
    assert reader.feed(b"three\r\n") == [Line("three")]


def test_the_default_reader_negotiates_nothing() -> None:
    reader = LineReader()
    assert reader.telnet.mode == "off" and reader.greeting() == b""
    assert reader.receive(b"\xff\xfd\x06a\xff\xf6\n", 9) == ([Line("a")], 7, b"")


def test_reader_snapshot_is_format_2_with_the_telnet_state_nested() -> None:
    state = LineReader(64, telnet="always").state()
    assert state["format"] == 2
    assert isinstance(state["telnet"], dict) and state["telnet"]["mode"] == "always"


def test_format_1_reader_snapshot_is_still_read() -> None:
    old = {"format": 1, "max_line_bytes": 64, "partial": "aGk=", "telnet": "option", "discard": False,
           "after_cr": False, "overflowed": False}
    reader = LineReader.from_state(old)
    assert reader.max_line_bytes == 64
    assert reader.feed(b"\x18 there\n") == [Line("hi there")]  # the option byte of IAC DO/WILL... skipped
