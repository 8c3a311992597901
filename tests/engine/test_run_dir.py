"""Expert-server process logs live in one run directory of the engine: removed at a clean
close, kept (and named) when a server process failed during the run."""

from __future__ import annotations

import logging
import os

from eaas import AsyncEngine, EngineConfig, SamplingParams
from tests.engine.conftest import final


def _cfg(d: str) -> EngineConfig:
    return EngineConfig.from_dict({"model": d, "placement": {"num_expert_servers": 2,
                                                             "expert_replicas": 2}})


async def test_clean_run_leaves_no_logs_and_a_failed_one_keeps_them(tiny_dirs, caplog):
    d = tiny_dirs["mixtral"]
    async with AsyncEngine(_cfg(d)) as engine:
        run_dir = engine.pool.home.log_dir
        assert run_dir and {"expert-0.log", "expert-1.log"} <= set(os.listdir(run_dir))
        await final(engine, [1, 2, 3], SamplingParams(max_tokens=3, temperature=0))
    assert not os.path.exists(run_dir)

    caplog.set_level(logging.WARNING, logger="eaas.engine")
    async with AsyncEngine(_cfg(d)) as engine:
        run_dir = engine.pool.home.log_dir
        inc = engine.incarnation("expert-1")
        await engine.inject_fault("expert-1", "kill")
        await engine.wait_servers_ready(60.0, {"expert-1": inc})
        await final(engine, [1, 2, 3], SamplingParams(max_tokens=3, temperature=0))
    assert os.path.isdir(run_dir) and "expert-1.log" in os.listdir(run_dir)
    assert any(run_dir in r.getMessage() and "expert-1" in r.getMessage()
               for r in caplog.records)
    for f in os.listdir(run_dir):
        os.unlink(os.path.join(run_dir, f))
    os.rmdir(run_dir)
