"""Where an engine's expert-server processes live: one run directory for their logs, and warm
spares per device.

The run directory (`eaas-PID-XXXX` in the temp directory) is made when the first process needs a
log; a clean close removes it, unless a server process failed during the run (restarted or
replaced), and then it is kept and its path logged. Warm spares are server processes started
ahead with no experts: a restarting server adopts one (connects and loads its experts), so the
failover path pays no interpreter and torch start-up. A spare starts `fault.spare_nice` nicer
than the engine (its start-up takes only CPU that serving leaves idle) and is given the
engine's priority back when adopted — where the OS lets this process raise a priority again
(CAP_SYS_NICE or RLIMIT_NICE, Linux); elsewhere spares start at normal priority.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import os
import resource
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from eaas.config import EngineConfig
from eaas.engine.server_process import (read_ready, reap, restart_transport, server_argv,
                                         spawn_server)

__all__ = ["ProcessHome", "Spare", "SpareProcesses"]

log = logging.getLogger("eaas.engine")


@dataclass(slots=True)
class Spare:
    """A started, ready expert-server process that hosts no experts yet."""

    proc: asyncio.subprocess.Process
    info: dict
    log_path: str


def may_unnice(priority: int) -> bool:
    """Whether this process may set another of its processes back to `priority` (a niceness)
    after raising it: Linux, with CAP_SYS_NICE or an RLIMIT_NICE that reaches it."""
    try:
        status = Path("/proc/self/status").read_text()
        caps = int(status.split("CapEff:")[1].split()[0], 16)
    except (OSError, IndexError, ValueError):
        return False
    cap_sys_nice = 23
    soft = resource.getrlimit(resource.RLIMIT_NICE)[0]
    return bool(caps >> cap_sys_nice & 1) or soft == resource.RLIM_INFINITY or \
        soft >= 20 - priority


def set_priority(pid: int, priority: int) -> None:
    """Set every thread of process `pid` to niceness `priority` (Linux niceness is per thread;
    threads started later inherit their creator's)."""
    try:
        tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        tids = [pid]
    for tid in tids:
        try:
            os.setpriority(os.PRIO_PROCESS, tid, priority)
        except ProcessLookupError:
            pass  # a thread that ended meanwhile


class SpareProcesses:
    """Warm spares: `count` expert-server processes started ahead with no experts, for one
    device and transport. A restarting server adopts one (it connects and loads its experts:
    no interpreter and torch start-up on the failover path), and a new spare starts behind it.

    argv: the command line of a spare; log_path(name): where its stderr goes; nice: how much
    nicer than this process a spare runs until adopted (0: as nice as this process).
    """

    def __init__(self, argv: Callable[[], list[str]], log_path: Callable[[str], str], *,
                 count: int, start_timeout_s: float, refill_delay_s: float = 1.0,
                 nice: int = 0) -> None:
        self._argv, self._log_path = argv, log_path
        self.priority = os.getpriority(os.PRIO_PROCESS, 0)  # what an adopted spare gets back
        self.nice = min(nice, 19 - self.priority) if nice and may_unnice(self.priority) else 0
        self.count, self.start_timeout_s = count, start_timeout_s
        self._ready: list[Spare] = []
        self._tasks: set[asyncio.Task] = set()  # starts in progress (aclose ends them)
        self._timer: asyncio.TimerHandle | None = None  # a delayed refill
        self.refill_delay_s = refill_delay_s
        self._names = itertools.count()
        self.adopted = 0

    def fill(self) -> None:
        """Start spares until `count` are ready or starting (in tasks this object owns)."""
        while len(self._ready) + len(self._tasks) < self.count:
            task = asyncio.get_running_loop().create_task(self._start(),
                                                          name="expert-spare-start")
            self._tasks.add(task)
            task.add_done_callback(self._started)

    def fill_later(self) -> None:
        """`fill()` after `refill_delay_s`: a spare's own start-up (interpreter, torch import)
        would compete for the CPU with the failover it just served."""
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.refill_delay_s, self._fill)

    def _fill(self) -> None:
        self._timer = None
        self.fill()

    def _started(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("a warm spare expert server did not start: %s", task.exception())

    async def _start(self) -> None:
        path = self._log_path(f"spare-{next(self._names)}")
        proc = await spawn_server(self._argv(), path)
        try:
            if self.nice:  # before the interpreter starts threads (they inherit it)
                set_priority(proc.pid, self.priority + self.nice)
            info = await read_ready(proc, "warm spare expert server", path, self.start_timeout_s)
        except BaseException:
            await reap(proc)
            raise
        self._ready.append(Spare(proc, info, path))

    def take(self) -> Spare | None:
        """A ready spare that is still alive (it is now the caller's), or None."""
        while self._ready:
            spare = self._ready.pop(0)
            if spare.proc.returncode is None:
                self.adopted += 1
                if self.nice:
                    try:
                        set_priority(spare.proc.pid, self.priority)
                    except OSError as e:  # it still serves, at the spare's priority
                        log.warning("adopted spare (pid %d) keeps niceness +%d: %s",
                                    spare.proc.pid, self.nice, e)
                return spare
        return None

    async def aclose(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for spare in self._ready:
            await reap(spare.proc)
        self._ready.clear()


class ProcessHome:
    """The run directory and the warm spares of one engine's server processes."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.log_dir: str | None = None  # made on first use
        self.spares: dict[str, SpareProcesses] = {}  # device -> its spares

    def log_path(self, name: str) -> str:
        """Server `name`'s log file, in the run directory (made on first use)."""
        if self.log_dir is None:
            self.log_dir = tempfile.mkdtemp(prefix=f"eaas-{os.getpid()}-")
            log.info("expert-server logs: %s", self.log_dir)
        return os.path.join(self.log_dir, f"{name}.log")

    def spares_for(self, device: str) -> SpareProcesses | None:
        """The warm spares of `device` (started on first use), or None (fault.warm_spares 0)."""
        cfg = self.config
        if cfg.fault.warm_spares == 0:
            return None
        spares = self.spares.get(device)
        if spares is None:
            argv = functools.partial(
                server_argv, cfg.model, {}, dtype=cfg.dtype, device=device,
                load_format=cfg.load_format, batch_invariant=cfg.batch_invariant,
                transport=restart_transport(cfg.placement.transport))
            spares = self.spares[device] = SpareProcesses(
                argv, self.log_path, count=cfg.fault.warm_spares, start_timeout_s=180.0,
                nice=cfg.fault.spare_nice)
            spares.fill()
        return spares

    def close_logs(self, failed: Iterable[str]) -> None:
        """At a clean close: remove the run directory, unless servers `failed` during the run:
        then keep it and say where it is."""
        if self.log_dir is None:
            return
        failed = sorted(failed)
        if failed:
            log.warning("expert-server logs kept in %s (servers that failed: %s)",
                        self.log_dir, ", ".join(failed))
        else:
            shutil.rmtree(self.log_dir, ignore_errors=True)
        self.log_dir = None

    async def aclose(self) -> None:
        for spares in self.spares.values():
            await spares.aclose()
