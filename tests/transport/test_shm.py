"""shm:// specifics: slot credits, the zero-copy aliasing hazard, no leaked segments."""

from __future__ import annotations

import asyncio
import os

import msgpack
import pytest
import torch

from eaas.errors import FrameError
from eaas.transport import Connection, TransportLimits, connect, listen
from eaas.transport.codec import MAGIC, PREFIX
from eaas.transport.shm import SHM_DIR

from .test_faults import open_raw

pytestmark = pytest.mark.timeout(60)
ONE_SLOT = TransportLimits(shm_min_bytes=1024, shm_pool_bytes=1 << 20)  # the pool is one slot


def my_segments() -> set[str]:
    return {n for n in os.listdir(SHM_DIR) if n.startswith(f"eaas-{os.getpid():x}-")}


async def pair(limits: TransportLimits):
    accepted: asyncio.Queue[Connection] = asyncio.Queue()

    async def keep(conn: Connection) -> None:
        accepted.put_nowait(conn)
        await asyncio.Event().wait()

    listener = await listen("shm://", keep, limits=limits)
    client = await connect(listener.url, limits=limits)
    return listener, client, await asyncio.wait_for(accepted.get(), 5)


async def test_leased_tensors_alias_the_slot_until_release() -> None:
    listener, client, server = await pair(ONE_SLOT)
    try:
        await client.send({"x": torch.full((1000,), 1.0)})
        lease = await server.recv_lease(timeout=5)
        first = lease.msg["x"]
        second = client.send_start({"x": torch.full((1000,), 2.0)})  # no free slot: it waits
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(second, 0.05)
        assert bool((first == 1.0).all())
        lease.release()
        lease.release()  # idempotent
        await asyncio.wait_for(second, 5)  # the credit came back; the slot was reused
        assert bool(((await server.recv(timeout=5))["x"] == 2.0).all())
        assert bool((first == 2.0).all())  # THE HAZARD: a released lease's tensor changed
    finally:
        await client.aclose()
        await listener.aclose()


async def test_recv_copies_out_so_tensors_survive_slot_reuse() -> None:
    listener, client, server = await pair(ONE_SLOT)
    try:
        kept = []
        for i in range(5):
            await client.send({"x": torch.full((1000,), float(i))})
            kept.append((await server.recv(timeout=5))["x"])
        assert [float(x[0]) for x in kept] == [0.0, 1.0, 2.0, 3.0, 4.0]
    finally:
        await client.aclose()
        await listener.aclose()


async def test_bigger_message_evicts_free_slots_within_the_pool() -> None:
    limits = TransportLimits(shm_min_bytes=1024, shm_pool_bytes=8 << 20)
    listener, client, server = await pair(limits)
    try:
        for n in (1 << 18, 1 << 20, 1 << 18, (8 << 20) // 4):  # float32 elements; last fills it
            x = torch.randn(n)
            await client.send(x)
            assert torch.equal(await server.recv(timeout=5), x)
        with pytest.raises(ValueError, match="shm_pool_bytes"):
            client.send_start(torch.zeros((8 << 20) // 4 + 1))
    finally:
        await client.aclose()
        await listener.aclose()


async def test_segments_are_unlinked_once_mapped_and_after_close() -> None:
    before = my_segments()
    listener, client, server = await pair(ONE_SLOT)
    await client.send(torch.zeros(1000))
    await server.recv(timeout=5)
    assert my_segments() == before  # the receiver unlinked the name after mapping
    client.send_start(torch.zeros(1000))  # sent, never received
    await client.aclose()
    await listener.aclose()
    assert my_segments() == before


@pytest.mark.parametrize("slot", [[0, "../../etc/passwd", 4096], [0, "eaas-1-2-3", 1 << 40],
                                  [0, "eaas-ffff-ffff-0", 4096], "nonsense"])
async def test_hostile_slot_reference_is_a_frame_error(slot: object) -> None:
    errors: asyncio.Queue[BaseException] = asyncio.Queue()

    async def reader(conn: Connection) -> None:
        try:
            await conn.recv(timeout=5)
        except Exception as exc:
            errors.put_nowait(exc)

    listener = await listen("shm://", reader)
    try:
        header = msgpack.packb({"k": 0, "m": msgpack.packb(None), "t": [], "s": slot})
        _, writer = await open_raw(listener.url)
        writer.write(PREFIX.pack(MAGIC, len(header), 0) + header)
        await writer.drain()
        assert isinstance(await asyncio.wait_for(errors.get(), 5), FrameError)
        writer.close()
    finally:
        await listener.aclose()


def test_remove_stale_segments_only_removes_names_of_dead_pids() -> None:
    from eaas.transport.shm import remove_stale_segments

    dead = os.path.join(SHM_DIR, "eaas-7ffffffe-00-0")  # above pid_max: never a live process
    alive = os.path.join(SHM_DIR, f"eaas-{os.getpid():x}-00-0")
    for path in (dead, alive):
        open(path, "wb").close()
    try:
        assert "eaas-7ffffffe-00-0" in remove_stale_segments()
        assert os.path.exists(alive) and not os.path.exists(dead)
    finally:
        for path in (dead, alive):
            if os.path.exists(path):
                os.unlink(path)
