"""/metrics parses as Prometheus text, follows the naming conventions, counts what happened,
and each app has its own registry."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from eaas.serving import ENGINE, STATE, create_app
from eaas.serving.metrics import ServingMetrics
from eaas.serving.snapshot import normalize
from tests.serving.conftest import ADMIN_TOKEN, engine_config, serving_client

REQUIRED = {
    "eaas_time_to_first_token_seconds": "histogram",
    "eaas_inter_token_latency_seconds": "histogram",
    "eaas_e2e_request_latency_seconds": "histogram",
    "eaas_prompt_tokens": "counter",
    "eaas_generation_tokens": "counter",
    "eaas_request_success": "counter",
    "eaas_http_requests": "counter",
    "eaas_actor_restarts": "counter",
    "eaas_actor_mailbox_depth": "gauge",
    "eaas_reroutes": "counter",
    "eaas_dead_letters": "counter",
    "eaas_num_requests_running": "gauge",
    "eaas_num_requests_waiting": "gauge",
    "eaas_server_up": "gauge",
    "eaas_kv_cache_usage_ratio": "gauge",
}


def families(text: str) -> dict:
    return {f.name: f for f in text_string_to_metric_families(text)}


def value(fams: dict, family: str, sample: str, **labels: str) -> float:
    return sum(s.value for s in fams[family].samples
               if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items()))


async def test_metrics_parse_follow_conventions_and_count_requests(tiny_dir):
    async with serving_client(engine_config(tiny_dir)) as client:
        prompt = [11, 12, 13, 14, 15]
        for stream in (False, True):
            resp = await client.post("/v1/completions", json={
                "prompt": prompt, "max_tokens": 5, "temperature": 0, "ignore_eos": True,
                "stream": stream})
            await resp.read()
            assert resp.status == 200
        resp = await client.get("/metrics")
        assert resp.headers["Content-Type"].startswith("text/plain")
        fams = families(await resp.text())
    for name, kind in REQUIRED.items():
        assert name in fams and fams[name].type == kind, name
    for fam in fams.values():
        assert fam.name.startswith("eaas_"), fam.name
        if fam.type == "counter":
            assert all(s.name.endswith(("_total", "_created")) for s in fam.samples), fam.name
        if fam.type == "histogram":
            assert fam.name.endswith("_seconds"), fam.name  # base unit
        assert not fam.name.endswith(("_ms", "_milliseconds", "_minutes")), fam.name
    m = {"model_name": "tiny"}
    assert value(fams, "eaas_generation_tokens", "eaas_generation_tokens_total", **m) == 10
    assert value(fams, "eaas_prompt_tokens", "eaas_prompt_tokens_total", **m) == 10
    assert value(fams, "eaas_request_success", "eaas_request_success_total",
                 finished_reason="length", **m) == 2
    assert value(fams, "eaas_time_to_first_token_seconds",
                 "eaas_time_to_first_token_seconds_count", **m) == 2
    assert value(fams, "eaas_inter_token_latency_seconds",
                 "eaas_inter_token_latency_seconds_count", **m) == 8
    assert value(fams, "eaas_e2e_request_latency_seconds",
                 "eaas_e2e_request_latency_seconds_count", **m) == 2
    assert value(fams, "eaas_http_requests", "eaas_http_requests_total",
                 route="/v1/completions", status="200") == 2
    actors = {s.labels["actor"] for s in fams["eaas_actor_mailbox_depth"].samples}
    assert {"engine", "expert-0", "expert-1", "shard-0"} <= actors  # the whole tree, flattened
    assert value(fams, "eaas_server_up", "eaas_server_up", server="expert-0") == 1
    assert 0 <= value(fams, "eaas_kv_cache_usage_ratio", "eaas_kv_cache_usage_ratio") <= 1


async def test_each_app_has_its_own_registry(tiny_dir):
    async with serving_client(engine_config(tiny_dir)) as client:
        other = create_app(client.server.app[ENGINE], admin_token=ADMIN_TOKEN)  # same engine
        resp = await client.post("/v1/completions", json={"prompt": [1, 2], "max_tokens": 2})
        assert resp.status == 200
        mine = families(await (await client.get("/metrics")).text())
        theirs = families(other[STATE].metrics.render().decode())
    assert value(mine, "eaas_generation_tokens", "eaas_generation_tokens_total") == 2
    assert value(theirs, "eaas_generation_tokens", "eaas_generation_tokens_total") == 0


async def test_layer_imbalance_always_and_expert_tokens_only_when_asked(tiny_dir):
    prompt = {"prompt": [21, 22, 23], "max_tokens": 3, "temperature": 0, "ignore_eos": True}
    for opt_in in (False, True):
        cfg = engine_config(tiny_dir).replace(**{"balance.expert_metrics": opt_in})
        async with serving_client(cfg) as client:
            assert (await client.post("/v1/completions", json=prompt)).status == 200
            fams = families(await (await client.get("/metrics")).text())
            routed = client.server.app[ENGINE].load.expert_tokens()
        layers = {s.labels["layer"] for s in fams["eaas_layer_imbalance"].samples}
        assert layers and all(s.value >= 0 for s in fams["eaas_layer_imbalance"].samples)
        assert ("eaas_expert_tokens" in fams) == opt_in
        if opt_in:
            total = sum(s.value for s in fams["eaas_expert_tokens"].samples)
            assert total == float(routed.sum()) > 0


def scrape(snapshot: dict) -> dict:
    """The engine families of one scrape over a fixed (fake) engine snapshot."""
    return families(ServingMetrics("m", snapshot=lambda: normalize(snapshot)).render().decode())


def test_kv_cache_usage_sums_blocks_over_shards():
    fams = scrape({"shards": [
        {"name": "shard-0", "running": 2, "kv_blocks_used": 30, "kv_blocks_total": 100},
        {"name": "shard-1", "kv_blocks_used": 10, "kv_blocks_total": 60},
        {"name": "shard-2", "running": 0}]})  # a shard that reports no pool counts 0
    assert fams["eaas_kv_cache_usage_ratio"].type == "gauge"
    assert value(fams, "eaas_kv_cache_usage_ratio", "eaas_kv_cache_usage_ratio") == 40 / 160
    used = {s.labels["shard"]: s.value for s in fams["eaas_kv_cache_used_blocks"].samples}
    total = {s.labels["shard"]: s.value for s in fams["eaas_kv_cache_total_blocks"].samples}
    assert used == {"shard-0": 30, "shard-1": 10, "shard-2": 0}
    assert total == {"shard-0": 100, "shard-1": 60, "shard-2": 0}


def test_kv_cache_usage_is_zero_without_pools():
    for snap in ({}, {"shards": []}, {"shards": [{"name": "shard-0", "running": 1}]}):
        fams = scrape(snap)
        assert value(fams, "eaas_kv_cache_usage_ratio", "eaas_kv_cache_usage_ratio") == 0
    assert normalize({"shards": [{"name": "s", "kv_blocks_used": 3, "kv_blocks_total": 4}]})[
        "kv_cache"] == {"used_blocks": 3, "total_blocks": 4, "usage_ratio": 0.75}


def _server(name: str, restarts: int) -> dict:
    return {"name": name, "state": "alive", "restarts": restarts}


def _actor(name: str, restarts: int) -> dict:
    return {"name": name, "kind": "ExpertServer", "state": "running", "restarts": restarts}


# (what the engine reports, eaas_restarts_total, eaas_actor_restarts_total{actor=expert-0})
RESTART_STEPS = [
    ({"servers": [_server("expert-0", 0)], "actors": [_actor("expert-0", 0)]}, 0, 0),
    ({"servers": [_server("expert-0", 2)], "actors": [_actor("expert-0", 2)]}, 2, 2),
    ({"servers": [], "actors": []}, 2, None),  # removed: its restarts stay counted
    ({"servers": [_server("expert-1", 1)], "actors": [_actor("expert-1", 1)]}, 3, None),
    # the name comes back as a fresh actor (restarts 0, then 1): its series continues at 2, 3
    ({"servers": [_server("expert-1", 1), _server("expert-0", 0)],
      "actors": [_actor("expert-1", 1), _actor("expert-0", 0)]}, 3, 2),
    ({"servers": [_server("expert-1", 1), _server("expert-0", 1)],
      "actors": [_actor("expert-1", 1), _actor("expert-0", 1)]}, 4, 3),
    # the engine starts counting restarts itself (as it does from the first one on): no dip
    ({"servers": [_server("expert-1", 1), _server("expert-0", 1)],
      "actors": [_actor("expert-1", 1), _actor("expert-0", 1)], "counters": {"restarts": 1}},
     4, 3),
]


def test_counters_derived_from_live_state_never_go_down():
    from eaas.serving.snapshot import MonotonicCounters

    guard = MonotonicCounters()
    current: dict = {}
    metrics = ServingMetrics("m", snapshot=lambda: guard.apply(normalize(current)))
    seen = []
    for snap, restarts, actor in RESTART_STEPS:
        current = snap
        fams = families(metrics.render().decode())
        assert value(fams, "eaas_restarts", "eaas_restarts_total") == restarts, len(seen)
        got = [s.value for s in fams["eaas_actor_restarts"].samples
               if s.name == "eaas_actor_restarts_total" and s.labels["actor"] == "expert-0"]
        assert got == ([] if actor is None else [actor]), len(seen)
        seen.append(restarts)
    assert seen == sorted(seen)


def test_engine_counters_are_guarded_against_a_reset():
    from eaas.serving.snapshot import MonotonicCounters

    guard = MonotonicCounters()
    reroutes = [guard.apply(normalize({"counters": {"reroutes": n}}))["counters"]["reroutes"]
                for n in (0, 5, 7, 2, 3)]  # the source restarted at 0 after 7
    assert reroutes == [0, 5, 7, 9, 10]


async def test_topology_counters_are_the_monotonic_ones(tiny_dir):
    async with serving_client(engine_config(tiny_dir)) as client:
        state = client.server.app[STATE]
        engine = client.server.app[ENGINE]
        real = engine.snapshot

        def dropping() -> dict:  # a live-state value that fell (a removed server's share)
            snap = real()
            snap["counters"] = {**snap.get("counters", {}), "scale_events": drops.pop(0)}
            return snap

        drops = [4, 1]
        engine.snapshot = dropping
        first = (await (await client.get("/admin/api/topology")).json())["counters"]
        second = (await (await client.get("/admin/api/topology")).json())["counters"]
        engine.snapshot = real
        assert (first["scale_events"], second["scale_events"]) == (4, 5)
        assert state.snapshot()["counters"]["restarts"] == 0
