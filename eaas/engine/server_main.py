"""An expert server in its own OS process: `python -m eaas.engine.server_main ...`.

The process loads only its experts' tensors (ExpertHost), listens on a transport URL, prints one
JSON line {"url", "pid", "load_stats"} on stdout when ready, then answers the RPC requests of
the expert-server protocol (eaas.engine.protocol: compute, ping, stats, load, unload, delay;
on a CUDA device also the device data path's xopen / xconnect / xrun / xclose,
eaas.engine.exchange_host),
each a tagged tree such as {"op": "compute", "layer": L, "x": [N, H], "expert_ids": [N]}, run
by the same `HostDispatcher` as an in-process server (eaas.engine.host_dispatch).

Every connection must first pass the cluster-secret handshake (EAAS_CLUSTER_SECRET, read when
the listener opens; eaas.transport.auth), and every request the RequestGuard
(eaas.engine.server_policy: field checks, row limit, `delay` only in fault-injection mode);
"stats" reports what was refused under "security".

It exits when its parent process goes away, so a killed engine leaves no orphans.

With `--fabric STORE,RANK,WORLD` (the engine's first start of a server, transport nvshmem) it
joins the engine's NVSHMEM job (`join_fabric`, collective: every rank must join) before it
loads its experts, and listens on nvshmem://; `--fabric-slots SLOT_BYTES,NUM_SLOTS` and
`--fabric-timeout SECONDS` size and bound the join. Such a process leaves with `os._exit`:
NVSHMEM's finalize at interpreter exit is collective and would hang on a dead peer.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from typing import Any, Awaitable, Callable


def _join(args: argparse.Namespace) -> None:
    from eaas.transport.fabric import join_fabric

    store, rank, world = args.fabric
    slot_bytes, num_slots = args.fabric_slots
    join_fabric(store, rank, world, args.device, slot_bytes=slot_bytes, num_slots=num_slots,
                timeout_s=args.fabric_timeout)


def _fabric_arg(value: str) -> tuple[str, int, int]:
    """Parse HOST:PORT,RANK,WORLD into (store, rank, world)."""
    try:
        store, rank, world = value.rsplit(",", 2)
        return store, int(rank), int(world)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--fabric {value!r}: expected HOST:PORT,RANK,WORLD"
                                         ) from None


def _ints2(value: str) -> tuple[int, int]:
    try:
        a, b = (int(v) for v in value.split(","))
        return a, b
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r}: expected two integers A,B") from None


async def _serve(args: argparse.Namespace, *,
                 on_listening: Callable[[dict], Awaitable[None]] | None = None,
                 until: Callable[[], Awaitable[None]] | None = None) -> None:
    """Load, listen, announce, serve. By default the announcement is the ready line on stdout
    and the process serves while its parent lives; a joined server (eaas.engine.joiner) passes
    `on_listening(info)` (it tells the engine) and `until()` (it returns when the server is to
    stop: SIGTERM after a drain, or the engine let it go)."""
    from eaas.engine.expert_server import ExpertHost
    from eaas.engine.host_dispatch import HostDispatcher
    from eaas.engine.server_policy import RequestGuard
    from eaas.transport import TransportSecurity, listen, serve_rpc

    assignment = {int(k): v for k, v in json.loads(args.assignment).items()}
    host = ExpertHost(args.model, assignment, dtype=args.dtype, device=args.device,
                      batch_invariant=args.batch_invariant, load_format=args.load_format)
    guard = RequestGuard.from_env()
    # On a GPU the first batch of a new size compiles Triton kernels for seconds: compute (and
    # expert loading) then run on one worker thread, in order, so the loop keeps answering
    # heartbeats. On CPU batches are short and run inline (no thread hand-off per batch).
    worker = None
    if args.device.startswith("cuda"):
        import concurrent.futures

        import torch

        worker = concurrent.futures.ThreadPoolExecutor(
            1, "expert-compute", initializer=torch.cuda.set_device, initargs=(args.device,))

    async def blocking(fn: Any, *fn_args: Any) -> Any:
        if worker is None:
            return fn(*fn_args)
        return await asyncio.get_running_loop().run_in_executor(worker, fn, *fn_args)

    def process_stats() -> dict:
        return {"pid": os.getpid(),
                "security": {**listener.stats.snapshot(), "refused_requests": guard.refused}}

    exchange = None
    if worker is not None:  # a CUDA server: the device data path (eaas.engine.exchange_host)
        from eaas.engine.exchange_host import ExchangeSets

        exchange = ExchangeSets(host, blocking)
    dispatch = HostDispatcher(host, guard, compute_in=blocking, load_in=blocking,
                              extra_stats=process_stats, pid=os.getpid(), exchange=exchange)

    async def on_connection(conn: Any) -> None:
        await serve_rpc(conn, dispatch.handle)

    listener = await listen(args.listen, on_connection, security=TransportSecurity.from_env())
    info = {"url": listener.url, "pid": os.getpid(), "load_stats": host.load_stats}
    try:
        if on_listening is not None:
            await on_listening(info)
        else:
            print(json.dumps(info), flush=True)
        if until is not None:
            await until()
            return
        parent = args.parent_pid
        while os.getppid() == parent:
            await asyncio.sleep(0.25)
    finally:
        await listener.aclose()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The server's flags (as ServerProcess.argv writes them); --fabric parses to
    (store, rank, world), --fabric-slots to (slot_bytes, num_slots)."""
    p = argparse.ArgumentParser(prog="eaas-expert-server")
    p.add_argument("--model", required=True)
    p.add_argument("--assignment", required=True, help='JSON {"layer": [expert ids]}')
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--load-format", default="auto", choices=("auto", "dummy"))
    p.add_argument("--batch-invariant", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--listen", default="tcp://127.0.0.1:0")
    p.add_argument("--parent-pid", type=int, default=os.getppid())
    p.add_argument("--fabric", type=_fabric_arg, default=None,
                   help="STORE_HOST:PORT,RANK,WORLD: join the engine's NVSHMEM job first "
                   "(and listen on nvshmem://)")
    p.add_argument("--fabric-slots", type=_ints2, default=(4 << 20, 16),
                   help="SLOT_BYTES,NUM_SLOTS")
    p.add_argument("--fabric-timeout", type=float, default=120.0)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(1)  # several servers share the host's cores
    if args.device.startswith("cuda"):
        # this process's GPU is the current device: the default streams, the Triton launches
        # and the transports' copies then all run on it (cuda:0 is only the default)
        torch.cuda.set_device(args.device)
    if args.fabric is None:
        asyncio.run(_serve(args))
        return 0
    rc = 1
    try:
        _join(args)
        asyncio.run(_serve(args))
        rc = 0
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)  # NVSHMEM finalize is collective: with a dead peer it would wait forever


if __name__ == "__main__":
    sys.exit(main())
