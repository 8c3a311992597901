"""Normalize `engine.snapshot()` for the HTTP surface (metrics, topology, dashboard).

The engine may report its supervision tree nested (`children` holding actor dicts) or flat
(`children` holding names); the HTTP surface always serves it flat, in pre-order, with
`children` as names and `parent` set, so that clients need one shape only.

`shards` (optional): one dict per attention shard, `{"name": ..., **shard.stats()}`; its paged
KV cache keys `kv_blocks_used` / `kv_blocks_total` default to 0, and `kv_cache` sums them:
`{"used_blocks", "total_blocks", "usage_ratio"}` (0.0 when no shard reports a pool).
"""

from __future__ import annotations

from typing import Any

UP_STATES = frozenset({"alive", "running", "ready"})


def flatten_actors(actors: list[Any]) -> list[dict]:
    """Pre-order flat list of actor dicts; `children` become names, `parent` is filled in."""
    out: list[dict] = []

    def walk(actor: dict, parent: str | None) -> None:
        kids = actor.get("children") or []
        entry = {**actor, "parent": actor.get("parent", parent),
                 "children": [k.get("name") if isinstance(k, dict) else k for k in kids]}
        out.append(entry)
        for k in kids:
            if isinstance(k, dict):
                walk(k, actor.get("name"))

    for a in actors or []:
        if isinstance(a, dict):
            walk(a, None)
    return out


def server_is_up(server: dict) -> bool:
    """True when an expert server is serving (its state and, if reported, its actor's)."""
    actor_state = server.get("actor_state")
    return server.get("state") in UP_STATES and (actor_state is None or actor_state == "running")


def kv_cache_usage(shards: list[dict]) -> dict:
    """Blocks in use and in total over all shards, and their ratio (0.0 when total is 0)."""
    used = sum(_count(s.get("kv_blocks_used")) for s in shards)
    total = sum(_count(s.get("kv_blocks_total")) for s in shards)
    return {"used_blocks": used, "total_blocks": total,
            "usage_ratio": used / total if total else 0.0}


def _count(value: Any) -> int:
    """A non-negative block count; a missing or non-integer value (an older shard) is 0."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def normalize(snap: dict) -> dict:
    """A copy of a snapshot with a flat actor list, per-server `up` and `restarts`, per-shard KV
    block counts and their sum `kv_cache`."""
    snap = dict(snap or {})
    actors = flatten_actors(snap.get("actors") or [])
    by_name = {a.get("name"): a for a in actors}
    servers = []
    for s in snap.get("servers") or []:
        s = dict(s)
        s["up"] = server_is_up(s)
        if s.get("restarts") is None:  # in-process servers: the restarts of the server actor
            s["restarts"] = (by_name.get(s.get("name")) or {}).get("restarts", 0)
        servers.append(s)
    snap["actors"], snap["servers"] = actors, servers
    shards = [{**s, "kv_blocks_used": _count(s.get("kv_blocks_used")),
               "kv_blocks_total": _count(s.get("kv_blocks_total"))}
              for s in snap.get("shards") or [] if isinstance(s, dict)]
    snap["shards"], snap["kv_cache"] = shards, kv_cache_usage(shards)
    snap["counters"] = dict(snap.get("counters") or {})
    return snap


class MonotonicCounters:
    """Makes a normalized snapshot's counters fit to export as counters: they never go down.

    Values the engine derives from live state drop when what they count goes away: a
    server's `restarts` is its current incarnation's, an actor's `restarts` resets when it is
    replaced, and a sum over live servers loses a removed server's share. So this keeps, per
    identity (an actor name, a server name, a counter key), the last raw value and a running
    total: a rise adds the increase, a fall is a new incarnation counting from 0 (adds the new
    value, as Prometheus reads a reset), and an identity that disappears keeps what it had.

    `apply(snap)` returns a copy where `counters` holds the totals and `restarts` is at least
    the sum of every server's restarts ever seen, and `actor_restarts_total` maps each present
    actor's name to its total. Runtime state: one per app, fed every snapshot it serves.
    """

    def __init__(self) -> None:
        self._raw: dict[tuple[str, str], float] = {}
        self._total: dict[tuple[str, str], float] = {}
        self._exported: dict[str, float] = {}

    def _add(self, kind: str, name: str, raw: float) -> float:
        key = (kind, name)
        last = self._raw.get(key)
        self._raw[key] = raw
        grew = raw - last if last is not None and raw >= last else raw
        total = self._total[key] = self._total.get(key, 0) + grew
        return total

    def apply(self, snap: dict) -> dict:
        snap = dict(snap)
        snap["actor_restarts_total"] = {
            str(a.get("name")): self._add("actor", str(a.get("name")), _count(a.get("restarts")))
            for a in snap.get("actors") or []}
        for s in snap.get("servers") or []:
            self._add("server", str(s.get("name")), _count(s.get("restarts")))
        server_restarts = sum(t for (kind, _), t in self._total.items() if kind == "server")
        counters: dict[str, Any] = {}
        for key, value in (snap.get("counters") or {}).items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                counters[key] = value
                continue
            counters[key] = self._add("counter", str(key), value)
        counters["restarts"] = max(counters.get("restarts", 0), server_restarts)
        for key, value in counters.items():  # last line of defence: never below what was sent
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                value = counters[key] = max(value, self._exported.get(key, value))
                self._exported[key] = value
        snap["counters"] = counters
        return snap
