"""SuccessorClock: how soon ended requests' successors arrive, learned from arrivals after ends (pure, no model)."""

from __future__ import annotations

import pytest

from inference_worker.successors import GAP_MARGIN, MIN_SAMPLES, SUCCESSOR_WINDOW_S, SuccessorClock


def test_no_gap_is_offered_before_enough_ends_were_seen() -> None:
    clock = SuccessorClock()
    assert clock.expected_gap() is None
    for i in range(MIN_SAMPLES - 1):
        clock.ended(i, 1)
        clock.arrived(i + 0.005)
    assert clock.expected_gap() is None
    clock.ended(10.0, 1)
    clock.arrived(10.005)
    assert clock.expected_gap() == pytest.approx(GAP_MARGIN * 0.005)


def test_closed_loop_clients_teach_their_gap_and_the_slow_tail_counts() -> None:
    clock = SuccessorClock()
    gaps = [0.004, 0.005, 0.006, 0.004, 0.005, 0.030, 0.005, 0.006, 0.005, 0.004]
    for i, gap in enumerate(gaps):
        clock.ended(float(i), 2)  # two requests ended in one step; both successors come
        clock.arrived(i + gap)
        clock.arrived(i + gap + 0.001)
    expected = clock.expected_gap()
    assert expected is not None and GAP_MARGIN * 0.006 <= expected <= GAP_MARGIN * 0.031


def test_ends_nobody_follows_switch_the_offer_off() -> None:
    clock = SuccessorClock()
    for i in range(8):
        clock.ended(float(i), 1)
        clock.arrived(i + 0.005)
    assert clock.expected_gap() is not None
    for i in range(8, 20):  # an open-loop phase: requests end, nothing follows within the window
        clock.ended(float(i), 1)
    clock.arrived(20 + SUCCESSOR_WINDOW_S + 1)  # long after: every pending end has expired unfollowed
    assert clock.expected_gap() is None


def test_arrivals_without_ends_teach_nothing() -> None:
    clock = SuccessorClock()
    for i in range(10):
        clock.arrived(float(i))
    assert clock.expected_gap() is None
