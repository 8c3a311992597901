"""Supervision: strategies checked against a model of the OTP rules, intensity, backoff."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from eaas.actors import (Actor, ActorState, ActorSystem, ChildSpec, FakeClock, RestartPolicy,
                         Supervisor, restart_set)
from eaas.actors.supervisor import RESTART_TYPES, STRATEGIES
from eaas.errors import ActorDeadError, ConfigError


class Worker(Actor):
    async def on_receive(self, msg: Any) -> Any:
        if msg == "crash":
            raise RuntimeError(f"{self.context.name} told to crash")
        if msg == "exit":
            self.context.stop()
        return msg


# --- a model of the rules ----------------------------------------------------------------
@dataclass(eq=False)
class Node:
    name: str
    restart: str
    strategy: str | None = None          # None: a worker
    max_restarts: int = 0
    initial: list[Node] = field(default_factory=list)
    children: list[Node] = field(default_factory=list)
    parent: Node | None = None
    alive: bool = True
    count: int = 0

    def reset(self) -> None:
        self.children = list(self.initial)
        for c in self.initial:
            c.reset()

    def walk(self):
        yield self
        for c in self.children:
            yield from c.walk()


class Model:
    """What OTP predicts: which actors (re)start after each crash, and who is alive."""

    def __init__(self, root: Node) -> None:
        self.root = root
        self.started: set[str] = set()

    def crash(self, worker: Node) -> set[str]:
        self.started = set()
        worker.alive = False
        self._exit(worker.parent, worker)
        return self.started

    def _down(self, node: Node) -> None:
        for n in node.walk():
            n.alive = False

    def _exit(self, sup: Node | None, child: Node) -> None:
        assert sup is not None
        if child.restart == "temporary":       # every exit here is a crash
            sup.children.remove(child)
            return
        sup.count += 1
        if sup.count > sup.max_restarts:
            self._down(sup)
            if sup.parent is not None:
                self._exit(sup.parent, sup)
            return
        i = sup.children.index(child)     # the rules, written out apart from the library's
        group = {"one_for_one": [child], "one_for_all": list(sup.children),
                 "rest_for_one": sup.children[i:]}[sup.strategy]
        for c in group:
            if c is not child:
                self._down(c)
                if c.restart == "temporary":
                    sup.children.remove(c)
        for c in group:
            if c in sup.children:
                self._start(c)

    def _start(self, node: Node) -> None:
        node.alive = True
        self.started.add(node.name)
        if node.strategy is not None:
            node.count = 0
            for c in node.initial:
                if c not in node.children:
                    c.reset()
                    node.children.append(c)
            for c in node.children:
                self._start(c)


@st.composite
def trees(draw: Any, name: str = "root", restart: str = "permanent", depth: int = 0) -> Node:
    node = Node(name, restart, strategy=draw(st.sampled_from(STRATEGIES)),
                max_restarts=draw(st.integers(0, 3)))
    for i in range(draw(st.integers(1, 3))):
        child_restart = draw(st.sampled_from(RESTART_TYPES))
        if depth < 2 and draw(st.integers(0, 2)) == 0:
            child = draw(trees(f"{name}.{i}", child_restart, depth + 1))
        else:
            child = Node(f"{name}.{i}", child_restart)
        child.parent = node
        node.initial.append(child)
    node.reset()
    return node


def to_specs(node: Node) -> list[ChildSpec]:
    specs = []
    for c in node.initial:
        if c.strategy is None:
            specs.append(ChildSpec(c.name, Worker, restart=c.restart))
        else:
            policy, sub = _policy(c), to_specs(c)
            specs.append(ChildSpec(c.name, lambda p=policy, s=sub: Supervisor(p, s),
                                   restart=c.restart))
    return specs


def _policy(node: Node) -> RestartPolicy:
    assert node.strategy is not None
    return RestartPolicy(node.strategy, max_restarts=node.max_restarts, within_s=60.0,
                         backoff_s=0.0, jitter=0.0)


async def _check_against_model(root: Node, picks: list[int]) -> None:
    model = Model(root)
    # FakeClock never advances: every crash falls inside the intensity window.
    async with ActorSystem(clock=FakeClock(), seed=0) as system:
        await system.spawn_supervisor("root", _policy(root), to_specs(root))
        events = system.subscribe_events()
        for pick in picks:
            workers = [n for n in root.walk() if n.strategy is None and n.alive]
            if not workers or not root.alive:
                break
            victim = workers[pick % len(workers)]
            expected = model.crash(victim)
            ref = system.lookup(victim.name)
            assert ref is not None and ref.state is ActorState.RUNNING
            await ref.tell("crash")
            await system.wait_idle()
            started = set()
            while not events.empty():
                ev = events.get_nowait()
                if ev["type"] in ("actor_started", "actor_restarted"):
                    started.add(ev["name"])
            assert started == expected, f"crash of {victim.name}: restarted {started}"
            alive = {n.name for n in root.walk() if n.alive}
            really_alive = {n.name for n in root.walk()
                            if (r := system.lookup(n.name)) is not None
                            and r.state is ActorState.RUNNING}
            assert really_alive == alive, f"after crash of {victim.name}"


@settings(max_examples=60, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(root=trees(), picks=st.lists(st.integers(0, 100), min_size=1, max_size=8))
def test_strategies_restart_exactly_what_the_model_predicts(root: Node, picks: list[int]) -> None:
    asyncio.run(_check_against_model(root, picks))


def test_restart_set_per_strategy() -> None:
    order = ["a", "b", "c", "d"]
    assert restart_set("one_for_one", order, "b") == ["b"]
    assert restart_set("one_for_all", order, "b") == order
    assert restart_set("rest_for_one", order, "b") == ["b", "c", "d"]


@pytest.mark.parametrize("field_, value", [("strategy", "one_for_some"), ("max_restarts", -1),
                                           ("within_s", 0.0), ("backoff_s", -0.1),
                                           ("jitter", 1.5)])
def test_policy_validation_names_the_field(field_: str, value: Any) -> None:
    with pytest.raises(ConfigError, match=f"RestartPolicy.{field_}"):
        RestartPolicy(**{field_: value})


def test_child_spec_validation() -> None:
    with pytest.raises(ConfigError, match="ChildSpec.restart"):
        ChildSpec("a", Worker, restart="sometimes")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="ChildSpec.name"):
        ChildSpec("", Worker)


# --- intensity and backoff on a fake clock --------------------------------------------------
def _crash_times(events: list[dict[str, Any]], kind: str, name: str) -> list[float]:
    return [e["mono"] for e in events if e["type"] == kind and e["name"] == name]


async def test_backoff_is_exponential_on_the_fake_clock() -> None:
    clock = FakeClock()
    policy = RestartPolicy(max_restarts=5, within_s=100.0, backoff_s=0.5, max_backoff_s=1.5,
                           jitter=0.0)
    async with ActorSystem(clock=clock) as system:
        await system.spawn_supervisor("sup", policy, [ChildSpec("w", Worker)])
        w = system.lookup("w")
        assert w is not None
        for expected_delay in (0.5, 1.0, 1.5, 1.5):     # doubling, capped at max_backoff_s
            crashed_at = clock.now()
            await w.tell("crash")
            await clock.wait_for_sleepers(1)
            assert clock.sleepers == [pytest.approx(crashed_at + expected_delay)]
            assert w.state is ActorState.RESTARTING
            await clock.advance(expected_delay - 0.01)
            assert w.state is ActorState.RESTARTING     # not a moment early
            await clock.advance(0.01)
            await system.wait_idle()
            assert w.state is ActorState.RUNNING
        restarted = _crash_times(list(system.events), "actor_restarted", "w")
        crashed = _crash_times(list(system.events), "actor_crashed", "w")
        assert [round(r - c, 6) for r, c in zip(restarted, crashed)] == [0.5, 1.0, 1.5, 1.5]


def test_backoff_jitter_stays_in_bounds() -> None:
    p = RestartPolicy(backoff_s=1.0, max_backoff_s=8.0, jitter=0.25)
    assert p.backoff(1, 0.0) == pytest.approx(0.75)
    assert p.backoff(1, 0.999999) == pytest.approx(1.25, rel=1e-5)
    assert p.backoff(3, 0.5) == pytest.approx(4.0)
    assert p.backoff(10, 0.5) == pytest.approx(8.0)


async def test_n_crashes_within_window_escalate_but_spread_out_do_not() -> None:
    clock = FakeClock()
    seen: list[dict[str, Any]] = []
    policy = RestartPolicy(max_restarts=2, within_s=10.0, backoff_s=0.0)
    async with ActorSystem(clock=clock, on_escalation=seen.append) as system:
        sup = await system.spawn_supervisor("sup", policy, [ChildSpec("w", Worker),
                                                            ChildSpec("v", Worker)])
        w = system.lookup("w")
        assert w is not None
        for _ in range(4):                  # 4 crashes, 11s apart: never 3 in a window
            await w.tell("crash")
            await system.wait_idle()
            await clock.advance(11.0)
        assert sup.state is ActorState.RUNNING and w.state is ActorState.RUNNING
        assert seen == []
        for _ in range(3):                  # 3 crashes at one instant: the 3rd breaches
            await w.tell("crash")
            await system.wait_idle()
        assert sup.state is ActorState.CRASHED
        assert w.state is ActorState.STOPPED and system.lookup("v").state is ActorState.STOPPED
        assert [e["name"] for e in seen] == ["sup"] and "more than 2 restarts" in seen[0]["reason"]
        assert any(e["type"] == "escalated" and e["name"] == "sup" for e in system.events)


async def test_breach_escalates_to_parent_which_restarts_the_subtree() -> None:
    inner = RestartPolicy(max_restarts=0, backoff_s=0.0)
    async with ActorSystem(clock=FakeClock()) as system:
        await system.spawn_supervisor("top", RestartPolicy(max_restarts=5, backoff_s=0.0), [
            ChildSpec("pool", lambda: Supervisor(inner, [ChildSpec("e1", Worker),
                                                         ChildSpec("e2", Worker)]))])
        e1, e2, pool = system.lookup("e1"), system.lookup("e2"), system.lookup("pool")
        await e1.tell("crash")
        await system.wait_idle()
        kinds = [(e["type"], e["name"]) for e in system.events if e["type"] != "actor_started"]
        assert kinds == [("actor_crashed", "e1"), ("escalated", "pool"),
                         ("actor_crashed", "pool"), ("actor_restarted", "pool"),
                         ("actor_restarted", "e1"), ("actor_restarted", "e2")]
        assert [r.state for r in (pool, e1, e2)] == [ActorState.RUNNING] * 3
        assert await e2.ask("same ref still works", timeout=1.0) == "same ref still works"


# --- refs across restarts -----------------------------------------------------------------
class Gate(Actor):
    """Blocks on an event while handling "hold"; records what it handled."""

    def __init__(self, gate: asyncio.Event, log: list[Any]) -> None:
        self.gate, self.log = gate, log

    async def on_receive(self, msg: Any) -> Any:
        if msg == "hold":
            await self.gate.wait()
            raise RuntimeError("crash after hold")
        self.log.append(msg)
        return msg


async def test_restart_keeps_ref_fails_pending_asks_and_queues_tells() -> None:
    gate, log = asyncio.Event(), []
    clock = FakeClock()
    policy = RestartPolicy(backoff_s=1.0, jitter=0.0)
    async with ActorSystem(clock=clock) as system:
        await system.spawn_supervisor("sup", policy, [ChildSpec("g", lambda: Gate(gate, log))])
        g = system.lookup("g")
        assert g is not None
        await g.tell("hold")
        pending = [asyncio.create_task(g.ask(i, timeout=5.0)) for i in range(3)]
        await asyncio.sleep(0)
        gate.set()                                    # the held tell crashes the actor
        results = await asyncio.gather(*pending, return_exceptions=True)
        assert all(isinstance(r, ActorDeadError) for r in results)
        assert g.state is ActorState.RESTARTING
        await g.tell("during-restart")                # queued for the new instance
        late_ask = asyncio.create_task(g.ask("late", timeout=5.0))
        await clock.wait_for_sleepers(1)
        await clock.advance(1.0)
        assert await late_ask == "late"
        assert log == ["during-restart", "late"]
        assert system.lookup("g") is g and g.state is ActorState.RUNNING


async def test_transient_and_temporary_children() -> None:
    policy = RestartPolicy(backoff_s=0.0)
    async with ActorSystem(clock=FakeClock()) as system:
        await system.spawn_supervisor("sup", policy, [
            ChildSpec("perm", Worker), ChildSpec("trans", Worker, restart="transient"),
            ChildSpec("temp", Worker, restart="temporary")])
        perm, trans, temp = (system.lookup(n) for n in ("perm", "trans", "temp"))
        await trans.tell("crash")                     # abnormal: restarted
        await perm.tell("exit")                       # permanent: restarted even on exit
        await temp.tell("crash")                      # temporary: forgotten
        await system.wait_idle()
        assert trans.state is ActorState.RUNNING and perm.state is ActorState.RUNNING
        assert temp.state is ActorState.CRASHED and system.lookup("temp") is None
        await trans.tell("exit")                      # normal exit: not restarted
        await system.wait_idle()
        assert trans.state is ActorState.STOPPED and system.lookup("trans") is None


async def test_start_and_terminate_child() -> None:
    async with ActorSystem() as system:
        sup = await system.spawn_supervisor("sup", RestartPolicy())
        ref = await sup.start_child(ChildSpec("w", Worker))
        assert sup.children() == [ref] and await ref.ask(7, timeout=1.0) == 7
        await sup.terminate_child("w")
        assert ref.state is ActorState.STOPPED and sup.children() == []
        await ref.tell("to nobody")
        assert system.dead_letters.count == 1
