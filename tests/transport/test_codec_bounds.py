"""Bounded decoding: nesting depth, value counts, declared lengths and extension types are
checked on the raw bytes before msgpack unpacks anything; hostile trees raise FrameError (the
crafted 200-deep extension tree once segfaulted the process)."""

from __future__ import annotations

import msgpack
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from eaas.errors import FrameError
from eaas.transport import TransportLimits, decode_message, encode_message
from eaas.transport.codec import EXT_TENSOR, EXT_TUPLE, MAGIC, PREFIX
from eaas.transport.scan import check_msgpack

from .raw_peer import nested_ext_frame

LIMITS = TransportLimits()


def frame_of_tree(tree: bytes, descs: list | None = None) -> bytes:
    header = msgpack.packb({"k": 0, "m": tree, "t": descs or []})
    return PREFIX.pack(MAGIC, len(header), 0) + header


def nested_lists(depth: int) -> list:
    value: list = []
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize("depth", [17, 200, 5000])
def test_deeply_nested_extensions_raise_frame_error_not_a_crash(depth: int) -> None:
    with pytest.raises(FrameError, match="max_depth"):
        decode_message(nested_ext_frame(depth))


def test_nesting_up_to_max_depth_round_trips_and_one_more_is_refused() -> None:
    limits = TransportLimits(max_depth=8)
    assert decode_message(encode_message(nested_lists(7), limits=limits),
                          limits=limits) == nested_lists(7)
    with pytest.raises(FrameError, match="max_depth=8"):
        decode_message(frame_of_tree(msgpack.packb(nested_lists(9))), limits=limits)


def test_too_many_values_are_refused_before_unpacking() -> None:
    limits = TransportLimits(max_elements=1000)
    with pytest.raises(FrameError, match="max_elements=1000"):
        decode_message(frame_of_tree(msgpack.packb(list(range(2000)))), limits=limits)


@pytest.mark.parametrize("tree", [
    b"\xdd\xff\xff\xff\xff",             # an array declaring 4 billion values, none present
    b"\xdb\xff\xff\xff\xff" + b"x" * 10,  # a string declaring 4 GiB
    b"\xc6\x7f\xff\xff\xff",             # bin of 2 GiB
    b"\x92\x01",                         # an array of 2 with 1 value
    b"\xc1",                             # the reserved type byte
    b"\xd4\x05\x00",                     # an unknown extension type
    b"\xc0\xc0",                         # trailing bytes
    b"\xc7\x03\x02\x91\xc0\xc0",         # a tuple payload holding more than one value
], ids=["huge-array", "huge-str", "huge-bin", "short-array", "reserved", "unknown-ext",
        "trailing", "tuple-payload"])
def test_malformed_trees_raise_frame_error(tree: bytes) -> None:
    with pytest.raises(FrameError):
        decode_message(frame_of_tree(tree))


def test_a_deep_header_is_refused_too() -> None:
    head = msgpack.packb({"k": 0, "m": msgpack.packb(None), "t": []})
    header = b"\x84" + head[1:] + b"\xa1x" + b"\x91" * 5000 + b"\xc0"  # "x": 5000 deep
    with pytest.raises(FrameError, match="malformed frame header"):
        decode_message(PREFIX.pack(MAGIC, len(header), 0) + header)


def test_ordinary_messages_pass_the_scan() -> None:
    msg = {"rpc": "req", "id": 7, "body": {"op": "compute", "layer": 1, "x": torch.zeros(3, 4),
                                           "expert_ids": torch.zeros(3, dtype=torch.int64),
                                           "t": (1, (2.5, None), [b"\x00", "é"])}}
    out = decode_message(encode_message(msg))
    assert out["body"]["t"] == (1, (2.5, None), [b"\x00", "é"])
    assert torch.equal(out["body"]["x"], msg["body"]["x"])


values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2 ** 63), 2 ** 64 - 1) | st.floats()
    | st.text(max_size=40) | st.binary(max_size=300),
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=5), inner,
                                                                max_size=6),
    max_leaves=40)


@settings(max_examples=150, deadline=None)
@given(values, st.data())
def test_scan_accepts_what_msgpack_writes_and_refuses_every_truncation(value, data) -> None:
    packed = msgpack.packb(value, use_bin_type=True)
    check_msgpack(packed, max_depth=64, max_elements=1 << 20)
    cut = data.draw(st.integers(1, len(packed)))
    with pytest.raises(FrameError):
        check_msgpack(packed[:-cut], max_depth=64, max_elements=1 << 20)


def test_tensor_and_tuple_extensions_are_known_only_where_allowed() -> None:
    tensor_ref = msgpack.packb(msgpack.ExtType(EXT_TENSOR, msgpack.packb(0)))
    check_msgpack(tensor_ref, max_depth=4, max_elements=8, leaf_exts=(EXT_TENSOR,))
    with pytest.raises(FrameError, match="unknown msgpack extension"):
        check_msgpack(tensor_ref, max_depth=4, max_elements=8)  # e.g. in a header
    tup = msgpack.packb(msgpack.ExtType(EXT_TUPLE, msgpack.packb([1, 2])))
    check_msgpack(tup, max_depth=4, max_elements=8, nested_exts=(EXT_TUPLE,))
