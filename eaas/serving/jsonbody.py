"""Decode a request body into a JSON object, or refuse it with a 400 that says what is wrong.

Stricter than `json.loads(bytes)`, which the engine must never see the results of:
- the body must be UTF-8 (RFC 8259); `json.loads` would also guess UTF-16/32 and let raw
  surrogate bytes through (`surrogatepass`);
- `NaN`, `Infinity` and `-Infinity` are refused: they are not JSON, Python merely accepts them;
- no string (value or field name) may hold a lone surrogate (`"\\ud800"`): it is legal JSON
  but not Unicode, so the tokenizer, the chat template and the response writer would fail on
  it later (a 500, or a stream cut short). The error names the field and the index.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from eaas.serving.api_errors import ApiError

__all__ = ["json_type", "parse_json_body"]


def parse_json_body(raw: bytes) -> dict[str, Any]:
    """The request body as a JSON object, or a 400 that says what is wrong with it."""
    if not raw:
        raise ApiError(400, "request body is empty; expected a JSON object")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ApiError(400, f"request body is not valid UTF-8 (byte 0x{raw[e.start]:02x} at "
                       f"offset {e.start}); send JSON encoded as UTF-8") from None
    try:
        body = json.loads(text, parse_constant=_refuse_constant)
    except (ValueError, RecursionError) as e:
        why = str(e)
        if "integer string conversion" in why:  # Python's guard against quadratic int parsing
            why = f"an integer has more than {sys.get_int_max_str_digits()} digits"
        raise ApiError(400, f"request body is not valid JSON: {why}") from None
    if not isinstance(body, dict):
        raise ApiError(400, f"request body must be a JSON object, got {json_type(body)}")
    _check_unicode(body)
    return body


def json_type(v: object) -> str:
    """The JSON name of a decoded value's type (for error messages)."""
    return {dict: "object", list: "array", str: "string", bool: "boolean", int: "integer",
            float: "number", type(None): "null"}.get(type(v), type(v).__name__)


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value (send a finite number or null)")


def _check_unicode(body: dict[str, Any]) -> None:
    """Raise a 400 naming the first string that holds a lone surrogate (iterative: bodies
    nest as deep as the JSON decoder allows)."""
    stack: list[tuple[str, Any]] = [("", body)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, str):
            i = _lone_surrogate(value)
            if i is not None:
                raise ApiError(400, f"{path} contains a lone surrogate (U+{ord(value[i]):04X}) "
                               f"at index {i}; text must be valid Unicode (a character outside "
                               "the BMP is a surrogate pair: a high then a low \\u escape)",
                               param=_top_field(path))
        elif isinstance(value, dict):
            items = list(value.items())
            for key, item in reversed(items):
                if _lone_surrogate(key) is not None:
                    where = f"an object field name in {path}" if path else "a field name"
                    raise ApiError(400, f"{where} contains a lone surrogate; text must be valid "
                                   "Unicode", param=_top_field(path) if path else None)
                stack.append((f"{path}.{key}" if path else key, item))
        elif isinstance(value, list):
            stack.extend((f"{path}[{j}]", item) for j, item in reversed(list(enumerate(value))))


def _lone_surrogate(s: str) -> int | None:
    if s.isascii():
        return None
    try:
        s.encode("utf-8")
    except UnicodeEncodeError as e:
        return e.start
    return None


def _top_field(path: str) -> str:
    return path.split(".", 1)[0].split("[", 1)[0]
