"""End to end on two GPUs: attention on cuda:0, expert-server processes on cuda:1.

Over cudaipc:// and over nvshmem:// (the engine is NVSHMEM rank 0, the server rank 1): greedy
tokens equal the single-GPU engine's; killing the expert-server process mid-run restarts it,
it re-joins over cudaipc:// (NVSHMEM admits no process after start-up), and every request
completes with the same tokens.

The nvshmem engine runs in a child process (`python -m tests.gpu.test_engine_gpu nvshmem ...`):
NVSHMEM joins a process once, and its collective finalize at exit would hang on the killed
peer, so that process leaves with os._exit.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys

import pytest

from eaas import AsyncEngine, EngineConfig, SamplingParams
from eaas.gpu import nvshmem_available
from tests.engine.conftest import prompts_of

from .conftest import NUM_GPUS, PYTHON, ROOT, child_env, two_gpus

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
def _child_path(child_path) -> None:
    """Server processes import this tree (tests/gpu/conftest.py)."""


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


@pytest.mark.nvshmem
@pytest.mark.skipif(NUM_GPUS < 2 or not nvshmem_available(),
                    reason="needs two GPUs and NVSHMEM in torch")
async def test_server_on_gpu1_over_nvshmem_equals_single_gpu_and_rejoins_over_cudaipc(
        tiny_dirs, tmp_path):
    model = tiny_dirs["qwen3_moe"]
    one_server = {"num_expert_servers": 1, "expert_replicas": 1}
    async with AsyncEngine(_cfg(model, {"server_mode": "inproc", **one_server})) as engine:
        prompts = prompts_of(engine.tokenizer, 24, seed=3)
        expected = [o.outputs[0].token_ids for o in await _run(engine, prompts)]
    inp, out = tmp_path / "in.json", tmp_path / "out.json"
    inp.write_text(json.dumps({"model": model, "prompts": prompts}))
    proc = await asyncio.to_thread(
        subprocess.run, [PYTHON, "-m", "tests.gpu.test_engine_gpu", "nvshmem", str(inp), str(out)],
        env=child_env(), capture_output=True, text=True, timeout=240, cwd=ROOT)
    log = (proc.stdout + proc.stderr)[-4000:]
    assert proc.returncode == 0, log
    got = json.loads(out.read_text())
    assert got["device"] == "cuda:1", log
    assert got["transport_first"].startswith("nvshmem://1/"), got["transport_first"]
    assert got["first"] == expected  # GPU-initiated puts both ways, same tokens
    assert got["restarted"], "the killed server did not come back"
    assert got["transport_after_kill"].startswith("cudaipc://"), got["transport_after_kill"]
    assert got["all_finished_by_length"]
    assert got["during_kill"] == expected
    assert got["again"] == expected[:4]  # served by the new process over cudaipc://
    assert got["close_s"] < 30, got["close_s"]  # stopping never waits on the dead rank


async def _nvshmem_scenario(model: str, prompts: list) -> dict:
    """Rank 0 of a two-rank NVSHMEM job: serve, kill the server mid-run, serve again."""
    cfg = _cfg(model, {"server_mode": "process", "transport": "nvshmem",
                       "num_expert_servers": 1, "expert_replicas": 1,
                       "server_devices": ["cuda:1"]})
    got: dict = {}
    loop = asyncio.get_running_loop()
    engine = AsyncEngine(cfg)
    await engine.start()
    try:
        got["first"] = [o.outputs[0].token_ids for o in await _run(engine, prompts)]
        server = engine.snapshot()["servers"][0]
        got["transport_first"], got["device"] = server["transport"], server["device"]
        victim = server["name"]
        before = engine.incarnation(victim)
        started = asyncio.Event()

        async def kill_mid_run():
            await asyncio.wait_for(started.wait(), 60)
            await engine.inject_fault(victim, "kill")

        outs, _ = await asyncio.gather(_run(engine, prompts, started), kill_mid_run())
        await engine.wait_servers_ready(timeout=120)
        got["restarted"] = engine.incarnation(victim) > before
        got["transport_after_kill"] = engine.snapshot()["servers"][0]["transport"]
        got["all_finished_by_length"] = all(o.finished and o.finish_reason == "length"
                                            for o in outs)
        got["during_kill"] = [o.outputs[0].token_ids for o in outs]
        got["again"] = [o.outputs[0].token_ids for o in await _run(engine, prompts[:4])]
    finally:
        t0 = loop.time()
        await engine.aclose()
        got["close_s"] = loop.time() - t0
    return got


def _child_main(argv: list[str]) -> None:
    rc = 1
    try:
        mode, inp, out = argv
        assert mode == "nvshmem", mode
        with open(inp) as f:
            data = json.load(f)
        got = asyncio.run(_nvshmem_scenario(data["model"], data["prompts"]))
        with open(out, "w") as f:
            json.dump(got, f)
        rc = 0
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)  # NVSHMEM finalize is collective: the killed rank 1 would hang it


if __name__ == "__main__":
    _child_main(sys.argv[1:])
