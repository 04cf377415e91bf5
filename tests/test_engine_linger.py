"""Engine.linger: after a step that ended a sequence, the engine gives the freed slot's successor a moment to arrive
(bounded by the setting and by a fraction of a step), and returns the moment it does."""

from __future__ import annotations

import threading
import time

import pytest

from inference_worker.engine import (
    ADMIT_LINGER_AMORTIZED_SHARE,
    ADMIT_LINGER_EXPECTED_FRACTION,
    ADMIT_LINGER_IDLE_FRACTION,
    ADMIT_LINGER_MAX_FRACTION,
    ADMIT_LINGER_STEP_FRACTION,
    ENDING_STEPS_DECAY,
    Engine,
)
from inference_worker.successors import SuccessorClock
from shared.wire import GenerationRequest
from tests.test_engine import greedy, loaded, make_engine  # noqa: F401


def one_ended_one_running(engine: Engine, prompt: list[int]) -> None:
    """Step until the short request has ended while the long one still runs."""
    engine.add_request(GenerationRequest("short", "m", prompt, greedy(2)))
    engine.add_request(GenerationRequest("long", "m", prompt, greedy(40)))
    for _ in range(50):
        events = engine.step()
        if any(rid == "short" and ev["type"] == "done" for rid, ev in events):
            return
    raise AssertionError("the short request did not end")


def idle_after_one_request(engine: Engine, prompt: list[int]) -> None:
    """Run one short request to its end: nothing runs afterwards, and its prompt step has been timed."""
    engine.add_request(GenerationRequest("only", "m", prompt, greedy(2)))
    while engine.has_work():
        engine.step()


def successors_after(gap: float) -> SuccessorClock:
    """A clock whose history is eight ends, each followed by its successor ``gap`` seconds later."""
    clock = SuccessorClock()
    for i in range(8):
        clock.ended(float(i), 1)
        clock.arrived(i + gap)
    return clock


def timed_linger(engine: Engine) -> float:
    """Seconds ``engine.linger()`` waited."""
    started = time.monotonic()
    engine.linger()
    return time.monotonic() - started


def test_linger_returns_when_the_successor_arrives(loaded) -> None:  # noqa: F811
    engine = make_engine(loaded, admit_linger_s=5.0)
    prompt = loaded[2].tokenizer.encode("Hello there").ids
    one_ended_one_running(engine, prompt)
    engine._last_step_s = 100.0  # the fraction of a step is no limit here: the setting is
    timer = threading.Timer(0.05, engine.add_request, [GenerationRequest("next", "m", prompt, greedy(2))])
    started = time.monotonic()
    timer.start()
    engine.linger()
    waited = time.monotonic() - started
    timer.join()
    assert 0.04 <= waited < 2.0, waited  # woke by the arrival, far before the 5 s limit
    assert [r.id for r in engine._inbox] == ["next"]


def test_linger_waits_at_most_a_fraction_of_a_step(loaded) -> None:  # noqa: F811
    engine = make_engine(loaded, admit_linger_s=5.0)
    one_ended_one_running(engine, loaded[2].tokenizer.encode("Hello there").ids)
    engine._last_step_s = 2.0
    started = time.monotonic()
    engine.linger()  # nobody comes
    waited = time.monotonic() - started
    assert 0.5 * ADMIT_LINGER_STEP_FRACTION * 2.0 <= waited < 1.0, waited
    started = time.monotonic()
    engine.linger()  # no sequence ended since the last linger: no wait at all
    assert time.monotonic() - started < 0.05


def test_linger_is_off_at_zero(loaded) -> None:  # noqa: F811
    prompt = loaded[2].tokenizer.encode("Hello there").ids
    engine = make_engine(loaded, admit_linger_s=0.0)
    one_ended_one_running(engine, prompt)
    engine._last_step_s = 100.0
    started = time.monotonic()
    engine.linger()
    assert time.monotonic() - started < 0.05


def test_linger_waits_for_as_many_successors_as_sequences_ended(loaded) -> None:  # noqa: F811
    # four closed-loop clients whose requests end in one step: all four successors should share the next step,
    # not the first alone while the other three wait a whole step for the one after
    engine = make_engine(loaded, admit_linger_s=5.0)
    prompt = loaded[2].tokenizer.encode("Hello there").ids
    for i in range(2):
        engine.add_request(GenerationRequest(f"r{i}", "m", prompt, greedy(2)))
    while engine.has_work():
        engine.step()
    assert engine._freed_seqs == 2 and not engine.scheduler.running
    engine._last_step_s = 100.0
    first = threading.Timer(0.05, engine.add_request, [GenerationRequest("a", "m", prompt, greedy(2))])
    second = threading.Timer(0.25, engine.add_request, [GenerationRequest("b", "m", prompt, greedy(2))])
    started = time.monotonic()
    first.start()
    second.start()
    engine.linger()
    waited = time.monotonic() - started
    first.join()
    second.join()
    assert 0.2 <= waited < 2.0, waited  # past the first arrival, woken by the second, far before the 5 s limit
    assert [r.id for r in engine._inbox] == ["a", "b"]
    started = time.monotonic()
    engine.linger()  # nothing ended since: no wait
    assert time.monotonic() - started < 0.05


