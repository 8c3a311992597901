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
    counters = dict(snap.get("counters") or {})
    counters.setdefault("restarts", sum(int(a.get("restarts") or 0) for a in actors))
    snap["counters"] = counters
    return snap
