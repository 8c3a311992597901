"""The stated model of the capacity simulator: servers, expert-load traces.

Assumptions (the simulator's answers hold only under these):

1. Load. Routed traffic is a rate ``L`` of expert-token assignments per second (tokens x K).
   Expert ``e`` receives the fraction ``p_e`` of it (its *share*, ``sum(p) == 1``), measured
   as the mean over an expert-load trace ``[W windows, E experts]`` of token counts. The
   synthetic trace is Zipf-like: the expert of popularity rank ``r`` (1-based) has weight
   ``r ** -s``; ranks are assigned to expert ids by a seeded random permutation (so popularity
   is unrelated to id, as in trained routers); each window draws ``tokens_per_window``
   assignments from that distribution (multinomial noise).
2. Throughput. A GPU serves at most ``tokens_per_s`` expert-token assignments per second at
   the target utilization ``max_util`` (headroom for bursts); time is linear in tokens, the
   same for every expert, and independent of how many experts the GPU hosts (grouped GEMM
   over its local experts). A replica costs only memory; an expert's traffic splits across
   its replicas in whatever proportions the placement sets (weighted replica choice).
3. Memory. A GPU holds at most ``expert_slots`` experts (one slot = one expert id in every
   MoE layer; attention and KV cache live elsewhere in both designs).
4. Expert parallelism (the baseline): ``N`` GPUs, ``N`` a power of two, one synchronous group.
   With ``N <= E`` experts are split into ``N`` contiguous id blocks (``ceil(E/N) <=
   expert_slots``); with ``N > E`` the group is ``N/E`` copies of the one-expert-per-GPU
   layout, each copy taking an equal part of the traffic. No per-expert replication. The
   group keeps up iff its most loaded GPU does: ``max_g share_g * L <= tokens_per_s * max_util``.
5. EaaS: any number ``n`` of expert servers; the busiest server's share is the best of two
   greedy packers under the slot budget: (a) hot experts get equal-split replicas
   (water-filling: the expert with the largest per-replica share gets the next replica, one
   per server at most, while it exceeds a quarter of the mean server share and slots remain),
   packed largest first onto the least loaded server with a free slot not holding that expert;
   (b) wrap-around packing: servers filled in turn to ``1/n`` of the load, experts taken
   largest, smallest, next largest, ..., an expert crossing a boundary split into replicas.
   When (b) runs out of slots at ``1/n`` it is retried at the smallest larger per-server cap
   that fits (bisection). Since the placer may also pick the EP layout when ``n`` is a power
   of two, EaaS never needs more GPUs than EP.
6. Not modelled: network bandwidth/latency, per-replica weight-read cost at small batches,
   placement changes over time (shares are the trace mean; one placement serves it), and
   attention GPUs (counted apart in both designs).

Both placements depend only on the shares, not on ``L``: for a given GPU count the busiest
GPU carries a fixed share, so the GPUs needed are nondecreasing in ``L``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from eaas.errors import ConfigError

__all__ = ["ServerModel", "zipf_trace", "expert_shares"]


@dataclass(frozen=True, slots=True)
class ServerModel:
    """Per-GPU capacity: throughput (expert-token assignments/s), memory (experts), headroom."""

    tokens_per_s: float = 1.0
    expert_slots: int = 16
    max_util: float = 1.0

    def __post_init__(self) -> None:
        if not self.tokens_per_s > 0:
            raise ConfigError(f"ServerModel.tokens_per_s must be > 0, got {self.tokens_per_s}")
        if self.expert_slots < 1:
            raise ConfigError(f"ServerModel.expert_slots must be >= 1, got {self.expert_slots}")
        if not 0 < self.max_util <= 1:
            raise ConfigError(f"ServerModel.max_util must be in (0, 1], got {self.max_util}")

    @property
    def capacity(self) -> float:
        """Assignments per second one GPU may carry."""
        return self.tokens_per_s * self.max_util


def zipf_trace(num_experts: int, num_windows: int = 64, tokens_per_window: int = 65536,
               exponent: float = 0.6, seed: int = 0) -> np.ndarray:
    """A synthetic expert-load trace: int64 ``[num_windows, num_experts]`` token counts.

    Rank ``r`` has weight ``r ** -exponent``; ranks map to expert ids by a permutation drawn
    from ``seed``. ``exponent=0`` is uniform load.
    """
    if num_experts < 1 or num_windows < 1 or tokens_per_window < 1:
        raise ValueError("zipf_trace: num_experts, num_windows, tokens_per_window must be >= 1")
    rng = np.random.default_rng(seed)
    weights = np.arange(1, num_experts + 1, dtype=np.float64) ** -float(exponent)  # [E]
    probs = np.empty(num_experts)
    probs[rng.permutation(num_experts)] = weights / weights.sum()  # [E] by expert id
    return rng.multinomial(tokens_per_window, probs, size=num_windows)  # [W, E]


def expert_shares(trace: np.ndarray) -> np.ndarray:
    """Per-expert share of the load, float64 ``[E]`` summing to 1, from a ``[W, E]`` trace
    (or a ``[E]`` vector of loads)."""
    t = np.asarray(trace, dtype=np.float64)
    if t.ndim == 1:
        t = t[None, :]
    if t.ndim != 2 or t.shape[1] < 1 or (t < 0).any() or t.sum() <= 0:
        raise ValueError(f"expert_shares: need a nonnegative [W, E] trace with load, got {t.shape}")
    loads = t.mean(axis=0)  # [E]
    return loads / loads.sum()
