"""FakeClock: sleepers wake in deadline order, each seeing its own deadline as `now()`."""

from __future__ import annotations

import asyncio

import pytest

from eaas.actors import Clock, FakeClock, RealClock


async def test_fake_clock_wakes_sleepers_at_their_deadlines() -> None:
    clock = FakeClock(start=10.0)
    woke: list[tuple[str, float]] = []

    async def sleeper(name: str, seconds: float) -> None:
        await clock.sleep(seconds)
        woke.append((name, clock.now()))

    tasks = [asyncio.create_task(sleeper(n, s)) for n, s in (("b", 2.0), ("a", 1.0), ("c", 5.0))]
    await clock.wait_for_sleepers(3)
    assert clock.sleepers == [11.0, 12.0, 15.0]
    await clock.advance(3.0)
    assert woke == [("a", 11.0), ("b", 12.0)] and clock.now() == 13.0
    await clock.advance(2.0)
    await asyncio.gather(*tasks)
    assert woke[-1] == ("c", 15.0) and clock.sleepers == []
    with pytest.raises(ValueError, match="seconds must be >= 0"):
        await clock.advance(-1.0)


def test_both_clocks_satisfy_the_protocol() -> None:
    assert isinstance(RealClock(), Clock) and isinstance(FakeClock(), Clock)
