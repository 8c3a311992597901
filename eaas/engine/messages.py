"""Messages between the engine's actors.

Plain frozen dataclasses of ints, strings and tensors, so a transport can carry them between
processes (tensors as raw buffers). `reply_to` fields hold ActorRefs, which a remote transport
sends by name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True, slots=True)
class ComputeBatch:
    """Run rows through experts of one layer: y[n] = expert[expert_ids[n]](x[n])."""

    layer: int
    x: torch.Tensor  # [N, H]
    expert_ids: torch.Tensor  # [N] int64, global expert ids


@dataclass(frozen=True, slots=True)
class WorkUnit:
    """Rows one shard sends one server for one layer of one step; kept until combined."""

    unit_id: int
    attempt: int
    generation: int  # routing generation it was dispatched under
    layer: int
    x: torch.Tensor  # [N, H]
    expert_ids: torch.Tensor  # [N] int64
    reply_to: Any  # ActorRef of the dispatching shard
    # at most how many units of this layer can reach a batcher this round, this one included
    # (the lanes running a step in the whole engine); the batcher flushes once that many are
    # there instead of waiting out max_wait_us. 0: unknown (the window decides)
    round_units: int = 0


@dataclass(frozen=True, slots=True)
class UnitResult:
    unit_id: int
    attempt: int
    server: str
    y: torch.Tensor  # [N, H]


@dataclass(frozen=True, slots=True)
class UnitFailed:
    unit_id: int
    attempt: int
    server: str
    reason: str


@dataclass(frozen=True, slots=True)
class AddRequest:
    request: Any  # eaas.engine.request.Request (in-process: shards live in the engine process)


@dataclass(frozen=True, slots=True)
class AbortRequest:
    request_id: str
    reason: str = "aborted by caller"


@dataclass(frozen=True, slots=True)
class RoutingUpdate:
    snapshot: Any  # RoutingSnapshot


@dataclass(frozen=True, slots=True)
class SetServerState:
    """Routing-table command: server `name` is alive (True) or dead (False)."""

    name: str
    alive: bool
    reason: str = ""


@dataclass(frozen=True, slots=True)
class SetTable:
    """Routing-table command: install a new table (elastic scaling, replication)."""

    table: Any  # Mapping[int, Mapping[int, tuple[str, ...]]]
    reason: str = ""


@dataclass(frozen=True, slots=True)
class Subscribe:
    ref: Any  # ActorRef that receives RoutingUpdate on every change


@dataclass(frozen=True, slots=True)
class Crash:
    """Fault injection: the receiving actor raises and crashes (its supervisor restarts it)."""

    reason: str = "injected crash"


@dataclass(frozen=True, slots=True)
class Stats:
    """Ask an actor for its counters (a plain dict)."""


@dataclass(frozen=True, slots=True)
class LoadExperts:
    """Expert-server command: also host these experts ({layer: ids}); replies when loaded."""

    experts: Any  # Mapping[int, Sequence[int]]


@dataclass(frozen=True, slots=True)
class UnloadExperts:
    """Expert-server command: stop hosting these experts ({layer: ids}) and free their weights."""

    experts: Any  # Mapping[int, Sequence[int]]


@dataclass(frozen=True, slots=True)
class Ping:
    """Expert-server liveness probe (the heartbeat); a server process replies {"pid": int}."""


@dataclass(frozen=True, slots=True)
class SetDelay:
    """Fault injection: add `seconds` of latency to every compute batch from now on (0 clears).
    Refused by a server not in fault-injection mode (eaas.engine.server_policy)."""

    seconds: float


@dataclass(frozen=True, slots=True)
class Hang:
    """Fault injection, in-process servers only: stop answering for `seconds` (a server process
    gets SIGSTOP instead)."""

    seconds: float


# ---- the device data path (eaas.engine.device_path / eaas.engine.exchange_host) -------------

@dataclass(frozen=True, slots=True)
class ExchangeOpen:
    """Expert-server command: allocate this server's buffers of device-exchange set `set_id`
    as rank `rank` of `format` (`ExchangeFormat` fields as a map); replies {"export": ...}, the
    description its peers map (`SharedChannels.export`), and {"experts": {layer: [ids]},
    "rows": {layer: [rows]}}: the weight row (the wire's expert id) of each expert it hosts."""

    set_id: int
    rank: int
    format: Any  # Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class ExchangeConnect:
    """Expert-server command: map the peers of set `set_id` (`exports`: every rank's export, or
    None for a rank it never exchanges with), warm the set up in lockstep with the shard, and
    serve `layers` (the model's MoE layers, in order) for every step asked for; device waits
    are bounded by `timeout_s`. Replies "ok" once warmed up. `alone`: warm up with itself
    only (a restarted server joining a running set: the shard's kernels are loaded already and
    its rounds go on meanwhile)."""

    set_id: int
    exports: Any  # Sequence[Mapping | None]
    layers: Any  # Sequence[int]
    timeout_s: float
    alone: bool = False


@dataclass(frozen=True, slots=True)
class ExchangeRun:
    """Expert-server command: run `steps` more steps of set `set_id` (the shard's announcement:
    one message per batch of its steps, never one per layer)."""

    set_id: int
    steps: int


@dataclass(frozen=True, slots=True)
class ExchangeClose:
    """Expert-server command: stop serving set `set_id` and free its buffers."""

    set_id: int
