"""A strict, bounded JSON reader for everything that crosses a trust boundary.

Python's ``json.loads`` accepts more than RFC 8259 (I-JSON, RFC 7493) allows and
has no limits: a duplicate key silently keeps the last value (two parties can read
one document differently), ``NaN``/``Infinity`` are accepted, deep nesting raises
``RecursionError``, and a 100,000-digit integer costs quadratic time (or raises
``ValueError`` past ``sys.get_int_max_str_digits``). :func:`loads` refuses all of
that *before* the standard parser can misbehave, each with a precise message:

- more than ``max_bytes`` bytes;
- a UTF-8 byte-order mark, or bytes that are not UTF-8 (RFC 8259 §8.1);
- nesting deeper than ``max_depth`` (counted on the raw text, so the parser never
  recurses further than that);
- a duplicate member name in any object (I-JSON §2.3);
- ``NaN``, ``Infinity``, ``-Infinity``, or a number that overflows a double;
- an integer whose magnitude exceeds ``max_int`` (checked on its digit count
  first, so no big integer is ever built);
- a string (member name or value) holding NUL or an unpaired surrogate escape.

Every refusal is a :class:`~privacy.errors.JsonError` with reason ``malformed``.
"""

from __future__ import annotations

import json
import math
import re
from itertools import accumulate
from typing import Any

from .errors import JsonError, Reason

__all__ = ["DEFAULT_MAX_BYTES", "DEFAULT_MAX_DEPTH", "DEFAULT_MAX_INT", "loads"]

DEFAULT_MAX_BYTES = 1024 * 1024
DEFAULT_MAX_DEPTH = 32
#: I-JSON's interoperable range (RFC 7493 §2.2): exactly representable as a double.
DEFAULT_MAX_INT = 2**53 - 1

_BOM = b"\xef\xbb\xbf"
# A string literal; an unterminated one runs to the end of the text. Possessive (*+) and
# with an optional closing quote, so every match succeeds at its first quote without
# backtracking: linear time. (With a required closing quote, a text of escaped quotes
# and no terminator made each quote rescan the rest: quadratic, minutes for 64 KB.)
_STRING = re.compile(r'"(?:[^"\\]|\\.)*+"?', re.DOTALL)
_NOT_BRACKET = re.compile(r"[^\[\]{}]")
_SURROGATE = re.compile("[\ud800-\udfff]")


def _refuse(message: str) -> JsonError:
    return JsonError(Reason.MALFORMED, message)


def _depth(text: str) -> int:
    """The deepest nesting of arrays and objects, ignoring brackets inside strings.

    Linear and iterative; a malformed text may give any figure here, and the parser
    then refuses it anyway.
    """
    brackets = _NOT_BRACKET.sub("", _STRING.sub("", text))
    return max(accumulate(1 if c in "[{" else -1 for c in brackets), default=0)


def _check_string(value: str, where: str) -> str:
    if "\x00" in value:
        raise _refuse(f"{where} contains a NUL character")
    if _SURROGATE.search(value):
        raise _refuse(f"{where} contains an unpaired UTF-16 surrogate escape")
    return value


def loads(
    data: bytes | bytearray | memoryview | str,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_depth: int = DEFAULT_MAX_DEPTH,
    max_int: int = DEFAULT_MAX_INT,
) -> Any:
    """Parse one JSON document strictly (see the module docstring); raise JsonError."""
    if isinstance(data, str):
        raw = None
        if len(data) > max_bytes:  # a character is at least one byte
            raise _refuse(f"the JSON document is larger than {max_bytes} bytes")
        text = data
    else:
        raw = bytes(data)
        if len(raw) > max_bytes:
            raise _refuse(f"the JSON document is larger than {max_bytes} bytes")
        if raw.startswith(_BOM):
            raise _refuse("the JSON document starts with a UTF-8 byte-order mark")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise _refuse(f"the JSON document is not valid UTF-8 (byte {exc.start})") from None
    if text.startswith("\ufeff"):
        raise _refuse("the JSON document starts with a byte-order mark")
    if raw is None and len(text.encode("utf-8", "surrogatepass")) > max_bytes:
        raise _refuse(f"the JSON document is larger than {max_bytes} bytes")
    depth = _depth(text)
    if depth > max_depth:
        raise _refuse(f"the JSON document nests {depth} levels deep; the limit is {max_depth}")
    max_digits = len(str(max_int))

    def parse_int(digits: str) -> int:
        if len(digits.lstrip("-")) > max_digits or abs(value := int(digits)) > max_int:
            raise _refuse(f"integer {digits[:24]}{'...' if len(digits) > 24 else ''} is beyond +-{max_int}")
        return value

    def parse_float(literal: str) -> float:
        value = float(literal)
        if not math.isfinite(value):
            raise _refuse(f"number {literal[:24]} is out of the range of a double")
        return value

    def parse_constant(name: str) -> None:
        raise _refuse(f"{name} is not a JSON number")

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        obj: dict[str, Any] = {}
        for key, value in items:
            if key in obj:
                raise _refuse(f"duplicate member name {key[:64]!r}")
            obj[_check_string(key, f"member name {key[:64]!r}")] = value
        return obj

    try:
        result = json.loads(
            text,
            object_pairs_hook=pairs,
            parse_int=parse_int,
            parse_float=parse_float,
            parse_constant=parse_constant,
        )
    except json.JSONDecodeError as exc:
        raise _refuse(f"not JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except RecursionError:  # unreachable after the depth check; kept so it can never escape
        raise _refuse("the JSON document nests too deeply") from None
    # String values (member names were checked by the hook), iteratively: depth is bounded anyway.
    stack = [result]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            _check_string(item, "a string")
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return result
