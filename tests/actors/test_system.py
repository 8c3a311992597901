"""The system: shutdown order and completeness, idempotent stop, snapshot, events, lookup."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import msgpack
import pytest

from eaas.actors import (Actor, ActorState, ActorSystem, ChildSpec, FakeClock, RestartPolicy,
                         Supervisor)
from eaas.errors import ActorDeadError, ActorStateError


class Noted(Actor):
    """Notes its name in `order` when it stops; keeps a background task running."""

    def __init__(self, order: list[str]) -> None:
        self.order = order

    async def on_start(self) -> None:
        self.context.create_task(asyncio.Event().wait(), name="forever")

    async def on_receive(self, msg: Any) -> Any:
        return msg

    async def on_stop(self) -> None:
        self.order.append(self.context.name)


def _other_tasks() -> set[asyncio.Task[Any]]:
    return {t for t in asyncio.all_tasks() if t is not asyncio.current_task()}


async def test_shutdown_in_reverse_start_order_leaves_no_tasks() -> None:
    order: list[str] = []
    before = _other_tasks()
    system = ActorSystem()
    async with system:
        await system.spawn(lambda: Noted(order), "a")
        await system.spawn_supervisor("sup", RestartPolicy(), [
            ChildSpec("s1", lambda: Noted(order)), ChildSpec("s2", lambda: Noted(order))])
        await system.spawn(lambda: Noted(order), "b")
        assert len(_other_tasks() - before) == 2 * 4 + 1   # 4 noted actors + tasks, 1 sup
    assert order == ["b", "s2", "s1", "a"]
    assert _other_tasks() == before
    assert system.state == "stopped"
    await system.stop()                                     # idempotent
    with pytest.raises(ActorStateError, match="cannot spawn"):
        await system.spawn(lambda: Noted(order), "late")


async def test_concurrent_stops_share_one_shutdown() -> None:
    order: list[str] = []
    system = await ActorSystem().start()
    await system.spawn(lambda: Noted(order), "a")
    await asyncio.gather(system.stop(), system.stop(), system.aclose())
    assert order == ["a"] and system.state == "stopped"


async def test_stuck_actor_is_cancelled_after_the_stop_timeout() -> None:
    class Stuck(Actor):
        async def on_receive(self, msg: Any) -> Any:
            await asyncio.Event().wait()

    before = _other_tasks()
    system = await ActorSystem().start()
    ref = await system.spawn(Stuck, "stuck")
    ref.tell_nowait("hang")
    await asyncio.sleep(0)
    await system.stop(timeout=0.05)
    assert ref.state is ActorState.STOPPED
    assert _other_tasks() == before


async def test_snapshot_is_plain_data_with_the_tree() -> None:
    async with ActorSystem(clock=FakeClock(), name="t") as system:
        await system.spawn_supervisor("root", RestartPolicy(backoff_s=0.0), [
            ChildSpec("pool", lambda: Supervisor(RestartPolicy(), [
                ChildSpec("e0", lambda: Noted([]))])),
            ChildSpec("w", lambda: Noted([]), mailbox_size=8)])
        w = system.lookup("w")
        await w.ask("ping", timeout=1.0)
        snap = system.snapshot()
        json.dumps(snap)
        assert msgpack.unpackb(msgpack.packb(snap)) == snap
        (root,) = snap["actors"]
        assert root["kind"] == "supervisor" and root["state"] == "running"
        assert [c["name"] for c in root["children"]] == ["pool", "w"]
        pool, wnode = root["children"]
        assert pool["kind"] == "supervisor" and pool["children"][0]["name"] == "e0"
        assert wnode == {"name": "w", "parent": "root", "kind": "actor", "state": "running",
                         "restarts": 0, "mailbox_depth": 0, "mailbox_size": 8,
                         "restart_type": "permanent", "last_reason": None, "children": []}
        assert snap["dead_letters"] == 0 and snap["num_actors"] == 4


async def test_events_reach_queues_and_listeners() -> None:
    clock = FakeClock(start=100.0)
    heard: list[dict[str, Any]] = []
    async with ActorSystem(clock=clock) as system:
        queue = system.subscribe_events()
        unsubscribe = system.add_listener(heard.append)
        ref = await system.spawn(lambda: Noted([]), "a")
        await ref.stop()
        unsubscribe()
        await system.spawn(lambda: Noted([]), "b")
    got = [queue.get_nowait() for _ in range(queue.qsize())]
    assert [(e["type"], e["name"]) for e in heard] == [("actor_started", "a"),
                                                       ("actor_stopped", "a")]
    assert [(e["type"], e["name"]) for e in got] == [
        ("actor_started", "a"), ("actor_stopped", "a"), ("actor_started", "b"),
        ("actor_stopped", "b")]
    # both clocks of the system's clock: monotonic `mono`, wall-clock `time` (from wall_start)
    assert all(e["mono"] == 100.0 and e["time"] == 1.8e9 for e in got)


async def test_lookup_and_unsupervised_child_stops_with_its_parent() -> None:
    order: list[str] = []
    async with ActorSystem() as system:
        parent = await system.spawn(lambda: Noted(order), "parent")
        child = await system.spawn(lambda: Noted(order), "child", parent=parent)
        assert system.lookup("child") is child and system.lookup("nope") is None
        await parent.stop()
        assert order == ["child", "parent"]
        assert child.state is ActorState.STOPPED and system.lookup("parent") is None


async def test_misuse_stop_from_inside_and_spawn_under_dead_parent() -> None:
    class Stopper(Actor):
        async def on_receive(self, msg: Any) -> Any:
            await self.context.system.stop()

    async with ActorSystem() as system:
        ref = await system.spawn(Stopper, "s")
        with pytest.raises(ActorStateError, match="outside the actor tree"):
            await ref.ask("stop everything", timeout=1.0)
        await ref.stop()
        with pytest.raises(ActorDeadError, match="under 's'"):
            await system.spawn(lambda: Noted([]), "orphan", parent=ref)
