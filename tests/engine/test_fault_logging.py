"""A planned kill (fault injection) is logged as one line, in-process and for a server process;
an unplanned crash keeps its traceback."""

from __future__ import annotations

import logging

import pytest

from eaas import AsyncEngine, EngineConfig, SamplingParams
from tests.engine.conftest import final


@pytest.mark.parametrize("mode", ["inproc", "process"])
async def test_planned_kill_logs_one_line_without_a_traceback(tiny_dirs, caplog, mode):
    cfg = EngineConfig.from_dict({"model": tiny_dirs["qwen2_moe"], "placement": {
        "num_expert_servers": 2, "expert_replicas": 2, "server_mode": mode}})
    caplog.set_level(logging.WARNING)
    async with AsyncEngine(cfg) as engine:
        inc = engine.incarnation("expert-0")
        await engine.inject_fault("expert-0", "kill")
        await engine.wait_servers_ready(60.0, {"expert-0": inc})
        out = await final(engine, [3, 4], SamplingParams(max_tokens=3, temperature=0))
        assert engine.counters["restarts"] >= 1
    assert out.finish_reason == "length"
    crashes = [r for r in caplog.records if "crashed" in r.getMessage()]
    assert crashes and all("fault injection" in r.getMessage() for r in crashes)
    assert all(r.exc_info is None for r in crashes)
