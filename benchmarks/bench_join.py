"""Joining under load on CPU (issue 19): how long an `eaas expert-server --join` process takes
from its start to its first routed row, and tokens/s before and after it joins.

Setup: `eaas serve` of a tiny qwen3_moe checkpoint with 1 local expert-server process (every
expert on it, warm spares off), C client threads issuing greedy completions (ignore_eos) back
to back over HTTP. At T1 one `eaas expert-server --join` process starts (hosting every expert,
as the pool decides for a new name); the topology and /metrics are polled every 10 ms.

  ticket   = the engine's `join_started` event is not polled: the joiner's own stderr line
             "joining ... as NAME" (stamped when read) — interpreter + aiohttp + the join call
  routed   = first poll where the server is alive and in every expert's routing entry
  first row= first poll where eaas_server_inflight_tokens{server=NAME} > 0 (an upper bound:
             rows in flight between two polls can be missed)
  tokens/s = completion tokens finished in a window / window length; before = [T1 - W, T1],
             after = [routed + 1 s, routed + 1 s + W]
Peer in the same run: `POST /admin/api/servers` (the engine spawns a server process itself),
timed from the call to routed.

    python benchmarks/bench_join.py [--clients 3] [--window-s 8]
    python benchmarks/bench_join.py --device cuda:0   # the same on a GPU: shard, the local
        # server and the joined one on that device (server processes over cudaipc://)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

TOKEN = "bench-join-admin-token-0123"
TOKENS = 8


def _call(url: str, body: dict | None = None, method: str = "GET", timeout: float = 120.0) -> dict:
    req = urllib.request.Request(url, method=method, data=None if body is None else
                                 json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json",
                                          "Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def _routed(url: str, name: str) -> bool:
    topo = _call(url + "/admin/api/topology")
    s = {x["name"]: x for x in topo["servers"]}.get(name)
    table = topo["routing"]["table"]
    return bool(s and s["state"] == "alive" and name not in topo["routing"]["dead"]
                and all(name in srv for ex in table.values() for srv in ex.values()))


def _inflight(url: str, name: str) -> float:
    with urllib.request.urlopen(url + "/metrics", timeout=5) as r:
        for line in r.read().decode().splitlines():
            if line.startswith("eaas_server_inflight_tokens") and f'server="{name}"' in line:
                return float(line.split()[-1])
    return 0.0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=3)
    ap.add_argument("--window-s", type=float, default=8.0)
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:N]: where the engine and "
                    "both expert servers run (on CUDA the servers use cudaipc://)")
    args = ap.parse_args()
    gpu = args.device.startswith("cuda")
    from eaas.model import make_tiny

    tmp = Path(tempfile.mkdtemp(prefix="bench-join-"))
    model = make_tiny(tmp / "tiny", "qwen3_moe", seed=3) or tmp / "tiny"
    transport = ", transport: cudaipc" if gpu else ""
    (tmp / "eaas.yaml").write_text("placement: {num_expert_servers: 1, expert_replicas: 1"
                                   f"{transport}}}\nfault: {{warm_spares: 0}}\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "EAAS_ADMIN_TOKEN": TOKEN}
    ready = tmp / "ready.json"
    serve = subprocess.Popen([sys.executable, "-m", "eaas.cli", "serve", str(model), "--config",
                              str(tmp / "eaas.yaml"), "--port", "0", "--ready-file", str(ready),
                              "--device", args.device],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    done: list[float] = []  # finish times of completions
    stop = threading.Event()
    joiner = None
    try:
        t_end = time.monotonic() + 120
        while not ready.exists():
            assert serve.poll() is None and time.monotonic() < t_end, "eaas serve did not start"
            time.sleep(0.1)
        url = json.loads(ready.read_text())["url"]

        def client(c: int) -> None:
            i = c
            while not stop.is_set():
                _call(url + "/v1/completions", {"prompt": [3 + i % 50, 5, 11, 2],
                                                 "max_tokens": TOKENS, "temperature": 0,
                                                 "ignore_eos": True}, "POST")
                done.append(time.monotonic())
                i += 1

        threads = [threading.Thread(target=client, args=(c,), daemon=True)
                   for c in range(args.clients)]
        for t in threads:
            t.start()
        time.sleep(args.window_s + 1.0)  # the before-window (the load's own start excluded)
        t1 = time.monotonic()
        joiner = subprocess.Popen([sys.executable, "-m", "eaas.cli", "expert-server", "--join",
                                   url, "--name", "joined-0", "--device", args.device,
                                   *(["--transport", "cudaipc"] if gpu else [])],
                                  stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, env=env, text=True)
        t_ticket = None

        def read_stderr() -> None:
            nonlocal t_ticket
            assert joiner is not None and joiner.stderr is not None
            for line in joiner.stderr:
                if "joining" in line and t_ticket is None:
                    t_ticket = time.monotonic()

        threading.Thread(target=read_stderr, daemon=True).start()
        t_routed = t_row = None
        while t_row is None and time.monotonic() - t1 < 120:
            if t_routed is None and _routed(url, "joined-0"):
                t_routed = time.monotonic()
            if t_routed is not None and _inflight(url, "joined-0") > 0:
                t_row = time.monotonic()
            time.sleep(0.01)
        assert t_routed is not None and t_row is not None, "the joined server was never used"
        time.sleep(1.0 + args.window_s)
        t_peer = time.monotonic()
        peer = _call(url + "/admin/api/servers", {}, "POST")["name"]
        while not _routed(url, peer):
            time.sleep(0.01)
        peer_s = time.monotonic() - t_peer
        stop.set()
        for t in threads:
            t.join(60)
    finally:
        stop.set()
        if joiner is not None and joiner.poll() is None:
            joiner.send_signal(signal.SIGTERM)
            joiner.wait(60)
        serve.send_signal(signal.SIGTERM)
        serve.wait(60)

    def rate(a: float, b: float) -> float:
        return sum(1 for t in done if a <= t < b) * TOKENS / (b - a)

    before = rate(t1 - args.window_s, t1)
    after = rate(t_routed + 1.0, t_routed + 1.0 + args.window_s)
    cpu = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    print(f"bench_join on {platform.node()} ({cpu}), {time.strftime('%Y-%m-%d')}, "
          f"{args.clients} clients x {TOKENS} tokens, tiny qwen3_moe, on {args.device}")
    print(f"{'phase':<34}{'seconds after start':>20}")
    print(f"{'join ticket (joiner stderr)':<34}{(t_ticket or float('nan')) - t1:>20.2f}")
    print(f"{'routed (topology)':<34}{t_routed - t1:>20.2f}")
    print(f"{'first routed row (<=, /metrics)':<34}{t_row - t1:>20.2f}")
    print(f"{'peer: POST /admin/api/servers':<34}{peer_s:>20.2f}  (engine-spawned, to routed)")
    print(f"tokens/s = completion tokens finished in the window / {args.window_s:.0f} s: "
          f"before {before:.1f}, after {after:.1f} ({after / max(before, 1e-9):.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
