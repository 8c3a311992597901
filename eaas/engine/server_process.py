"""ServerProcess: the supervised actor that stands for an expert server in its own OS process.

It spawns the process (which loads only its experts), connects over the configured transport,
forwards the requests of the expert-server protocol (eaas.engine.protocol: `ComputeBatch`,
`Stats`, `LoadExperts`, ...) as RPC, encoded by `SERVER_PROTOCOL`, and watches the process:
an exit, or `heartbeat_misses` heartbeats unanswered (a hung process, e.g. SIGSTOP), crashes
the actor, so its supervisor restarts it — which kills what is left of the old process and
spawns a fresh one.

Transport nvshmem: a slot's FIRST process joins the engine's NVSHMEM fabric as the rank its
`FabricSeat` (eaas.transport.fabric_seat) names and listens on nvshmem://; every later process
of the slot (a restart), and a server added while serving (no seat), listens on cudaipc:// —
NVSHMEM admits no process after start-up.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import tempfile
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping

from eaas.actors import Actor
from eaas.engine.messages import ComputeBatch, Crash, LoadExperts, Ping, UnloadExperts
from eaas.engine.protocol import SERVER_PROTOCOL
from eaas.errors import EaasError, InjectedFault

if TYPE_CHECKING:
    from eaas.engine.process_home import SpareProcesses
    from eaas.transport.fabric_seat import FabricSeat


FALLBACK_TRANSPORT = "cudaipc"  # for processes that cannot join the NVSHMEM job


@dataclass(slots=True)
class ProcessSlot:
    """The OS process behind one server name; outlives actor restarts (one per server)."""

    name: str
    proc: asyncio.subprocess.Process | None = None
    pid: int | None = None
    url: str | None = None
    starts: int = 0
    log_path: str = field(default="")
    planned_kill: bool = False  # the next exit was asked for (fault injection)

    def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            try:
                self.proc.kill()
            except ProcessLookupError:
                pass

    def signal(self, sig: int) -> None:
        if self.pid is not None and self.proc is not None and self.proc.returncode is None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:  # it died and was reaped before asyncio noticed
                pass


SECRET_ENV = ("EAAS_ADMIN_TOKEN",)  # the serving process's secrets: never handed to a child


def child_env() -> dict[str, str]:
    """This process's environment for an expert-server process, without its secrets (the admin
    token). The cluster secret (EAAS_CLUSTER_SECRET) and the transport settings (EAAS_TRANSPORT)
    do go along: the child authenticates its connections with them (prepare_server_env)."""
    return {k: v for k, v in os.environ.items() if k not in SECRET_ENV}


def prepare_server_env(config: Any) -> None:
    """At engine start: the cluster secret (transport.secret_file, else EAAS_CLUSTER_SECRET, else
    a generated one) and the transport settings (TLS files, listen host, request policy) in this
    process's environment, where the server processes it spawns find them."""
    from eaas.transport.auth import ensure_cluster_secret, export_settings

    ensure_cluster_secret(config.transport.secret_file)
    export_settings(config.transport.settings())


def server_security() -> Any:
    """The TransportSecurity this engine's connections to its servers use (from its env)."""
    from eaas.transport.auth import TransportSecurity

    return TransportSecurity.from_env()


def _listen_url(transport: str) -> str:
    """`--listen` of a server process: tcp:// on the configured host (transport.listen_host,
    127.0.0.1 by default; never a wildcard unless configured), a fresh socket path otherwise."""
    if transport != "tcp":
        return f"{transport}://"
    from eaas.transport.auth import exported_settings

    host = exported_settings().get("listen_host") or "127.0.0.1"
    return f"tcp://[{host}]:0" if ":" in host else f"tcp://{host}:0"


def restart_transport(transport: str) -> str:
    """The transport of a process that cannot join the NVSHMEM job (restarted, added, spare)."""
    return FALLBACK_TRANSPORT if transport == "nvshmem" else transport


def server_argv(model_dir: str, assignment: Mapping[int, list[int]], *, dtype: str, device: str,
                load_format: str, batch_invariant: bool, transport: str) -> list[str]:
    """The command line of an expert-server process hosting `assignment` ({} for a spare)."""
    return [sys.executable, "-m", "eaas.engine.server_main", "--model", model_dir,
            "--assignment", json.dumps({str(k): v for k, v in assignment.items()}),
            "--dtype", dtype, "--device", device, "--load-format", load_format,
            "--batch-invariant" if batch_invariant else "--no-batch-invariant",
            "--listen", _listen_url(transport),
            "--parent-pid", str(os.getpid())]


