"""A request body as JSON, within explicit limits: every fault is an ApiError (400), never a 500.

Python's own parser has limits that end as exceptions a server would answer with 500: an
integer of more than 4,300 digits (ValueError), deep nesting (RecursionError). Here every
number is checked for length before it is converted, NaN and Infinity (not JSON) are refused,
and the parsed value is walked once for its depth and the size of each array and object.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

from .errors import ApiError


@dataclass(frozen=True)
class JsonLimits:
    max_depth: int = 32
    max_items: int = 10_000
    max_number_chars: int = 64


class _Refused(ValueError):
    pass


def _bad(message: str) -> ApiError:
    return ApiError(400, "invalid_json", message)


def parse(text: str, limits: JsonLimits):
    """`text` as a JSON value; ApiError 400 when it is not JSON or breaks a limit."""
    n = limits.max_number_chars

    def number(kind):
        def convert(s: str):
            if len(s) > n:
                raise _Refused(f"a JSON number has {len(s)} characters; the limit is {n}")
            return kind(s)
        return convert

    def constant(name: str):
        raise _Refused(f"{name} is not JSON")

    try:
        value = json.loads(text, parse_int=number(int), parse_float=number(float), parse_constant=constant)
    except _Refused as exc:
        raise _bad(str(exc)) from None
    except json.JSONDecodeError as exc:
        raise _bad(f"the request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise _bad(f"the JSON nests deeper than {limits.max_depth} levels") from None
    except ValueError as exc:  # anything else the parser refuses: still the client's fault
        raise _bad(f"the request body is not valid JSON ({type(exc).__name__})") from None
    check(value, limits)
    return value


def check(value, limits: JsonLimits) -> None:
    """Depth and container sizes, iteratively (no recursion to overflow)."""
    stack = [(value, 1)]
    while stack:
        v, depth = stack.pop()
        if isinstance(v, dict):
            children = v.values()
        elif isinstance(v, list):
            children = v
        else:
            continue
        if depth > limits.max_depth:
            raise _bad(f"the JSON nests deeper than {limits.max_depth} levels")
        if len(v) > limits.max_items:
            what = "an object has" if isinstance(v, dict) else "an array has"
            raise _bad(f"{what} {len(v)} items; the limit is {limits.max_items}")
        stack.extend((c, depth + 1) for c in children if isinstance(c, (dict, list)))
