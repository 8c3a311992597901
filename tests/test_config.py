"""EngineConfig: one typed tree that round-trips through dicts, YAML and CLI flags; bad values
get one clear error naming the field."""

from __future__ import annotations

import pytest

from eaas.model.tiny import make_config_only

from eaas.cli import main
from eaas.config import EngineConfig
from eaas.errors import ConfigError


def test_yaml_and_dict_round_trip():
    cfg = EngineConfig.from_dict({
        "model": "/m", "dtype": "bfloat16", "graph": "g.yaml",
        "placement": {"num_attention_shards": 2, "num_expert_servers": 4, "expert_replicas": 3,
                      "strategy": "explicit", "explicit_map": {0: [0, 1], 3: [2]},
                      "server_devices": ["cuda:1", "cuda:2"],
                      "shard_devices": ["cuda:0"]},
        "batching": {"max_batch_tokens": 7, "max_wait_us": 0},
        "cache": {"block_size": 32, "num_blocks": 100, "gpu_memory_utilization": 0.5,
                  "cpu_kv_cache_space_gib": 0.25}, "enforce_eager": True,
        "fault": {"no_replica_policy": "degrade"}, "balance": {"auto": True}})
    assert EngineConfig.from_yaml(cfg.to_yaml()) == cfg
    assert EngineConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.placement.explicit_map == {0: (0, 1), 3: (2,)}
    assert (cfg.cache.block_size, cfg.cache.num_blocks, cfg.enforce_eager) == (32, 100, True)
    assert cfg.replace(**{"placement.num_expert_servers": 5}).placement.num_expert_servers == 5


