"""The strict JSON reader: each refusal it documents, and nothing else refused."""

from __future__ import annotations

import json

import pytest

from privacy import strict_json
from privacy.errors import JsonError, Reason


@pytest.mark.parametrize(
    "text",
    [
        b'{"a": 1, "b": [1.5, -2, "x\\u00e9", true, false, null], "c": {"d": {}}}',
        '{"caf\u00e9": "\u00fcml\u00e4ut"}'.encode(),
        b' [1e-300, -0, 9007199254740991, -9007199254740991] ',
        b'"\\ud83d\\ude00"',  # a paired surrogate escape is one character
    ],
)
def test_accepts_what_json_accepts_within_bounds(text):
    assert strict_json.loads(text) == json.loads(text)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (b'{"a": 1, "a": 2}', "duplicate member name 'a'"),
        (b'[{"x": {"k": 1, "k": 1}}]', "duplicate member name 'k'"),
        (b'\xef\xbb\xbf{"a": 1}', "byte-order mark"),
        ('\ufeff{"a": 1}', "byte-order mark"),
        (b'{"a": "\xc3"}', "not valid UTF-8"),
        (b'{"a": NaN}', "NaN is not a JSON number"),
        (b'[-Infinity]', "-Infinity is not a JSON number"),
        (b'[1e400]', "out of the range of a double"),
        (b'[9007199254740992]', "beyond"),
        (b'[' + b"1" * 100_000 + b"]", "beyond"),  # never built: past Python's int-from-string limit too
        (b'{"a": "x\\u0000y"}', "NUL"),
        (b'{"\\u0000": 1}', "NUL"),
        (b'["\\ud800"]', "surrogate"),
        (b"[" * 33 + b"]" * 33, "nests 33 levels deep"),
        (b"[" * 200_000, "nests 200000 levels deep"),
        (b'{"a": 1} x', "not JSON"),
        (b"", "not JSON"),
    ],
)
def test_refusals_are_precise(text, message):
    with pytest.raises(JsonError, match=message) as info:
        strict_json.loads(text)
    assert info.value.reason is Reason.MALFORMED


def test_an_unterminated_string_of_escaped_quotes_is_refused_in_one_pass():
    """Regression: the nesting pre-scan once rescanned such a text from every quote
    (quadratic: about a minute for 32 KB). Now it is one pass; the parser then refuses it."""
    with pytest.raises(JsonError, match="not JSON: Unterminated string"):
        strict_json.loads(b'["' + b'\\"' * 500_000)


def test_brackets_inside_strings_do_not_count_as_nesting():
    text = json.dumps({"a": "[[[[" * 100 + '\\"{{{'}).encode()
    assert strict_json.loads(text, max_depth=1)["a"].startswith("[[[[")


def test_bounds_are_parameters():
    with pytest.raises(JsonError, match="larger than 10 bytes"):
        strict_json.loads(b'{"abc": 12345}', max_bytes=10)
    with pytest.raises(JsonError, match="larger than 4 bytes"):
        strict_json.loads('"\u00e9\u00e9"', max_bytes=4)  # 6 bytes as UTF-8
    assert strict_json.loads(b"[[1]]", max_depth=2) == [[1]]
    with pytest.raises(JsonError, match="nests 3 levels"):
        strict_json.loads(b"[[[1]]]", max_depth=2)
    assert strict_json.loads(b"[-100]", max_int=100) == [-100]
    with pytest.raises(JsonError, match="beyond"):
        strict_json.loads(b"[101]", max_int=100)
