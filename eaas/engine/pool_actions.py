"""The engine's operator actions on its expert pool: fault injection, adding, removing and
replacing servers (rolling upgrades), join tickets for servers started elsewhere, replicas, and
one rebalance by the planner. Each delegates to `ExpertPool` (eaas/engine/pool.py and its
`Scaling` mixin), which owns the routing-table rule (a server is routed to only once ready).

`PoolActions` is a mixin of `AsyncEngine` (eaas/engine/engine.py).
"""

from __future__ import annotations

from typing import Any

__all__ = ["PoolActions"]


class PoolActions:
    """server_names / inject_fault / kill_server / add_server / remove_server / replace_server,
    join_*, replicate_expert / unreplicate_expert / rebalance."""

    config: Any
    load: Any
    routing: Any
    counters: dict[str, int]
    events_bus: Any
    _pool: Any

    def server_names(self) -> list[str]:
        return sorted(self._pool().servers)

    async def inject_fault(self, server: str, kind: str, *, seconds: float = 0.0) -> None:
        """Fault injection on one server: `kill` (crash it; a process gets SIGKILL), `hang`
        (stop answering for `seconds`; SIGSTOP), `delay` (add `seconds` to every batch)."""
        await self._pool().inject_fault(server, kind, seconds=seconds)

    def incarnation(self, server: str) -> int:
        return self._pool().incarnation(server)

    async def wait_servers_ready(self, timeout: float = 60.0,
                                 newer_than: dict[str, int] | None = None) -> None:
        await self._pool().wait_ready(timeout, newer_than)

    async def kill_server(self, name: str) -> None:
        """Fault injection: crash server `name` (its supervisor restarts it)."""
        await self._pool().inject_fault(name, "kill")

    async def add_server(self, experts: dict[int, list[int]] | None = None, *,
                         start_timeout_s: float = 120.0, device: str | None = None) -> str:
        """Add an expert server (default: hosting every expert; on `device`, default
        placement.server_devices round robin); returns its name."""
        return await self._pool().add_server(experts, start_timeout_s=start_timeout_s,
                                             device=device)

    async def remove_server(self, name: str) -> None:
        """Drain and remove an expert server; experts only it hosted move elsewhere first."""
        await self._pool().remove_server(name)

    async def replace_server(self, name: str, *, model: str | None = None,
                             start_timeout_s: float = 120.0) -> str:
        """Rolling upgrade of server `name`: a replacement (a fresh process; `model`: another
        checkpoint of the same shape) is routed to once ready, then `name` is drained and
        stopped; a hand-joined server starts its successor on its own host. Returns the name
        of the server that now hosts its experts."""
        return await self._pool().replace_server(name, model=model,
                                                 start_timeout_s=start_timeout_s)

    # ---- servers that join from elsewhere (eaas expert-server --join; eaas/engine/join.py) ---
    def join_server(self, name: str | None = None, *, device: str = "cpu", host: str = "",
                    transport: str = "tcp") -> dict:
        """A join ticket for a server process starting elsewhere (see ExpertPool.join)."""
        return self._pool().join(name, device=device, host=host, transport=transport)

    async def join_ready(self, name: str, incarnation: int, url: str,
                         pid: int | None = None) -> dict:
        """The joining process listens at `url`: connect, ping, route to it."""
        return await self._pool().ready(name, incarnation, url, pid)

    async def join_leave(self, name: str, incarnation: int) -> dict:
        """A joined process leaves: out of routing, drained, removed."""
        return await self._pool().leave(name, incarnation)

    def join_status(self, name: str, incarnation: int) -> dict:
        """Whether the joined process holding ticket `incarnation` is still wanted."""
        return self._pool().status(name, incarnation)

    async def replicate_expert(self, layer: int, expert: int, server: str | None = None) -> str:
        """Add a replica of (layer, expert); returns the server that now hosts it."""
        return await self._pool().replicate_expert(layer, expert, server)

    async def unreplicate_expert(self, layer: int, expert: int, server: str) -> None:
        """Drop `server`'s replica of (layer, expert) (never the last live copy)."""
        await self._pool().unreplicate_expert(layer, expert, server)

    async def rebalance(self) -> dict:
        """Run the placement planner once on the current load window and apply its plan."""
        from eaas.engine.planner import plan_table

        cfg, pool, load = self.config.balance, self._pool(), self.load
        assert load is not None  # set with the pool at start
        live = [n for n, s in pool.servers.items() if s["state"] == "alive"]
        table, moves = plan_table(load.expert_tokens(), self.routing.table, live,
                                  cfg.max_experts_per_server, cfg.max_new_replicas)
        if moves:
            await pool.apply_table(table, f"rebalance: {len(moves)} new replicas")
            self.counters["rebalances"] = self.counters.get("rebalances", 0) + 1
        self.events_bus.emit({"type": "rebalance", "moves": moves})
        return {"moves": moves, "generation": self.routing.generation}
