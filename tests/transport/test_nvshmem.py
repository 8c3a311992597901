"""nvshmem:// protocol on a HostFabric: slots, credits, windows, HELLO checks, teardown.

The NVSHMEM fabric itself (GPU puts between processes) is tested in tests/gpu.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
import torch

from eaas.errors import TransportError
from eaas.transport import TransportLimits, connect, listen
from eaas.transport.fabric import HostFabric, close_fabric, current_fabric, open_host_fabric

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def fabric() -> Iterator[HostFabric]:
    fab = open_host_fabric(slot_bytes=64 << 10, num_slots=4)  # window: 2 slots per end
    yield fab
    close_fabric()


def busy(fab: HostFabric) -> int:
    return sum(fab._busy[0])


async def test_rows_go_through_the_slots_and_arrive_exact(fabric: HostFabric) -> None:
    async def echo(conn):
        while True:
            await conn.send(await conn.recv(timeout=10))

    listener = await listen("nvshmem://", echo)
    assert listener.url.startswith("nvshmem://0/")  # the rank is part of the address
    try:
        async with await connect(listener.url) as conn:
            rows = torch.randn(33, 256).to(torch.bfloat16)  # [N, H]
            ids = torch.randint(0, 64, (33,))
            await conn.send({"x": rows, "expert_ids": ids, "layer": 3})
            out = await conn.recv(timeout=5)
        assert torch.equal(out["x"], rows) and torch.equal(out["expert_ids"], ids)
        assert out["layer"] == 3
        assert fabric.puts == 4  # 2 tensors there, 2 back: none went inline
        await asyncio.sleep(0.01)
        assert busy(fabric) == 0  # every slot came back (RELEASE after the reads)
    finally:
        await listener.aclose()


async def test_a_sender_never_holds_more_than_its_window_and_nothing_is_lost(
        fabric: HostFabric) -> None:
    seen: list[int] = []
    go = asyncio.Event()
    got: asyncio.Queue[dict] = asyncio.Queue()

    async def late_reader(conn):
        await go.wait()
        while True:
            got.put_nowait(await conn.recv(timeout=10))

    listener = await listen("nvshmem://", late_reader)
    try:
        async with await connect(listener.url) as conn:
            handles = [conn.send_start({"i": i, "x": torch.full((4000,), i)}) for i in range(12)]
            for _ in range(20):
                await asyncio.sleep(0.005)
                seen.append(busy(fabric))
            assert max(seen) == fabric.window == 2  # 32 KB each: one slot per message
            assert sum(h.done() for h in handles) == 2  # the rest queue for credit, in order
            go.set()
            await asyncio.wait_for(asyncio.gather(*handles), 10)
            for i in range(12):
                msg = await asyncio.wait_for(got.get(), 5)
                assert msg["i"] == i and bool((msg["x"] == i).all())
    finally:
        await listener.aclose()


async def test_message_over_the_window_is_refused_with_the_sizes(fabric: HostFabric) -> None:
    listener = await listen("nvshmem://", lambda conn: conn.recv(timeout=5))
    try:
        async with await connect(listener.url) as conn:
            with pytest.raises(ValueError, match="window of 2 slots"):
                conn.send_start({"x": torch.zeros(200 << 10, dtype=torch.uint8)})
            await conn.send({"x": torch.zeros(100 << 10, dtype=torch.uint8)})  # 2 slots: fits
    finally:
        await listener.aclose()


async def test_close_returns_the_slots_of_unread_messages(fabric: HostFabric) -> None:
    never = asyncio.Event()
    listener = await listen("nvshmem://", lambda conn: never.wait())
    try:
        conn = await connect(listener.url)
        await conn.send({"x": torch.ones(1000)})
        await conn.send({"x": torch.ones(1000)})
        assert busy(fabric) == 2
        await conn.aclose()
        assert busy(fabric) == 0
    finally:
        await listener.aclose()


async def test_zero_copy_lease_aliases_the_heap_until_released(fabric: HostFabric) -> None:
    leases: asyncio.Queue = asyncio.Queue()

    async def hold(conn):
        leases.put_nowait(await conn.recv_lease(timeout=5))
        await asyncio.Event().wait()

    listener = await listen("nvshmem://", hold)
    try:
        async with await connect(listener.url) as conn:
            x = torch.arange(5000, dtype=torch.int32)
            await conn.send({"x": x})
            lease = await asyncio.wait_for(leases.get(), 5)
            heap = fabric.heap
            ptr = lease.msg["x"].data_ptr()
            assert heap.data_ptr() <= ptr < heap.data_ptr() + heap.numel()
            assert torch.equal(lease.msg["x"], x) and busy(fabric) == 1
            lease.release()
            lease.release()  # idempotent
            for _ in range(100):
                if busy(fabric) == 0:
                    break
                await asyncio.sleep(0.005)
            assert busy(fabric) == 0
    finally:
        await listener.aclose()


async def test_a_peer_of_another_fabric_is_refused() -> None:
    open_host_fabric()
    listener = await listen("nvshmem://", lambda conn: conn.recv(timeout=5))
    try:
        open_host_fabric()  # this process now belongs to another job (another fabric id)
        conn = await connect(listener.url)
        with pytest.raises(TransportError):
            await conn.recv(timeout=5)  # the listener's side dropped us after our HELLO
        await conn.aclose()
    finally:
        await listener.aclose()
        close_fabric()


async def test_addresses_and_missing_fabric_give_clear_errors() -> None:
    close_fabric()
    assert current_fabric() is None
    with pytest.raises(TransportError, match="join_fabric"):
        await listen("nvshmem://", lambda conn: asyncio.sleep(0))
    with pytest.raises(TransportError, match="join_fabric"):
        await connect("nvshmem://0/tmp/x.sock")
    open_host_fabric()
    try:
        with pytest.raises(ValueError, match="RANK"):
            await connect("nvshmem:///tmp/x.sock")  # no rank
        with pytest.raises(ValueError, match="bad nvshmem URL"):
            await connect("nvshmem://host/tmp/x.sock")
        with pytest.raises(TransportError, match="rank 3 is not in this fabric of 1"):
            await connect("nvshmem://3/tmp/x.sock")
        with pytest.raises(ValueError, match="multiple of 256"):
            HostFabric(1000, 4)
    finally:
        close_fabric()


async def test_limits_still_apply_to_the_inline_part(fabric: HostFabric) -> None:
    limits = TransportLimits(max_frame_bytes=1 << 16, max_header_bytes=1 << 12)
    listener = await listen("nvshmem://", lambda conn: conn.recv(timeout=5), limits=limits)
    try:
        async with await connect(listener.url, limits=limits) as conn:
            with pytest.raises(ValueError, match="max_header_bytes"):
                conn.send_start({"blob": "y" * 5000})
    finally:
        await listener.aclose()
