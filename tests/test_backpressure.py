"""Backpressure on heavy senders, as a pure state machine: measurements and time in, events and shares out."""

from __future__ import annotations

from chatcluster import backpressure as BP
from chatcluster import events as E

T0 = 1000.0


def calm_for(bp: BP.Backpressure, start: float, seconds: float, step: float = 0.005) -> float:
    t = start
    while t < start + seconds:
        bp.tick(t, 0, 0.0)
        t += step
    return t


def test_a_calm_worker_lets_a_heavy_sender_take_a_full_burst() -> None:
    bp = BP.Backpressure("w1")
    assert bp.tick(T0, 0, 0.0) == []
    assert bp.allowance(T0) == BP.BURST
    assert not bp.active


def test_clients_not_keeping_up_put_the_worker_under_pressure_and_it_says_so_once_then_every_second() -> None:
    bp = BP.Backpressure("w1")
    assert bp.tick(T0, BP.HIGH + 1, 0.0) == [E.Pressure("w1", 1)]
    assert bp.allowance(T0) == 0
    assert bp.tick(T0 + 0.5, BP.HIGH + 1, 0.0) == []
    assert bp.tick(T0 + 1.0, BP.HIGH + 1, 0.0) == [E.Pressure("w1", 1)]
    assert bp.tick(T0 + 1.1, BP.LOW + 1, 0.0) == []  # between the marks: still under pressure
    assert bp.tick(T0 + 1.2, BP.LOW - 1, 0.0) == [E.Pressure("w1", 0)]
    assert bp.episodes == 1


def test_a_bus_left_undrained_counts_as_pressure_only_after_a_while() -> None:
    bp = BP.Backpressure("w1")
    assert bp.tick(T0, 0, BP.BEHIND / 2) == []
    assert bp.tick(T0 + 0.1, 0, BP.BEHIND * 2) == [E.Pressure("w1", 1)]


def test_pressure_anywhere_stops_heavy_senders_here_and_each_episode_halves_their_rate() -> None:
    bp = BP.Backpressure("w1")
    bp.tick(T0, 0, 0.0)
    rate = bp.rate
    bp.heard(E.Pressure("w2", 1), T0)
    assert bp.allowance(T0) == 0 and bp.rate == rate / 2
    bp.heard(E.Pressure("w2", 1), T0 + 1)  # the same episode, repeated: no second halving
    assert bp.rate == rate / 2
    bp.heard(E.Pressure("w2", 0), T0 + 1.5)
    bp.tick(T0 + 1.5, 0, 0.0)
    assert bp.allowance(T0 + 1.5) == 0  # not right after it ends
    t = calm_for(bp, T0 + 1.5, BP.CALM * 2)
    assert bp.allowance(t) > 0


def test_the_share_grows_back_step_by_step_while_all_is_calm_and_never_below_the_floor() -> None:
    bp = BP.Backpressure("w1")
    for _ in range(40):
        bp.slow_down()
    assert bp.rate == BP.MIN_RATE
    t = calm_for(bp, T0, 1.0)
    assert BP.MIN_RATE < bp.rate <= BP.MIN_RATE + BP.STEP * (1.0 / BP.GROW_EVERY + 1)
    calm_for(bp, t, 60.0, step=0.05)
    assert bp.rate == BP.MAX_RATE


def test_tokens_limit_what_a_heavy_sender_takes_between_ticks() -> None:
    bp = BP.Backpressure("w1")
    bp.tick(T0, 0, 0.0)
    bp.rate = float(BP.MIN_RATE)
    bp.spend(bp.allowance(T0))
    assert bp.allowance(T0) == 0
    bp.tick(T0 + 0.1, 0, 0.0)
    assert abs(bp.allowance(T0 + 0.1) - BP.MIN_RATE * 0.1) <= 1


def test_a_worker_that_went_quiet_under_pressure_stops_counting_after_a_while() -> None:
    bp = BP.Backpressure("w1")
    bp.heard(E.Pressure("w2", 1), T0)
    bp.tick(T0 + BP.EXPIRES / 2, 0, 0.0)
    assert not bp.calm
    bp.tick(T0 + BP.EXPIRES + 0.1, 0, 0.0)
    assert bp.calm


def test_a_dead_worker_no_longer_holds_anyone_back_and_our_own_events_are_ignored() -> None:
    bp = BP.Backpressure("w1")
    bp.heard(E.Pressure("w1", 1), T0)
    assert bp.calm
    bp.heard(E.Pressure("w2", 1), T0)
    bp.gone("w2")
    assert bp.calm
