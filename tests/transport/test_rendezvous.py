"""The NVSHMEM fabric's rendezvous store (eaas.transport.rendezvous): rank 0's TCPStore listens
on exactly the configured host (torch's own binds every interface), the job's keys live under a
prefix derived from the cluster secret, and torch.distributed initialises over it."""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest
import torch.distributed as dist

from eaas.config import EngineConfig
from eaas.transport.auth import SECRET_ENV
from eaas.transport.fabric_seat import free_port, plan_fabric
from eaas.transport.rendezvous import rendezvous_store, store_prefix

pytestmark = pytest.mark.timeout(60)


def listening_on(port: int) -> list[str]:
    """Local addresses (hex, as /proc/net/tcp{,6} writes them) of LISTEN sockets on `port`."""
    out = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            addr, hex_port = fields[1].split(":")
            if fields[3] == "0A" and int(hex_port, 16) == port:
                out.append(addr)
    return out


@pytest.fixture
def secret(monkeypatch: pytest.MonkeyPatch) -> str:
    value = "rendezvous-test-secret-0123456789"
    monkeypatch.setenv(SECRET_ENV, value)
    return value


def test_rank0_listens_on_the_named_host_only_and_ranks_meet(secret) -> None:
    address = f"127.0.0.1:{free_port()}"
    host_store = rendezvous_store(address, 0, 2, timeout_s=10)
    assert listening_on(int(address.split(":")[1])) == ["0100007F"]  # 127.0.0.1, no wildcard
    peer = rendezvous_store(address, 1, 2, timeout_s=10)
    peer.set("nccl-id", b"x")
    assert host_store.get("nccl-id") == b"x"


def test_keys_sit_under_a_prefix_only_the_secret_gives(secret, monkeypatch) -> None:
    address = f"127.0.0.1:{free_port()}"
    store = rendezvous_store(address, 0, 1, timeout_s=10)
    store.set("k", b"v")
    raw = dist.TCPStore("127.0.0.1", int(address.split(":")[1]), is_master=False,
                        timeout=datetime.timedelta(seconds=10))
    prefix = store_prefix(address)
    assert prefix.startswith("eaas/") and len(prefix) == len("eaas/") + 32
    assert raw.list_keys() == [f"{prefix}/k"] and raw.get(f"{prefix}/k") == b"v"
    assert store_prefix(f"127.0.0.1:{int(address.split(':')[1]) + 1}") != prefix  # per job
    monkeypatch.setenv(SECRET_ENV, "another-cluster-secret-0123456789")
    assert store_prefix(address) != prefix


def test_torch_distributed_initialises_over_it(secret) -> None:
    store = rendezvous_store(f"127.0.0.1:{free_port()}", 0, 1, timeout_s=10)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        assert dist.get_world_size() == 1
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_the_engine_plans_its_store_on_transport_listen_host() -> None:
    base = {"model": "/m", "device": "cuda:0", "placement": {
        "transport": "nvshmem", "server_mode": "process", "num_expert_servers": 1,
        "expert_replicas": 1, "server_devices": ["cuda:1"]}}
    assert plan_fabric(EngineConfig.from_dict(base)).store.startswith("127.0.0.1:")
    cfg = EngineConfig.from_dict({**base, "transport": {"listen_host": "localhost"}})
    assert plan_fabric(cfg, port=29555).store == "localhost:29555"