@pytest.mark.parametrize("data,field", [
    ({"dtype": "float8"}, "dtype"),
    ({"device": "tpu"}, "device"),
    ({"placement": {"num_expert_servers": 0}}, "placement.num_expert_servers"),
    ({"placement": {"expert_replicas": 4}}, "placement.expert_replicas"),
    ({"placement": {"strategy": "random"}}, "placement.strategy"),
    ({"placement": {"strategy": "explicit"}}, "placement.explicit_map"),
    ({"placement": {"server_mode": "thread"}}, "placement.server_mode"),
    ({"placement": {"transport": "udp"}}, "placement.transport"),
    ({"placement": {"server_devices": ["gpu0"]}}, "placement.server_devices"),
    ({"placement": {"shard_devices": []}}, "placement.shard_devices"),
    ({"batching": {"max_batch_tokens": 0}}, "batching.max_batch_tokens"),
    ({"batching": {"max_wait_us": -1}}, "batching.max_wait_us"),
    ({"scheduler": {"micro_batches": 0}}, "scheduler.micro_batches"),
    ({"cache": {"block_size": 24}}, "cache.block_size=24 is not allowed: a power of two"),
    ({"cache": {"block_size": 512}}, "cache.block_size"),
    ({"cache": {"block_size": 16.0}}, "cache.block_size"),
    ({"cache": {"num_blocks": 0}}, "cache.num_blocks"),
    ({"cache": {"gpu_memory_utilization": 0}}, "cache.gpu_memory_utilization=0 is not allowed: "
                                               "a number > 0 and <= 1"),
    ({"cache": {"gpu_memory_utilization": 1.01}}, "cache.gpu_memory_utilization"),
    ({"cache": {"cpu_kv_cache_space_gib": 0}}, "cache.cpu_kv_cache_space_gib"),
    ({"enforce_eager": "yes"}, "enforce_eager"),
    ({"fault": {"unit_timeout_s": 0}}, "fault.unit_timeout_s"),
    ({"fault": {"no_replica_policy": "retry"}}, "fault.no_replica_policy"),
    ({"balance": {"max_experts_per_server": 0}}, "balance.max_experts_per_server"),
    ({"placement": {"bogus": 1}}, "placement.'bogus'"),
    ({"placement": {"launcher": "k8s"}}, "placement.launcher='k8s' is not allowed: one of"),
    ({"placement": {"launcher": "ray", "transport": "shm"}},
     "placement.transport='shm' is not allowed: 'tcp' when placement.launcher"),
    ({"placement": {"launcher": "ray", "server_mode": "inproc"}}, "placement.server_mode"),
    ({"placement": {"ray_num_gpus": -1}}, "placement.ray_num_gpus"),
    ({"placement": {"ray_placement_strategy": "pack"}}, "placement.ray_placement_strategy"),
    ({"placement": {"ray_address": ""}}, "placement.ray_address"),
    ({"batching": 5}, "batching"),
])
def test_bad_values_name_the_field(data, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.").replace("'", "'")):
        EngineConfig.from_dict({"model": "/m", **data})


def test_yaml_errors_are_clear(tmp_path):
    with pytest.raises(ConfigError, match="not valid YAML"):
        EngineConfig.from_yaml("model: [unclosed")
    with pytest.raises(ConfigError, match="does not exist"):
        EngineConfig.from_yaml_file(tmp_path / "missing.yaml")


def test_cli_flags_override_the_yaml_file(tmp_path, capsys):
    path = tmp_path / "eaas.yaml"
    path.write_text(EngineConfig.from_dict({"model": "/ignored", "placement": {
        "num_expert_servers": 5, "expert_replicas": 1}}).to_yaml())
    model = make_config_only(tmp_path / "m", "qwen3_moe")  # `eaas config` reads it, as serve
    assert main(["config", str(model), "--config", str(path), "--expert-replicas", "2",
                 "--no-batch-invariant", "--server-mode", "inproc", "--load-format",
                 "dummy"]) == 0
    cfg = EngineConfig.from_yaml(capsys.readouterr().out)
    assert cfg.model == str(model) and cfg.batch_invariant is False
    assert (cfg.placement.num_expert_servers, cfg.placement.expert_replicas) == (5, 2)
    assert cfg.placement.server_mode == "inproc"


def test_cache_defaults_follow_vllm():
    cfg = EngineConfig(model="/m")
    assert (cfg.cache.block_size, cfg.cache.num_blocks, cfg.cache.gpu_memory_utilization,
            cfg.cache.cpu_kv_cache_space_gib, cfg.enforce_eager) == (16, None, 0.9, 4.0, False)


def test_cli_cache_and_eager_flags(tmp_path, capsys):
    m = str(make_config_only(tmp_path / "m", "qwen3_moe"))
    assert main(["config", m, "--block-size", "32", "--num-gpu-blocks-override", "100",
                 "--gpu-memory-utilization", "0.5", "--cpu-kv-cache-space-gib", "2",
                 "--enforce-eager", "--load-format", "dummy"]) == 0
    cfg = EngineConfig.from_yaml(capsys.readouterr().out)
    assert (cfg.cache.block_size, cfg.cache.num_blocks, cfg.cache.gpu_memory_utilization,
            cfg.cache.cpu_kv_cache_space_gib, cfg.enforce_eager) == (32, 100, 0.5, 2.0, True)
    path = tmp_path / "eaas.yaml"
    path.write_text(cfg.to_yaml())
    assert main(["config", m, "--config", str(path), "--no-enforce-eager",
                 "--block-size", "8"]) == 0
    cfg = EngineConfig.from_yaml(capsys.readouterr().out)
    assert (cfg.cache.block_size, cfg.cache.num_blocks, cfg.enforce_eager) == (8, 100, False)
    assert main(["config", m, "--block-size", "24"]) == 2
    assert "cache.block_size=24" in capsys.readouterr().err


def test_cli_reports_bad_flags_without_a_traceback(capsys):
    assert main(["config", "/m", "--num-expert-servers", "1"]) == 2  # replicas 2 > 1 server
    assert "placement.expert_replicas" in capsys.readouterr().err


NVSHMEM_OK = {"model": "/m", "device": "cuda:0", "placement": {
    "transport": "nvshmem", "server_mode": "process", "num_expert_servers": 2,
    "expert_replicas": 1, "server_devices": ["cuda:1", "cuda:2"]}}


def test_nvshmem_transport_round_trips_with_its_slot_sizes():
    cfg = EngineConfig.from_dict(NVSHMEM_OK)
    assert (cfg.placement.nvshmem_slot_bytes, cfg.placement.nvshmem_slots) == (4 << 20, 16)
    cfg = cfg.replace(**{"placement.nvshmem_slot_bytes": 1 << 20, "placement.nvshmem_slots": 4})
    assert EngineConfig.from_yaml(cfg.to_yaml()) == cfg
    assert (cfg.placement.nvshmem_slot_bytes, cfg.placement.nvshmem_slots) == (1 << 20, 4)


@pytest.mark.parametrize("change,field,why", [
    ({"placement.server_mode": "inproc"}, "placement.server_mode", "'process' when"),
    ({"device": "cpu"}, "device", "explicit 'cuda:N'"),
    ({"device": "cuda"}, "device", "explicit 'cuda:N'"),
    ({"placement.server_devices": ["cpu", "cuda:1"]}, "placement.server_devices",
     "not \\['cpu'\\]"),
    ({"placement.server_devices": ["cuda:0", "cuda:1"]}, "placement.server_devices", "one GPU"),
    ({"placement.server_devices": ["cuda:1"]}, "placement.server_devices", "one GPU"),
    ({"placement.nvshmem_slot_bytes": 0}, "placement.nvshmem_slot_bytes", ">= 1"),
    ({"placement.nvshmem_slot_bytes": 1000}, "placement.nvshmem_slot_bytes", "multiple of 256"),
    ({"placement.nvshmem_slots": 0}, "placement.nvshmem_slots", ">= 1"),
])
def test_nvshmem_needs_process_servers_each_on_its_own_gpu(change, field, why):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.") + ".*" + why):
        EngineConfig.from_dict(NVSHMEM_OK).replace(**change)


def test_nvshmem_needs_explicit_server_devices():
    data = {**NVSHMEM_OK, "placement": {**NVSHMEM_OK["placement"], "server_devices": None}}
    with pytest.raises(ConfigError, match=r"placement\.server_devices=None.*other than device"):
        EngineConfig.from_dict(data)
