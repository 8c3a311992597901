"""Mailbox: bound, backpressure, priority lane, closing."""

from __future__ import annotations

import asyncio

import pytest

from eaas.actors import Mailbox
from eaas.errors import MailboxClosedError, MailboxFullError


def test_system_lane_overtakes_data_and_each_lane_is_fifo() -> None:
    mb = Mailbox(8)
    for i in range(3):
        mb.put_nowait(f"d{i}")
    mb.put_system("s0")
    mb.put_system("s1")
    assert [mb.pop() for _ in range(6)] == ["s0", "s1", "d0", "d1", "d2", None]


def test_put_nowait_refuses_past_the_bound() -> None:
    mb = Mailbox(2)
    mb.put_nowait(1)
    mb.put_nowait(2)
    with pytest.raises(MailboxFullError, match="full"):
        mb.put_nowait(3)
    mb.put_system("stop")                      # control still gets in when data is full
    assert len(mb) == 3 and mb.data_depth == 2


async def test_put_waits_for_space_then_times_out() -> None:
    mb = Mailbox(1)
    mb.put_nowait("a")
    with pytest.raises(MailboxFullError, match="stayed full"):
        await mb.put("b", timeout=0.01)
    waiter = asyncio.create_task(mb.put("b", timeout=5.0))
    await asyncio.sleep(0)
    assert not waiter.done()                   # backpressure: the producer waits
    assert mb.pop() == "a"
    await waiter
    assert mb.pop() == "b"


async def test_fast_producer_is_held_at_the_bound() -> None:
    mb = Mailbox(16)
    depths: list[int] = []

    async def producer() -> None:
        for i in range(1000):
            await mb.put(i)
            depths.append(mb.data_depth)

    task = asyncio.create_task(producer())
    got = []
    for _ in range(1000):
        got.append(await mb.get())
        if len(got) % 100 == 0:
            await asyncio.sleep(0)            # a slow consumer now and then
    await task
    assert got == list(range(1000))
    assert max(depths) == 16


async def test_close_returns_queued_items_and_fails_waiting_producers() -> None:
    mb = Mailbox(1)
    mb.put_nowait("a")
    mb.put_system("s")
    waiter = asyncio.create_task(mb.put("b"))
    await asyncio.sleep(0)
    assert mb.close() == ["s", "a"]
    with pytest.raises(MailboxClosedError):
        await waiter
    with pytest.raises(MailboxClosedError):
        mb.put_nowait("c")
    with pytest.raises(MailboxClosedError):
        await mb.get()


async def test_cancelled_producer_passes_its_wakeup_on() -> None:
    mb = Mailbox(1)
    mb.put_nowait("a")
    first = asyncio.create_task(mb.put("b"))
    second = asyncio.create_task(mb.put("c"))
    await asyncio.sleep(0)
    mb.pop()                                  # wakes `first` ...
    first.cancel()                            # ... which leaves before using the slot
    await asyncio.gather(first, return_exceptions=True)
    await asyncio.wait_for(second, 1.0)
    assert mb.pop() == "c"


def test_maxsize_validation() -> None:
    with pytest.raises(ValueError, match="maxsize"):
        Mailbox(0)
