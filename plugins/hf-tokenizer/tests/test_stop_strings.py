"""Stop strings over plain text deltas: first match wins, nothing it swallows is ever emitted."""

from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from flowserve_hf_tokenizer.stop_strings import StopStringMatcher


def expected_output(text: str, stops: list[str], include: bool) -> tuple[str, bool]:
    """The reference rule on the whole text: the match that ends first (longest on a tie)."""
    matches = [(text.find(s) + len(s), text.find(s)) for s in stops if s in text]
    if not matches:
        return text, False
    end, start = min(matches)
    return (text[:end] if include else text[:start]), True


def stream(matcher: StopStringMatcher, pieces: list[str]) -> tuple[list[str], bool]:
    emitted, stopped = [], False
    for piece in pieces:
        text, stopped = matcher.feed(piece)
        emitted.append(text)
        if stopped:
            break
    if not stopped:
        emitted.append(matcher.flush())
    return emitted, stopped


def split(text: str, cuts: list[int]) -> list[str]:
    points = sorted({c % (len(text) + 1) for c in cuts} | {0, len(text)})
    return [text[a:b] for a, b in zip(points, points[1:])]


def test_a_stop_string_split_across_deltas_is_never_streamed():
    # vLLM #3572/#3574: "Hello wor" must not reach the client when the stop string is "world".
    matcher = StopStringMatcher(["world"])
    assert matcher.feed("Hello wor") == ("Hello ", False)
    assert matcher.held_text == "wor"
    assert matcher.feed("ld and more") == ("", True)
    assert matcher.feed("anything") == ("", True)


def test_held_text_that_turns_out_not_to_stop_is_released():
    matcher = StopStringMatcher(["world"])
    assert matcher.feed("Hello wo") == ("Hello ", False)
    assert matcher.feed("nderful") == ("wonderful", False)
    assert matcher.feed("w") == ("", False)
    assert matcher.flush() == "w"


def test_include_stop_str_in_output_keeps_the_match_and_drops_what_follows():
    matcher = StopStringMatcher(["\n\n"], include_stop_str_in_output=True)
    assert matcher.feed("one\n") == ("one", False)
    assert matcher.feed("\ntwo") == ("\n\n", True)


def test_the_stop_string_that_ends_first_wins():
    matcher = StopStringMatcher(["abcd", "bc"])
    assert matcher.feed("xabcd") == ("xa", True)
    matcher = StopStringMatcher(["bc", "abc"])  # same end: the longer one cuts earlier
    assert matcher.feed("xabc") == ("x", True)


def test_empty_stop_strings_are_refused():
    with pytest.raises(ValueError, match="must not be empty"):
        StopStringMatcher(["ok", ""])


alphabet = st.sampled_from(list("ab \n.") + ["é", "世"])


@settings(max_examples=300, deadline=None)
@given(text=st.text(alphabet, max_size=40), stops=st.lists(st.text(alphabet, min_size=1, max_size=5), min_size=1,
       max_size=3), include=st.booleans(), cuts=st.lists(st.integers(0, 60), max_size=12))
def test_streaming_any_split_gives_exactly_the_text_before_the_first_stop(text, stops, include, cuts):
    emitted, stopped = stream(StopStringMatcher(stops, include), split(text, cuts))
    assert ("".join(emitted), stopped) == expected_output(text, stops, include)
