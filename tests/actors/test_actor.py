"""One actor: hooks, ask/tell semantics, crashes, dead letters, death-watch, misuse."""

from __future__ import annotations

import asyncio
from typing import Any

import msgpack
import pytest

from eaas.actors import Actor, ActorState, ActorSystem, DeadLetter, Envelope, Terminated
from eaas.errors import (ActorDeadError, ActorStateError, AskTimeoutError, MailboxFullError,
                         StartTimeoutError)


class Recorder(Actor):
    """Records hooks and messages; "hold" blocks on `gate`; "boom" raises."""

    def __init__(self, log: list[Any], gate: asyncio.Event | None = None) -> None:
        self.log, self.gate = log, gate

    async def on_start(self) -> None:
        self.log.append("start")

    async def on_receive(self, msg: Any) -> Any:
        if msg == "hold":
            assert self.gate is not None
            await self.gate.wait()
        if msg == "boom":
            raise RuntimeError("boom")
        if isinstance(msg, Terminated):
            self.log.append(msg)
            return None
        self.log.append(msg)
        return ("reply", msg)

    async def on_stop(self) -> None:
        self.log.append("stop")


async def test_hooks_order_ask_reply_and_tell_order() -> None:
    log: list[Any] = []
    async with ActorSystem() as system:
        ref = await system.spawn(lambda: Recorder(log), "r")
        assert ref.state is ActorState.RUNNING and ref.is_alive
        for i in range(5):
            ref.tell_nowait(i)
        assert await ref.ask("q", timeout=1.0) == ("reply", "q")
        await ref.stop()
        assert ref.state is ActorState.STOPPED and not ref.is_alive
    assert log == ["start", 0, 1, 2, 3, 4, "q", "stop"]


async def test_error_in_ask_fails_only_that_ask() -> None:
    log: list[Any] = []
    async with ActorSystem() as system:
        ref = await system.spawn(lambda: Recorder(log), "r")
        with pytest.raises(RuntimeError, match="boom"):
            await ref.ask("boom", timeout=1.0)
        assert ref.state is ActorState.RUNNING
        assert await ref.ask("after", timeout=1.0) == ("reply", "after")


async def test_crash_on_tell_fails_every_pending_ask_at_once() -> None:
    gate = asyncio.Event()
    log: list[Any] = []
    async with ActorSystem() as system:
        ref = await system.spawn(lambda: Recorder(log, gate), "r")
        held = asyncio.create_task(ref.ask("hold", timeout=30.0))    # being handled
        await asyncio.sleep(0)
        ref.tell_nowait("boom")
        queued = [asyncio.create_task(ref.ask(i, timeout=30.0)) for i in range(3)]
        await asyncio.sleep(0)
        gate.set()        # "hold" replies, then "boom" crashes the unsupervised actor
        assert await held == ("reply", "hold")
        results = await asyncio.wait_for(asyncio.gather(*queued, return_exceptions=True), 1.0)
        assert all(isinstance(r, ActorDeadError) for r in results), results
        assert ref.state is ActorState.CRASHED
        assert log[-1] == "stop"                      # on_stop still ran
        with pytest.raises(ActorDeadError):
            await ref.ask("late", timeout=1.0)


async def test_ask_being_handled_fails_when_an_owned_task_crashes_the_actor() -> None:
    class Doomed(Actor):
        async def on_receive(self, msg: Any) -> Any:
            async def fail() -> None:
                raise ValueError("background failure")
            self.context.create_task(fail())
            await asyncio.Event().wait()              # never replies by itself

    async with ActorSystem() as system:
        ref = await system.spawn(Doomed, "d")
        with pytest.raises(ActorDeadError, match="died while handling"):
            await ref.ask("go", timeout=5.0)
        assert ref.state is ActorState.CRASHED
        assert "background failure" in (ref._cell.last_reason or "")


async def test_ask_timeout_and_the_expired_ask_is_skipped() -> None:
    gate = asyncio.Event()
    log: list[Any] = []
    async with ActorSystem() as system:
        ref = await system.spawn(lambda: Recorder(log, gate), "r")
        ref.tell_nowait("hold")
        with pytest.raises(AskTimeoutError, match="'r'"):
            await ref.ask("expired", timeout=0.01)
        gate.set()
        assert await ref.ask("fresh", timeout=1.0) == ("reply", "fresh")
        assert "expired" not in log


async def test_dead_letters_are_counted_and_inspectable() -> None:
    async with ActorSystem() as system:
        ref = await system.spawn(lambda: Recorder([]), "r")
        await ref.stop()
        ref.tell_nowait("a")
        await ref.tell("b")
        with pytest.raises(ActorDeadError):
            await ref.ask("c", timeout=1.0)
        assert system.dead_letters.count == 3
        assert list(system.dead_letters.recent) == [
            DeadLetter("r", "a", "stopped"), DeadLetter("r", "b", "stopped"),
            DeadLetter("r", "c", "stopped")]


