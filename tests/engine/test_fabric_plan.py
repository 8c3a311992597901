"""Transport nvshmem, the plumbing (no NVSHMEM needed): the engine is rank 0 of a job of
1 + start-up servers; start-up server i's first process joins as rank i + 1 and listens on
nvshmem://; a restarted or added server listens on cudaipc://; a failed start-up raises one
clear error and leaves no server process behind."""

from __future__ import annotations

import os

import pytest
import torch

from eaas import AsyncEngine, EngineConfig
from eaas.engine.server_main import parse_args
from eaas.engine.server_process import ProcessSlot, ServerProcess
from eaas.transport.fabric_seat import FabricSeat, plan_fabric
from eaas.errors import EaasError


def _cfg(model: str = "/m", **placement) -> EngineConfig:
    return EngineConfig.from_dict({"model": model, "device": "cuda:0", "placement": {
        "transport": "nvshmem", "server_mode": "process", "num_expert_servers": 3,
        "expert_replicas": 1, "server_devices": ["cuda:1", "cuda:2", "cuda:3"],
        "nvshmem_slot_bytes": 1 << 20, "nvshmem_slots": 8, **placement}})


def _server(slot: ProcessSlot, seat: FabricSeat | None, transport: str = "nvshmem"
            ) -> ServerProcess:
    return ServerProcess(slot, "/m", {1: [0, 2]}, dtype="float32", device="cuda:1",
                         batch_invariant=True, transport=transport, call_timeout_s=1.0,
                         heartbeat_interval_s=1.0, fabric=seat)


def test_the_engine_is_rank_0_of_one_plus_the_start_up_servers():
    seat = plan_fabric(_cfg(), port=29555)
    assert seat == FabricSeat("127.0.0.1:29555", 0, 4, 1 << 20, 8)
    assert [seat.for_rank(r).rank for r in (1, 2, 3)] == [1, 2, 3]
    assert seat.for_rank(2).store == seat.store and seat.for_rank(2).world_size == 4
    with pytest.raises(ValueError, match="rank 4 is not in a fabric of 4 ranks"):
        seat.for_rank(4)
    picked = plan_fabric(_cfg())
    assert picked is not None and 0 < int(picked.store.rsplit(":", 1)[1]) < 65536
    other = EngineConfig.from_dict({"model": "/m", "placement": {"transport": "cudaipc"}})
    assert plan_fabric(other) is None


def test_first_start_joins_the_fabric_and_the_server_parses_its_seat():
    seat = plan_fabric(_cfg(), port=29555).for_rank(2)
    argv = _server(ProcessSlot("expert-1"), seat).argv()
    assert argv[1:3] == ["-m", "eaas.engine.server_main"]
    args = parse_args(argv[3:])
    assert args.listen == "nvshmem://"
    assert args.fabric == ("127.0.0.1:29555", 2, 4)
    assert args.fabric_slots == (1 << 20, 8) and args.fabric_timeout == seat.timeout_s
    assert args.device == "cuda:1" and args.assignment == '{"1": [0, 2]}'


def test_a_restart_or_an_added_server_uses_cudaipc():
    seat = plan_fabric(_cfg(), port=29555).for_rank(1)
    restarted = ProcessSlot("expert-0", starts=1)  # the slot's process ran once already
    for server in (_server(restarted, seat), _server(ProcessSlot("expert-3"), None)):
        args = parse_args(server.argv()[3:])
        assert args.listen == "cudaipc://" and args.fabric is None


def test_other_transports_never_join():
    seat = plan_fabric(_cfg(), port=29555).for_rank(1)
    args = parse_args(_server(ProcessSlot("expert-0"), seat, transport="tcp").argv()[3:])
    assert args.listen == "tcp://127.0.0.1:0" and args.fabric is None


@pytest.mark.parametrize("flag,value", [("--fabric", "127.0.0.1:1,2"),
                                        ("--fabric", "h:1,x,2"), ("--fabric-slots", "7")])
def test_bad_fabric_flags_are_refused(flag, value, capsys):
    with pytest.raises(SystemExit):
        parse_args(["--model", "/m", "--assignment", "{}", flag, value])
    assert flag in capsys.readouterr().err


def _server_children() -> list[int]:
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read()
        except (OSError, IndexError, ValueError):
            continue
        if ppid == os.getpid() and b"eaas.engine.server_main" in cmd:
            out.append(int(pid))
    return out


@pytest.mark.timeout(120)
@pytest.mark.skipif(torch.cuda.is_available(), reason="the join must fail: needs a host "
                    "without CUDA (on a GPU host the GPU tests cover start-up)")
async def test_a_failed_join_fails_start_clearly_and_leaves_no_server_process(tiny_dirs):
    cfg = _cfg(tiny_dirs["qwen3_moe"], num_expert_servers=2, server_devices=["cuda:1", "cuda:2"])
    engine = AsyncEngine(cfg)
    with pytest.raises(EaasError, match=r"forming the NVSHMEM job of 3 ranks .*failed"):
        await engine.start()
    assert _server_children() == []
    assert not engine.is_ready


@pytest.mark.timeout(60)
async def test_a_second_job_in_one_process_is_refused_before_any_server_starts(tiny_dirs):
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("this process already has a torch.distributed group")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        engine = AsyncEngine(_cfg(tiny_dirs["qwen3_moe"], num_expert_servers=1,
                                  server_devices=["cuda:1"]))
        with pytest.raises(EaasError, match="already initialised.*one nvshmem engine per process"):
            await engine.start()
        assert engine.pool is not None and engine.pool.servers == {}
        assert _server_children() == []
    finally:
        dist.destroy_process_group()
