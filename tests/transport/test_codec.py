"""Codec: every dtype round-trips bit-exactly; hostile bytes only ever raise FrameError."""

from __future__ import annotations

import struct

import msgpack
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from eaas.errors import FrameError
from eaas.transport import DTYPES, TransportLimits, decode_message, encode_message
from eaas.transport.codec import MAGIC, PREFIX


def sample(dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=gen).bool()
    if dtype.is_floating_point:
        return torch.randn(shape, generator=gen).to(dtype)
    info = torch.iinfo(dtype)
    return torch.randint(info.min, info.max, shape, generator=gen, dtype=torch.int64).to(dtype)


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
def test_every_dtype_round_trips_bit_exact(dtype: torch.dtype) -> None:
    x = sample(dtype, (33, 7))
    out = decode_message(encode_message({"x": x, "empty": x[:0], "scalar": x[0, 0]}))
    for got, want in ((out["x"], x), (out["empty"], x[:0]), (out["scalar"], x[0, 0])):
        assert got.dtype == want.dtype and got.shape == want.shape
        assert torch.equal(got.reshape(-1).view(torch.uint8), want.reshape(-1).view(torch.uint8))


def test_tree_types_survive_including_tuples_bytes_and_int_keys() -> None:
    msg = {"a": (1, [2.5, None, True], ("x", b"\x00\xff")), 7: {"nested": [[[]]]}, "s": "é"}
    assert decode_message(encode_message(msg)) == msg


def test_non_contiguous_tensor_is_sent_contiguous() -> None:
    x = torch.arange(24, dtype=torch.float32).view(4, 6).t()[1:, ::2]  # [5, 2] strided
    out = decode_message(encode_message(x))
    assert out.is_contiguous() and torch.equal(out, x)


def test_decoded_tensors_are_fresh_and_writable() -> None:
    x = torch.zeros(4)
    out = decode_message(encode_message(x))
    out += 1
    assert torch.equal(x, torch.zeros(4))


@pytest.mark.parametrize("bad", [object(), {1, 2}, torch.zeros(2, dtype=torch.complex64)],
                         ids=["object", "set", "complex"])
def test_unsendable_values_raise_type_error_naming_the_problem(bad: object) -> None:
    with pytest.raises(TypeError):
        encode_message({"x": bad})


def test_frame_over_limit_is_refused_on_both_sides() -> None:
    small = TransportLimits(max_frame_bytes=1024, max_header_bytes=512)
    frame = encode_message(torch.zeros(1000))
    with pytest.raises(ValueError, match="max_frame_bytes"):
        encode_message(torch.zeros(1000), limits=small)
    with pytest.raises(FrameError, match="max_frame_bytes"):
        decode_message(frame, limits=small)


def test_truncated_and_garbage_frames_raise_frame_error() -> None:
    frame = encode_message({"x": torch.ones(10)})
    for bad in (frame[:10], frame[:-1], frame + b"\x00", b"GARBAGE!" * 4):
        with pytest.raises(FrameError):
            decode_message(bad)


def test_tensor_descriptor_pointing_outside_the_body_is_rejected() -> None:
    header = msgpack.packb({"k": 0, "m": msgpack.packb(msgpack.ExtType(1, msgpack.packb(0))),
                            "t": [["float32", [100], 0]]})
    frame = PREFIX.pack(MAGIC, len(header), 8) + header + bytes(8)
    with pytest.raises(FrameError, match="does not fit"):
        decode_message(frame)


def test_unknown_extension_type_is_rejected_not_unpickled() -> None:
    header = msgpack.packb({"k": 0, "m": msgpack.packb(msgpack.ExtType(99, b"x")), "t": []})
    with pytest.raises(FrameError, match="extension"):
        decode_message(PREFIX.pack(MAGIC, len(header), 0) + header)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200), st.integers(0, 300), st.integers(0, 1 << 20))
def test_fuzzed_frames_raise_only_frame_error(junk: bytes, header_len: int, body_len: int) -> None:
    for frame in (junk, struct.pack("<4sIQ", MAGIC, header_len, body_len) + junk):
        try:
            decode_message(frame)
        except FrameError:
            pass


@pytest.mark.parametrize("field,value", [("max_frame_bytes", 0), ("max_tensors", -1),
                                         ("shm_min_bytes", 1.5), ("max_queued_messages", True)])
def test_limits_reject_bad_values_naming_the_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        TransportLimits(**{field: value})


@pytest.mark.parametrize("url", ["127.0.0.1:5000", "udp://x:1", "tcp://nohostport", "shm://host/x"])
async def test_bad_urls_raise_value_error_listing_what_is_allowed(url: str) -> None:
    from eaas.transport import connect

    with pytest.raises(ValueError, match="tcp://|shm:///"):
        await connect(url)
