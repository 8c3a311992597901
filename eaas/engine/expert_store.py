"""One copy of each layer's routed experts per device, shared by the in-process expert servers
on that device and by the captured decode step of a shard there.

In-process servers live in the engine's process: giving each its own copy of the experts it
hosts would hold every replicated expert several times on the same GPU. The store loads a whole
layer once per device (lazily, on first use) and hands each server a view restricted to the
experts it hosts (`ExpertBank.view`, no copy); restarting a server re-creates its views only.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from typing import Any

import torch

__all__ = ["ExpertStore"]


class ExpertStore:
    """Whole-layer ExpertBanks by (device, layer). Thread-safe: servers load on threads."""

    def __init__(self, model_dir: str, *, dtype: str, batch_invariant: bool,
                 load_format: str = "auto") -> None:
        self.model_dir, self.dtype, self.batch_invariant = model_dir, dtype, batch_invariant
        self.load_format = load_format
        self._banks: dict[tuple[str, int], Any] = {}
        self._lock = threading.Lock()
        self._ckpt: Any = None

    def layer(self, device: str, layer: int) -> Any:
        """The whole-layer ExpertBank of `layer` on `device` (loaded on first use)."""
        key = (str(torch.device(device)), int(layer))
        with self._lock:
            bank = self._banks.get(key)
            if bank is None:
                from eaas.model import Checkpoint, ExpertBank

                if self._ckpt is None:
                    self._ckpt = Checkpoint.open(self.model_dir, self.load_format)
                n = self._ckpt.config.num_experts
                bank = self._banks[key] = ExpertBank.load(
                    self._ckpt, layer, range(n), getattr(torch, self.dtype), device,
                    self.batch_invariant)
            return bank

    def bank(self, device: str, layer: int, expert_ids: Iterable[int]) -> Any:
        """A server's bank: `expert_ids` of `layer` on `device`, a view of the shared weights."""
        return self.layer(device, layer).view(expert_ids)

    def clear(self) -> None:
        """Drop every layer (the engine is closing: give the GPU memory back)."""
        with self._lock:
            self._banks.clear()
