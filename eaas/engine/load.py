"""LoadTracker: a sliding window of routed tokens per (layer, expert) and per (layer, server).

Shards record what they dispatch; the planner and the metrics read window totals. The window is
a ring of `num_buckets` time buckets covering `window_s` seconds.

Imbalance of a layer = (max - mean) / mean of tokens per server over the window (0 = perfect).
"""

from __future__ import annotations

import time
from collections import defaultdict
from typing import Callable

import torch


class LoadTracker:
    def __init__(self, num_layers: int, num_experts: int, *, window_s: float = 30.0,
                 num_buckets: int = 30, clock: Callable[[], float] = time.monotonic) -> None:
        self.num_layers, self.num_experts = num_layers, num_experts
        self.bucket_s = window_s / num_buckets
        self.window_s = window_s
        self._clock = clock
        self._experts = torch.zeros(num_buckets, num_layers, num_experts, dtype=torch.long)
        self._servers: list[dict[tuple[int, str], int]] = [defaultdict(int)
                                                           for _ in range(num_buckets)]
        self._stamp = [-1] * num_buckets  # which bucket number each slot holds
        self.inflight: dict[str, int] = defaultdict(int)  # rows sent and not yet back, per server

    def _slot(self) -> int:
        n = int(self._clock() / self.bucket_s)
        i = n % len(self._stamp)
        if self._stamp[i] != n:  # a new bucket: forget what this slot held
            self._stamp[i] = n
            self._experts[i].zero_()
            self._servers[i].clear()
        return i

    def record_experts(self, layer: int, expert_ids: torch.Tensor) -> None:
        """expert_ids: [N] int64 routed pairs of one layer."""
        i = self._slot()
        self._experts[i, layer] += torch.bincount(expert_ids.reshape(-1).cpu(),
                                                  minlength=self.num_experts)

    def record_server(self, layer: int, server: str, rows: int) -> None:
        self._servers[self._slot()][(layer, server)] += rows

    def _live(self) -> list[int]:
        n = int(self._clock() / self.bucket_s)
        return [i for i, s in enumerate(self._stamp) if 0 <= n - s < len(self._stamp)]

    def expert_tokens(self) -> torch.Tensor:
        """[L, E] tokens routed to each expert of each layer in the window."""
        live = self._live()
        if not live:
            return torch.zeros(self.num_layers, self.num_experts, dtype=torch.long)
        return self._experts[live].sum(0)

    def server_tokens(self) -> dict[int, dict[str, int]]:
        """layer -> server -> rows sent in the window."""
        out: dict[int, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        for i in self._live():
            for (layer, server), n in self._servers[i].items():
                out[layer][server] += n
        return {l: dict(s) for l, s in out.items()}

    def imbalance(self, servers: list[str]) -> dict[int, float]:
        """layer -> (max - mean) / mean of rows per server (servers with no rows count as 0)."""
        out = {}
        for layer, per in self.server_tokens().items():
            counts = [per.get(s, 0) for s in servers]
            mean = sum(counts) / len(counts) if counts else 0.0
            out[layer] = (max(counts) - mean) / mean if mean > 0 else 0.0
        return out

    def reset(self) -> None:
        self._stamp = [-1] * len(self._stamp)