async def spawn_server(argv: list[str], log_path: str) -> asyncio.subprocess.Process:
    """Start an expert-server process: stdout piped (its ready line), stderr to `log_path`."""
    log = open(log_path, "ab")  # noqa: ASYNC230 (opening a log file does not block)
    try:
        return await asyncio.create_subprocess_exec(
            *argv, stdout=asyncio.subprocess.PIPE, stderr=log, stdin=asyncio.subprocess.DEVNULL,
            env=child_env())
    finally:
        log.close()


async def read_ready(proc: asyncio.subprocess.Process, what: str, log_path: str,
                     timeout_s: float) -> dict:
    """The ready line: the first stdout line that is a JSON object with a "url" (libraries
    such as NCCL may print lines of their own first)."""
    assert proc.stdout is not None
    name = f"{what} (pid {proc.pid})"
    try:
        async with asyncio.timeout(timeout_s):
            while line := await proc.stdout.readline():
                try:
                    info = json.loads(line)
                except ValueError:
                    continue
                if isinstance(info, dict) and isinstance(info.get("url"), str):
                    return info
    except TimeoutError:
        raise EaasError(f"{name} did not become ready within {timeout_s}s; see {log_path}"
                        ) from None
    await reap(proc)
    raise EaasError(f"{name} did not become ready: it exited with code {proc.returncode}; "
                    f"see {log_path}")


async def reap(proc: asyncio.subprocess.Process) -> None:
    """Kill `proc` if it runs, wait for its exit and read its stdout to EOF, so that its pipes'
    transport is closed now, on this loop — not garbage-collected later, after the loop
    closed ("Event loop is closed" raised in the transport's __del__)."""
    if proc.returncode is None:
        proc.kill()
    await proc.wait()
    if proc.stdout is not None:
        await proc.stdout.read()
    await asyncio.sleep(0)  # the transport's connection_lost callbacks run


