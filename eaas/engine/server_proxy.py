"""ServerProcess: the supervised actor that stands for an expert server in its own OS process.

It spawns the process (which loads only its experts), connects over the configured transport,
forwards `ComputeBatch` as RPC, and watches the process: an exit, or `heartbeat_misses`
heartbeats unanswered (a hung process, e.g. SIGSTOP), crashes the actor, so its supervisor
restarts it — which kills what is left of the old process and spawns a fresh one.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from eaas.actors import Actor
from eaas.engine.messages import ComputeBatch, Crash, LoadExperts, Stats, UnloadExperts
from eaas.errors import EaasError


@dataclass(slots=True)
class ProcessSlot:
    """The OS process behind one server name; outlives actor restarts (one per server)."""

    name: str
    proc: asyncio.subprocess.Process | None = None
    pid: int | None = None
    url: str | None = None
    starts: int = 0
    log_path: str = field(default="")

    def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            try:
                self.proc.kill()
            except ProcessLookupError:
                pass

    def signal(self, sig: int) -> None:
        if self.pid is not None and self.proc is not None and self.proc.returncode is None:
            os.kill(self.pid, sig)


class ServerProcess(Actor):
    def __init__(self, slot: ProcessSlot, model_dir: str, assignment: Mapping[int, list[int]], *,
                 dtype: str, device: str, batch_invariant: bool, transport: str,
                 call_timeout_s: float, heartbeat_interval_s: float, heartbeat_misses: int = 3,
                 start_timeout_s: float = 120.0, on_ready: Callable[[], None] | None = None
                 ) -> None:
        self._on_ready = on_ready
        self.slot = slot
        self.assignment = {int(k): list(v) for k, v in assignment.items()}
        self.model_dir, self.dtype, self.device = model_dir, dtype, device
        self.batch_invariant, self.transport = batch_invariant, transport
        self.call_timeout_s = call_timeout_s
        self.heartbeat_interval_s = heartbeat_interval_s
        self.heartbeat_misses = heartbeat_misses
        self.start_timeout_s = start_timeout_s
        self.rpc: Any = None
        self._stopping = False

    async def on_start(self) -> None:
        from eaas.transport import RpcClient, connect

        await self._reap_old()
        slot = self.slot
        slot.log_path = slot.log_path or os.path.join(tempfile.gettempdir(),
                                                      f"eaas-{os.getpid()}-{slot.name}.log")
        log = open(slot.log_path, "ab")  # noqa: ASYNC230 (opening a log file does not block)
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "eaas.engine.server_process", "--model", self.model_dir,
                "--assignment", json.dumps({str(k): v for k, v in self.assignment.items()}),
                "--dtype", self.dtype, "--device", self.device,
                "--batch-invariant" if self.batch_invariant else "--no-batch-invariant",
                "--listen", f"{self.transport}://" + (
                    "127.0.0.1:0" if self.transport == "tcp" else ""),
                "--parent-pid", str(os.getpid()),
                stdout=asyncio.subprocess.PIPE, stderr=log, stdin=asyncio.subprocess.DEVNULL)
        finally:
            log.close()
        slot.proc, slot.pid, slot.starts = proc, proc.pid, slot.starts + 1
        assert proc.stdout is not None
        try:
            line = await asyncio.wait_for(proc.stdout.readline(), self.start_timeout_s)
            info = json.loads(line)
        except (TimeoutError, ValueError) as e:
            slot.kill()
            raise EaasError(f"expert server {slot.name} (pid {proc.pid}) did not become ready: "
                            f"{type(e).__name__}; see {slot.log_path}") from e
        slot.url = info["url"]
        self.rpc = RpcClient(await connect(info["url"], timeout=10.0))
        self.context.create_task(self._watch_exit(proc), name=f"{slot.name}-exit")
        self.context.create_task(self._heartbeat(), name=f"{slot.name}-heartbeat")
        if self._on_ready is not None:
            self._on_ready()

    async def _reap_old(self) -> None:
        old = self.slot.proc
        if old is not None and old.returncode is None:
            self.slot.kill()
            try:
                await asyncio.wait_for(old.wait(), 5.0)
            except TimeoutError:
                pass

    async def _watch_exit(self, proc: asyncio.subprocess.Process) -> None:
        rc = await proc.wait()
        if self._stopping:
            return
        raise EaasError(f"expert server {self.slot.name} (pid {proc.pid}) exited with code {rc}")

    async def _heartbeat(self) -> None:
        misses = 0
        while True:
            await asyncio.sleep(self.heartbeat_interval_s)
            try:
                await self.rpc.call({"op": "ping"}, timeout=self.heartbeat_interval_s)
                misses = 0
            except asyncio.CancelledError:
                raise
            except Exception:
                misses += 1
                if misses >= self.heartbeat_misses:
                    self.slot.kill()  # hung (e.g. SIGSTOP): it is dead to us
                    raise EaasError(f"expert server {self.slot.name} (pid {self.slot.pid}) missed "
                                    f"{misses} heartbeats") from None

    async def on_stop(self) -> None:
        self._stopping = True
        if self.rpc is not None:
            try:
                await self.rpc.aclose()
            except Exception:
                pass
        await self._reap_old()

    async def on_receive(self, msg: Any) -> Any:
        if isinstance(msg, ComputeBatch):
            return await self.rpc.call({"op": "compute", "layer": msg.layer, "x": msg.x,
                                        "expert_ids": msg.expert_ids}, timeout=self.call_timeout_s)
        if isinstance(msg, Stats):
            return await self.rpc.call({"op": "stats"}, timeout=self.call_timeout_s)
        if isinstance(msg, LoadExperts):
            return await self.rpc.call({"op": "load", "experts": {
                str(k): [int(e) for e in v] for k, v in msg.experts.items()}}, timeout=120.0)
        if isinstance(msg, UnloadExperts):
            return await self.rpc.call({"op": "unload", "experts": {
                str(k): [int(e) for e in v] for k, v in msg.experts.items()}}, timeout=120.0)
        if isinstance(msg, Crash):
            self.slot.signal(signal.SIGKILL)
            return None
        if isinstance(msg, dict) and msg.get("op") == "delay":
            return await self.rpc.call(msg, timeout=self.call_timeout_s)
        raise TypeError(f"ServerProcess {self.slot.name} cannot handle {type(msg).__name__}")
