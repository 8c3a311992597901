"""The device data path end to end (eaas.engine.device_path): the engine's shard and expert-server
processes exchange every decode step's MoE rows through GPU memory, inside captured graphs.

On one GPU (the shard and the servers are separate processes on the same GPU, CUDA IPC;
`placement.data_path: device` forces the path, `auto` would take the host path there): greedy
tokens equal the co-located engine's; a server SIGKILLed or SIGSTOPped mid-decode (replicas
present) costs a timed-out wait, the step is replayed without it, and every request completes
with the same tokens. With two GPUs (`multi_gpu`) the servers live on cuda:1 and `auto` takes
the device path by itself.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from eaas import AsyncEngine, EngineConfig, SamplingParams
from tests.engine.conftest import prompts_of

from .conftest import cuda_only, two_gpus

pytestmark = [pytest.mark.cuda, cuda_only, pytest.mark.timeout(400)]
N_TOKENS = 16


def _cfg(model: str, placement: dict, **fault) -> EngineConfig:
    return EngineConfig.from_dict({
        "model": model, "device": "cuda:0", "dtype": "float32",
        "scheduler": {"max_num_seqs": 32},
        "placement": {"num_attention_shards": 1, "num_expert_servers": 2, "expert_replicas": 2,
                      **placement},
        # two processes on one GPU time-slice it: a round trip may take a slice (~10-150 ms)
        "fault": {"device_timeout_s": 2.0, "heartbeat_interval_s": 0.5, "max_restarts": 10,
                  "within_s": 60.0, "unit_timeout_s": 5.0, **fault}})


async def _run(engine: AsyncEngine, prompts: list, started: asyncio.Event | None = None,
               after: int = 4):
    params = SamplingParams(max_tokens=N_TOKENS, temperature=0, ignore_eos=True)

    async def one(p):
        last = None
        async for last in engine.generate(p, params):
            if started is not None and len(last.outputs[0].token_ids) >= after:
                started.set()
        return last

    return await asyncio.gather(*(one(p) for p in prompts))


@pytest.fixture(autouse=True)
def _child_path(child_path) -> None:
    """Server processes import this tree (tests/gpu/conftest.py)."""


_EXPECTED: dict[str, tuple[list, list]] = {}


async def _expected(model: str) -> tuple[list, list]:
    """The co-located engine's greedy tokens (in-process servers on the shard's GPU), once."""
    if model not in _EXPECTED:
        async with AsyncEngine(_cfg(model, {"server_mode": "inproc"})) as engine:
            prompts = prompts_of(engine.tokenizer, 12, seed=3)
            _EXPECTED[model] = (prompts, [o.outputs[0].token_ids
                                          for o in await _run(engine, prompts)])
    return _EXPECTED[model]


def _device_cfg(model: str, **placement) -> EngineConfig:
    return _cfg(model, {"server_mode": "process", "transport": "tcp", "data_path": "device",
                        **placement})


async def test_shard_and_server_processes_on_one_gpu_give_the_colocated_tokens(tiny_dirs):
    prompts, want = await _expected(tiny_dirs["qwen3_moe"])
    async with AsyncEngine(_device_cfg(tiny_dirs["qwen3_moe"])) as engine:
        t0 = time.perf_counter()
        outs = await _run(engine, prompts)
        took = time.perf_counter() - t0
        snap = engine.snapshot()
    (shard,) = snap["shards"]
    print("shard:", {k: shard[k] for k in ("data_path", "device_path", "graph_replays")},
          {k: v for k, v in snap["counters"].items() if k.startswith("step")},
          "outcomes:", sorted({(o.finish_reason, str(getattr(o, "error", ""))) for o in outs}))
    assert [o.outputs[0].token_ids for o in outs] == want
    assert shard["data_path"] == "device", shard["device_path"]
    assert shard["graph_replays"] >= N_TOKENS - 1
    assert all(v == "in" for v in shard["device_path"]["servers"].values())
    assert all(s["data_path"] == {"shard-0": "device"} for s in snap["servers"])
    assert snap["counters"]["step_replays"] == 0
    print(f"{len(prompts)} requests x {N_TOKENS} tokens over the device path: {took:.2f} s, "
          f"{shard['graph_replays']} replays")


async def test_auto_takes_the_host_path_when_servers_share_the_shards_gpu(tiny_dirs):
    prompts, want = await _expected(tiny_dirs["qwen3_moe"])
    cfg = _cfg(tiny_dirs["qwen3_moe"], {"server_mode": "process", "transport": "tcp",
                                        "data_path": "auto"})
    async with AsyncEngine(cfg) as engine:
        outs = await _run(engine, prompts[:3])
        snap = engine.snapshot()
    assert [o.outputs[0].token_ids for o in outs] == want[:3]
    (shard,) = snap["shards"]
    assert shard["data_path"] == "dispatch"
    assert "shares the shard's GPU" in shard["device_path"]["reason"]
    assert all(s["data_path"] == {"shard-0": "host"} for s in snap["servers"])


@pytest.mark.parametrize("fault", ["kill", "hang"])
async def test_a_server_failing_mid_decode_costs_a_replay_not_a_token(tiny_dirs, fault):
    """SIGKILL (kill) or SIGSTOP for 3 s (hang) of one of two servers, every expert on both:
    the shard's wait for it times out once, the step is replayed without it, the rest of the
    run goes to the other server, and every token equals the co-located run's."""
    prompts, want = await _expected(tiny_dirs["qwen3_moe"])
    async with AsyncEngine(_device_cfg(tiny_dirs["qwen3_moe"])) as engine:
        await _run(engine, prompts[:2])  # warm
        victim = engine.server_names()[0]
        started = asyncio.Event()

        async def fail_mid_run():
            await asyncio.wait_for(started.wait(), 120)
            await engine.inject_fault(victim, fault, seconds=3.0)

        t0 = time.perf_counter()
        outs, _ = await asyncio.gather(_run(engine, prompts, started), fail_mid_run())
        took = time.perf_counter() - t0
        snap = engine.snapshot()
        assert all(o.finished and o.finish_reason == "length" for o in outs)
        assert [o.outputs[0].token_ids for o in outs] == want
        (shard,) = snap["shards"]
        assert snap["counters"]["step_replays"] >= 1
        assert shard["data_path"] == "device"  # the other server holds every expert
        print(f"{fault}: {took:.2f} s for the run, {snap['counters']['step_replays']} replays")
        # the process was replaced (SIGKILL; SIGSTOP: killed after missed heartbeats): the
        # shard readmits the new one into the set, and routes to it again
        t1 = time.perf_counter()
        while engine.snapshot()["shards"][0]["device_path"]["servers"][victim] != "in":
            assert time.perf_counter() - t1 < 120, engine.snapshot()["shards"][0]
            await asyncio.sleep(0.2)
        print(f"{fault}: readmitted {time.perf_counter() - t1:.2f} s after the run")
        steps_before = await _device_steps(engine, victim)
        again = await _run(engine, prompts)
        assert [o.outputs[0].token_ids for o in again] == want
        snap = engine.snapshot()
        assert snap["shards"][0]["data_path"] == "device"
        assert all(s["data_path"] == {"shard-0": "device"} for s in snap["servers"])
        assert await _device_steps(engine, victim) >= steps_before + N_TOKENS - 1


