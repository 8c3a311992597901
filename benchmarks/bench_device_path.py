"""Disaggregated decode (issue 17): shard + expert-server processes over the device data path,
against co-located experts, the host path (the same processes, rows through the transport)
and the captured plain-PyTorch peer of the same shape (benchmarks/decode_peer.py), in one run.
Qwen3-30B-A3B shape with fewer layers (--layers, default 8), random bf16 weights made in memory
(load_format "dummy", in every server process too), 2 servers, every expert on both (replicas
2: what the SIGKILL measurement needs).

Servers on the shard's GPU by default: two processes on one GPU time-slice it (no MPS), so a
device wait spins through the other process's slice; `--server-device cuda:1` puts them on a
second GPU, the layout the device path is for.

decode ms/step = 1000 * B / decode tok/s (AsyncEngine.generate, host loop and streaming
included; bench_e2e_gpu.run_batch); peer ms/step = CUDA-event time of graph replays.
kill: while B requests decode over the device path, SIGKILL one server; "stall" = the longest
gap between two consecutive streamed tokens of the batch, against the median gap (the degraded
time is the stall minus one median step); every request must end with its tokens.

    python benchmarks/bench_device_path.py [--layers 8] [--batches 1,32] [--tokens 32]
        [--setups peer,colocated,device,host,kill] [--server-device cuda:1]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_e2e_gpu as e2e  # noqa: E402  (puts eaas / eaas_kernels on sys.path)
import decode_peer  # noqa: E402
import torch  # noqa: E402

from eaas import AsyncEngine, EngineConfig, SamplingParams  # noqa: E402
from eaas.model.tiny import QWEN3_30B_A3B, make_config_only  # noqa: E402

VOCAB = 151936


def cfg_for(model: Path, setup: str, max_seqs: int, max_len: int, server_device: str | None,
            timeout_s: float) -> EngineConfig:
    placement: dict[str, Any] = {"num_expert_servers": 2, "expert_replicas": 2}
    if setup == "colocated":
        placement["server_mode"] = "inproc"
    else:
        placement.update(server_mode="process", transport="tcp",
                         data_path="host" if setup == "host" else "device")
        if server_device:
            placement["server_devices"] = [server_device]
    bs = 16
    return EngineConfig.from_dict({
        "model": str(model), "load_format": "dummy", "device": "cuda:0", "dtype": "bfloat16",
        "placement": placement,
        "scheduler": {"max_num_seqs": max_seqs, "max_waiting": 4096, "max_model_len": max_len,
                      "micro_batches": 1},
        "cache": {"num_blocks": max_seqs * -(-max_len // bs) + 8},
        "fault": {"unit_timeout_s": 60.0, "device_timeout_s": timeout_s, "warm_spares": 0,
                  "heartbeat_interval_s": 1.0}})


async def bench_setup(cfg: EngineConfig, batches: list[int], n_tokens: int,
                      budget_s: float) -> dict[str, Any]:
    out: dict[str, Any] = {}
    t0 = time.perf_counter()
    async with AsyncEngine(cfg) as engine:
        out["start_s"] = time.perf_counter() - t0
        ps = e2e.prompts(max(batches), 16, VOCAB)
        for b in batches:
            await e2e.run_batch(engine, ps[:b], 4, budget_s)
            r = await e2e.run_batch(engine, ps[:b], n_tokens, budget_s)
            r["ms_step"] = 1000.0 * b / r["decode_tok_s"]
            out[b] = r
            print(f"# measured: {cfg.placement.server_mode}/{cfg.placement.data_path} batch "
                  f"{b}: {r['ms_step']:.2f} ms/step", flush=True)
        snap = engine.snapshot()
        out["data_path"] = [s["data_path"] for s in snap["shards"]]
    return out


async def bench_kill(cfg: EngineConfig, b: int, n_tokens: int) -> dict[str, Any]:
    async with AsyncEngine(cfg) as engine:
        ps = e2e.prompts(b, 16, VOCAB)
        params = SamplingParams(max_tokens=n_tokens, temperature=0, ignore_eos=True)
        await e2e.run_batch(engine, ps, 4, 120.0)
        stamps: list[float] = []
        done: list[Any] = []
        third = asyncio.Event()

        async def one(p: list[int]) -> None:
            last = None
            async for last in engine.generate(p, params):
                if p is ps[0]:  # one request's stream: one stamp per step
                    stamps.append(time.perf_counter())
                if len(last.outputs[0].token_ids) >= n_tokens // 3:
                    third.set()
            done.append(last)

        async def kill() -> float:
            await third.wait()
            t = time.perf_counter()
            await engine.inject_fault(engine.server_names()[0], "kill")
            return t

        _, t_kill = await asyncio.gather(asyncio.gather(*(one(p) for p in ps)), kill())
        snap = engine.snapshot()
    steps = stamps
    gaps = [b2 - a for a, b2 in zip(steps, steps[1:])]
    stall = max(gaps)
    return {"batch": b, "stall_s": stall, "median_gap_s": statistics.median(gaps),
            "degraded_s": stall - statistics.median(gaps),
            "all_completed": all(o is not None and o.finish_reason == "length" for o in done),
            "replays": snap["counters"].get("step_replays", 0),
            "data_path_after": [s["data_path"] for s in snap["shards"]],
            "kill_at_s": t_kill - steps[0]}


def free_gpu() -> None:
    gc.collect()
    torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--setups", default="peer,colocated,device,host,kill")
    ap.add_argument("--server-device", default=None)
    ap.add_argument("--timeout-s", type=float, default=0.75, help="fault.device_timeout_s")
    ap.add_argument("--budget-s", type=float, default=120.0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    batches = [int(x) for x in args.batches.split(",")]
    setups = args.setups.split(",")
    shape = dict(QWEN3_30B_A3B)
    shape.update(num_hidden_layers=args.layers, vocab_size=VOCAB, max_position_embeddings=8192)
    max_len, max_seqs = 16 + args.tokens + 8, max(batches)
    res: dict[str, Any] = {"machine": e2e.machine_line(), "command": " ".join(sys.argv),
                           "layers": args.layers, "batches": batches, "tokens": args.tokens,
                           "server_device": args.server_device or "cuda:0 (the shard's)"}
    with tempfile.TemporaryDirectory() as tmp:
        model = make_config_only(Path(tmp) / "m", "qwen3_moe", dtype="bfloat16", **shape)
        if "peer" in setups:
            pshape = decode_peer.PeerShape.from_dict(shape)
            peer = decode_peer.DecodePeer(pshape, torch.device("cuda:0"), dtype=torch.bfloat16)
            res["peer"] = {b: decode_peer.measure_peer({}, b, 16, args.tokens, args.layers,
                                                       VOCAB, "cuda:0", peer=peer, eager=False)
                           for b in batches}
            del peer
            free_gpu()
        for setup in ("colocated", "device", "host"):
            if setup in setups:
                cfg = cfg_for(model, setup, max_seqs, max_len, args.server_device,
                              args.timeout_s)
                res[setup] = asyncio.run(bench_setup(cfg, batches, args.tokens, args.budget_s))
                free_gpu()
        if "kill" in setups:
            cfg = cfg_for(model, "device", max_seqs, max_len, args.server_device,
                          args.timeout_s)
            res["kill"] = asyncio.run(bench_kill(cfg, max(batches), args.tokens))
            free_gpu()
    print_table(res, batches)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1, default=str) + "\n")


def print_table(res: dict[str, Any], batches: list[int]) -> None:
    print(f"# bench_device_path  {res['machine']}")
    print(f"# command: {res['command']}")
    print(f"# qwen3_moe shape, {res['layers']} layers, dummy weights; servers on "
          f"{res['server_device']}; 16-token prompts, {res['tokens']} greedy tokens")
    print("| path | " + " | ".join(f"b={b} ms/step" for b in batches) + " |")
    print("|---|" + "---:|" * len(batches))
    labels = (("colocated", "eaas co-located (in-process experts, captured)"),
              ("device", "eaas shard + 2 server processes, device path"),
              ("host", "eaas shard + 2 server processes, host path"))
    for key, label in labels:
        if key in res:
            print(f"| {label} [{','.join(res[key]['data_path'])}] | " +
                  " | ".join(f"{res[key][b]['ms_step']:.2f}" for b in batches) + " |")
    if "peer" in res:
        print("| plain PyTorch step, one CUDA graph | " +
              " | ".join(f"{res['peer'][b]['graph_ms']:.2f}" for b in batches) + " |")
    if "colocated" in res and "device" in res:
        print("| device path speed / co-located | " + " | ".join(
            f"{res['colocated'][b]['ms_step'] / res['device'][b]['ms_step']:.2f}x"
            for b in batches) + " |")
    if "kill" in res:
        k = res["kill"]
        print(f"# kill at b={k['batch']}: stall {k['stall_s'] * 1e3:.0f} ms (median step "
              f"{k['median_gap_s'] * 1e3:.1f} ms; degraded {k['degraded_s']:.2f} s), replays "
              f"{k['replays']}, all completed: {k['all_completed']}, path after: "
              f"{k['data_path_after']}")


if __name__ == "__main__":
    main()
