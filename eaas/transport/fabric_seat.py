"""The start-up of an engine's NVSHMEM fabric: who joins as which rank, and the engine's join.

With placement.transport "nvshmem" the engine is rank 0 of a job of 1 + its start-up servers
(`plan_fabric`); start-up server i's first process joins as rank i + 1 (`FabricSeat.argv` are
its flags, parsed by eaas.engine.server_main). Every rank's `join_fabric`
(eaas.transport.fabric) blocks until all have joined, so the engine joins on a thread
(`join_fabric_in_thread`) while it starts its servers. NVSHMEM admits no process after
start-up: a restarted or added server listens on cudaipc:// instead.

Nothing here touches CUDA or NVSHMEM at import: `join_fabric` is imported when a join runs.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from dataclasses import dataclass, replace
from typing import Any

__all__ = ["FabricSeat", "plan_fabric", "join_fabric_in_thread", "free_port"]


@dataclass(frozen=True, slots=True)
class FabricSeat:
    """One rank's place in the engine's NVSHMEM job (eaas.transport.fabric.join_fabric).

    store: "host:port" of the rendezvous, hosted by rank 0 (the engine); world_size: 1 + the
    servers that exist at start-up; rank: 0 for the engine, i + 1 for start-up server i.
    """

    store: str
    rank: int
    world_size: int
    slot_bytes: int
    num_slots: int
    timeout_s: float = 120.0

    def for_rank(self, rank: int) -> FabricSeat:
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} is not in a fabric of {self.world_size} ranks")
        return replace(self, rank=rank)

    def argv(self) -> list[str]:
        """The server-process flags that give it this seat (parsed by server_main)."""
        return ["--fabric", f"{self.store},{self.rank},{self.world_size}",
                "--fabric-slots", f"{self.slot_bytes},{self.num_slots}",
                "--fabric-timeout", str(self.timeout_s)]


def plan_fabric(config: Any, port: int | None = None) -> FabricSeat | None:
    """The engine's seat (rank 0) when placement.transport is nvshmem, else None.

    config: an EngineConfig; port: the rendezvous port (None: a free one on
    transport.listen_host, which the store binds).
    Start-up server i gets `seat.for_rank(i + 1)`.
    """
    pl = config.placement
    if pl.transport != "nvshmem":
        return None
    host = config.transport.listen_host  # the store binds it (eaas.transport.rendezvous)
    return FabricSeat(f"{host}:{free_port(host) if port is None else port}", 0,
                      1 + pl.num_expert_servers, pl.nvshmem_slot_bytes, pl.nvshmem_slots)


async def join_fabric_in_thread(seat: FabricSeat, device: str, joined: asyncio.Event) -> None:
    """`join_fabric` for `seat` on a daemon thread; sets `joined` once it returned.

    It blocks until every rank joins (or seat.timeout_s passes); the event loop keeps running,
    and a start-up that fails meanwhile neither waits for the thread nor is held by it at exit.
    """
    from eaas.transport.fabric import join_fabric

    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()

    def settle(error: BaseException | None) -> None:
        if done.done():
            return
        if error is None:
            done.set_result(None)
        else:
            done.set_exception(error)

    def run() -> None:
        error: BaseException | None = None
        try:
            join_fabric(seat.store, seat.rank, seat.world_size, device,
                        slot_bytes=seat.slot_bytes, num_slots=seat.num_slots,
                        timeout_s=seat.timeout_s)
        except BaseException as e:  # reported to the loop, not lost on this thread
            error = e
        try:
            loop.call_soon_threadsafe(settle, error)
        except RuntimeError:
            pass  # the loop is gone: the start-up that waited for us has ended

    threading.Thread(target=run, name="eaas-fabric-join", daemon=True).start()
    await done
    joined.set()


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the rendezvous binds it soon after)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])
