"""placement.launcher ray on a two-node Ray cluster started by the test on this host
(ray.cluster_utils.Cluster: a head and a second raylet, each with its own resources and worker
processes): the engine connects by address, its SPREAD placement group puts the 3 expert servers
on both nodes, they give the reference tokens (the ones the local launcher is held to), and a
SIGKILLed server worker is survived (requests complete from replicas; the engine's supervisor
starts a new Ray actor in the same bundle, so on the same node)."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest

from eaas import AsyncEngine, EngineConfig, SamplingParams
from tests.engine.conftest import final

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.slow  # ~25 s: a two-node cluster (~7 s) and 4 server actors on 2 cores


@pytest.fixture(scope="module")
def ray_cluster():
    """(address, {Ray node id: "node_a" | "node_b"}) of a head and one more node, 2 CPUs each."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "resources": {"node_a": 1}, "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=2, resources={"node_b": 1})
        ray.init(address=cluster.address, include_dashboard=False, log_to_driver=False)
        cluster.wait_for_nodes()
        labels = {n["NodeID"]: ("node_a" if "node_a" in n["Resources"] else "node_b")
                  for n in ray.nodes() if n["Alive"]}
        ray.shutdown()  # the engine connects by address itself, as on a real cluster
        assert sorted(labels.values()) == ["node_a", "node_b"]
        yield cluster.address, labels
    finally:
        if ray.is_initialized():
            ray.shutdown()
        cluster.shutdown()


async def test_ray_servers_span_both_nodes_give_reference_tokens_and_survive_a_killed_worker(
        ray_cluster, tiny_dirs, reference_greedy):
    address, labels = ray_cluster
    model = tiny_dirs["qwen3_moe"]
    cfg = EngineConfig.from_dict({"model": model, "placement": {
        "launcher": "ray", "ray_address": address, "num_expert_servers": 3,
        "expert_replicas": 2, "ray_num_cpus": 1, "ray_placement_strategy": "SPREAD"},
        "fault": {"warm_spares": 0}})
    prompts = [[3 + i, 17, 5 * i + 1, 9] for i in range(6)]
    want = [reference_greedy(model, p, 6) for p in prompts]
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    async with AsyncEngine(cfg) as engine:
        servers = engine.snapshot()["servers"]
        assert [s["origin"] for s in servers] == ["ray"] * 3
        pids = {s["name"]: s["pid"] for s in servers}
        assert len(set(pids.values())) == 3 and os.getpid() not in pids.values()
        nodes = dict(engine.pool.launcher.server_nodes)  # server name -> Ray node id
        assert sorted(nodes) == ["expert-0", "expert-1", "expert-2"]
        assert {labels[n] for n in nodes.values()} == {"node_a", "node_b"}, nodes
        outs = await asyncio.gather(*(final(engine, p, params) for p in prompts))
        assert [o.outputs[0].token_ids for o in outs] == want

        before = engine.incarnation("expert-1")
        run = [asyncio.ensure_future(final(engine, p, params)) for p in prompts]
        await asyncio.sleep(0)
        os.kill(pids["expert-1"], signal.SIGKILL)  # the Ray worker process of one server
        outs = await asyncio.gather(*run)
        assert [o.finish_reason for o in outs] == ["length"] * len(prompts)
        assert [o.outputs[0].token_ids for o in outs] == want
        await engine.wait_servers_ready(timeout=90, newer_than={"expert-1": before})
        after = {s["name"]: s for s in engine.snapshot()["servers"]}
        assert after["expert-1"]["pid"] != pids["expert-1"]  # a fresh Ray actor
        assert engine.pool.launcher.server_nodes["expert-1"] == nodes["expert-1"]  # its bundle
        assert not engine.routing.dead
        outs = await asyncio.gather(*(final(engine, p, params) for p in prompts))
        assert [o.outputs[0].token_ids for o in outs] == want