def test_with_nothing_running_the_wait_may_be_a_larger_share_of_a_step(loaded) -> None:  # noqa: F811
    # nobody's inter-token time is at stake, and a successor that misses the step waits all of it
    engine = make_engine(loaded, admit_linger_s=5.0)
    prompt = loaded[2].tokenizer.encode("Hello there").ids
    idle_after_one_request(engine, prompt)
    engine._last_step_s = 2.0
    waited = timed_linger(engine)  # nobody comes
    assert ADMIT_LINGER_IDLE_FRACTION > 2 * ADMIT_LINGER_STEP_FRACTION
    assert 0.9 * ADMIT_LINGER_IDLE_FRACTION * 2.0 <= waited < 2 * ADMIT_LINGER_IDLE_FRACTION * 2.0, waited


def test_when_successors_usually_come_the_wait_covers_their_gap(loaded) -> None:  # noqa: F811
    engine = make_engine(loaded, admit_linger_s=5.0)
    one_ended_one_running(engine, loaded[2].tokenizer.encode("Hello there").ids)
    engine.successors = successors_after(0.2)
    engine._last_step_s = 2.0  # 5 % of a step: 0.1 s; the usual gap with its margin: 0.25 s
    waited = timed_linger(engine)  # nobody comes this time
    assert 0.9 * 0.25 <= waited < 0.4, waited
    one_ended_one_running(engine, loaded[2].tokenizer.encode("Hello there").ids)
    engine._last_step_s = 1.0  # the gap (0.25 s) is more than 20 % of this step: waiting for it does not pay
    waited = timed_linger(engine)
    assert waited < 0.9 * 0.25, waited


def test_with_nothing_running_the_gap_is_weighed_against_the_prompt_step(loaded) -> None:  # noqa: F811
    # several sequences that ended together leave the engine idle; their successors arrive spread over the usual
    # gap, and one that misses the first arrival's prompt step waits all of it: that step, not the decode step that
    # ended them, is what the wait is weighed against
    engine = make_engine(loaded, admit_linger_s=5.0)
    prompt = loaded[2].tokenizer.encode("Hello there").ids
    idle_after_one_request(engine, prompt)
    assert engine._last_prompt_step_s > 0  # its prompt step was timed
    engine.successors = successors_after(0.2)  # 0.25 s with the margin
    for prompt_step_s, expected in ((0.8, 0.25), (0.4, 0.25 * 0.4)):
        engine._freed_seqs = 2
        engine._last_step_s = 0.1  # the decode step that ended them: the gap is far more than a share of it
        engine._last_prompt_step_s = prompt_step_s  # 0.25 s is within half of 0.8 s but not of 0.4 s
        waited = timed_linger(engine)  # nobody comes
        assert 0.9 * expected <= waited < expected + 0.1, (prompt_step_s, waited)
    assert ADMIT_LINGER_MAX_FRACTION == 0.5 and ADMIT_LINGER_IDLE_FRACTION == 0.25


def test_when_ends_are_rare_the_wait_may_cover_a_longer_gap(loaded) -> None:  # noqa: F811
    # a wait costs the running sequences only after steps that end one: when one step in ten does, a wait of 25 % of
    # a step slows them by 2.5 % on average, within ADMIT_LINGER_AMORTIZED_SHARE; when every step does, it would not
    engine = make_engine(loaded, admit_linger_s=5.0)
    prompt = loaded[2].tokenizer.encode("Hello there").ids
    engine.successors = successors_after(0.2)  # 0.25 s with the margin
    for ending_steps, expected in ((0.1, 0.25), (1.0, 0.05)):
        one_ended_one_running(engine, prompt)
        engine._ending_steps = ending_steps
        engine._last_step_s = 1.0  # the gap is 25 % of this step, over ADMIT_LINGER_EXPECTED_FRACTION
        waited = timed_linger(engine)  # nobody comes
        assert 0.9 * expected <= waited < expected + 0.15, (ending_steps, waited)
        engine.abort("long")
        while engine.has_work():
            engine.step()
    assert ADMIT_LINGER_AMORTIZED_SHARE / 0.1 >= 0.25 > ADMIT_LINGER_EXPECTED_FRACTION


def test_the_share_of_ending_steps_counts_steps_not_sequences(loaded) -> None:  # noqa: F811
    # two sequences ending in one step cost the running ones one wait, so they count as one ending step
    engine = make_engine(loaded, admit_linger_s=0.0)
    engine._ending_steps = 0.0
    engine._freed_seqs = 2
    engine.linger()
    assert engine._ending_steps == pytest.approx(ENDING_STEPS_DECAY)
    engine.linger()  # a step that ended nothing
    assert engine._ending_steps == pytest.approx(ENDING_STEPS_DECAY * (1 - ENDING_STEPS_DECAY))


def test_an_abort_ends_the_linger(loaded) -> None:  # noqa: F811
    engine = make_engine(loaded, admit_linger_s=5.0)
    one_ended_one_running(engine, loaded[2].tokenizer.encode("Hello there").ids)
    engine._last_step_s = 100.0
    timer = threading.Timer(0.05, engine.abort, ["long"])
    started = time.monotonic()
    timer.start()
    engine.linger()
    timer.join()
    assert time.monotonic() - started < 2.0
