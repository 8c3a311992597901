"""Typed reads of optional JSON body fields: a wrong type or range is a 400 naming the field."""

from __future__ import annotations

import math
from typing import Any

from eaas.serving.api_errors import ApiError
from eaas.serving.jsonbody import json_type as _json_type

__all__ = ["Fields", "is_int", "short"]


def short(v: object) -> str:
    """repr(v), cut to a readable length (a 4000-digit integer is legal JSON)."""
    text = repr(v)
    return text if len(text) <= 40 else f"{text[:24]}...({len(text)} characters)"


def is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


class Fields:
    """Typed reads of optional body fields; a wrong type or range is a 400 naming the field."""

    def __init__(self, body: dict[str, Any]) -> None:
        self.body = body

    def get(self, name: str) -> Any:
        return self.body.get(name)

    def bool_(self, name: str, default: bool, *, param: str | None = None) -> bool:
        v = self.body.get(name)
        if v is None:
            return default
        if not isinstance(v, bool):
            where = f"{param}.{name}" if param else name
            raise ApiError(400, f"{where} must be a boolean, got {_json_type(v)}",
                           param=param or name)
        return v

    def int_(self, name: str, default: int | None, lo: int, hi: int | None, *,
             allowed: str | None = None) -> int | None:
        v = self.body.get(name)
        if v is None:
            return default
        rng = allowed or (f"an integer >= {lo}" + (f" and <= {hi}" if hi is not None else ""))
        if not is_int(v):
            raise ApiError(400, f"{name} must be {rng}, got {_json_type(v)} {short(v)}",
                           param=name)
        if v < lo or (hi is not None and v > hi):
            raise ApiError(400, f"{name}={short(v)} is not allowed: {rng}", param=name)
        return v

    def num(self, name: str, default: float, *, lo: float, hi: float | None = None,
            lo_open: bool = False) -> float:
        v = self.body.get(name)
        if v is None:
            return default
        lo_s = "(" if lo_open else "["
        rng = (f"a number in {lo_s}{lo}, {hi}]" if hi is not None
               else f"a number >= {lo}" if lo > -math.inf else "a number")
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ApiError(400, f"{name} must be {rng}, got {_json_type(v)} {short(v)}",
                           param=name)
        try:
            x = float(v)
        except OverflowError:  # a JSON integer beyond float range (no JSON float is)
            x = math.inf
        if not math.isfinite(x):
            raise ApiError(400, f"{name}={short(v)} is not allowed: {rng} (finite)", param=name)
        if x < lo or (lo_open and x == lo) or (hi is not None and x > hi):
            raise ApiError(400, f"{name}={short(v)} is not allowed: {rng}", param=name)
        return x

    def reject_set(self, name: str, message: str) -> None:
        if self.body.get(name):
            raise ApiError(400, message, param=name)
