"""Device placement, the GPU process environment, and CUDA-event polling (CPU-only checks)."""

from __future__ import annotations

import asyncio

import pytest

from eaas.gpu import assign_devices, find_rdma_nics, gpu_env, wait_event


def test_multicast_is_forced_off_even_if_the_caller_set_it_on() -> None:
    env = gpu_env({"NVSHMEM_DISABLE_NVLS": "0", "NCCL_NVLS_ENABLE": "1", "X": "y"}, nics=[])
    assert env["NVSHMEM_DISABLE_NVLS"] == "1" and env["NCCL_NVLS_ENABLE"] == "0"
    assert env["TORCH_SYMM_MEM_DISABLE_MULTICAST"] == "1" and env["X"] == "y"


def test_ibgda_follows_the_nics() -> None:
    none = gpu_env({}, nics=[])
    assert "NVSHMEM_IB_ENABLE_IBGDA" not in none and none["NVSHMEM_REMOTE_TRANSPORT"] == "none"
    some = gpu_env({}, nics=["mlx5_0", "mlx5_1"])
    assert some["NVSHMEM_IB_ENABLE_IBGDA"] == "1" and some["NVSHMEM_HCA_LIST"] == "mlx5_0,mlx5_1"
    assert gpu_env({}, nics=[], ibgda="on")["NVSHMEM_IB_ENABLE_IBGDA"] == "1"
    assert "NVSHMEM_IB_ENABLE_IBGDA" not in gpu_env({}, nics=["mlx5_0"], ibgda="off")
    assert gpu_env({"NVSHMEM_HCA_LIST": "mine"}, nics=["mlx5_0"])["NVSHMEM_HCA_LIST"] == "mine"
    with pytest.raises(ValueError, match="ibgda"):
        gpu_env({}, ibgda="yes")  # type: ignore[arg-type]


def test_find_rdma_nics_reads_the_sysfs_folder(tmp_path) -> None:
    (tmp_path / "mlx5_1").mkdir()
    (tmp_path / "mlx5_0").mkdir()
    assert find_rdma_nics(str(tmp_path)) == ["mlx5_0", "mlx5_1"]
    assert find_rdma_nics(str(tmp_path / "absent")) == []


@pytest.mark.parametrize("shards,servers,gpus,want_shards,want_servers", [
    (1, 3, 4, ["cuda:0"], ["cuda:1", "cuda:2", "cuda:3"]),
    (1, 1, 2, ["cuda:0"], ["cuda:1"]),
    (2, 2, 2, ["cuda:0", "cuda:0"], ["cuda:1", "cuda:1"]),
    (2, 6, 4, ["cuda:0", "cuda:0"], ["cuda:1", "cuda:2", "cuda:3", "cuda:1", "cuda:2", "cuda:3"]),
    (3, 2, 1, ["cuda:0"] * 3, ["cuda:0"] * 2),
])
def test_assign_devices(shards, servers, gpus, want_shards, want_servers) -> None:
    got = assign_devices(shards, servers, gpus)
    assert list(got.shards) == want_shards and list(got.servers) == want_servers


def test_assign_devices_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="num_gpus"):
        assign_devices(1, 1, 0)


class _Event:
    """Completes after `n` queries, like a recorded CUDA event the GPU finishes later."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.queries = 0

    def query(self) -> bool:
        self.queries += 1
        return self.queries > self.n


async def test_wait_event_polls_until_done_without_blocking_the_loop() -> None:
    event = _Event(5)
    ticks = 0

    async def other() -> None:
        nonlocal ticks
        while event.queries <= event.n:
            ticks += 1
            await asyncio.sleep(0)

    await asyncio.gather(wait_event(event, poll_s=1e-6), other())
    assert event.queries == 6 and ticks > 0


async def test_wait_event_times_out() -> None:
    with pytest.raises(TimeoutError):
        await wait_event(_Event(10**9), poll_s=1e-4, timeout=0.01)
