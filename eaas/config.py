"""The engine's configuration: one typed tree of frozen dataclasses.

Round-trips through plain dicts, YAML (`EngineConfig.from_yaml` / `to_yaml`) and CLI flags
(`eaas.cli`). Every field is validated in `__post_init__`; an error names the field (dotted
path), the value and what is allowed. Runtime state never lives here.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping

from eaas.errors import ConfigError

DTYPES = ("float32", "bfloat16", "float16")
PLACEMENTS = ("round_robin", "contiguous", "explicit")
NO_REPLICA_POLICIES = ("fail", "wait", "degrade")
SERVER_MODES = ("inproc", "process")
TRANSPORTS = ("tcp", "shm", "cudaipc", "nvshmem")
DATA_PATHS = ("auto", "host", "device")
LAUNCHERS = ("local", "ray")
RAY_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
NVSHMEM_ALIGN = 256  # nvshmem:// slot sizes are multiples of this (eaas.transport.fabric.ALIGN)
BLOCK_SIZES = tuple(1 << i for i in range(9))  # KV cache block sizes: 1, 2, 4, ..., 256


def _check(cond: bool, name: str, value: object, allowed: str) -> None:
    if not cond:
        raise ConfigError(f"{name}={value!r} is not allowed: {allowed}")


def _int(name: str, value: object, lo: int, hi: int | None = None) -> None:
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= lo
    ok = ok and (hi is None or value <= hi)  # type: ignore[operator]
    _check(ok, name, value, f"an integer >= {lo}" + (f" and <= {hi}" if hi is not None else ""))


def _num(name: str, value: object, lo: float, *, strict: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = ok and (value > lo if strict else value >= lo)  # type: ignore[operator]
    _check(ok, name, value, f"a number {'>' if strict else '>='} {lo}")


@dataclass(frozen=True, slots=True)
class PlacementConfig:
    """Where things run: shards, expert servers, and which experts each server hosts.

    strategy: `round_robin` (expert e's first copy on server e % N), `contiguous` (experts
    split in N contiguous blocks), or `explicit` (`explicit_map`: server index -> expert ids,
    the same for every MoE layer). Each copy after the first goes to the next server.

    transport "nvshmem": the engine (rank 0, on `device`) and the expert server processes that
    exist at start-up (ranks 1..N) form one NVSHMEM job, one GPU each; a server restarted or
    added later connects over cudaipc:// (NVSHMEM admits no process after start-up). Each rank's
    symmetric heap holds W * nvshmem_slots * nvshmem_slot_bytes bytes (W = 1 + N); one message
    may carry at most nvshmem_slots // 2 slots of CUDA tensors.
    """

    num_attention_shards: int = 1
    num_expert_servers: int = 3
    expert_replicas: int = 2
    strategy: Literal["round_robin", "contiguous", "explicit"] = "round_robin"
    explicit_map: Mapping[int, tuple[int, ...]] | None = None
    server_mode: Literal["inproc", "process"] = "process"  # expert servers as OS processes
    transport: str = "tcp"  # engine <-> server process (server_mode process):
                            # tcp | shm | cudaipc | nvshmem
    server_devices: tuple[str, ...] | None = None  # device of server i = server_devices[i % len];
                                                   # None: the engine's device
    shard_devices: tuple[str, ...] | None = None  # device of shard j = shard_devices[j % len];
                                                  # None: the engine's device
    nvshmem_slot_bytes: int = 4 << 20  # transport nvshmem: bytes per slot (multiple of 256)
    nvshmem_slots: int = 16  # transport nvshmem: slots per (sender, receiver) pair
    # who starts the expert-server processes: `local` (the engine spawns them on its host) or
    # `ray` (one Ray actor per server on the cluster at ray_address; restarts stay the engine's)
    launcher: Literal["local", "ray"] = "local"
    ray_address: str | None = None  # ray.init(address=...): None starts/joins a local cluster
    ray_num_gpus: float = 0.0  # GPUs per server actor (> 0: the server runs on its cuda:0)
    ray_num_cpus: float = 1.0  # CPUs per server actor
    ray_placement_strategy: str = "PACK"  # the start-up servers' placement group:
                                          # PACK | SPREAD | STRICT_PACK | STRICT_SPREAD
    # how a CUDA shard's decode steps reach server processes: `device` (the captured step puts
    # rows into the servers' GPU memory and waits on the GPU: eaas.engine.device_path),
    # `host` (messages through the transport), or `auto` (device when every server is a CUDA
    # process on ANOTHER GPU the shard's can map; two processes on one GPU time-slice it)
    data_path: Literal["auto", "host", "device"] = "auto"
    device_spare_ranks: int = 2  # device path: ranks each shard's set keeps for servers added
                                 # while it serves (each costs R rows x H of buffers per channel)

    def __post_init__(self) -> None:
        p = "placement."
        _check(self.launcher in LAUNCHERS, p + "launcher", self.launcher, f"one of {LAUNCHERS}")
        _check(self.ray_address is None or (isinstance(self.ray_address, str)
                                            and self.ray_address != ""),
               p + "ray_address", self.ray_address, "null or an address such as 'auto' or "
               "'ray://head:10001' or 'head:6379'")
        _num(p + "ray_num_gpus", self.ray_num_gpus, 0)
        _num(p + "ray_num_cpus", self.ray_num_cpus, 0)
        _check(self.ray_placement_strategy in RAY_STRATEGIES, p + "ray_placement_strategy",
               self.ray_placement_strategy, f"one of {RAY_STRATEGIES}")
        if self.launcher == "ray":
            _check(self.server_mode == "process", p + "server_mode", self.server_mode,
                   "'process' when placement.launcher is 'ray' (servers are Ray actors)")
            _check(self.transport == "tcp", p + "transport", self.transport,
                   "'tcp' when placement.launcher is 'ray' (servers may be on other hosts)")
        _check(self.transport in TRANSPORTS, p + "transport", self.transport,
               f"one of {TRANSPORTS}")
        _check(self.data_path in DATA_PATHS, p + "data_path", self.data_path,
               f"one of {DATA_PATHS}")
        _int(p + "device_spare_ranks", self.device_spare_ranks, 0, 64)
        _int(p + "nvshmem_slot_bytes", self.nvshmem_slot_bytes, 1)
        _check(self.nvshmem_slot_bytes % NVSHMEM_ALIGN == 0, p + "nvshmem_slot_bytes",
               self.nvshmem_slot_bytes, f"a multiple of {NVSHMEM_ALIGN} bytes")
        _int(p + "nvshmem_slots", self.nvshmem_slots, 1)
        if self.transport == "nvshmem":
            _check(self.server_mode == "process", p + "server_mode", self.server_mode,
                   "'process' when placement.transport is 'nvshmem' (servers are NVSHMEM ranks)")
        _int(p + "num_attention_shards", self.num_attention_shards, 1, 64)
        _int(p + "num_expert_servers", self.num_expert_servers, 1, 1024)
        _int(p + "expert_replicas", self.expert_replicas, 1)
        _check(self.expert_replicas <= self.num_expert_servers, p + "expert_replicas",
               self.expert_replicas, f"at most num_expert_servers ({self.num_expert_servers})")
        _check(self.strategy in PLACEMENTS, p + "strategy", self.strategy, f"one of {PLACEMENTS}")
        _check(self.server_mode in SERVER_MODES, p + "server_mode", self.server_mode,
               f"one of {SERVER_MODES}")
        for name in ("server_devices", "shard_devices"):
            value = getattr(self, name)
            if value is None:
                continue
            devs = tuple(value)
            _check(bool(devs) and all(isinstance(d, str) and (d == "cpu" or d.startswith("cuda"))
                                      for d in devs), p + name, value,
                   "a non-empty list of 'cpu' / 'cuda:N'")
            object.__setattr__(self, name, devs)
        if self.strategy == "explicit":
            _check(bool(self.explicit_map), p + "explicit_map", self.explicit_map,
                   "a non-empty map {server index: [expert ids]} when strategy is 'explicit'")
        if self.explicit_map is not None:
            fixed: dict[int, tuple[int, ...]] = {}
            for k, v in dict(self.explicit_map).items():
                _int(f"{p}explicit_map key", int(k) if str(k).isdigit() else k, 0,
                     self.num_expert_servers - 1)
                ids = tuple(v)
                for e in ids:
                    _int(f"{p}explicit_map[{k}] expert id", e, 0)
                fixed[int(k)] = ids
            object.__setattr__(self, "explicit_map", fixed)


@dataclass(frozen=True, slots=True)
class BatchingConfig:
    """Expert-side batching: a layer's pending rows are flushed at max_batch_tokens rows, once
    every unit that can come this round is there (one per lane running a step in the engine: a
    lone request never waits), or after max_wait_us (kept to the microsecond: the last
    millisecond is polled, since asyncio's epoll timers round up to whole milliseconds)."""

    max_batch_tokens: int = 512
    max_wait_us: int = 200

    def __post_init__(self) -> None:
        _int("batching.max_batch_tokens", self.max_batch_tokens, 1)
        _int("batching.max_wait_us", self.max_wait_us, 0)


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    """Per-shard continuous batching."""

    max_num_seqs: int = 64  # running requests per shard
    max_waiting: int = 1024  # queued requests (all shards) before EngineOverloadedError
    max_model_len: int | None = None  # None: the checkpoint's max_position_embeddings
    micro_batches: int = 2  # ping-pong lanes per shard
    max_num_batched_tokens: int = 2048  # tokens per step of a lane; longer prompts are chunked

    def __post_init__(self) -> None:
        _int("scheduler.max_num_seqs", self.max_num_seqs, 1)
        _int("scheduler.max_num_batched_tokens", self.max_num_batched_tokens, 1)
        _int("scheduler.max_waiting", self.max_waiting, 1)
        if self.max_model_len is not None:
            _int("scheduler.max_model_len", self.max_model_len, 2)
        _int("scheduler.micro_batches", self.micro_batches, 1, 8)


@dataclass(frozen=True, slots=True)
class CacheConfig:
    """The paged KV cache of each attention shard (eaas.engine.blocks): a pool of num_blocks
    blocks of block_size tokens, sized at start.

    num_blocks: None sizes the pool from memory: on CUDA, gpu_memory_utilization is the share
    of the GPU's total memory this instance may use (weights, activations and cache; vLLM's
    meaning), the cache getting what is left of it once the weights are loaded; on CPU the
    cache gets cpu_kv_cache_space_gib GiB (vLLM's VLLM_CPU_KVCACHE_SPACE; default as vLLM's).
    Shards sharing a device split its budget evenly.
    Either way never more than max_num_seqs full-length (max_model_len) sequences could use.
    """

    block_size: int = 16  # tokens per block
    num_blocks: int | None = None  # per shard; None: from memory (vLLM --num-gpu-blocks-override)
    gpu_memory_utilization: float = 0.9
    cpu_kv_cache_space_gib: float = 4.0

    def __post_init__(self) -> None:
        p = "cache."
        bs = self.block_size
        _check(isinstance(bs, int) and not isinstance(bs, bool) and bs in BLOCK_SIZES,
               p + "block_size", self.block_size, f"a power of two in {BLOCK_SIZES}")
        if self.num_blocks is not None:
            _int(p + "num_blocks", self.num_blocks, 1)
        u = self.gpu_memory_utilization
        _check(isinstance(u, (int, float)) and not isinstance(u, bool) and 0 < u <= 1,
               p + "gpu_memory_utilization", u, "a number > 0 and <= 1")
        _num(p + "cpu_kv_cache_space_gib", self.cpu_kv_cache_space_gib, 0, strict=True)


@dataclass(frozen=True, slots=True)
class FaultConfig:
    """Supervision and failover."""

    max_restarts: int = 5
    within_s: float = 30.0
    backoff_s: float = 0.05
    unit_timeout_s: float = 2.0  # a work unit not answered by then is resent elsewhere
    max_unit_attempts: int = 8  # then its rows count as having no live replica (the policy)
    heartbeat_interval_s: float = 0.5
    # with no live replica of an expert: `wait` for the restarted or replacement server (bounded
    # by wait_timeout_s and the request's deadline), `fail` the requests, or `degrade` (skip it)
    no_replica_policy: Literal["fail", "wait", "degrade"] = "wait"
    wait_timeout_s: float = 30.0  # policy `wait`: give up after this long
    # a server past its restart intensity is replaced (a fresh name, the same experts) after
    # this cool-down; escalation is an event, capacity comes back
    replace_after_s: float = 2.0
    warm_spares: int = 1  # server processes started ahead, adopted by a restart (0: off)
    # a spare runs this much nicer (OS niceness) until adopted, so starting one takes only idle
    # CPU; restored on adoption where the OS allows it (CAP_SYS_NICE / RLIMIT_NICE), else 0
    spare_nice: int = 10
    # a unit unanswered this long (or 4 x its server's recent p99 unit time, if sooner; never
    # under 0.15 s) is also sent to another live replica: the first answer wins, a server so
    # beaten is suspect (0: off). Well below the heartbeat's verdict: a hung server stalls no step
    hedge_after_s: float = 0.25
    # the device data path (placement.data_path): the shard's bound on each device wait for a
    # server; past it the server is out of the step, which is replayed without it
    device_timeout_s: float = 1.0
    max_step_replays: int = 3  # replays of one decode step before its requests fail

    def __post_init__(self) -> None:
        _int("fault.max_restarts", self.max_restarts, 0)
        _num("fault.within_s", self.within_s, 0, strict=True)
        _num("fault.backoff_s", self.backoff_s, 0)
        _num("fault.unit_timeout_s", self.unit_timeout_s, 0, strict=True)
        _int("fault.max_unit_attempts", self.max_unit_attempts, 1)
        _num("fault.heartbeat_interval_s", self.heartbeat_interval_s, 0, strict=True)
        _check(self.no_replica_policy in NO_REPLICA_POLICIES, "fault.no_replica_policy",
               self.no_replica_policy, f"one of {NO_REPLICA_POLICIES}")
        _num("fault.wait_timeout_s", self.wait_timeout_s, 0, strict=True)
        _num("fault.replace_after_s", self.replace_after_s, 0)
        _int("fault.warm_spares", self.warm_spares, 0, 8)
        _num("fault.hedge_after_s", self.hedge_after_s, 0)
        _int("fault.spare_nice", self.spare_nice, 0, 19)
        _num("fault.device_timeout_s", self.device_timeout_s, 0, strict=True)
        _int("fault.max_step_replays", self.max_step_replays, 0, 100)


@dataclass(frozen=True, slots=True)
class BalanceConfig:
    """Load window, and the EPLB-style placement planner (replicates hot experts online)."""

    window_s: float = 30.0  # sliding window of routed-token counts
    auto: bool = False  # run the planner every interval_s while serving
    interval_s: float = 10.0
    max_experts_per_server: int | None = None  # per layer; None: no memory limit
    max_new_replicas: int = 8  # per layer per planning round
    stall_timeout_s: float = 60.0  # planner progress watchdog
    expert_metrics: bool = False  # export tokens per (layer, expert) in /metrics (cardinality E*L)

    def __post_init__(self) -> None:
        _num("balance.window_s", self.window_s, 0, strict=True)
        _check(isinstance(self.auto, bool), "balance.auto", self.auto, "true or false")
        _num("balance.interval_s", self.interval_s, 0, strict=True)
        if self.max_experts_per_server is not None:
            _int("balance.max_experts_per_server", self.max_experts_per_server, 1)
        _int("balance.max_new_replicas", self.max_new_replicas, 0)
        _num("balance.stall_timeout_s", self.stall_timeout_s, 0, strict=True)
        _check(isinstance(self.expert_metrics, bool), "balance.expert_metrics",
               self.expert_metrics, "true or false")


@dataclass(frozen=True, slots=True)
class TransportConfig:
    """Security of the engine <-> expert-server connections (eaas.transport.auth).

    Every connection starts with a mutual HMAC handshake over the cluster secret: from
    `secret_file` if given, else `EAAS_CLUSTER_SECRET`, else generated at start (then set in the
    engine's environment, which its server processes inherit). tls_cert + tls_key (PEM) also run
    tcp:// over TLS, both ends presenting the certificate and checking the peer's against tls_ca
    (None: tls_cert itself, one self-signed cluster certificate); the unix-socket transports
    (shm, cudaipc, nvshmem) are same-host and do not use TLS. Server processes listen on
    listen_host (tcp://), refuse compute requests of more than max_rows rows (the engine splits
    bigger batches), and accept the `delay` fault-injection request only if fault_injection.
    """

    secret_file: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_ca: str | None = None
    listen_host: str = "127.0.0.1"  # never a wildcard unless named here
    max_rows: int = 65536
    fault_injection: bool = True  # engine.inject_fault(..., "delay"); false for production

    def __post_init__(self) -> None:
        p = "transport."
        for name in ("secret_file", "tls_cert", "tls_key", "tls_ca"):
            value = getattr(self, name)
            _check(value is None or (isinstance(value, str) and value != ""), p + name, value,
                   "null or a file path")
        _check((self.tls_cert is None) == (self.tls_key is None), p + "tls_key", self.tls_key,
               "set together with transport.tls_cert (both or neither)")
        _check(self.tls_ca is None or self.tls_cert is not None, p + "tls_ca", self.tls_ca,
               "only with transport.tls_cert and tls_key (TLS is mutual)")
        host = self.listen_host
        _check(isinstance(host, str) and host != "" and "/" not in host
               and not host.startswith("["), p + "listen_host", host,
               "a host name or IP address to bind, e.g. 127.0.0.1 or 10.0.0.5 (no port)")
        _int(p + "max_rows", self.max_rows, 1)
        _check(isinstance(self.fault_injection, bool), p + "fault_injection",
               self.fault_injection, "true or false")

    def settings(self) -> dict[str, Any]:
        """What the engine exports to its server processes (eaas.transport.auth)."""
        return {"tls_cert": self.tls_cert, "tls_key": self.tls_key, "tls_ca": self.tls_ca,
                "listen_host": self.listen_host, "max_rows": self.max_rows,
                "fault_injection": self.fault_injection}


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """Everything the engine needs. `model` is a Hugging Face checkpoint directory."""

    model: str
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str = "cpu"
    seed: int = 0
    batch_invariant: bool = True  # row results independent of batching (exact failover/equality)
    enforce_eager: bool = False  # True: no CUDA graphs, every step runs eagerly (vLLM's name)
    load_format: str = "auto"  # "auto": the safetensors files; "dummy": seeded random weights
    # made in memory from config.json alone (vLLM's name; benchmarks of full-size shapes)
    served_model_name: str | None = None
    graph: str | None = None  # YAML file of the dataflow graph; None: the architecture's default
    placement: PlacementConfig = field(default_factory=PlacementConfig)
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    fault: FaultConfig = field(default_factory=FaultConfig)
    balance: BalanceConfig = field(default_factory=BalanceConfig)
    transport: TransportConfig = field(default_factory=TransportConfig)

    def __post_init__(self) -> None:
        _check(isinstance(self.model, (str, Path)) and str(self.model) != "", "model", self.model,
               "a checkpoint directory path")
        object.__setattr__(self, "model", str(self.model))
        _check(self.dtype in DTYPES, "dtype", self.dtype, f"one of {DTYPES}")
        _check(isinstance(self.device, str) and (self.device == "cpu" or
               self.device.startswith("cuda")), "device", self.device, "'cpu' or 'cuda[:N]'")
        _int("seed", self.seed, 0)
        _check(isinstance(self.batch_invariant, bool), "batch_invariant", self.batch_invariant,
               "true or false")
        _check(isinstance(self.enforce_eager, bool), "enforce_eager", self.enforce_eager,
               "true or false")
        _check(self.load_format in ("auto", "dummy"), "load_format", self.load_format,
               "auto or dummy")
        for name, cls in (("placement", PlacementConfig), ("batching", BatchingConfig),
                          ("scheduler", SchedulerConfig), ("cache", CacheConfig),
                          ("fault", FaultConfig), ("balance", BalanceConfig),
                          ("transport", TransportConfig)):
            _check(isinstance(getattr(self, name), cls), name, getattr(self, name),
                   f"a {cls.__name__}")
        if self.placement.transport == "nvshmem":
            self._check_nvshmem_devices()

    def _check_nvshmem_devices(self) -> None:
        """One NVSHMEM rank per GPU: the engine on `device`, each start-up server on its own."""
        pl, why = self.placement, "when placement.transport is 'nvshmem'"
        _check(_is_cuda_n(self.device), "device", self.device,
               f"an explicit 'cuda:N' {why} (the engine is NVSHMEM rank 0)")
        _check(pl.server_devices is not None, "placement.server_devices", pl.server_devices,
               f"a list of 'cuda:N' other than device ({self.device}) {why}")
        assert pl.server_devices is not None
        bad = [d for d in pl.server_devices if not _is_cuda_n(d)]
        _check(not bad, "placement.server_devices", list(pl.server_devices),
               f"explicit 'cuda:N' devices only {why}; not {bad}")
        initial = [pl.server_devices[i % len(pl.server_devices)]
                   for i in range(pl.num_expert_servers)]
        _check(self.device not in initial and len(set(initial)) == len(initial),
               "placement.server_devices", list(pl.server_devices),
               f"one GPU per NVSHMEM rank {why}: the {pl.num_expert_servers} start-up servers "
               f"(server i on server_devices[i % {len(pl.server_devices)}]) would use {initial}, "
               f"the engine {self.device}; give each its own GPU")

    @property
    def model_name(self) -> str:
        return self.served_model_name or Path(self.model).name

    # ---- dict / YAML round trip ----------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        def conv(v: Any) -> Any:
            if dataclasses.is_dataclass(v):
                return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
            if isinstance(v, Mapping):
                return {k: conv(x) for k, x in v.items()}
            if isinstance(v, tuple):
                return [conv(x) for x in v]
            return v

        return conv(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EngineConfig:
        return _build(cls, data, "")

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_yaml(cls, text: str, *, source: str = "<string>", **overrides: Any) -> EngineConfig:
        """Parse YAML text; `overrides` (top-level or dotted `a.b` keys, None = unset) win."""
        import yaml

        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config {source} is not valid YAML: {e}") from e
        if not isinstance(data, dict):
            raise ConfigError(f"config {source} must be a mapping, got {type(data).__name__}")
        return cls.from_dict(merge_overrides(data, overrides))

    @classmethod
    def from_yaml_file(cls, path: str | Path, **overrides: Any) -> EngineConfig:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        return cls.from_yaml(p.read_text(), source=str(p), **overrides)

    def replace(self, **overrides: Any) -> EngineConfig:
        """A copy with overrides; dotted keys reach nested sections (`placement.x`)."""
        return EngineConfig.from_dict(merge_overrides(self.to_dict(), overrides))


def _is_cuda_n(device: object) -> bool:
    return isinstance(device, str) and re.fullmatch(r"cuda:\d+", device) is not None


def merge_overrides(data: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in data.items()}
    for key, value in overrides.items():
        if value is None:
            continue
        *head, last = key.split(".")
        node = out
        for part in head:
            node = node.setdefault(part, {})
        node[last] = value
    return out


def _build(cls: type, data: Mapping[str, Any], prefix: str) -> Any:
    if not isinstance(data, Mapping):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown config field {prefix}{unknown[0]!r}; allowed: {sorted(names)}")
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        hint = hints[key]
        sub = _dataclass_in(hint)
        if sub is not None and isinstance(value, Mapping):
            value = _build(sub, value, f"{prefix}{key}.")
        elif isinstance(value, list):
            value = tuple(value)
        kwargs[key] = value
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except TypeError as e:
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: {e}") from e


def _dataclass_in(hint: Any) -> type | None:
    if dataclasses.is_dataclass(hint):
        return hint  # type: ignore[return-value]
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        for arg in typing.get_args(hint):
            if dataclasses.is_dataclass(arg):
                return arg  # type: ignore[return-value]
    return None
