"""Typed messages on the wire: frozen dataclasses <-> tagged trees, each type declared once.

    types = MessageTypes([
        MessageType("compute", ComputeBatch, {"layer": INT, "x": tensor(2), "expert_ids": ...}),
        MessageType("ping", Ping),
    ], noun="request")
    tree = types.encode(ComputeBatch(3, x, ids))   # {"op": "compute", "layer": 3, "x": x, ...}
    msg = types.decode(tree)                       # ComputeBatch again, every field checked

A tagged tree is a plain map (the tag under "op", then one key per field), so the codec frames
it like any other message: every scheme carries it, and the raw-byte bounds of
`eaas.transport.scan` are checked before anything is unpacked, as for any frame. `decode` is
for untrusted input: the tag must be registered, every field is checked by its `Field` (a
ValueError names the message, the field, its value and what is allowed), unknown fields are
refused, a missing one is refused unless its dataclass field has a default, and the type's own
cross-field `check` runs last. `encode` trusts its input (the sender built the dataclass) and
only converts fields to their wire form (`Field.encode`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Mapping
from types import MappingProxyType
from typing import Any

import torch

__all__ = ["Field", "MessageType", "MessageTypes", "INT", "TEXT", "BOOL", "number", "tensor",
           "int_lists_by_int"]


def _same(value: Any) -> Any:
    return value


@dataclasses.dataclass(frozen=True, slots=True)
class Field:
    """How one field travels: `parse(wire value) -> value` (raises on a bad one), `encode(value)
    -> wire value`, and `allowed`, the words an error uses ("an int", "a [N] integer tensor")."""

    allowed: str
    parse: Callable[[Any], Any] = _same
    encode: Callable[[Any], Any] = _same


def _int(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError
    return value


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError
    return value


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError
    return value


INT = Field("an int", _int)
TEXT = Field("a string", _text)
BOOL = Field("true or false", _bool)


def number(lo: float = -math.inf, hi: float = math.inf) -> Field:
    """A finite int or float in [lo, hi] (bool refused); decoded as float."""

    def parse(value: Any) -> float:
        if (not isinstance(value, (int, float)) or isinstance(value, bool)
                or not math.isfinite(value) or not lo <= value <= hi):
            raise ValueError
        return float(value)

    bounds = " and ".join(s for s in (f">= {lo}" if lo > -math.inf else "",
                                      f"<= {hi}" if hi < math.inf else "") if s)
    return Field(f"a finite number {bounds}".rstrip(), parse)


def tensor(ndim: int, kind: str = "any", shape: str = "") -> Field:
    """A torch.Tensor of `ndim` dims; kind "float", "int" (integer, not bool) or "any";
    `shape` names the dims in errors ("[N, H]")."""
    if kind not in ("any", "float", "int"):
        raise ValueError(f"tensor kind={kind!r}: must be 'any', 'float' or 'int'")

    def parse(value: Any) -> torch.Tensor:
        if not isinstance(value, torch.Tensor) or value.dim() != ndim:
            raise ValueError
        if kind == "float" and not value.dtype.is_floating_point:
            raise ValueError
        if kind == "int" and (value.dtype.is_floating_point or value.dtype.is_complex
                              or value.dtype == torch.bool):
            raise ValueError
        return value

    what = {"any": "", "float": " floating-point", "int": " integer"}[kind]
    return Field(f"a {shape or f'{ndim}-D'}{what} tensor", parse)


def _int_lists_by_int(value: Any) -> dict[int, list[int]]:
    if not isinstance(value, dict):
        raise ValueError
    out: dict[int, list[int]] = {}
    for key, ids in value.items():
        if isinstance(key, str) and key.isdigit():
            key = int(key)
        if (not isinstance(key, int) or isinstance(key, bool) or not isinstance(ids, list)
                or not all(isinstance(e, int) and not isinstance(e, bool) for e in ids)):
            raise ValueError
        out[key] = list(ids)
    return out


def _encode_int_lists(value: Mapping[int, Any]) -> dict[str, list[int]]:
    return {str(k): [int(e) for e in v] for k, v in value.items()}


def int_lists_by_int(what: str = "{layer: [ids]}") -> Field:
    """A map int -> list of ints; on the wire the keys are decimal strings (as JSON has them);
    decoding takes int keys too."""
    return Field(f"a map {what}", _int_lists_by_int, _encode_int_lists)


@dataclasses.dataclass(frozen=True, slots=True)
class MessageType:
    """One registered message: its wire `tag`, its dataclass `cls`, a Field per dataclass field,
    and `check(msg)`, a cross-field check of a decoded message (raises ValueError)."""

    tag: str
    cls: type
    fields: Mapping[str, Field] = dataclasses.field(default_factory=dict)
    check: Callable[[Any], None] | None = None

    def __post_init__(self) -> None:
        if not dataclasses.is_dataclass(self.cls):
            raise TypeError(f"message type {self.tag!r}: {self.cls!r} is not a dataclass")
        names = [f.name for f in dataclasses.fields(self.cls)]
        if sorted(names) != sorted(self.fields):
            raise TypeError(f"message type {self.tag!r} declares fields {sorted(self.fields)} "
                            f"but {self.cls.__name__} has {sorted(names)}")


def _short(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"tensor{tuple(value.shape)} {value.dtype}"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


class MessageTypes:
    """An immutable registry of message types: dataclass <-> {"op": tag, field: value, ...}.

    noun: what the messages are, for errors ("unknown request op 'exec'; allowed: ...").
    """

    KEY = "op"

    def __init__(self, types: Iterable[MessageType], *, noun: str = "message") -> None:
        by_tag: dict[str, MessageType] = {}
        by_cls: dict[type, MessageType] = {}
        for t in types:
            if t.tag in by_tag or t.cls in by_cls:
                raise ValueError(f"message type {t.tag!r} ({t.cls.__name__}) registered twice")
            by_tag[t.tag], by_cls[t.cls] = t, t
        self.noun = noun
        self._by_tag = MappingProxyType(by_tag)
        self._by_cls = MappingProxyType(by_cls)
        self._defaults = MappingProxyType({t.tag: _defaults(t.cls) for t in by_tag.values()})

    @property
    def tags(self) -> tuple[str, ...]:
        return tuple(self._by_tag)

    def __contains__(self, msg: Any) -> bool:
        """Whether `msg` (an instance, not a class) is of a registered type."""
        return type(msg) in self._by_cls

    def tag_of(self, msg: Any) -> str:
        """The wire tag of `msg`; TypeError if its type is not registered."""
        t = self._by_cls.get(type(msg))
        if t is None:
            raise TypeError(f"{type(msg).__name__} is not a registered {self.noun}; "
                            f"registered: {', '.join(c.__name__ for c in self._by_cls)}")
        return t.tag

    def encode(self, msg: Any) -> dict[str, Any]:
        """The tagged tree of a registered dataclass instance (TypeError for any other)."""
        t = self._by_cls[type(msg)] if msg in self else None
        if t is None:
            self.tag_of(msg)  # raises the TypeError
        assert t is not None
        tree: dict[str, Any] = {self.KEY: t.tag}
        for name, spec in t.fields.items():
            tree[name] = spec.encode(getattr(msg, name))
        return tree

    def decode(self, tree: Any) -> Any:
        """The dataclass a tagged tree stands for; ValueError (naming the field) if it is not
        one of the registered types exactly."""
        if not isinstance(tree, dict) or self.KEY not in tree:
            raise ValueError(f"a {self.noun} must be a map with an {self.KEY!r} key; "
                             f"got {_short(tree) if not isinstance(tree, dict) else 'a map'}")
        tag = tree[self.KEY]
        t = self._by_tag.get(tag) if isinstance(tag, str) else None
        if t is None:
            raise ValueError(f"unknown {self.noun} {self.KEY} {tag!r}; allowed: "
                             f"{', '.join(self._by_tag)}")
        extra = [k for k in tree if k != self.KEY and k not in t.fields]
        if extra:
            raise ValueError(f"{tag} {self.noun}: unknown field {extra[0]!r}; fields: "
                             f"{', '.join(t.fields) or 'none'}")
        defaults = self._defaults[tag]
        values: dict[str, Any] = {}
        for name, spec in t.fields.items():
            if name not in tree:
                if name in defaults:
                    continue
                raise ValueError(f"{tag} {self.noun}: field {name!r} is missing")
            value = tree[name]
            try:
                values[name] = spec.parse(value)
            except (ValueError, TypeError):
                raise ValueError(f"{tag} {name}={_short(value)}: must be {spec.allowed}"
                                 ) from None
        msg = t.cls(**values)
        if t.check is not None:
            t.check(msg)
        return msg


def _defaults(cls: type) -> frozenset[str]:
    """The fields of dataclass `cls` that have a default."""
    return frozenset(f.name for f in dataclasses.fields(cls)
                     if f.default is not dataclasses.MISSING
                     or f.default_factory is not dataclasses.MISSING)
