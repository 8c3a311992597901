"""Remote actor refs over every scheme: tell/ask, error mapping, dead peers fail asks at once."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import torch

from eaas.actors import Actor, ActorSystem
from eaas.errors import ActorDeadError, AskTimeoutError, RemoteError
from eaas.transport import remote_ref, serve_actors

from .conftest import LISTEN_URLS

pytestmark = pytest.mark.timeout(60)


class Expert(Actor):
    def __init__(self, entered: asyncio.Event, release: asyncio.Event) -> None:
        self.told: list[Any] = []
        self.entered = entered
        self.release = release

    async def on_receive(self, msg: Any) -> Any:
        if isinstance(msg, dict) and "rows" in msg:
            return {"rows": msg["rows"] * 2, "expert_ids": msg["expert_ids"]}
        if msg == "crash":
            raise ValueError("bad work unit")
        if msg == "block":
            self.entered.set()
            await self.release.wait()
            return "released"
        if msg == "told":
            return list(self.told)
        self.told.append(msg)
        return None


@pytest.fixture
async def system():
    entered, release = asyncio.Event(), asyncio.Event()
    async with ActorSystem(name="experts") as system:
        await system.spawn(lambda: Expert(entered, release), "expert-0")
        system.entered = entered  # type: ignore[attr-defined]
        yield system
        release.set()


async def test_ask_and_tell_reach_the_remote_actor(scheme: str, system: ActorSystem) -> None:
    listener = await serve_actors(system, LISTEN_URLS[scheme])
    try:
        async with await remote_ref(listener.url, "expert-0") as ref:
            rows = torch.randn(33, 16, dtype=torch.bfloat16)  # [N, H]
            reply = await ref.ask({"rows": rows, "expert_ids": torch.arange(33)}, timeout=5)
            assert torch.equal(reply["rows"], rows * 2)
            await ref.tell("a")
            ref.tell_nowait("b")
            assert await ref.ask("told", timeout=5) == ["a", "b"]
            with pytest.raises(RemoteError, match="bad work unit"):
                await ref.ask("crash", timeout=5)
            with pytest.raises(AskTimeoutError):
                await ref.ask("block", timeout=0.05)
    finally:
        await listener.aclose()


async def test_missing_or_unexported_actor_is_actor_dead(system: ActorSystem) -> None:
    listener = await serve_actors(system, "tcp://127.0.0.1:0", names=["someone-else"])
    try:
        with pytest.raises(ActorDeadError):
            await remote_ref(listener.url, "expert-0")
        with pytest.raises(ActorDeadError):
            await remote_ref(listener.url, "nobody")
    finally:
        await listener.aclose()
    with pytest.raises(ActorDeadError):
        await remote_ref(listener.url, "expert-0", timeout=2)  # nobody listens any more


async def test_stopped_actor_fails_asks_with_actor_dead(system: ActorSystem) -> None:
    listener = await serve_actors(system, "inproc://")
    try:
        async with await remote_ref(listener.url, "expert-0") as ref:
            target = system.lookup("expert-0")
            assert target is not None
            await target.stop()
            with pytest.raises(ActorDeadError):
                await ref.ask("told", timeout=5)
    finally:
        await listener.aclose()


async def test_dead_peer_fails_pending_asks_at_once(scheme: str, system: ActorSystem) -> None:
    listener = await serve_actors(system, LISTEN_URLS[scheme])
    async with await remote_ref(listener.url, "expert-0") as ref:
        pending = asyncio.ensure_future(ref.ask("block", timeout=30))
        await asyncio.wait_for(system.entered.wait(), 5)  # the actor is handling the ask
        await listener.aclose()  # the peer goes away with the ask pending
        with pytest.raises(ActorDeadError):
            await asyncio.wait_for(pending, 5)  # at once, not after 30 s
        assert not ref.is_alive
        with pytest.raises(ActorDeadError):
            await ref.ask("told", timeout=5)
