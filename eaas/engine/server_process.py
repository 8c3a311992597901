"""An expert server in its own OS process: `python -m eaas.engine.server_process ...`.

The process loads only its experts' tensors (ExpertHost), listens on a transport URL, prints one
JSON line {"url", "pid", "load_stats"} on stdout when ready, then answers RPC requests:

    {"op": "compute", "layer": L, "x": [N, H] tensor, "expert_ids": [N] tensor} -> [N, H] tensor
    {"op": "ping"} -> {"pid": ...}      {"op": "stats"} -> {...}
    {"op": "delay", "seconds": s}       (fault injection: extra latency per compute)

It exits when its parent process goes away, so a killed engine leaves no orphans.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from typing import Any


async def _serve(args: argparse.Namespace) -> None:
    from eaas.engine.expert_server import ExpertHost
    from eaas.transport import listen, serve_rpc

    assignment = {int(k): v for k, v in json.loads(args.assignment).items()}
    host = ExpertHost(args.model, assignment, dtype=args.dtype, device=args.device,
                      batch_invariant=args.batch_invariant)
    delay = 0.0

    async def handle(msg: Any) -> Any:
        nonlocal delay
        op = msg.get("op") if isinstance(msg, dict) else None
        if op == "compute":
            if delay:
                await asyncio.sleep(delay)
            return host.compute(int(msg["layer"]), msg["x"], msg["expert_ids"])
        if op == "ping":
            return {"pid": os.getpid()}
        if op == "stats":
            return {"calls": host.calls, "rows": host.rows, "pid": os.getpid(),
                    "experts": {str(k): v for k, v in host.assignment.items()},
                    "load_stats": host.load_stats}
        if op == "load":
            host.add({int(k): v for k, v in msg["experts"].items()})
            return {str(k): v for k, v in host.assignment.items()}
        if op == "unload":
            host.remove({int(k): v for k, v in msg["experts"].items()})
            return {str(k): v for k, v in host.assignment.items()}
        if op == "delay":
            delay = float(msg["seconds"])
            return "ok"
        raise ValueError(f"unknown request op {op!r}; "
                         "allowed: compute, ping, stats, load, unload, delay")

    async def on_connection(conn: Any) -> None:
        await serve_rpc(conn, handle)

    listener = await listen(args.listen, on_connection)
    print(json.dumps({"url": listener.url, "pid": os.getpid(), "load_stats": host.load_stats}),
          flush=True)
    parent = args.parent_pid
    try:
        while os.getppid() == parent:
            await asyncio.sleep(0.25)
    finally:
        await listener.aclose()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="eaas-expert-server")
    p.add_argument("--model", required=True)
    p.add_argument("--assignment", required=True, help='JSON {"layer": [expert ids]}')
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-invariant", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--listen", default="tcp://127.0.0.1:0")
    p.add_argument("--parent-pid", type=int, default=os.getppid())
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(1)  # several servers share the host's cores
    asyncio.run(_serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
