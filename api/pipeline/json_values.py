"""Values a parsed JSON body may hold that no request model refuses: lone surrogates, NaN, deep nesting.

Its own module because both the request checks (api.pipeline.validation) and the error mapping (api.errors, which names
such a value even where it also made a field invalid) need it, and neither may import the other.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

# Deeper than any real request (a tool schema nests a few levels); past it the canonical form's
# json.dumps could exhaust the recursion limit.
MAX_DEPTH = 64


def _dotted(path: list[str | int]) -> str:
    return ".".join(str(p) for p in path)


def _utf8_ok(text: str) -> bool:
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _keys_ok(mapping: dict[Any, Any]) -> bool:
    return all(_utf8_ok(k) for k in mapping if type(k) is str)


def _not_unicode(path: list[str | int], *, key: bool = False) -> tuple[str, str | None]:
    where = _dotted(path)
    what = f"Invalid key in '{where or 'body'}'" if key else f"Invalid value for '{where}'"
    return f"{what}: the string is not valid Unicode (it holds a lone surrogate such as \\ud800).", where or None


def json_value_problem(body: Any) -> tuple[str, str | None] | None:
    """(message, param) for the first lone surrogate (in a string or a key), NaN or infinity, or nesting
    past MAX_DEPTH anywhere in a parsed body; None when there is none.

    Hand-written rather than a pydantic validator: JSON `\\ud800` escapes parse into Python strings that
    every `str` field accepts but that cannot be encoded (the cache key, the database and the worker all
    encode them), and they can sit in any field, in untyped dicts (tool schemas) and in unknown extras;
    Python's parser also accepts NaN, which is not JSON. One walk over the whole body covers them all.
    It runs on every request, on the event loop: iterative (a deep body cannot exhaust the stack), in
    document order, and a path is only built for a problem (16 MB of token ids take ~0.5 s, like parsing).
    """
    if not isinstance(body, dict | list):
        return None
    if isinstance(body, dict) and not _keys_ok(body):
        return _not_unicode([], key=True)
    keys: list[str | int] = []  # the path to the container on top of `walking`
    walking: list[Iterator[tuple[Any, Any]]] = [iter(body.items()) if isinstance(body, dict) else enumerate(body)]
    while walking:
        if len(walking) > MAX_DEPTH:
            return f"The request body nests deeper than {MAX_DEPTH} levels.", _dotted(keys)
        for key, value in walking[-1]:
            kind = type(value)
            if kind is str:
                if not _utf8_ok(value):
                    return _not_unicode([*keys, key])
            elif kind is float:
                if not math.isfinite(value):
                    where = _dotted([*keys, key])
                    return f"Invalid value for '{where}': NaN and Infinity are not JSON numbers.", where
            elif kind is dict:
                if not _keys_ok(value):
                    return _not_unicode([*keys, key], key=True)
                keys.append(key)
                walking.append(iter(value.items()))
                break
            elif kind is list:
                keys.append(key)
                walking.append(enumerate(value))
                break
        else:  # this container is done: back to its parent, where its iterator left off
            walking.pop()
            if keys:
                keys.pop()
    return None
