"""Placement planner in the spirit of DeepSeek's EPLB: replicate hot experts where load is low.

`plan_table` is the pure planning step. Per MoE layer, from the window's tokens per expert:
each expert's tokens are assumed split evenly over its live replicas (shards route to the replica
with the fewest rows in flight), so a server's load is the sum of its experts' shares. Greedily,
the expert with the largest per-replica share gets one more replica on the least-loaded live
server that lacks it and has room (`max_experts_per_server`), as long as that lowers the busiest
server's load. Worked example (one layer, 2 servers, shares in tokens):

    load = [90, 10, 10, 10]; expert e on server e % 2  ->  s0 = 100, s1 = 20
    replicate expert 0 on s1                            ->  s0 = 55,  s1 = 65  (max 100 -> 65)
    expert 0 is everywhere; replicate expert 1 on s0    ->  s0 = 60,  s1 = 60  (max 65 -> 60)
    experts 2 or 3 would raise the max again            ->  stop

`Planner` is the actor that runs it every `balance.interval_s` and applies the plan online
(servers load the new experts first, then the routing table changes in a new generation). It
stamps `progress` after every round, which the HealthMonitor's watchdog reads: a planner that
stops making progress is reported (an event and a counter), a known failure of other systems.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Awaitable, Callable, Mapping, Sequence

import torch

from eaas.actors import Actor


def plan_table(expert_tokens: torch.Tensor, table: Mapping[int, Mapping[int, Sequence[str]]],
               live: Sequence[str], max_experts_per_server: int | None = None,
               max_new_replicas: int = 8) -> tuple[dict[int, dict[int, tuple[str, ...]]], list]:
    """expert_tokens [L, E]; table: layer -> expert -> servers. Returns (new table, moves)."""
    new: dict[int, dict[int, tuple[str, ...]]] = {l: {e: tuple(s) for e, s in ex.items()}
                                                   for l, ex in table.items()}
    moves: list[dict] = []
    live = list(live)
    if not live:
        return new, moves
    for layer, experts in table.items():
        load = expert_tokens[layer].double().tolist()
        copies = {e: [s for s in srv if s in live] for e, srv in experts.items()}
        hosted = {s: {e for e, c in copies.items() if s in c} for s in live}

        def share(e: int) -> float:
            return load[e] / max(1, len(copies[e]))

        def server_load(s: str) -> float:
            return sum(share(e) for e in hosted[s])

        for _ in range(max_new_replicas):
            busiest = max(server_load(s) for s in live)
            placed = False
            for e in sorted(copies, key=share, reverse=True):
                if load[e] <= 0:
                    break
                room = [s for s in live if s not in copies[e] and
                        (max_experts_per_server is None or len(hosted[s]) < max_experts_per_server)]
                if not room:
                    continue
                target = min(room, key=lambda s: (server_load(s), s))
                copies[e].append(target)
                hosted[target].add(e)
                if max(server_load(s) for s in live) < busiest - 1e-9:
                    new[layer][e] = new[layer][e] + (target,)
                    moves.append({"layer": layer, "expert": e, "server": target})
                    placed = True
                    break
                copies[e].remove(target)
                hosted[target].discard(e)
            if not placed:
                break
    return new, moves


class Planner(Actor):
    """Runs `rebalance` every interval; `progress` is the time of the last finished round."""

    def __init__(self, rebalance: Callable[[], Awaitable[Any]], interval_s: float,
                 progress: dict) -> None:
        self._rebalance = rebalance
        self.interval_s = interval_s
        self.progress = progress  # shared with the HealthMonitor: {"t": monotonic, "rounds": n}

    async def on_start(self) -> None:
        self.progress["t"] = time.monotonic()
        self.context.create_task(self._loop(), name="planner-loop")

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            await self._rebalance()
            self.progress["t"] = time.monotonic()
            self.progress["rounds"] = self.progress.get("rounds", 0) + 1

    async def on_receive(self, msg: Any) -> Any:
        raise TypeError(f"Planner takes no messages, got {type(msg).__name__}")
