"""Placements of experts on GPUs and the share of load their busiest GPU carries.

Both functions answer "with ``n`` GPUs of ``expert_slots`` slots, what fraction of the total
load lands on the busiest GPU?" (``inf`` when the experts do not fit). See
:mod:`eaas.sim.model` for the assumptions.

Worked example (shares ``[0.4, 0.3, 0.2, 0.1]``, 2 slots per GPU):
    ep_max_share(p, 2, 2)    -> 0.7   # GPU0 = {e0, e1}, GPU1 = {e2, e3}
    ep_max_share(p, 4, 2)    -> 0.4   # one expert each
    eaas_placement(p, 2, 2)  -> max share 0.5: {e0, e3}, {e1, e2}
    eaas_placement(p, 3, 2)  -> e0, e1 get 2 replicas; servers {e0, e1}, {e0, e1}, {e2, e3}:
                                 0.35, 0.35, 0.3
    wrap_placement(p, 4, 2)  -> order e0, e3, e1, e2; 0.25 each: {e0}, {e0, e3}, {e1}, {e1, e2}
                                 (e0 split 0.25 + 0.15, e1 0.25 + 0.05)
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass

import numpy as np

__all__ = ["ep_max_share", "EaasPlacement", "eaas_placement", "eaas_max_share", "is_power_of_two",
           "wrap_placement"]


def is_power_of_two(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def ep_max_share(shares: np.ndarray, num_gpus: int, expert_slots: int) -> float:
    """Busiest GPU's share in a static expert-parallel group of ``num_gpus`` GPUs.

    Args:
        shares: float ``[E]``, each expert's fraction of the load (sums to 1).
        num_gpus: group size (the caller restricts it to powers of two).
        expert_slots: experts one GPU can hold.
    Returns ``inf`` when ``ceil(E / num_gpus) > expert_slots``.
    """
    p = np.asarray(shares, dtype=np.float64)
    num_experts = p.shape[0]
    if num_gpus > num_experts:  # whole-group copies of the one-expert-per-GPU layout
        return float(p.max()) / (num_gpus / num_experts)
    if math.ceil(num_experts / num_gpus) > expert_slots:
        return math.inf
    return max(float(block.sum()) for block in np.array_split(p, num_gpus))


@dataclass(frozen=True, slots=True)
class EaasPlacement:
    """Fine-grained placement: ``servers[s]`` lists the expert ids server ``s`` hosts;
    ``replicas[e]`` is expert ``e``'s replica count; ``loads[s]`` the share server ``s`` carries
    (each replica carries ``shares[e] / replicas[e]``)."""

    servers: tuple[tuple[int, ...], ...]
    replicas: tuple[int, ...]
    loads: tuple[float, ...]

    @property
    def max_share(self) -> float:
        return max(self.loads) if self.loads else math.inf


def eaas_placement(shares: np.ndarray, num_servers: int, expert_slots: int) -> EaasPlacement | None:
    """Greedy placement with hot-expert replication; ``None`` when it cannot fit.

    Args:
        shares: float ``[E]``, each expert's fraction of the load.
        num_servers: expert servers (any positive integer).
        expert_slots: experts one server can hold.
    """
    p = np.asarray(shares, dtype=np.float64)
    num_experts = p.shape[0]
    slots = num_servers * expert_slots
    if num_servers < 1 or slots < num_experts:
        return None
    # 1) replicas: water-fill the largest per-replica share while it is coarse vs. the mean.
    replicas = [1] * num_experts
    target = float(p.sum()) / num_servers / 4
    heap = [(-float(p[e]), e) for e in range(num_experts)]
    heapq.heapify(heap)
    spare = slots - num_experts
    while spare > 0 and heap:
        neg, e = heap[0]
        if -neg <= target:
            break
        heapq.heappop(heap)
        if replicas[e] >= num_servers:
            continue  # one replica per server at most
        replicas[e] += 1
        spare -= 1
        heapq.heappush(heap, (-float(p[e]) / replicas[e], e))
    # 2) pack replicas, largest first, on the least loaded server that can take them.
    pieces = sorted(((float(p[e]) / replicas[e], e) for e in range(num_experts)
                     for _ in range(replicas[e])), key=lambda x: (-x[0], x[1]))
    loads = [0.0] * num_servers
    hosted: list[list[int]] = [[] for _ in range(num_servers)]
    for share, e in pieces:
        best = -1
        for s in range(num_servers):
            if len(hosted[s]) < expert_slots and e not in hosted[s] and (
                    best < 0 or loads[s] < loads[best]):
                best = s
        if best < 0:
            return None
        loads[best] += share
        hosted[best].append(e)
    return EaasPlacement(tuple(tuple(h) for h in hosted), tuple(replicas), tuple(loads))


def wrap_placement(shares: np.ndarray, num_servers: int, expert_slots: int,
                   cap: float | None = None) -> EaasPlacement | None:
    """Wrap-around packing (McNaughton): fill server after server up to ``1 / num_servers`` of
    the load, experts taken largest, smallest, next largest, ..., splitting an expert that
    crosses a server boundary into replicas with unequal traffic parts; ``None`` when the
    servers run out of slots first.

    Args:
        shares: float ``[E]``, each expert's fraction of the load.
        num_servers: expert servers.
        expert_slots: experts one server can hold.
        cap: the share at which a server counts as full (default ``1 / num_servers``).
    """
    p = np.asarray(shares, dtype=np.float64)
    if num_servers < 1:
        return None
    cap = (float(p.sum()) / num_servers if cap is None else cap) * (1 + 1e-9)
    by_size = sorted(range(p.shape[0]), key=lambda e: (-float(p[e]), e))
    # largest, smallest, 2nd largest, 2nd smallest, ...: small experts spread over servers
    # instead of crowding the last ones' slots.
    order = [by_size[i // 2] if i % 2 == 0 else by_size[-1 - i // 2] for i in range(len(by_size))]
    hosted: list[list[int]] = [[]]
    loads = [0.0]
    replicas = [0] * p.shape[0]
    for e in order:
        left = float(p[e])
        while left > 1e-15:
            if loads[-1] >= cap * (1 - 1e-9) or len(hosted[-1]) == expert_slots:
                if len(hosted) == num_servers:
                    return None
                hosted.append([])
                loads.append(0.0)
            part = min(left, cap - loads[-1])
            loads[-1] += part
            hosted[-1].append(e)
            replicas[e] += 1
            left -= part
    hosted += [[] for _ in range(num_servers - len(hosted))]
    loads += [0.0] * (num_servers - len(loads))
    return EaasPlacement(tuple(tuple(h) for h in hosted), tuple(replicas), tuple(loads))


def eaas_max_share(shares: np.ndarray, num_servers: int, expert_slots: int) -> float:
    """Busiest server's share under EaaS: the best of the greedy placement, the wrap-around
    placement (at the smallest per-server cap that fits the slots, found by bisection), and
    (when ``num_servers`` is a power of two) the EP layout."""
    best = math.inf
    for placer in (eaas_placement, wrap_placement):
        placed = placer(shares, num_servers, expert_slots)
        if placed is not None:
            best = min(best, placed.max_share)
    if is_power_of_two(num_servers):
        best = min(best, ep_max_share(shares, num_servers, expert_slots))
    lo = float(np.sum(shares)) / num_servers
    if best > lo * (1 + 1e-6) and wrap_placement(shares, num_servers, expert_slots) is None:
        # Slots ran out at 1/n: look for the smallest per-server cap at which wrap-around fits
        # (a fuller server needs fewer of the later, slot-hungry small experts).
        hi = best if math.isfinite(best) else 1.0
        for _ in range(30):
            mid = (lo + hi) / 2
            placed = wrap_placement(shares, num_servers, expert_slots, cap=mid)
            if placed is not None:
                best = min(best, placed.max_share)
                hi = mid
            else:
                lo = mid
            if hi - lo <= 1e-4 * hi:
                break
    return best