class ServerProcess(Actor):
    def __init__(self, slot: ProcessSlot, model_dir: str, assignment: Mapping[int, list[int]], *,
                 dtype: str, device: str, batch_invariant: bool, transport: str,
                 call_timeout_s: float, heartbeat_interval_s: float, heartbeat_misses: int = 3,
                 start_timeout_s: float = 120.0, on_ready: Callable[[], None] | None = None,
                 fabric: FabricSeat | None = None,
                 fabric_joined: asyncio.Event | None = None, load_format: str = "auto",
                 spares: SpareProcesses | None = None) -> None:
        self._on_ready = on_ready
        self.spares = spares  # warm spares a restart adopts (None: always a fresh process)
        self.load_format = load_format
        self.slot = slot
        self.assignment = {int(k): list(v) for k, v in assignment.items()}
        self.model_dir, self.dtype, self.device = model_dir, dtype, device
        self.batch_invariant, self.transport = batch_invariant, transport
        self.call_timeout_s = call_timeout_s
        self.heartbeat_interval_s = heartbeat_interval_s
        self.heartbeat_misses = heartbeat_misses
        self.start_timeout_s = start_timeout_s
        self.fabric = fabric  # used on the slot's first start only
        self.fabric_joined = fabric_joined  # set once this process's own join has returned
        self.rpc: Any = None
        self._max_rows: int | None = None  # rows per compute RPC (transport.max_rows)
        self._stopping = False

    def argv(self) -> list[str]:
        """The command line of the slot's next process (its first start joins the fabric)."""
        transport = self.transport
        seat = self.fabric if transport == "nvshmem" and self.slot.starts == 0 else None
        return server_argv(self.model_dir, self.assignment, dtype=self.dtype, device=self.device,
                           load_format=self.load_format, batch_invariant=self.batch_invariant,
                           transport=transport if seat is not None else restart_transport(
                               transport)) + (seat.argv() if seat is not None else [])

    async def on_start(self) -> None:
        from eaas.transport import RpcClient, connect

        await self._reap_old()
        slot = self.slot
        slot.log_path = slot.log_path or os.path.join(tempfile.gettempdir(),
                                                      f"eaas-{os.getpid()}-{slot.name}.log")
        # a restart adopts a warm spare (started ahead, no experts): no interpreter start-up
        spare = self.spares.take() if self.spares is not None and slot.starts > 0 else None
        if spare is not None:
            proc, info = spare.proc, spare.info
            slot.log_path = spare.log_path
        else:
            proc = await spawn_server(self.argv(), slot.log_path)
        slot.proc, slot.pid, slot.starts, slot.url = proc, proc.pid, slot.starts + 1, None
        assert proc.stdout is not None
        try:
            if spare is None:
                info = await read_ready(proc, f"expert server {slot.name}", slot.log_path,
                                        self.start_timeout_s)
            if info["url"].startswith("nvshmem://") and self.fabric_joined is not None:
                # the server's join returned, so ours is returning: wait until it has
                await asyncio.wait_for(self.fabric_joined.wait(), self.start_timeout_s)
            slot.url = info["url"]
            self.rpc = RpcClient(await connect(info["url"], timeout=10.0,
                                               security=server_security()))
            if spare is not None:  # give the adopted spare this server's experts
                await self._ask(LoadExperts(self.assignment), timeout=self.start_timeout_s)
        except BaseException:  # also a cancelled start (a failed fabric join): no orphan
            await self._reap_old()
            raise
        finally:
            if spare is not None and self.spares is not None:
                self.spares.fill_later()  # the next spare, once the failover is over
        self.context.create_task(self._drain_stdout(proc), name=f"{slot.name}-stdout")
        self.context.create_task(self._watch_exit(proc), name=f"{slot.name}-exit")
        self.context.create_task(self._heartbeat(), name=f"{slot.name}-heartbeat")
        if self._on_ready is not None:
            self._on_ready()

    async def _drain_stdout(self, proc: asyncio.subprocess.Process) -> None:
        """Keep reading the server's stdout so that library output never fills the pipe."""
        assert proc.stdout is not None
        while line := await proc.stdout.readline():
            with open(self.slot.log_path, "ab") as log:  # noqa: ASYNC230 (rare, small writes)
                log.write(line)

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
        what = f"expert server {self.slot.name} (pid {proc.pid}) exited with code {rc}"
        if self.slot.planned_kill:  # the pool's inject_fault("kill") sent that SIGKILL
            self.slot.planned_kill = False
            raise InjectedFault(what + " (killed by fault injection)")
        raise EaasError(what)

    async def _heartbeat(self) -> None:
        misses = 0
        while True:
            await asyncio.sleep(self.heartbeat_interval_s)
            try:
                await self._ask(Ping(), timeout=self.heartbeat_interval_s)
                misses = 0
            except asyncio.CancelledError:
                raise
            except Exception:
                misses += 1
                if misses >= self.heartbeat_misses:
                    self.slot.kill()  # hung (e.g. SIGSTOP): it is dead to us
                    raise EaasError(f"expert server {self.slot.name} (pid {self.slot.pid}) missed "
                                    f"{misses} heartbeats") from None

    async def _ask(self, msg: Any, timeout: float) -> Any:
        """One request of the expert-server protocol to the process; its reply."""
        return await self.rpc.call(SERVER_PROTOCOL.encode(msg), timeout=timeout)

    async def _compute(self, msg: ComputeBatch) -> Any:
        """One compute RPC, or several of at most max_rows rows each (the server refuses more)."""
        if self._max_rows is None:
            from eaas.engine.server_policy import RequestGuard

            self._max_rows = RequestGuard.from_env().max_rows or 1 << 62
        n, step = int(msg.x.shape[0]), self._max_rows
        if n <= step:
            return await self._ask(msg, timeout=self.call_timeout_s)
        import torch

        parts = [await self._ask(ComputeBatch(msg.layer, msg.x[i:i + step],
                                              msg.expert_ids[i:i + step]),
                                 timeout=self.call_timeout_s) for i in range(0, n, step)]
        return torch.cat(parts)  # [N, H]

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
            return await self._compute(msg)
        if isinstance(msg, Crash):
            self.slot.signal(signal.SIGKILL)
            return None
        if msg in SERVER_PROTOCOL:  # Stats, LoadExperts, UnloadExperts, SetDelay, Ping
            slow = isinstance(msg, (LoadExperts, UnloadExperts))  # loading reads weights
            return await self._ask(msg, timeout=120.0 if slow else self.call_timeout_s)
        raise TypeError(f"ServerProcess {self.slot.name} cannot handle {type(msg).__name__}")
