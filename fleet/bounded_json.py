"""JSON parsing with a bound on nesting depth, for every text a tenant sends (dataset lines, request bodies).

Python's `json` recurses once per nesting level: a line of 100 000 `[` raises RecursionError (not
ValueError), and one just under the interpreter's limit can still exhaust a thread's C stack. So the
depth is measured first, by a flat scan that skips string contents, and anything deeper than
`max_depth` is refused with `JsonTooDeep` (a ValueError) before `json.loads` sees it. Our formats need
depth 3 (`{"messages": [{...}]}`); `MAX_JSON_DEPTH` leaves ample room.
"""

from __future__ import annotations

import json
import re
from typing import Any

__all__ = ["MAX_JSON_DEPTH", "JsonTooDeep", "check_depth", "loads_bounded"]

MAX_JSON_DEPTH = 64

# A complete JSON string literal (unrolled-loop form: linear time, no backtracking blow-up).
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKET = re.compile(rb"[^\[\]{}]+")


class JsonTooDeep(ValueError):
    """JSON nested deeper than `max_depth` levels of arrays/objects."""

    def __init__(self, max_depth: int) -> None:
        self.max_depth = max_depth
        super().__init__(f"JSON nested more than {max_depth} levels deep; flatten the structure")


def check_depth(data: bytes | str, max_depth: int = MAX_JSON_DEPTH) -> None:
    """Raise JsonTooDeep if arrays/objects in `data` nest deeper than `max_depth` (brackets inside strings
    do not count). Malformed JSON passes unless its brackets alone are too deep: the parser reports it."""
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data
    if raw.count(b"[") + raw.count(b"{") <= max_depth:
        return  # the common case: too few brackets to nest that deep, no scan needed
    depth = 0
    for byte in _NOT_BRACKET.sub(b"", _STRING.sub(b"", raw)):
        if byte in (0x5B, 0x7B):  # [ {
            depth += 1
            if depth > max_depth:
                raise JsonTooDeep(max_depth)
        else:
            depth -= 1


def loads_bounded(data: bytes | str, *, max_depth: int = MAX_JSON_DEPTH, **kwargs: Any) -> Any:
    """`json.loads(data, **kwargs)`, refusing nesting deeper than `max_depth` with JsonTooDeep."""
    check_depth(data, max_depth)
    try:
        return json.loads(data, **kwargs)
    except RecursionError as e:  # not expected under the bound; never let it out as anything but bad input
        raise JsonTooDeep(max_depth) from e
