"""The host book: every host applies it to the same stream and must reach the same verdicts at the same point."""

from __future__ import annotations

import random

import pytest

from chatcluster import hosts as H


class Feed:
    """Builds stamps the way the stream would: dense sequence numbers, leader timestamps."""

    def __init__(self) -> None:
        self.seq = 0
        self.numbers: dict[tuple[str, str], int] = {}

    def msg(self, ts: float, node: str, inc: str = "i1", kind: str = "batch", number: int | None = None) -> H.Stamp:
        self.seq += 1
        if number is None:
            number = self.numbers.get((node, inc), 0) + 1
        self.numbers[(node, inc)] = max(number, self.numbers.get((node, inc), 0))
        return H.Stamp(self.seq, ts, node, inc, number, kind)


def kinds(outcomes: list[H.Outcome]) -> list[str]:
    return [type(o).__name__ for o in outcomes]


def test_first_message_of_a_host_announces_it_then_delivers() -> None:
    book, f = H.HostBook(), Feed()
    out = book.apply(f.msg(0.0, "a", kind="hello"))
    assert out == [H.HostUp("a", "i1", 1), H.Deliver(H.Stamp(1, 0.0, "a", "i1", 1, "hello"))]


def test_a_repeated_publisher_number_is_dropped_as_duplicate() -> None:
    book, f = H.HostBook(), Feed()
    book.apply(f.msg(0.0, "a"))
    out = book.apply(f.msg(0.1, "a", number=1))
    assert kinds(out) == ["Dropped"] and out[0].reason == "duplicate"  # type: ignore[union-attr]


def test_a_jump_in_publisher_numbers_is_reported_before_the_message() -> None:
    book, f = H.HostBook(), Feed()
    book.apply(f.msg(0.0, "a"))
    out = book.apply(f.msg(0.1, "a", number=4))
    assert out[0] == H.LostMessages("a", "i1", 2, 3, 2)
    assert kinds(out) == ["LostMessages", "Deliver"]


def test_a_silent_host_is_gone_at_the_first_message_past_its_lease() -> None:
    book, f = H.HostBook(lease=5.0), Feed()
    book.apply(f.msg(0.0, "a"))
    book.apply(f.msg(0.0, "b"))
    for t in range(1, 6):  # b keeps publishing every second; a is silent
        assert kinds(book.apply(f.msg(float(t), "b"))) == ["Deliver"]
    out = book.apply(f.msg(5.5, "b"))
    assert out[0] == H.HostGone("a", "i1", f.seq, "lease")
    assert kinds(out) == ["HostGone", "Deliver"]


def test_a_stall_of_the_whole_stream_expires_nobody() -> None:
    """A leader election stops every publisher for ~5 s; the first messages after it must not expire the others."""
    book, f = H.HostBook(lease=5.0, tick_cap=1.5), Feed()
    book.apply(f.msg(0.0, "a"))
    book.apply(f.msg(0.5, "b"))
    out = book.apply(f.msg(30.0, "b"))  # 30 s without any message, then b first
    assert kinds(out) == ["Deliver"]
    assert kinds(book.apply(f.msg(30.4, "a"))) == ["Deliver"]


def test_a_leader_clock_jumping_back_or_forward_is_harmless() -> None:
    book, f = H.HostBook(lease=5.0, tick_cap=1.5), Feed()
    book.apply(f.msg(100.0, "a"))
    book.apply(f.msg(100.5, "b"))
    assert kinds(book.apply(f.msg(40.0, "b"))) == ["Deliver"]  # new leader's clock behind
    assert kinds(book.apply(f.msg(900.0, "b"))) == ["Deliver"]  # and then far ahead
    assert kinds(book.apply(f.msg(900.2, "a"))) == ["Deliver"]


def test_a_new_incarnation_replaces_the_old_and_the_old_ones_messages_are_stale() -> None:
    book, f = H.HostBook(), Feed()
    book.apply(f.msg(0.0, "a", inc="old"))
    out = book.apply(f.msg(0.1, "a", inc="new"))
    assert out[:2] == [H.HostGone("a", "old", 2, "restarted"), H.HostUp("a", "new", 2)]
    late = book.apply(f.msg(0.2, "a", inc="old"))
    assert kinds(late) == ["Dropped"] and late[0].reason == "stale"  # type: ignore[union-attr]


def test_a_host_gone_by_lease_stays_gone_when_it_speaks_again() -> None:
    book, f = H.HostBook(lease=2.0, tick_cap=1.0), Feed()
    book.apply(f.msg(0.0, "a"))
    for t in range(1, 4):
        book.apply(f.msg(float(t), "b"))
    assert book.current("a") is None
    assert kinds(book.apply(f.msg(4.0, "a"))) == ["Dropped"]


def test_bye_delivers_then_lets_the_host_go() -> None:
    book, f = H.HostBook(), Feed()
    book.apply(f.msg(0.0, "a"))
    out = book.apply(f.msg(0.1, "a", kind="bye"))
    assert kinds(out) == ["Deliver", "HostGone"] and out[1].reason == "stopped"  # type: ignore[union-attr]


def test_unknown_kind_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown stream message kind"):
        H.HostBook().apply(H.Stamp(1, 0.0, "a", "i", 1, "claim"))


def test_tick_cap_must_be_below_the_lease() -> None:
    with pytest.raises(ValueError, match="tick_cap"):
        H.HostBook(lease=1.0, tick_cap=2.0)


def random_stream(seed: int, n: int = 600) -> list[H.Stamp]:
    rng = random.Random(seed)
    f, t = Feed(), 0.0
    incs = {"a": "a1", "b": "b1", "c": "c1"}
    out = []
    for _ in range(n):
        t += rng.choice([0.01, 0.3, 1.0, 2.5, 7.0])
        node = rng.choice("abc")
        r = rng.random()
        if r < 0.03:
            incs[node] = f"{node}{rng.randrange(1000)}"
        number = None
        if r > 0.95:
            number = max(1, f.numbers.get((node, incs[node]), 1) - rng.randrange(3))  # a duplicate or late one
        kind = rng.choice(["batch", "heartbeat", "bye"] if r < 0.1 else ["batch"])
        out.append(f.msg(t, node, incs[node], kind, number))
        if kind == "bye" or rng.random() < 0.02:  # the host restarts (or a rare late message follows)
            incs[node] = f"{node}{rng.randrange(10**6)}"
    return out


@pytest.mark.parametrize("seed", range(5))
def test_two_books_fed_the_same_stream_agree_everywhere(seed: int) -> None:
    stream = random_stream(seed)
    a, b = H.HostBook(), H.HostBook()
    assert [a.apply(s) for s in stream] == [b.apply(s) for s in stream]


@pytest.mark.parametrize("seed", range(5))
def test_a_book_restored_from_a_snapshot_continues_identically(seed: int) -> None:
    stream = random_stream(seed)
    whole = H.HostBook()
    expected = [whole.apply(s) for s in stream]
    half = H.HostBook()
    for s in stream[:300]:
        half.apply(s)
    restored = H.HostBook.restore(half.snapshot())
    assert [restored.apply(s) for s in stream[300:]] == expected[300:]
