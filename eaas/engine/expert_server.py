"""Expert servers: stateless hosts of a subset of each layer's routed experts.

`ExpertHost` is the plain compute core (it loads only its experts' tensors and runs rows through
them); `ExpertServer` is the actor that wraps it in-process. A server process (server_mode
"process", eaas.engine.server_main) wraps the same `ExpertHost` behind a transport. Both answer
the requests of eaas.engine.protocol through one `HostDispatcher` (eaas.engine.host_dispatch).
"""

from __future__ import annotations

import asyncio
import functools
import time
from typing import Any, Callable, Mapping

import torch

from eaas.actors import Actor
from eaas.engine.host_dispatch import HostDispatcher
from eaas.engine.messages import Crash, Hang
from eaas.engine.protocol import SERVER_PROTOCOL
from eaas.engine.server_policy import RequestGuard
from eaas.errors import EaasError, InjectedFault


class ExpertHost:
    """The experts of one server: layer -> ExpertBank. Compute is a pure function of the rows."""

    def __init__(self, model_dir: str, assignment: Mapping[int, list[int]], *, dtype: str,
                 device: str = "cpu", batch_invariant: bool = True, store: Any = None,
                 load_format: str = "auto") -> None:
        from eaas.model import Checkpoint

        self.assignment = {int(layer): sorted(ids) for layer, ids in assignment.items()}
        self.device = torch.device(device)
        self._ckpt = Checkpoint.open(model_dir, load_format)
        self._load_args = dict(dtype=getattr(torch, dtype), device=device,
                               batch_invariant=batch_invariant)
        # eaas.engine.expert_store.ExpertStore (in-process servers) or None; used on CUDA only
        # (on CPU each server reads its own experts, so a restart re-reads exactly those)
        self._store = store
        self.banks = {layer: self._bank(layer, ids) for layer, ids in self.assignment.items()}
        self.load_stats = dict(self._ckpt.stats)
        self.calls = 0
        self.rows = 0

    def _bank(self, layer: int, ids: list[int]) -> Any:
        from eaas.model import ExpertBank

        a = self._load_args
        if self._store is not None and self.device.type == "cuda":  # one copy per GPU
            return self._store.bank(a["device"], layer, ids)
        return ExpertBank.load(self._ckpt, layer, ids, a["dtype"], device=a["device"],
                               batch_invariant=a["batch_invariant"])

    def add(self, experts: Mapping[int, Any]) -> None:
        """Also host these experts ({layer: ids}); reads only their tensors."""
        for layer, ids in experts.items():
            layer = int(layer)
            union = sorted(set(self.assignment.get(layer, [])) | {int(e) for e in ids})
            self.banks[layer] = self._bank(layer, union)
            self.assignment[layer] = union
        self.load_stats = dict(self._ckpt.stats)

    def remove(self, experts: Mapping[int, Any]) -> None:
        """Stop hosting these experts ({layer: ids}); their weights are freed (unless they live in
        the device's shared store, which keeps whole layers)."""
        for layer, ids in experts.items():
            layer = int(layer)
            keep = sorted(set(self.assignment.get(layer, [])) - {int(e) for e in ids})
            if keep:
                self.banks[layer] = self._bank(layer, keep)
                self.assignment[layer] = keep
            else:
                self.banks.pop(layer, None)
                self.assignment.pop(layer, None)

    def compute(self, layer: int, x: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
        """x [N, H], expert_ids [N] int64 -> y [N, H]: row n through expert expert_ids[n]."""
        bank = self.banks.get(layer)
        if bank is None:
            raise EaasError(f"this server hosts no experts of layer {layer} "
                            f"(it hosts layers {sorted(self.banks)})")
        self.calls += 1
        self.rows += int(x.shape[0])
        # rows may arrive from another device (a shard on another GPU); expert ids stay where
        # they are: host ids are checked and mapped on the host (no device sync, see ExpertBank)
        with torch.no_grad():
            ids = expert_ids if self.device.type != "cpu" else expert_ids.to(self.device)
            return bank.forward(x.to(self.device), ids)


class ExpertServer(Actor):
    """In-process expert server actor. Restarting it re-loads only its own experts."""

    def __init__(self, name: str, model_dir: str, assignment: Mapping[int, list[int]], *,
                 dtype: str, device: str, batch_invariant: bool,
                 on_ready: Callable[[], None] | None = None, store: Any = None,
                 load_format: str = "auto") -> None:
        self.name = name
        self._on_ready = on_ready
        self._load = functools.partial(ExpertHost, model_dir, dict(assignment), dtype=dtype,
                                       device=device, batch_invariant=batch_invariant,
                                       store=store, load_format=load_format)
        self.host: ExpertHost | None = None
        self.dispatch: HostDispatcher | None = None

    async def on_start(self) -> None:
        # Loading is blocking file I/O; keep the event loop responsive.
        self.host = await asyncio.to_thread(self._load)
        self.dispatch = HostDispatcher(self.host, RequestGuard.in_process())
        if self._on_ready is not None:
            self._on_ready()

    async def on_receive(self, msg: Any) -> Any:
        if isinstance(msg, Crash):
            raise InjectedFault(f"{self.name}: {msg.reason}")
        if isinstance(msg, Hang):
            # fault injection: stop answering for `seconds` (like SIGSTOP on a process)
            t_end = time.monotonic() + float(msg.seconds)
            while time.monotonic() < t_end:
                await asyncio.sleep(0.01)
            return "resumed"
        if msg not in SERVER_PROTOCOL:
            raise TypeError(f"ExpertServer {self.name} cannot handle {type(msg).__name__}")
        assert self.dispatch is not None  # the runtime runs on_start before any message
        return await self.dispatch.handle(msg)
