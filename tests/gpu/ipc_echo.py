"""A second process for the cudaipc:// tests: `python -m tests.gpu.ipc_echo [--to cuda:1]`.

Listens on a fresh cudaipc:// path, prints the URL on stdout, then sends every message back;
with --to, CUDA tensors are first moved to that device and doubled (so a reply proves the rows
crossed GPUs). Exits when stdin closes (the test process went away).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

import torch

from eaas.transport import listen


def _move(msg: Any, device: str | None) -> Any:
    if isinstance(msg, torch.Tensor):
        return msg.to(device) * 2 if (device and msg.is_cuda) else msg
    if isinstance(msg, dict):
        return {k: _move(v, device) for k, v in msg.items()}
    if isinstance(msg, (list, tuple)):
        return type(msg)(_move(v, device) for v in msg)
    return msg


async def main(device: str | None) -> None:
    async def echo(conn: Any) -> None:
        while True:
            msg = await conn.recv(timeout=600)
            await conn.send(_move(msg, device))

    listener = await listen("cudaipc://", echo)
    print(listener.url, flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await listener.aclose()


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--to", default=None)
    asyncio.run(main(p.parse_args().to))
