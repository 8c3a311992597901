"""An expert-server process's side of the device data path (issue 17): its exchange sets.

A shard that takes the device path (`eaas.engine.device_path`) builds one exchange set with the
servers it routes to (ranks: the shard 0, its servers 1..N; `ExchangeFormat`) and drives each
server through four requests of the expert-server protocol (eaas.engine.protocol):

    xopen(set_id, rank, format)      allocate this rank's arena (`SharedChannels.allocate` on
                                     the server's GPU) -> {"export": its description,
                                     "experts": {layer: ids}, "rows": {layer: wire rows}}
    xconnect(set_id, exports, layers, timeout_s)
                                     map the shard (the only peer it exchanges with), compile
                                     the experts' GEMM (`warm_up_experts`), warm the channels
                                     up in lockstep with the shard, start the set's
                                     `ServerLoop` (its own CUDA stream; graphs captured after
                                     its first step) -> "ok"
                                     (alone: a restarted server joining a running set warms
                                     up with itself only)
    xrun(set_id, steps)              the shard's "run k steps" (one message per step batch)
    xclose(set_id)                   stop the loop, free the buffers

`ExchangeSets` holds them; `HostDispatcher` routes the four requests here. The experts are the
`ExpertHost`'s banks as they are at xopen (their stacked weights: no copy on CUDA); a layer
it hosts nothing of still takes part in each round (it answers zeros; shards route it no rows).
A set is fixed once connected: loading or unloading experts later changes the host-path banks,
not the set's (the shard builds a new set to see them).
"""

from __future__ import annotations

import asyncio
import functools
import logging
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

import torch

from eaas.engine.messages import ExchangeClose, ExchangeConnect, ExchangeOpen, ExchangeRun
from eaas.errors import EaasError

__all__ = ["ExchangeSets"]

log = logging.getLogger(__name__)

Runner = Callable[..., Awaitable[Any]]  # await runner(fn, *args) -> fn(*args)


@dataclass(slots=True)
class _Set:
    fmt: Any  # ExchangeFormat
    shared: Any  # SharedChannels
    banks: dict  # layer -> ExpertBank, as the host had them at xopen
    loop: Any = None  # ServerLoop, once connected
    task: asyncio.Task | None = None  # its serve()


class ExchangeSets:
    """The exchange sets of one server process, over its `ExpertHost` (module docstring).

    blocking: how start-up work that blocks runs (mapping, compiles, the lockstep warm-up):
    the process's compute worker thread, so the event loop keeps answering heartbeats.
    """

    def __init__(self, host: Any, blocking: Runner, ahead: int = 2) -> None:
        self.host, self._blocking, self.ahead = host, blocking, ahead
        self.sets: dict[int, _Set] = {}

    def _set(self, set_id: int) -> _Set:
        s = self.sets.get(set_id)
        if s is None:
            raise EaasError(f"exchange set {set_id} is not open here (open: {sorted(self.sets)})")
        return s

    async def open(self, msg: ExchangeOpen) -> dict[str, Any]:
        from eaas.engine.device_experts import ExchangeFormat
        from eaas.gpu.shared_channels import SharedChannels

        if self.host.device.type != "cuda":
            raise EaasError(f"the device data path needs a CUDA server; this one runs on "
                            f"{self.host.device}")
        if msg.set_id in self.sets:
            raise EaasError(f"exchange set {msg.set_id} is already open here")
        try:
            fmt = ExchangeFormat(**{k: tuple(v) if isinstance(v, list) else v
                                    for k, v in msg.format.items()})
        except (TypeError, ValueError) as e:
            raise ValueError(f"xopen format: {e}") from None
        if msg.rank not in fmt.server_ranks:
            raise ValueError(f"xopen rank {msg.rank}: not a server rank of {fmt.server_ranks}")
        shared = await self._blocking(SharedChannels.allocate, fmt.layouts(), msg.rank,
                                      self.host.device)
        banks = dict(self.host.banks)
        self.sets[msg.set_id] = _Set(fmt, shared, banks)
        experts = {l: sorted(b.expert_ids) for l, b in banks.items()}
        return {"export": shared.export(),
                "experts": {str(l): ids for l, ids in experts.items()},
                "rows": {str(l): [banks[l].rows()[e] for e in ids] for l, ids in experts.items()}}

    async def connect(self, msg: ExchangeConnect) -> dict[str, Any]:
        s = self._set(msg.set_id)
        if s.loop is not None:
            raise EaasError(f"exchange set {msg.set_id} is already connected")
        s.loop = await self._blocking(self._connect, s, msg)
        s.task = asyncio.get_running_loop().create_task(s.loop.serve(), name=f"xset{msg.set_id}")
        s.task.add_done_callback(functools.partial(_ended, msg.set_id))
        return "ok"

    def _connect(self, s: _Set, msg: ExchangeConnect) -> Any:
        from eaas.engine.device_experts import (PAIRS, RESULTS, ROWS, ExchangeChannels,
                                                ServerExchange, warm_up_experts)
        from eaas.engine.server_loop import ServerLoop

        fmt, shared = s.fmt, s.shared
        chans = shared.connect(msg.exports, timeout_s=msg.timeout_s)
        channels = ExchangeChannels(chans[ROWS], chans[PAIRS], chans[RESULTS])
        banks = {l: s.banks.get(l) for l in msg.layers}
        exchange = ServerExchange.from_banks(fmt, channels, banks)  # masks: the shards only
        warm_up_experts(fmt, exchange.experts)
        stream = torch.cuda.Stream(shared.device)
        with torch.cuda.stream(stream):
            if msg.alone:  # joining a running set: the shard's kernels are loaded already
                shared.warm_up_alone(exchange.peers)
            else:  # lockstep with the shard's warm-up (its rounds are the barrier)
                shared.warm_up()
        stream.synchronize()
        shared.unlink()
        return ServerLoop(exchange, msg.layers, ahead=self.ahead, stream=stream,
                          auto_capture=True)

    async def run(self, msg: ExchangeRun) -> str:
        s = self._set(msg.set_id)
        if s.loop is None:
            raise EaasError(f"exchange set {msg.set_id} is not connected yet")
        if s.task is not None and s.task.done():
            raise EaasError(f"exchange set {msg.set_id} stopped serving: {s.task.exception()!r}")
        s.loop.request(msg.steps)
        return "ok"

    async def close(self, msg: ExchangeClose) -> str:
        s = self.sets.pop(msg.set_id, None)
        if s is None:
            return "ok"
        if s.task is not None:
            s.task.cancel()
        s.shared.close()
        return "ok"

    def stats(self) -> dict[str, Any]:
        """Per set: steps requested / enqueued / done, whether its graphs are captured."""
        return {str(i): {"requested": s.loop.requested, "enqueued": s.loop.steps_enqueued,
                         "done": s.loop.steps_done, "captured": s.loop.captured}
                if s.loop is not None else {"connected": False} for i, s in self.sets.items()}


def _ended(set_id: int, task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("exchange set %d stopped serving", set_id, exc_info=task.exception())