async def test_full_mailbox_tell_times_out_and_tell_nowait_refuses() -> None:
    gate = asyncio.Event()
    async with ActorSystem() as system:
        ref = await system.spawn(lambda: Recorder([], gate), "r", mailbox_size=2)
        ref.tell_nowait("hold")
        await asyncio.sleep(0)                        # "hold" is being handled
        ref.tell_nowait(1)
        ref.tell_nowait(2)
        with pytest.raises(MailboxFullError, match="'r'"):
            ref.tell_nowait(3)
        with pytest.raises(MailboxFullError, match="stayed full"):
            await ref.tell(3, timeout=0.01)
        assert ref._cell.mailbox.data_depth == 2
        gate.set()


async def test_ping_and_stop_overtake_queued_data() -> None:
    gate = asyncio.Event()
    log: list[Any] = []
    async with ActorSystem() as system:
        ref = await system.spawn(lambda: Recorder(log, gate), "r")
        ref.tell_nowait("hold")
        for i in range(3):
            ref.tell_nowait(i)
        ping = asyncio.create_task(ref.ping(timeout=5.0))
        await asyncio.sleep(0)
        gate.set()
        status = await ping
        # answered while 0, 1, 2 were still queued behind it
        assert status["state"] == "running" and status["mailbox_depth"] == 3
        ref.tell_nowait("x")
        await ref.stop()                              # stop overtakes "x" and what's left
        assert "x" not in log and log[-1] == "stop"
        assert "x" in [d.msg for d in system.dead_letters.recent]


async def test_watchers_receive_terminated() -> None:
    log: list[Any] = []

    class Watcher(Actor):
        async def on_receive(self, msg: Any) -> Any:
            if msg == "watch":
                self.context.watch(self.context.system.lookup("target"))
            else:
                log.append(msg)

    async with ActorSystem() as system:
        target = await system.spawn(lambda: Recorder([]), "target")
        watcher = await system.spawn(Watcher, "w")
        await watcher.ask("watch", timeout=1.0)
        target.tell_nowait("boom")
        await system.wait_idle()
        assert log == [Terminated("target", "RuntimeError('boom')")]
        await watcher.ask("watch", timeout=1.0)       # watching the dead: notice at once
        await system.wait_idle()
        assert len(log) == 2 and log[1].name == "target"


async def test_self_stop_and_misuse_errors() -> None:
    class Quitter(Actor):
        async def on_receive(self, msg: Any) -> Any:
            self.context.stop()
            return "bye"

    async with ActorSystem() as system:
        ref = await system.spawn(Quitter, "q")
        assert await ref.ask("x", timeout=1.0) == "bye"
        await system.wait_idle()
        assert ref.state is ActorState.STOPPED
        with pytest.raises(ActorStateError, match="cannot create tasks while stopped"):
            ref._cell.create_task(asyncio.sleep(0), None)
        with pytest.raises(ValueError, match="already taken"):
            await system.spawn(Quitter, "q2") and await system.spawn(Quitter, "q2")
        with pytest.raises(TypeError, match="must return an Actor"):
            await system.spawn(lambda: object(), "bad")  # type: ignore[arg-type, return-value]
        assert system.lookup("bad") is None


async def test_on_start_failure_raises_from_spawn_and_frees_the_name() -> None:
    class Broken(Actor):
        async def on_start(self) -> None:
            raise OSError("no device")

    async with ActorSystem() as system:
        with pytest.raises(OSError, match="no device"):
            await system.spawn(Broken, "b")
        assert system.lookup("b") is None
        await system.spawn(lambda: Recorder([]), "b")


def test_envelope_and_notices_are_msgpack_friendly() -> None:
    env = Envelope({"rows": [1, 2], "layer": 3}, None)
    wire = msgpack.unpackb(msgpack.packb(env.to_wire("expert-0", ask_id=7)))
    assert Envelope.from_wire(wire) == ("expert-0", {"rows": [1, 2], "layer": 3}, 7)
    note = Terminated("expert-0", "stopped").to_wire()
    assert msgpack.unpackb(msgpack.packb(note)) == note


async def test_stop_is_idempotent_and_concurrent_stops_agree() -> None:
    log: list[Any] = []
    async with ActorSystem() as system:
        ref = await system.spawn(lambda: Recorder(log), "r")
        await asyncio.gather(ref.stop(), ref.stop())
        await ref.stop()
        assert log == ["start", "stop"] and ref.state is ActorState.STOPPED


async def test_hanging_on_start_times_out_and_frees_the_name() -> None:
    class Hangs(Actor):
        async def on_start(self) -> None:
            await asyncio.Event().wait()

    async with ActorSystem(start_timeout=0.02) as system:
        with pytest.raises(StartTimeoutError, match="'h'"):
            await system.spawn(Hangs, "h")
        assert system.lookup("h") is None
