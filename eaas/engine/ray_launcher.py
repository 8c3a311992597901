"""placement.launcher ray: expert servers as Ray actors on a Ray cluster.

The engine connects to the cluster (`ray.init(address=placement.ray_address)`), reserves one
bundle per start-up server in a placement group (`ray_num_cpus` / `ray_num_gpus` each, strategy
`ray_placement_strategy`), and starts every server as a Ray actor in its bundle. The actor runs
the same server code as a spawned server process (`server_main._serve`, in the actor's
worker process, listening on tcp:// at its node's IP) and the engine attaches to it as to any
joined server (eaas/engine/joined_server.py): heartbeats, routing, drain.

Fault semantics stay the engine's: Ray's own actor restarts and task retries are off
(`max_restarts=0`, `max_task_retries=0`); when a server's worker dies the engine's supervisor
restarts its actor, which launches a fresh Ray actor in the same bundle. Servers started later
(add_server, a replacement, a rolling upgrade) are Ray actors outside the placement group.

`ray` is an optional extra: `pip install 'eaas[ray]'`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from typing import Any, Mapping

from eaas.config import EngineConfig
from eaas.engine.join import CLUSTER_SECRET_ENV, SETTINGS_ENV, cluster_secret, transport_settings
from eaas.engine.joined_server import JoinSlot
from eaas.engine.server_process import server_argv
from eaas.errors import EaasError

__all__ = ["RayLauncher", "ServerActor"]

log = logging.getLogger("eaas.engine")

PLACEMENT_TIMEOUT_S = 120.0


class ServerActor:
    """One expert server inside a Ray worker process (wrapped by `ray.remote` at launch)."""

    def __init__(self) -> None:
        self._stop: asyncio.Event | None = None
        self._task: asyncio.Task | None = None

    async def start(self, args: list[str], env: dict[str, str]) -> dict:
        """Load the experts `args` name (server_main flags, without --listen), listen on
        this node's IP, and return {"url", "pid", "host", "node_id", "load_stats"} once
        listening (node_id: the Ray node, several of which may share one host)."""
        import ray
        import torch

        from eaas.engine import server_main

        os.environ.update(env)  # the cluster secret and transport settings, before listening
        ip = ray.util.get_node_ip_address()
        parsed = server_main.parse_args([*args, "--listen", f"tcp://{ip}:0"])
        torch.set_num_threads(1)
        if parsed.device.startswith("cuda"):
            torch.cuda.set_device(parsed.device)
        loop = asyncio.get_running_loop()
        listening: asyncio.Future[dict] = loop.create_future()
        self._stop = asyncio.Event()

        async def on_listening(info: dict) -> None:
            listening.set_result(info)

        self._task = loop.create_task(server_main._serve(
            parsed, on_listening=on_listening, until=self._stop.wait), name="expert-server")
        await asyncio.wait({listening, self._task}, return_when=asyncio.FIRST_COMPLETED)
        if not listening.done():
            self._task.result()  # raises what ended it
            raise EaasError("the expert server ended before it listened")
        return {**listening.result(), "host": socket.gethostname(),
                "node_id": ray.get_runtime_context().get_node_id()}

    async def stop(self) -> None:
        if self._stop is not None and self._task is not None:
            self._stop.set()
            await asyncio.gather(self._task, return_exceptions=True)


class RayLauncher:
    """Starts and stops the engine's expert servers as Ray actors (see the module docstring)."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self._ray: Any = None
        self._actor_cls: Any = None
        self._pg: Any = None
        self._owns_ray = False  # this engine called ray.init (so it calls ray.shutdown)
        self._actors: dict[str, Any] = {}  # server name -> its Ray actor handle
        self._bundles: dict[str, int] = {}  # start-up server name -> its bundle index
        self.server_nodes: dict[str, str] = {}  # server name -> Ray node id of its actor

    async def start(self) -> None:
        """Connect to the cluster and reserve the start-up servers' placement group."""
        try:
            import ray
            from ray.util.placement_group import placement_group
        except ImportError:
            raise EaasError("placement.launcher 'ray' needs Ray: pip install 'eaas[ray]'"
                            ) from None
        pl = self.config.placement
        self._ray = ray
        if not ray.is_initialized():
            await asyncio.to_thread(ray.init, address=pl.ray_address, include_dashboard=False,
                                    log_to_driver=False)
            self._owns_ray = True
        self._actor_cls = ray.remote(ServerActor)
        bundle = {"CPU": pl.ray_num_cpus, "GPU": pl.ray_num_gpus}
        bundle = {k: v for k, v in bundle.items() if v > 0}
        if bundle:
            n = pl.num_expert_servers
            self._pg = placement_group([dict(bundle) for _ in range(n)],
                                       strategy=pl.ray_placement_strategy)
            try:
                await asyncio.wait_for(self._pg.ready(), PLACEMENT_TIMEOUT_S)
            except TimeoutError:
                raise EaasError(
                    f"placement.launcher 'ray': a placement group of {n} bundles {bundle} "
                    f"({pl.ray_placement_strategy}) was not granted within "
                    f"{PLACEMENT_TIMEOUT_S:.0f}s; cluster resources: "
                    f"{ray.cluster_resources()}") from None
            from eaas.engine.placement import server_name

            self._bundles = {server_name(i): i for i in range(n)}

    def describe(self) -> dict:
        pl, ray = self.config.placement, self._ray
        return {"address": pl.ray_address or "local", "strategy": pl.ray_placement_strategy,
                "nodes": len([n for n in ray.nodes() if n.get("Alive")]) if ray else 0,
                "server_nodes": dict(self.server_nodes)}

    def slot(self, name: str, assignment: Mapping[int, list[int]], *, device: str,
             model: str) -> JoinSlot:
        """A slot whose processes are Ray actors: `slot.launch()` starts one hosting what the
        server hosts at that moment (`assignment` is the pool's, mutated in place)."""
        pl = self.config.placement
        device = "cuda:0" if pl.ray_num_gpus > 0 else "cpu"  # Ray sets CUDA_VISIBLE_DEVICES
        slot = JoinSlot(name, "ray", device, model=model)

        async def launch() -> dict:
            return await self._launch(slot, assignment)

        async def stop() -> None:
            await self._stop(name)

        slot.launch, slot.stop = launch, stop
        return slot

    async def _launch(self, slot: JoinSlot, assignment: Mapping[int, list[int]]) -> dict:
        cfg, pl = self.config, self.config.placement
        argv = server_argv(slot.model, assignment, dtype=cfg.dtype, device=slot.device,
                           load_format=cfg.load_format, batch_invariant=cfg.batch_invariant,
                           transport="tcp")
        args = _without(argv[3:], "--listen", "--parent-pid")  # after `python -m module`
        options: dict[str, Any] = {"num_cpus": pl.ray_num_cpus, "num_gpus": pl.ray_num_gpus,
                                   "max_restarts": 0, "max_task_retries": 0}
        bundle = self._bundles.get(slot.name)
        if self._pg is not None and bundle is not None:
            from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

            options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                placement_group=self._pg, placement_group_bundle_index=bundle)
        actor = self._actor_cls.options(**options).remote()
        self._actors[slot.name] = actor
        info = await actor.start.remote(args, _transport_env())
        slot.host = str(info.get("host", ""))
        self.server_nodes[slot.name] = str(info.get("node_id", ""))
        return info

    async def _stop(self, name: str) -> None:
        actor = self._actors.pop(name, None)
        self.server_nodes.pop(name, None)
        if actor is None:
            return
        try:
            await asyncio.wait_for(actor.stop.remote(), 5.0)
        except Exception:  # noqa: BLE001 - dead already, or stuck: killed below either way
            pass
        self._ray.kill(actor, no_restart=True)

    async def aclose(self) -> None:
        """Kill every server actor, release the placement group, and leave the cluster (if
        this engine joined it)."""
        ray = self._ray
        if ray is None:
            return
        for name in list(self._actors):
            try:
                ray.kill(self._actors.pop(name), no_restart=True)
            except Exception:  # noqa: BLE001
                pass
        if self._pg is not None:
            from ray.util.placement_group import remove_placement_group

            try:
                remove_placement_group(self._pg)
            except Exception:  # noqa: BLE001
                pass
            self._pg = None
        if self._owns_ray:
            await asyncio.to_thread(ray.shutdown)
            self._owns_ray = False
        self._ray = None


def _transport_env() -> dict[str, str]:
    """What a server actor sets in its environment before it listens: the engine's cluster
    secret and transport settings (eaas.transport.auth reads them there)."""
    import json

    env, secret, settings = {}, cluster_secret(), transport_settings()
    if secret:
        env[CLUSTER_SECRET_ENV] = secret
    if settings:
        env[SETTINGS_ENV] = json.dumps(settings, sort_keys=True)
    return env


def _without(args: list[str], *flags: str) -> list[str]:
    """`args` without each flag in `flags` and its value."""
    out, skip = [], False
    for a in args:
        if skip:
            skip = False
        elif a in flags:
            skip = True
        else:
            out.append(a)
    return out