async def _device_steps(engine, name: str) -> int:
    """Device steps the server's process ran (its exchange sets, from its `Stats` reply)."""
    sets = (await engine.stats())[name].get("exchange_sets", {})
    return sum(s.get("done", 0) for s in sets.values())


async def test_a_server_added_while_serving_joins_the_device_path(tiny_dirs):
    """add_server while the device path serves: the new process takes a spare rank of the
    running set over CUDA IPC (warmed up alone), is routed to once its experts are loaded, and
    computes device steps; tokens stay the co-located run's."""
    prompts, want = await _expected(tiny_dirs["qwen3_moe"])
    async with AsyncEngine(_device_cfg(tiny_dirs["qwen3_moe"])) as engine:
        await _run(engine, prompts[:2])
        name = await engine.add_server(device="cuda:0")
        t0 = time.perf_counter()
        while engine.snapshot()["shards"][0]["device_path"]["servers"].get(name) != "in":
            assert time.perf_counter() - t0 < 120, engine.snapshot()["shards"][0]
            await asyncio.sleep(0.2)
        print(f"{name} joined the device path {time.perf_counter() - t0:.2f} s after it started")
        outs = await _run(engine, prompts)
        assert [o.outputs[0].token_ids for o in outs] == want
        assert engine.snapshot()["shards"][0]["data_path"] == "device"
        assert await _device_steps(engine, name) >= N_TOKENS - 1


@pytest.mark.multi_gpu
@two_gpus
async def test_servers_on_another_gpu_take_the_device_path_by_themselves(tiny_dirs):
    prompts, want = await _expected(tiny_dirs["qwen3_moe"])
    cfg = _cfg(tiny_dirs["qwen3_moe"], {"server_mode": "process", "transport": "tcp",
                                        "server_devices": ["cuda:1"]})
    async with AsyncEngine(cfg) as engine:
        outs = await _run(engine, prompts)
        snap = engine.snapshot()
    assert [o.outputs[0].token_ids for o in outs] == want
    assert snap["shards"][0]["data_path"] == "device"
    assert all(s["device"] == "cuda:1" for s in snap["servers"])
    assert all(s["data_path"] == {"shard-0": "device"} for s in snap["servers"])
