"""Typed messages: a registry round-trips its dataclasses through the codec, and decoding
refuses anything that is not exactly one of them, naming the bad field."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from eaas.transport import MessageType, MessageTypes, decode_message, encode_message
from eaas.transport.wire import INT, TEXT, int_lists_by_int, number, tensor


@dataclass(frozen=True, slots=True)
class Rows:
    layer: int
    x: torch.Tensor
    note: str = ""


@dataclass(frozen=True, slots=True)
class Load:
    experts: dict


@dataclass(frozen=True, slots=True)
class Nap:
    seconds: float


TYPES = MessageTypes([
    MessageType("rows", Rows, {"layer": INT, "x": tensor(2, "float", "[N, H]"), "note": TEXT}),
    MessageType("load", Load, {"experts": int_lists_by_int()}),
    MessageType("nap", Nap, {"seconds": number(lo=0.0, hi=5.0)}),
], noun="request")


def test_a_message_round_trips_through_a_frame():
    x = torch.arange(6, dtype=torch.float32).view(2, 3)
    back = decode_message(encode_message(Rows(3, x, "hi"), types=TYPES), types=TYPES)
    assert isinstance(back, Rows) and (back.layer, back.note) == (3, "hi")
    assert torch.equal(back.x, x)


def test_the_wire_form_is_a_tagged_map():
    assert TYPES.encode(Load({1: (4, 2)})) == {"op": "load", "experts": {"1": [4, 2]}}
    assert TYPES.decode({"op": "load", "experts": {"1": [4, 2], 3: []}}) == Load({1: [4, 2], 3: []})
    assert TYPES.decode({"op": "rows", "layer": 0, "x": torch.zeros(1, 2)}).note == ""  # default


@pytest.mark.parametrize("tree,match", [
    ({"op": "exec"}, r"unknown request op 'exec'; allowed: rows, load, nap"),
    (["op", "rows"], r"a request must be a map with an 'op' key"),
    ({"layer": 1}, r"a request must be a map with an 'op' key; got a map"),
    ({"op": "rows", "x": torch.zeros(1, 2)}, r"rows request: field 'layer' is missing"),
    ({"op": "rows", "layer": True, "x": torch.zeros(1, 2)}, r"rows layer=True: must be an int"),
    ({"op": "rows", "layer": 1, "x": torch.zeros(3)},
     r"rows x=tensor\(3,\) torch.float32: must be a \[N, H\] floating-point tensor"),
    ({"op": "rows", "layer": 1, "x": torch.zeros(1, 2, dtype=torch.int64)}, r"floating-point"),
    ({"op": "rows", "layer": 1, "x": torch.zeros(1, 2), "y": 0},
     r"rows request: unknown field 'y'; fields: layer, x, note"),
    ({"op": "load", "experts": {"a": [1]}}, r"load experts=\{'a': \[1\]\}: must be a map"),
    ({"op": "load", "experts": {"1": [True]}}, r"load experts="),
    ({"op": "nap", "seconds": float("nan")}, r"nap seconds=nan: must be a finite number >= 0"),
    ({"op": "nap", "seconds": 6}, r"<= 5.0"),
    ({"op": "nap", "seconds": "1"}, r"nap seconds='1'"),
])
def test_decoding_names_what_is_wrong(tree, match):
    with pytest.raises(ValueError, match=match):
        TYPES.decode(tree)


def test_declarations_must_match_their_dataclass():
    with pytest.raises(TypeError, match=r"declares fields \['layer'\] but Rows has"):
        MessageType("rows", Rows, {"layer": INT})
    with pytest.raises(ValueError, match="registered twice"):
        MessageTypes([MessageType("nap", Nap, {"seconds": INT})] * 2)
    with pytest.raises(TypeError, match="dict is not a registered request"):
        TYPES.tag_of({})
