"""GPUs needed at a load level: static expert-parallel groups vs fine-grained EaaS servers.

    sim = CapacitySimulator(expert_shares(zipf_trace(256, seed=0)), ServerModel(1.0, 16))
    sim.ep_gpus(40.0), sim.eaas_gpus(40.0)   # load in expert-token assignments per second
    sim.curve([10.0, 20.0, 40.0])            # [CapacityPoint, ...]

A GPU count ``n`` keeps up with load ``L`` iff ``max_share(n) * L <= capacity`` where
``max_share`` is the busiest GPU's fraction of the load under that design's placement
(:mod:`eaas.sim.placement`) and ``capacity = tokens_per_s * max_util`` (:class:`ServerModel`).
The answer is the smallest such ``n`` (a power of two for EP). Assumptions: :mod:`eaas.sim.model`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from eaas.sim.model import ServerModel
from eaas.sim.placement import eaas_max_share, ep_max_share

__all__ = ["CapacityPoint", "CapacitySimulator"]

_EPS = 1e-6  # relative slack: an exact fit (0.4 * 2.5 == 1.0) counts as keeping up


@dataclass(frozen=True, slots=True)
class CapacityPoint:
    """GPUs each design needs at one load level (assignments/s)."""

    load: float
    ep_gpus: int
    eaas_gpus: int

    @property
    def saving(self) -> float:
        """Fraction of the EP GPUs that EaaS does without: ``1 - eaas / ep``."""
        return 1.0 - self.eaas_gpus / self.ep_gpus


class CapacitySimulator:
    """Answers "how many GPUs at load L" for both designs, for fixed expert shares.

    Args:
        shares: float ``[E]``, each expert's fraction of the routed load (sums to 1).
        model: per-GPU throughput and memory.
        max_gpus: search limit; asking for a load that needs more raises ``ValueError``.
    """

    def __init__(self, shares: np.ndarray, model: ServerModel, max_gpus: int = 4096) -> None:
        p = np.asarray(shares, dtype=np.float64)
        if p.ndim != 1 or p.size < 1 or (p < 0).any() or not math.isclose(p.sum(), 1.0):
            raise ValueError("CapacitySimulator: shares must be a nonnegative [E] vector summing "
                             f"to 1, got shape {p.shape} sum {p.sum():.4g}")
        self.shares, self.model, self.max_gpus = p, model, max_gpus
        self.num_experts = p.size
        self.min_gpus = math.ceil(p.size / model.expert_slots)  # memory bound, both designs
        self._ep: dict[int, float] = {}
        self._eaas: dict[int, float] = {}

    def ep_max_share(self, num_gpus: int) -> float:
        if num_gpus not in self._ep:
            self._ep[num_gpus] = ep_max_share(self.shares, num_gpus, self.model.expert_slots)
        return self._ep[num_gpus]

    def eaas_max_share(self, num_servers: int) -> float:
        if num_servers not in self._eaas:
            self._eaas[num_servers] = eaas_max_share(self.shares, num_servers,
                                                     self.model.expert_slots)
        return self._eaas[num_servers]

    def _fits(self, max_share: float, load: float) -> bool:
        if math.isinf(max_share):  # the experts do not fit in memory
            return False
        return max_share * load <= self.model.capacity * (1 + _EPS)

    def ep_gpus(self, load: float) -> int:
        """Smallest power-of-two EP group whose busiest GPU keeps up with ``load``."""
        self._check_load(load)
        n = 1
        while n <= self.max_gpus:
            if self._fits(self.ep_max_share(n), load):
                return n
            n *= 2
        raise ValueError(f"load {load} needs more than max_gpus={self.max_gpus} EP GPUs")

    def eaas_gpus(self, load: float) -> int:
        """Smallest number of EaaS expert servers that keeps up with ``load``."""
        self._check_load(load)
        # Every server carries at least 1/n of the load, so n >= load / capacity.
        start = max(self.min_gpus, int(load / self.model.capacity), 1)
        for n in range(start, self.max_gpus + 1):
            if self._fits(self.eaas_max_share(n), load):
                return n
        raise ValueError(f"load {load} needs more than max_gpus={self.max_gpus} EaaS servers")

    def point(self, load: float) -> CapacityPoint:
        return CapacityPoint(float(load), self.ep_gpus(load), self.eaas_gpus(load))

    def curve(self, loads: Iterable[float]) -> list[CapacityPoint]:
        return [self.point(x) for x in loads]

    @staticmethod
    def _check_load(load: float) -> None:
        if not (load >= 0 and math.isfinite(load)):
            raise ValueError(f"load must be a finite number >= 0, got {load}")
