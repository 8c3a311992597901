"""The stream receiver parses frames correctly whatever the socket's chunk boundaries are.

Drives StreamConnection's BufferedProtocol methods directly with hypothesis-chosen chunk
sizes (a real socket cannot be made to split bytes at chosen places).
"""

from __future__ import annotations

import asyncio

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from eaas.errors import FrameError
from eaas.transport import TransportLimits, encode_message
from eaas.transport.stream import BIG_BODY, STAGE_BYTES, StreamConnection


class RecordingTransport(asyncio.Transport):
    """Just enough transport for the protocol: records pause/abort, sends nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.paused = False
        self.aborted = False

    def set_write_buffer_limits(self, high=None, low=None) -> None:
        pass

    def get_extra_info(self, name, default=None):
        return default

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False

    def is_closing(self) -> bool:
        return self.aborted

    def abort(self) -> None:
        self.aborted = True


def feed(conn: StreamConnection, data: bytes, chunks: list[int]) -> None:
    pos, i = 0, 0
    while pos < len(data) and not conn.closed:
        want = chunks[i % len(chunks)]
        i += 1
        buf = conn.get_buffer(-1)
        n = min(want, len(buf), len(data) - pos)
        buf[:n] = data[pos:pos + n]
        conn.buffer_updated(n)
        pos += n


SIZES = st.sampled_from([0, 1, 17, BIG_BODY // 4 - 1, BIG_BODY // 4 + 1, STAGE_BYTES // 2])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(SIZES, min_size=1, max_size=6),
       st.lists(st.integers(1, 300_000), min_size=1, max_size=8))
async def test_any_chunking_yields_the_same_messages(sizes: list[int], chunks: list[int]) -> None:
    msgs = [{"i": i, "x": torch.arange(n, dtype=torch.int32), "pad": "p" * (i * 997)}
            for i, n in enumerate(sizes)]
    conn = StreamConnection("test://", TransportLimits())
    conn.connection_made(RecordingTransport())
    feed(conn, b"".join(encode_message(m) for m in msgs), chunks)
    for want in msgs:
        got = await conn.recv(timeout=1)
        assert got["i"] == want["i"] and got["pad"] == want["pad"]
        assert torch.equal(got["x"], want["x"])
    assert len(conn._inbox) == 0 and not conn.closed


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 64), st.binary(min_size=1, max_size=64))
async def test_corruption_after_a_good_frame_delivers_it_then_a_frame_error(
        chunk: int, junk: bytes) -> None:
    conn = StreamConnection("test://", TransportLimits())
    transport = RecordingTransport()
    conn.connection_made(transport)
    feed(conn, encode_message("good") + b"XXXX" + junk + bytes(16), [chunk])
    assert await conn.recv(timeout=1) == "good"
    try:
        await conn.recv(timeout=1)
        raise AssertionError("corrupt frame was accepted")
    except FrameError:
        pass
    assert transport.aborted and conn.closed
