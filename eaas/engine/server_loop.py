"""An expert server's device loop: one exchange round per MoE layer, step after step (issue 17).

`ServerExchange(layer)` is one round of one MoE layer on the server's side (post the empty row
and pair messages, gather every shard's rows and pairs, run the layer's experts, put the sums
back, drain the empty results). A decode step of the shards runs one round per MoE layer, in
layer order, on every rank, so the server's step is the same rounds in the same order:

    loop = ServerLoop(exchange, layers=[1, 3, 5])   # the model's MoE layer ids, in order
    loop.start(1); await loop.drain()               # enqueue one step now (eagerly on CPU)
    loop.capture()                                  # CUDA: one graph per layer (after a step)
    await loop.run(8)                               # 8 more, at most `ahead` enqueued ahead
    loop.request(8); await loop.serve()             # the same, fed by host messages
    loop.run_step()                                 # one step, neither counted nor awaited

Nothing in a step reads a device value on the host: every wait is on the GPU (a replay of
layer l's graph spins until the shards' puts of that round arrive), so the host only keeps a
bounded number of steps enqueued (`ahead`), recording one CUDA event per step and awaiting the
oldest with `eaas.gpu.waiter.wait_done` (the asyncio loop keeps serving RPCs meanwhile). On CPU
(Triton's interpreter) a step runs to completion inside `run_step`; `run` / `serve` then
yield to the loop between steps.

Agreeing on the number of steps. A server and its shard must run the same rounds: the shard
owns the schedule and tells each server "run k steps" with ONE host message per batch of steps
(in the engine: a one-way note per step, written before the step is launched:
`eaas.engine.device_path`), never one per layer or per round. The server's handler calls
`request(k)` and the serving task (`serve()`) enqueues them as the window allows; the shard
runs every step it announced. A mismatch shows up as timed-out waits, never as a hang when the
channels have `timeout_s`, and it never goes on silently: a wait that times out drops that peer
from the rank's mask (`drop_on_timeout`), so the shard stops sending to this server and the
server stops answering the shard; the shard's step ledger replays the step without it, and the
server's process comes back only as a new process readmitted into the set.

Before the first round — before the ranks' lockstep warm-up — compile the experts' GEMM with
`eaas.engine.device_experts.warm_up_experts`: the shards' waits for this server are bounded, and
a first Triton compile takes seconds (on the H200 it outlasted a 5 s `timeout_s`).

Graphs. `capture()` records one CUDA graph per layer over the exchange's fixed buffers and
that layer's weights, sharing one memory pool (the graphs replay one after another on one
stream, so a layer's temporaries are dead before the next layer's replay). It needs one eager
step first (every kernel variant launched once: a first launch may load a module, which
synchronises the context while a wait of this process could be spinning, see
`NvshmemPlane.warm_up`) and no step in flight. A graph keeps the channels' `timeout_s` it was
captured with. The capture is thread-local: other threads of the process (the GPU waiter,
a cudaipc:// transport) may keep making CUDA calls meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Sequence
from typing import Any

import torch

from eaas.engine.device_experts import ServerExchange
from eaas.gpu.waiter import wait_done

__all__ = ["ServerLoop"]


class ServerLoop:
    """Runs `exchange` for every layer of `layers` per step (see the module docstring).

    ahead: steps `run` / `serve` keep enqueued beyond the last one completed (>= 1).
    stream: the CUDA stream the steps run on (None: the current one). A stream of its own
        keeps the process's other GPU work (host-path compute batches) from queueing behind
        a step that waits on the device for the shards.
    auto_capture: on CUDA, `run` / `serve` capture the graphs by themselves once the first
        step completed (that step runs alone: nothing else is enqueued until it is captured).
    Counts: `steps_enqueued`, `steps_done` (completed as seen by the host), `requested`.
    """

    def __init__(self, exchange: ServerExchange, layers: Sequence[int], ahead: int = 2,
                 stream: Any = None, auto_capture: bool = False) -> None:
        layers = list(layers)
        if not layers or len(set(layers)) != len(layers):
            raise ValueError(f"layers {layers}: must be non-empty and distinct (the model's MoE "
                             "layer ids, in order)")
        missing = [l for l in layers if l not in exchange.experts]
        if missing:
            raise ValueError(f"layers {missing}: no experts in the exchange (it has "
                             f"{sorted(exchange.experts)})")
        if isinstance(ahead, bool) or not isinstance(ahead, int) or ahead < 1:
            raise ValueError(f"ahead={ahead!r}: must be an int >= 1")
        self.exchange, self.layers, self.ahead = exchange, layers, ahead
        self.device: torch.device = exchange.channels.device
        self.stream = stream
        self.auto_capture = auto_capture and self.device.type == "cuda"
        self.steps_enqueued = 0
        self.steps_done = 0
        self.requested = 0
        self._graphs: dict[int, Any] | None = None
        self._pool: Any = None
        self._inflight: deque[Any] = deque()  # one event per enqueued, uncompleted step
        self._wake = asyncio.Event()
        self._pumping = False

    @property
    def captured(self) -> bool:
        return self._graphs is not None

    def run_step(self) -> None:
        """Enqueue one step: every layer's round, in layer order (replays once captured).
        Use `start` / `run` to have it counted and awaited."""
        with self._on_stream():
            if self._graphs is not None:
                for l in self.layers:
                    self._graphs[l].replay()
            else:
                for l in self.layers:
                    self.exchange(l)

    def _on_stream(self) -> Any:
        if self.stream is None:
            return contextlib.nullcontext()
        return torch.cuda.stream(self.stream)

    def capture(self) -> None:
        """CUDA only: capture one graph per layer (after an eager step; none in flight)."""
        if self.device.type != "cuda":
            raise RuntimeError(f"capture: CUDA graphs need a CUDA device, the exchange is on "
                               f"{self.device} (steps there run eagerly)")
        if self._graphs is not None:
            raise RuntimeError("capture: already captured")
        if self.steps_enqueued == 0:
            raise RuntimeError("capture: run one eager step first (start(1) and await it): "
                               "every kernel must have been launched once")
        if any(not ev.query() for ev in self._inflight):
            raise RuntimeError("capture: steps still in flight; await them first")
        self._retire_completed()
        pool, graphs = torch.cuda.graph_pool_handle(), {}
        for l in self.layers:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool, stream=self.stream,
                                  capture_error_mode="thread_local"):
                self.exchange(l)  # other threads (waiters, transports) may call CUDA meanwhile
            graphs[l] = graph
        self._pool, self._graphs = pool, graphs

    def start(self, steps: int) -> None:
        """Enqueue `steps` steps now (however many are in flight), one event per step."""
        _check_steps(steps)
        self.requested += steps
        for _ in range(steps):
            self._enqueue()

    def request(self, steps: int) -> None:
        """`steps` more steps for `serve` / `run` to enqueue (a shard's "run k steps")."""
        _check_steps(steps)
        self.requested += steps
        self._wake.set()

    async def run(self, steps: int, timeout: float | None = None) -> None:
        """Request `steps` steps and return once every step requested so far completed;
        `timeout`: bound of each step's wait (TimeoutError; the device work goes on)."""
        self._check_idle()
        self.request(steps)
        await self._pump(forever=False, timeout=timeout)

    async def serve(self, timeout: float | None = None) -> None:
        """Serve `request`s until cancelled, keeping at most `ahead` steps enqueued."""
        await self._pump(forever=True, timeout=timeout)

    async def drain(self, timeout: float | None = None) -> None:
        """Await every enqueued step (started or requested ones not yet enqueued excluded)."""
        while self._inflight:
            await self._complete_oldest(timeout)

    def failures(self) -> torch.Tensor:
        """[2, W] int64 on the device: timed-out waits of the server's three channels so far,
        row 0 puts per destination, row 1 gathers per source (`NvshmemChannel.failures`)."""
        return self.exchange.failures()

    # -- internals --

    def _enqueue(self) -> None:
        self.run_step()
        self.steps_enqueued += 1
        if self.device.type == "cuda":
            event = torch.cuda.Event()
            event.record(self.stream or torch.cuda.current_stream(self.device))
            self._inflight.append(event)
        else:
            self._inflight.append(None)  # the interpreter ran it to completion

    async def _complete_oldest(self, timeout: float | None) -> None:
        event = self._inflight[0]
        if event is None:
            await asyncio.sleep(0)  # yield to the loop between eager steps
        else:
            await wait_done(event, timeout)
        self._inflight.popleft()
        self.steps_done += 1

    def _retire_completed(self) -> None:
        while self._inflight and (self._inflight[0] is None or self._inflight[0].query()):
            self._inflight.popleft()
            self.steps_done += 1

    def _check_idle(self) -> None:
        if self._pumping:
            raise RuntimeError("run / serve: another run or serve is already enqueuing steps")

    async def _pump(self, forever: bool, timeout: float | None) -> None:
        self._check_idle()
        self._pumping = True
        try:
            while True:
                if (self.auto_capture and self._graphs is None and self.steps_done
                        and not self._inflight):
                    self.capture()
                # until captured, one step at a time (capture needs none in flight)
                window = self.ahead if self._graphs is not None or not self.auto_capture else 1
                while self.steps_enqueued < self.requested and len(self._inflight) < window:
                    self._enqueue()
                if self._inflight:
                    await self._complete_oldest(timeout)
                elif not forever:
                    return
                else:
                    self._wake.clear()
                    if self.steps_enqueued >= self.requested:
                        await self._wake.wait()
        finally:
            self._pumping = False


def _check_steps(steps: object) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps={steps!r}: must be an int >= 1")
