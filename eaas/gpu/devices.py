"""Placing processes on GPUs: the environment NVSHMEM/NCCL need, rank start-up, event polling.

- `gpu_env(...)`: the variables every GPU process gets. NVLink multicast stays off
  (NVSHMEM_DISABLE_NVLS=1, TORCH_SYMM_MEM_DISABLE_MULTICAST=1, NCCL_NVLS_ENABLE=0). IBGDA
  (GPU-initiated RDMA) is switched on through NVSHMEM's own variables when InfiniBand/RoCE NICs
  exist (`ibgda="auto"`); on NVLink-only hosts NVSHMEM uses its P2P transport.
- `assign_devices(...)`: attention shards and expert servers, each pinned to one GPU.
- `init_rank()`: one process per GPU, started by torchrun (or spawned with the same env
  variables), rendezvousing through torch.distributed's TCPStore (env://).
- `wait_event(event)`: await a CUDA event (on `eaas.gpu.waiter`'s thread); never
  `torch.cuda.synchronize()` on the asyncio loop.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass
from typing import Any, Literal, Mapping

__all__ = ["gpu_env", "find_rdma_nics", "assign_devices", "DeviceAssignment", "RankInfo",
           "init_rank", "wait_event", "MULTICAST_OFF"]

MULTICAST_OFF: Mapping[str, str] = {"NVSHMEM_DISABLE_NVLS": "1",
                                    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
                                    "NCCL_NVLS_ENABLE": "0"}


def find_rdma_nics(sys_dir: str = "/sys/class/infiniband") -> list[str]:
    """Names of RDMA devices (mlx5_0, ...) the kernel lists; [] when there are none."""
    try:
        return sorted(os.listdir(sys_dir))
    except OSError:
        return []


def gpu_env(base: Mapping[str, str] | None = None, *, nics: list[str] | None = None,
            ibgda: Literal["auto", "on", "off"] = "auto") -> dict[str, str]:
    """The environment for a GPU process: `base` (default os.environ) plus our settings.

    nics:  RDMA devices (default: `find_rdma_nics()`); with ibgda="auto" IBGDA is enabled iff
           any exist. "on" enables it regardless (NVSHMEM then logs a failed IBGDA init on a
           NIC-less host and carries on over P2P); "off" leaves it disabled.
    Variables already set in `base` win, except the multicast switches, which are forced off.
    """
    if ibgda not in ("auto", "on", "off"):
        raise ValueError(f"ibgda={ibgda!r}: must be 'auto', 'on' or 'off'")
    env = dict(os.environ if base is None else base)
    env.update(MULTICAST_OFF)
    nics = find_rdma_nics() if nics is None else nics
    if ibgda == "on" or (ibgda == "auto" and nics):
        env.setdefault("NVSHMEM_IB_ENABLE_IBGDA", "1")
        env.setdefault("NVSHMEM_IBGDA_NIC_HANDLER", "auto")
        if nics:
            env.setdefault("NVSHMEM_HCA_LIST", ",".join(nics))
    else:
        env.setdefault("NVSHMEM_REMOTE_TRANSPORT", "none")  # NVLink only: skip the IB attempt
    return env


@dataclass(frozen=True, slots=True)
class DeviceAssignment:
    """shards[i] / servers[j]: the device of attention shard i / expert server j."""

    shards: tuple[str, ...]
    servers: tuple[str, ...]


def assign_devices(num_shards: int, num_servers: int, num_gpus: int) -> DeviceAssignment:
    """Pin shards and servers to GPUs: shards fill the first GPUs, servers the rest.

    With fewer GPUs than processes, both wrap around their share. Example: 1 shard, 3 servers,
    4 GPUs -> shards (cuda:0,), servers (cuda:1, cuda:2, cuda:3); 2 shards, 2 servers,
    2 GPUs -> shards (cuda:0, cuda:0), servers (cuda:1, cuda:1); 1 GPU -> everything on cuda:0.
    """
    for name, value in (("num_shards", num_shards), ("num_servers", num_servers),
                        ("num_gpus", num_gpus)):
        if not isinstance(value, int) or value < (0 if name == "num_servers" else 1):
            raise ValueError(f"{name}={value!r}: must be a positive int")
    if num_gpus == 1:
        return DeviceAssignment(("cuda:0",) * num_shards, ("cuda:0",) * num_servers)
    shard_gpus = max(1, min(num_shards, num_gpus * num_shards // (num_shards + num_servers)))
    shard_gpus = min(shard_gpus, num_gpus - 1)
    server_gpus = num_gpus - shard_gpus
    return DeviceAssignment(
        tuple(f"cuda:{i % shard_gpus}" for i in range(num_shards)),
        tuple(f"cuda:{shard_gpus + j % server_gpus}" for j in range(num_servers)))


@dataclass(frozen=True, slots=True)
class RankInfo:
    rank: int
    world_size: int
    local_rank: int
    device: str


def init_rank(backend: str = "nccl", environ: Mapping[str, str] | None = None) -> RankInfo:
    """Join the process group of a torchrun launch (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_*).

    Pins this process to cuda:LOCAL_RANK, forces multicast off, and initialises
    torch.distributed (env://, i.e. a TCPStore at MASTER_ADDR:MASTER_PORT).
    """
    import torch
    import torch.distributed as dist

    env = os.environ if environ is None else environ
    try:
        rank, world, local = (int(env["RANK"]), int(env["WORLD_SIZE"]), int(env["LOCAL_RANK"]))
    except KeyError as exc:
        raise RuntimeError(f"init_rank needs torchrun's {exc.args[0]} in the environment") from None
    os.environ.update(MULTICAST_OFF)
    device = torch.device("cuda", local)
    torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend, device_id=device)
    return RankInfo(rank, world, local, str(device))


async def wait_event(event: Any, poll_s: float = 5e-5, timeout: float | None = None) -> None:
    """Wait until a recorded CUDA event completes; TimeoutError past `timeout`.

    An event with `.synchronize()` (torch.cuda.Event) is waited on by `eaas.gpu.waiter`'s
    thread; anything with only `.query()` is polled, backing off from `poll_s` to 1 ms.
    """
    if hasattr(event, "synchronize"):
        from eaas.gpu.waiter import wait_done

        await wait_done(event, timeout)
        return
    async with asyncio.timeout(timeout):
        delay = poll_s
        while not event.query():
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1e-3)
