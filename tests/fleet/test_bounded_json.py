"""Bounded JSON parsing: nesting is measured without recursion, and brackets inside strings do not count."""

from __future__ import annotations

import json

import pytest

from fleet.bounded_json import JsonTooDeep, check_depth, loads_bounded


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def test_nesting_up_to_the_bound_parses_and_one_more_level_is_refused():
    assert loads_bounded(_nested(8), max_depth=8) == json.loads(_nested(8))
    with pytest.raises(JsonTooDeep, match="more than 8 levels"):
        loads_bounded(_nested(9), max_depth=8)
    with pytest.raises(JsonTooDeep):
        loads_bounded('{"a":' * 200_000 + "1" + "}" * 200_000)  # far past Python's recursion limit


@pytest.mark.parametrize("text", [
    '{"s": "' + "[" * 500 + '"}',             # brackets inside a string
    '{"s": "\\"' + "{" * 500 + '\\""}',       # ... after an escaped quote
    json.dumps({"messages": [{"role": "user", "content": "[[[{{{" * 100}]}),
])
def test_brackets_inside_strings_do_not_count(text):
    check_depth(text, 4)
    assert loads_bounded(text, max_depth=4) == json.loads(text)


def test_a_refusal_is_a_value_error_so_parsers_report_it_as_bad_input():
    assert issubclass(JsonTooDeep, ValueError)
    with pytest.raises(ValueError):
        check_depth(b"[" * 100, 10)  # unbalanced, still too deep
