"""Stop strings over streamed deltas: nothing partial leaks, the cut is the same however the text is split."""

from __future__ import annotations

import random

import pytest

from inference_worker.stop import StopChecker


def _stream(deltas: list[str], stop: list[str], include_stop: bool = False) -> tuple[list[str], str | None]:
    """Emitted pieces and the matched stop, flushing at the end when nothing matched."""
    checker = StopChecker(stop, include_stop)
    pieces = []
    for delta in deltas:
        text, matched = checker.push(delta)
        pieces.append(text)
        if matched is not None:
            return pieces, matched
    pieces.append(checker.flush())
    return pieces, None


def _expected_cut(text: str, stop: list[str], include_stop: bool) -> tuple[str, str | None]:
    """Reference: scan prefixes of growing length; the first one containing a stop string decides."""
    for end in range(1, len(text) + 1):
        found = [s for s in stop if s and text[:end].endswith(s)]
        if found:
            s = max(found, key=len)
            return text[: end if include_stop else end - len(s)], s
    return text, None


def _random_split(text: str, rng: random.Random) -> list[str]:
    cuts = sorted(rng.sample(range(1, len(text)), k=min(len(text) - 1, rng.randint(0, 6)))) if len(text) > 1 else []
    bounds = [0, *cuts, len(text)]
    return [text[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]


def test_stop_split_across_many_deltas_is_never_partly_emitted() -> None:
    checker = StopChecker(["</answer>"], include_stop=False)
    emitted = []
    for delta in ["The result", " is 4<", "/ans", "w", "er", ">", " trailing"]:
        text, matched = checker.push(delta)
        emitted.append(text)
        assert "<" not in text, f"a piece of the stop string leaked: {text!r}"
        if matched:
            break
    assert "".join(emitted) == "The result is 4" and matched == "</answer>"


def test_held_text_is_released_when_the_stop_does_not_complete() -> None:
    checker = StopChecker(["STOP"], include_stop=False)
    assert checker.push("go ST") == ("go ", None)
    assert checker.push("O") == ("", None)
    assert checker.push("P!") == ("", "STOP")
    other = StopChecker(["STOP"], include_stop=False)
    assert other.push("go STO") == ("go ", None)
    assert other.push("RM") == ("STORM", None)
    assert other.push("ST") == ("", None)
    assert other.flush() == "ST"


def test_include_stop_emits_the_stop_string_and_nothing_after() -> None:
    pieces, matched = _stream(["a b", "c<e", "nd>tail"], ["<end>"], include_stop=True)
    assert "".join(pieces) == "a bc<end>" and matched == "<end>"


def test_stop_at_the_very_start_emits_nothing() -> None:
    assert _stream(["\n\nrest"], ["\n\n"]) == ([""], "\n\n")
    assert _stream(["\n", "\nrest"], ["\n\n"]) == (["", ""], "\n\n")


def test_earliest_completed_of_several_stops_wins() -> None:
    assert _stream(["one two three"], ["three", "two"]) == (["one "], "two")
    # "bc" completes before "abcd" would, exactly as it would token by token
    assert _stream(["xabcd"], ["abcd", "bc"]) == (["xa"], "bc")
    assert _stream(["x", "a", "b", "c", "d"], ["abcd", "bc"]) == (["x", "", "", "a"], "bc")


def test_overlapping_stops_ending_together_cut_at_the_longer() -> None:
    assert _stream(["say hello"], ["lo", "hello"]) == (["say "], "hello")


def test_self_overlapping_stop_is_found_after_a_false_start() -> None:
    # "aab" inside "aaab": the held "aa" must slide, not be dropped
    assert _stream(["a", "a", "a", "b", "z"], ["aab"]) == (["", "", "a", ""], "aab")


def test_unicode_stops_split_mid_string() -> None:
    text = "naïve café — 東京タワー 🗼 は高い"
    pieces, matched = _stream(["naïve café — 東", "京タ", "ワー 🗼", " は高い"], ["タワー 🗼"])
    assert "".join(pieces) == "naïve café — 東京" and matched == "タワー 🗼"
    pieces, matched = _stream([text[:5], text[5:]], ["e\u0301"])  # a decomposed é does not match the composed one
    assert "".join(pieces) == text and matched is None


def test_no_stop_strings_emits_everything_immediately() -> None:
    checker = StopChecker([], include_stop=False)
    assert checker.push("abc") == ("abc", None)
    assert checker.flush() == ""


def test_empty_stop_strings_are_ignored() -> None:
    assert _stream(["abc"], ["", "c"]) == (["ab"], "c")


def test_pushing_after_a_match_is_an_error() -> None:
    checker = StopChecker(["x"], include_stop=False)
    checker.push("x")
    with pytest.raises(RuntimeError, match="'x'"):
        checker.push("more")


@pytest.mark.parametrize("include_stop", [False, True])
def test_result_does_not_depend_on_how_text_is_split(include_stop: bool) -> None:
    rng = random.Random(11)
    alphabet = "ab<>/é🙂 "
    stops_pool = ["</a>", "ab", "bba", "🙂🙂", "é<", "aaa", "> /"]
    for _ in range(2000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 20)))
        stop = rng.sample(stops_pool, k=rng.randint(1, 3))
        pieces, matched = _stream(_random_split(text, rng), stop, include_stop)
        assert ("".join(pieces), matched) == _expected_cut(text, stop, include_stop), (text, stop)
