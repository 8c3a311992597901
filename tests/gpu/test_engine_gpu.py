"""End to end on two GPUs: attention on cuda:0, expert-server processes on cuda:1 over cudaipc://.

Greedy tokens equal the single-GPU engine's; killing the expert-server process mid-run restarts
it, it re-joins over cudaipc://, and every request completes with the same tokens.
"""

from __future__ import annotations

import asyncio
import os

import pytest

from eaas import AsyncEngine, EngineConfig, SamplingParams
from tests.engine.conftest import prompts_of

from .conftest import ROOT, child_env, two_gpus

pytestmark = [pytest.mark.multi_gpu, pytest.mark.cuda, two_gpus, pytest.mark.timeout(300)]
N_TOKENS = 16


def _cfg(model: str, placement: dict) -> EngineConfig:
    return EngineConfig.from_dict({
        "model": model, "device": "cuda:0", "dtype": "float32",
        "placement": {"num_attention_shards": 1, "num_expert_servers": 2, "expert_replicas": 1,
                      **placement},
        # one copy of each expert: requests wait for the killed server to come back (re-join)
        "fault": {"unit_timeout_s": 5.0, "heartbeat_interval_s": 0.5, "max_restarts": 10,
                  "within_s": 60.0, "backoff_s": 0.05, "no_replica_policy": "wait",
                  "wait_timeout_s": 120.0}})


async def _run(engine: AsyncEngine, prompts: list, started: asyncio.Event | None = None):
    params = SamplingParams(max_tokens=N_TOKENS, temperature=0, ignore_eos=True)

    async def one(p):
        last = None
        async for last in engine.generate(p, params):
            if started is not None:
                started.set()
        return last

    return await asyncio.gather(*(one(p) for p in prompts))


@pytest.fixture(autouse=True)
def _child_path(monkeypatch: pytest.MonkeyPatch) -> None:
    # server processes are `python -m eaas.engine.server_process`: they must import this tree
    monkeypatch.setenv("PYTHONPATH", child_env()["PYTHONPATH"])
    for key, value in child_env().items():
        if key.startswith(("NVSHMEM_", "NCCL_", "TORCH_SYMM")):
            monkeypatch.setenv(key, value)
    assert os.path.isdir(ROOT)


async def test_servers_on_gpu1_over_cudaipc_equal_single_gpu_and_survive_a_kill(tiny_dirs):
    model = tiny_dirs["qwen3_moe"]
    async with AsyncEngine(_cfg(model, {"server_mode": "inproc"})) as engine:
        prompts = prompts_of(engine.tokenizer, 24, seed=3)
        expected = [o.outputs[0].token_ids for o in await _run(engine, prompts)]

    cfg = _cfg(model, {"server_mode": "process", "transport": "cudaipc",
                       "server_devices": ["cuda:1"]})
    async with AsyncEngine(cfg) as engine:
        outs = await _run(engine, prompts)
        assert [o.outputs[0].token_ids for o in outs] == expected
        snap = engine.snapshot()
        assert all(s["device"] == "cuda:1" for s in snap["servers"])
        assert all(s["transport"].startswith("cudaipc://") for s in snap["servers"])

        started = asyncio.Event()
        victim = engine.server_names()[0]
        before = engine.incarnation(victim)

        async def kill_mid_run():
            await asyncio.wait_for(started.wait(), 60)
            await engine.inject_fault(victim, "kill")

        outs, _ = await asyncio.gather(_run(engine, prompts, started), kill_mid_run())
        await engine.wait_servers_ready(timeout=120)
        assert engine.incarnation(victim) > before  # restarted and re-joined
        assert all(o.finished and o.finish_reason == "length" for o in outs)
        assert [o.outputs[0].token_ids for o in outs] == expected
        again = await _run(engine, prompts[:4])  # served by the new process over cudaipc
        assert [o.outputs[0].token_ids for o in again] == expected[:4]
