"""cudaipc:// refuses malformed device-slot references from a peer (before touching CUDA)."""

from __future__ import annotations

import asyncio

import msgpack
import pytest

from eaas.errors import FrameError
from eaas.transport import listen
from eaas.transport.codec import MAGIC, PREFIX

pytestmark = pytest.mark.timeout(30)
TREE = msgpack.packb(msgpack.ExtType(3, msgpack.packb(0)))  # the message is one CUDA tensor


def frame(**extra) -> bytes:
    header = msgpack.packb({"k": 0, "m": TREE, "t": [], **extra})
    return PREFIX.pack(MAGIC, len(header), 0) + header


@pytest.mark.parametrize("extra,match", [
    ({"c": [["float32", [2], 0, 5]], "s": []}, "descriptor"),  # names a slot never announced
    ({"c": [], "s": [[0, 0, b"h", 10, 0, b"r", 0, b"", True, b"e"]]}, "slot reference"),  # short
    ({"c": [], "s": [[0, -1, b"h", 10, 0, b"r", 0, b"", True, b"e", 8]]}, "slot reference"),
    ({"c": [], "s": [[0, 0, b"h", 10, 0, b"r", 0, b"", True, b"e", 1 << 40]]}, "slot reference"),
    ({"c": "x", "s": []}, "must be arrays"),
    ({"c": [["float32", [2], 0, 0]], "s": []}, "descriptor"),
])
async def test_bad_slot_references_close_the_connection_with_frame_error(extra, match) -> None:
    seen: asyncio.Future[BaseException] = asyncio.get_running_loop().create_future()

    async def handler(conn):
        try:
            await conn.recv(timeout=10)
        except BaseException as exc:
            seen.set_result(exc)
            raise

    listener = await listen("cudaipc://", handler)
    try:
        path = listener.url[len("cudaipc://"):]
        reader, writer = await asyncio.open_unix_connection(path)
        writer.write(frame(**extra))
        await writer.drain()
        error = await asyncio.wait_for(seen, 10)
        assert isinstance(error, FrameError) and match in str(error), error
        assert await asyncio.wait_for(reader.read(), 10) == b""  # the peer was dropped
        writer.close()
    finally:
        await listener.aclose()
