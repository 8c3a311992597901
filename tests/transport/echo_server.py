"""A tiny echo server in its own OS process: `python echo_server.py URL`.

Prints the listener's resolved URL on stdout, then answers RPC calls with the request itself
(a request {"exit": code} ends the process at once with that code, like a crash).
"""

from __future__ import annotations

import asyncio
import os
import sys
from typing import Any

from eaas.transport import listen, serve_rpc


async def handle(msg: Any) -> Any:
    if isinstance(msg, dict) and "exit" in msg:
        os._exit(msg["exit"])
    if isinstance(msg, dict) and msg.get("raise"):
        raise KeyError(msg["raise"])
    return msg


async def main(url: str) -> None:
    listener = await listen(url, lambda conn: serve_rpc(conn, handle))
    print(listener.url, flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)  # until stdin closes
    await listener.aclose()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
