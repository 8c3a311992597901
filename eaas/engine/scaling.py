"""Elastic changes of the expert pool while it serves: add, remove, replicate, unreplicate,
apply a planned table. One rule holds throughout: a server is put into the routing table only
after it reports ready with the experts it will be asked for, and taken out of the table before
it is drained and stopped; a step that fails never reaches the table (the rollback).

`Scaling` is a mixin of `ExpertPool` (eaas/engine/pool.py), which owns the servers, the lock, the
routing-table actor and `start_server`.
"""

from __future__ import annotations

import asyncio
from typing import Any

from eaas.engine.messages import LoadExperts, SetTable, Stats, UnloadExperts
from eaas.engine.placement import RoutingSnapshot, server_name

__all__ = ["Scaling"]


class Scaling:
    """add_server / remove_server / replace_server / replicate_expert / unreplicate_expert /
    apply_table."""

    config: Any
    servers: dict[str, dict]
    _lock: asyncio.Lock
    _change: asyncio.Event
    _next_index: Any
    _routing: Any
    _routing_ref: Any
    _emit: Any
    _sup: Any
    counters: dict[str, int]

    async def add_server(self, experts: dict[int, list[int]] | None = None, *,
                         start_timeout_s: float = 120.0, device: str | None = None) -> str:
        """Start a new server hosting `experts` ({layer: ids}; default: every expert), and
        route to it once it is ready, in a new generation. If it does not become ready within
        start_timeout_s it is stopped and the routing table is left as it was."""
        async with self._lock:
            routing = self._routing()
            if experts is None:
                experts = {l: sorted(ex) for l, ex in routing.table.items()}
            assignment = self._check_experts(experts, routing)
            name = server_name(next(self._next_index))
            self._emit({"type": "scale_started", "action": "add", "server": name})
            try:
                await asyncio.wait_for(self.start_server(name, assignment, device=device,
                                                         timeout=start_timeout_s),
                                       start_timeout_s)
            except Exception as e:
                await self._discard(name)
                self.counters["scale_failures"] = self.counters.get("scale_failures", 0) + 1
                self._emit({"type": "scale_failed", "action": "add", "server": name,
                            "reason": f"{type(e).__name__}: {e}", "rolled_back_to":
                            routing.generation})
                raise RuntimeError(f"adding expert server {name} failed ({type(e).__name__}: "
                                   f"{e}); routing stays at generation {routing.generation}"
                                   ) from e
            table = _with_server(self._routing().table, name, assignment)
            await self._set_table(table, f"added {name}")
            self.counters["scale_events"] = self.counters.get("scale_events", 0) + 1
            self._emit({"type": "scale_done", "action": "add", "server": name})
            return name

    async def remove_server(self, name: str, *, drain_timeout_s: float = 30.0) -> None:
        """Take `name` out of routing (a new generation), copy experts only it hosted to the
        remaining servers first, let in-flight work finish (or be resent), then stop it."""
        async with self._lock:
            self._get(name)
            live = [n for n, s in self.servers.items() if n != name and s["state"] != "dead"]
            if not live:
                raise ValueError(f"cannot remove {name}: it is the last live expert server")
            self._emit({"type": "scale_started", "action": "remove", "server": name})
            table = {l: {e: tuple(s for s in srv if s != name) for e, srv in ex.items()}
                     for l, ex in self._routing().table.items()}
            orphans: dict[int, list[int]] = {}
            for l, ex in table.items():
                for e, srv in ex.items():
                    if not [s for s in srv if s in live]:
                        orphans.setdefault(l, []).append(e)
            # re-home experts only `name` hosted: plan on the least-loaded servers, then one
            # load per target server
            hosted = {n: sum(map(len, self.servers[n]["assignment"].values())) for n in live}
            plan: dict[str, dict[int, list[int]]] = {}
            for l, ids in orphans.items():
                for e in ids:
                    target = min(live, key=lambda n: (hosted[n], n))
                    hosted[target] += 1
                    plan.setdefault(target, {}).setdefault(l, []).append(e)
                    table[l][e] = table[l][e] + (target,)
            for target, experts in plan.items():
                await self._load(target, experts)
            await self._set_table(table, f"removing {name}")
            await self._drain(name, drain_timeout_s)
            await self._discard(name)
            self.counters["scale_events"] = self.counters.get("scale_events", 0) + 1
            self._emit({"type": "scale_done", "action": "remove", "server": name})

    async def replace_server(self, name: str, *, model: str | None = None,
                             start_timeout_s: float = 120.0, drain_timeout_s: float = 30.0
                             ) -> str:
        """Rolling upgrade of one server: start a replacement hosting what `name` hosts (a
        fresh process: the code on disk now; `model`: another checkpoint of the same shape),
        route to it once it is ready, in place of `name` (one new generation), then drain and
        stop `name`. Returns the replacement's name. A replacement that does not become ready
        leaves routing as it was.

        A server that joined by hand (`eaas expert-server --join`) is asked to start its own
        successor on its host, which takes its place under the same name once ready."""
        if model is not None:
            await asyncio.to_thread(self._check_model, model)
        entry = self._get(name)
        slot = entry.get("slot")
        if getattr(slot, "origin", None) == "join":
            return await self._roll_joined(name, model, start_timeout_s)
        async with self._lock:
            entry = self._get(name)
            assignment = {l: list(ids) for l, ids in entry["assignment"].items()}
            new = server_name(next(self._next_index))
            model = model or entry.get("model") or self.config.model
            self._emit({"type": "scale_started", "action": "replace", "server": new,
                        "replaces": name, "model": model})
            try:
                await asyncio.wait_for(self.start_server(new, assignment, device=entry["device"],
                                                         timeout=start_timeout_s, model=model),
                                       start_timeout_s)
            except Exception as e:
                await self._discard(new)
                self.counters["scale_failures"] = self.counters.get("scale_failures", 0) + 1
                self._emit({"type": "scale_failed", "action": "replace", "server": new,
                            "replaces": name, "reason": f"{type(e).__name__}: {e}"})
                raise RuntimeError(f"replacing expert server {name} failed: its replacement "
                                   f"{new} did not start ({type(e).__name__}: {e}); routing "
                                   f"is unchanged") from e
            await self._set_table(_swapped(self._routing().table, name, new),
                                  f"{new} replaces {name} (rolling upgrade)")
            await self._drain(name, drain_timeout_s)
            await self._discard(name)
            self.counters["rollouts"] = self.counters.get("rollouts", 0) + 1
            self._emit({"type": "scale_done", "action": "replace", "server": new,
                        "replaces": name})
            return new

    def _check_model(self, model: str) -> None:
        """`model` must be a checkpoint whose experts fit the engine's model (ValueError)."""
        from eaas.model import Checkpoint

        try:
            new = Checkpoint.open(model, self.config.load_format).config
        except Exception as e:
            raise ValueError(f"model={model!r} cannot be opened as a checkpoint: {e}") from None
        have = Checkpoint.open(self.config.model, self.config.load_format).config
        fields = ("model_type", "hidden_size", "num_hidden_layers", "num_experts",
                  "moe_intermediate_size", "mlp_only_layers", "decoder_sparse_step",
                  "first_k_dense_replace")
        diff = [f for f in fields if getattr(new, f, None) != getattr(have, f, None)]
        if diff:
            raise ValueError(f"model={model!r} does not fit the served model: "
                             + ", ".join(f"{f} {getattr(new, f, None)!r} != "
                                         f"{getattr(have, f, None)!r}" for f in diff))

    async def replicate_expert(self, layer: int, expert: int, server: str | None = None) -> str:
        """Add a copy of (layer, expert) on `server` (default: the least-loaded live server
        that lacks it); routing uses it in a new generation once the weights are loaded."""
        async with self._lock:
            routing = self._routing()
            if layer not in routing.table or expert not in routing.table[layer]:
                raise ValueError(f"no MoE expert ({layer}, {expert}); MoE layers "
                                 f"{sorted(routing.table)}, experts 0.."
                                 f"{len(next(iter(routing.table.values()))) - 1}")
            hosts = routing.table[layer][expert]
            if server is None:
                free = [n for n, s in self.servers.items()
                        if s["state"] == "alive" and n not in hosts]
                if not free:
                    raise ValueError(f"expert ({layer}, {expert}) is already on every live server")
                server = min(free, key=lambda n: (sum(map(len, self.servers[n]["assignment"]
                                                          .values())), n))
            elif server in hosts:
                raise ValueError(f"{server} already hosts expert ({layer}, {expert})")
            await self._load(server, {layer: [expert]})
            table = {l: dict(ex) for l, ex in routing.table.items()}
            table[layer][expert] = hosts + (server,)
            await self._set_table(table, f"replicated ({layer}, {expert}) on {server}")
            return server

    async def unreplicate_expert(self, layer: int, expert: int, server: str) -> None:
        """Drop `server`'s copy of (layer, expert): out of routing first (a new generation),
        then, once the server's queue is drained, its weights are freed. The last live copy
        cannot be dropped."""
        async with self._lock:
            routing = self._routing()
            hosts = routing.table.get(layer, {}).get(expert)
            if hosts is None:
                raise ValueError(f"no MoE expert ({layer}, {expert})")
            if server not in hosts:
                raise ValueError(f"{server} does not host expert ({layer}, {expert}); "
                                 f"hosts: {list(hosts)}")
            live = [s for s in hosts if s != server and s not in routing.dead]
            if not live:
                raise ValueError(f"{server} holds the last live copy of expert "
                                 f"({layer}, {expert}); replicate it elsewhere first")
            table = {l: dict(ex) for l, ex in routing.table.items()}
            table[layer][expert] = tuple(s for s in hosts if s != server)
            await self._set_table(table, f"unreplicated ({layer}, {expert}) from {server}")
            await self._drain(server, 30.0)
            s = self._get(server)
            await s["ref"].ask(UnloadExperts({layer: [expert]}), timeout=120.0)
            left = [e for e in s["assignment"].get(layer, []) if e != expert]
            if left:
                s["assignment"][layer] = left
            else:
                s["assignment"].pop(layer, None)

    async def apply_table(self, table: dict[int, dict[int, tuple[str, ...]]], reason: str) -> None:
        """Install a planned table: load whatever each server newly hosts, then route."""
        async with self._lock:
            for name, s in self.servers.items():
                need: dict[int, list[int]] = {}
                for l, ex in table.items():
                    have = set(s["assignment"].get(l, ()))
                    ids = [e for e, srv in ex.items() if name in srv and e not in have]
                    if ids:
                        need[l] = ids
                if need:
                    await self._load(name, need)
            await self._set_table(table, reason)

    # ---- helpers ---------------------------------------------------------------------------
    def _check_experts(self, experts: dict[int, list[int]], routing: RoutingSnapshot
                       ) -> dict[int, list[int]]:
        out: dict[int, list[int]] = {}
        for l, ids in experts.items():
            l = int(l)
            if l not in routing.table:
                raise ValueError(f"layer {l} is not a MoE layer; MoE layers: "
                                 f"{sorted(routing.table)}")
            bad = [e for e in ids if int(e) not in routing.table[l]]
            if bad:
                raise ValueError(f"layer {l} has no experts {bad}")
            out[l] = sorted({int(e) for e in ids})
        if not out:
            raise ValueError("a new server must host at least one expert")
        return out

    async def _load(self, name: str, experts: dict[int, list[int]]) -> None:
        s = self._get(name)
        await s["ref"].ask(LoadExperts(experts), timeout=120.0)
        for l, ids in experts.items():  # in place: restarts re-load what it hosts now
            s["assignment"][l] = sorted(set(s["assignment"].get(l, [])) | set(ids))

    async def _set_table(self, table: dict, reason: str) -> None:
        await self._routing_ref.ask(SetTable(table, reason), timeout=10.0)

    async def _drain(self, name: str, timeout: float) -> None:
        """Wait until the server's batcher holds no work (shards stopped sending when the
        new table reached them; anything still failing is resent by the shards)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        batcher = self.servers[name]["batcher"]
        while loop.time() < deadline:
            try:
                st = await batcher.ask(Stats(), timeout=2.0)
            except Exception:
                return  # it is gone already
            if st["pending_rows"] == 0 and st.get("busy", 0) == 0:
                return
            await asyncio.sleep(0.01)

    async def _discard(self, name: str) -> None:
        entry = self.servers.pop(name, None)
        if entry is None:
            return
        entry["state"] = "dead"
        try:
            await self._sup.terminate_child(entry["sup"].name)
        except Exception:
            pass
        self._change.set()



def _with_server(table: Any, name: str, assignment: dict[int, list[int]]) -> dict:
    out = {l: dict(ex) for l, ex in table.items()}
    for l, ids in assignment.items():
        for e in ids:
            out[l][e] = tuple(out[l][e]) + (name,)
    return out


def _swapped(table: Any, old: str, new: str) -> dict:
    """`table` with server `old` replaced by `new` wherever it hosts an expert."""
    return {l: {e: tuple(new if s == old else s for s in srv) for e, srv in ex.items()}
            for l, ex in table.items()}
