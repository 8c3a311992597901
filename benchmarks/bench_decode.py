"""Decode on one GPU: eaas co-located (experts in-process on the shard's GPU, decode steps as CUDA
graphs) against the strongest peer — a plain-PyTorch decode step of the same shape captured in
one CUDA graph (benchmarks/decode_peer.py) — transformers `generate`, and the weight-read floor,
all in one run. Qwen3-30B-A3B shape, random bf16 weights made in memory (load_format "dummy":
all 48 layers fit a 141 GB H200 because nothing is written to disk).

decode tok/s (eaas) = tokens streamed after the batch's last first token / time from then to the
    end (the engine as a user drives it: AsyncEngine.generate, host loop, streaming included);
    ms/step = 1000 * B / decode tok/s
peer ms/step = CUDA-event time of N graph replays / N (no host loop); tok/s = 1000 * B / ms
transformers decode tok/s = B * (N - 1) / (t_step_N - t_step_1)
weight-read floor = bytes of weights a step must read / measured read bandwidth

    python benchmarks/bench_decode.py [--layers 48] [--batches 1,32,128,256] [--tokens 32]
        [--setups peer,fast,invariant,hf] [--long]   # --long: TTFT 16 and 2048 + batch 32 at 4096
    python benchmarks/bench_decode.py --smoke        # CPU, tiny shape, eager, < 60 s
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_e2e_gpu as e2e  # noqa: E402  (puts eaas / eaas_kernels on sys.path)
import decode_peer  # noqa: E402
import torch  # noqa: E402

from eaas import AsyncEngine, EngineConfig  # noqa: E402
from eaas.model.tiny import QWEN3_30B_A3B, make_config_only  # noqa: E402

VOCAB = 151936


def free_gpu() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def eaas_cfg(model: Path, *, invariant: bool, smoke: bool, max_seqs: int, max_len: int,
             blocks: int) -> EngineConfig:
    return EngineConfig.from_dict({
        "model": str(model), "load_format": "dummy", "device": "cpu" if smoke else "cuda:0",
        "dtype": "float32" if smoke else "bfloat16", "batch_invariant": invariant,
        "placement": {"num_expert_servers": 2, "expert_replicas": 1, "server_mode": "inproc"},
        "scheduler": {"max_num_seqs": max_seqs, "max_waiting": 4096, "max_model_len": max_len,
                      "micro_batches": 1},
        "cache": {"num_blocks": blocks},
        "fault": {"unit_timeout_s": 60.0}})


async def bench_eaas(cfg: EngineConfig, batches: list[int], n_tokens: int, vocab: int,
                     long: bool, budget_s: float) -> dict[str, Any]:
    out: dict[str, Any] = {}
    t0 = time.perf_counter()
    async with AsyncEngine(cfg) as engine:
        out["start_s"] = time.perf_counter() - t0
        out["data_path"] = [s["data_path"] for s in engine.snapshot()["shards"]]
        ps = e2e.prompts(max(batches), 16, vocab)
        for b in batches:
            await e2e.run_batch(engine, ps[:b], 4, budget_s)  # warm-up at this batch size
            r = await e2e.run_batch(engine, ps[:b], n_tokens, budget_s)
            r["ms_step"] = 1000.0 * b / r["decode_tok_s"]
            out[b] = r
            print(f"# measured: eaas {cfg.batch_invariant=} batch {b}: "
                  f"{r['decode_tok_s']:.1f} tok/s, {r['ms_step']:.2f} ms/step", flush=True)
        if long:
            for n in (16, 2048):  # TTFT: median of 3 after a warm-up
                ps1 = e2e.prompts(1, n, vocab, seed=5)
                await e2e.run_batch(engine, ps1, 2, budget_s)
                times = []
                for _ in range(3):
                    t = time.perf_counter()
                    async for _ in engine.generate(ps1[0], e2e.SamplingParams(max_tokens=1,
                                                                              temperature=0)):
                        pass
                    times.append(1000.0 * (time.perf_counter() - t))
                out[f"ttft_{n}_ms"] = sorted(times)[1]
            # decode at 4096 of context with all 32 rows in the step: the prompts prefill in
            # chunks over several steps while the first ones already decode, so each request
            # asks for as many tokens as there are prefill steps more, and the rate is read
            # between the last first token and the first finish (`steady_tok_s`)
            p4k = e2e.prompts(32, 4096, vocab, seed=6)
            chunk = cfg.scheduler.max_num_batched_tokens
            n_long = n_tokens + 32 * -(-4096 // chunk)
            r = await e2e.run_batch(engine, p4k, n_long, 4 * budget_s)
            r["ms_step"] = 1000.0 * 32 / r["steady_tok_s"]
            out["ctx4096_b32"] = r
        out["replays"] = sum(s["graph_replays"] for s in engine.snapshot()["shards"])
    return out


def bench_hf(model_cfg: dict, batches: list[int], n_tokens: int, vocab: int,
             device: str) -> dict[int, dict]:
    """transformers generate on a randomly initialised model built from the same config.json
    (weights initialised directly on the device; nothing is read from disk)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    hf_cfg = AutoConfig.for_model(**model_cfg)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(hf_cfg, dtype=getattr(
            torch, model_cfg["torch_dtype"])).eval()
    out: dict[int, dict] = {}
    ps = e2e.prompts(max(batches), 16, vocab)
    for b in batches:
        ids = torch.tensor(ps[:b], device=device)

        def gen(n: int, streamer: Any = None) -> None:
            with torch.no_grad():
                model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                               max_new_tokens=n, min_new_tokens=n, pad_token_id=0,
                               streamer=streamer)

        gen(2)
        s = e2e._Stamps()
        gen(n_tokens, s)
        steps = s.t[1:]
        tok_s = b * (len(steps) - 1) / (steps[-1] - steps[0])
        out[b] = {"decode_tok_s": tok_s, "ms_step": 1000.0 * b / tok_s}
        print(f"# measured: transformers batch {b}: {tok_s:.1f} tok/s", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--batches", default=None)
    ap.add_argument("--tokens", type=int, default=None)
    ap.add_argument("--setups", default="peer,fast,invariant,hf")
    ap.add_argument("--hf-tokens", type=int, default=8, help="tokens per transformers run")
    ap.add_argument("--long", action="store_true",
                    help="TTFT of 16 and 2048 + decode at 4096, b=32")
    ap.add_argument("--budget-s", type=float, default=60.0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    smoke = args.smoke
    if not smoke and not torch.cuda.is_available():
        sys.exit("no CUDA GPU: run with --smoke on CPU")
    layers = args.layers or (2 if smoke else 48)
    batches = [int(x) for x in (args.batches or ("1,4" if smoke else "1,32,128,256")).split(",")]
    n_tokens = args.tokens or (6 if smoke else 32)
    setups = args.setups.split(",")
    shape = dict(e2e.SMOKE_SHAPE) if smoke else dict(QWEN3_30B_A3B)
    shape.update(num_hidden_layers=layers, vocab_size=384 if smoke else VOCAB,
                 max_position_embeddings=8192)
    device = "cpu" if smoke else "cuda:0"
    max_len = 4096 + n_tokens + 80 if args.long else 16 + n_tokens + 8  # long: + prefill steps
    max_seqs = max(batches + ([32] if args.long else []))
    bs = 16
    blocks = max_seqs * -(-max_len // bs) + 8
    res: dict[str, Any] = {"machine": e2e.machine_line(), "command": " ".join(sys.argv),
                           "layers": layers, "batches": batches, "tokens": n_tokens}
    pshape = decode_peer.PeerShape.from_dict(shape)
    bw = decode_peer.read_bandwidth(device, (4 << 30) if not smoke else (64 << 20))
    res["read_bandwidth"] = bw
    res["floor_ms"] = {b: decode_peer.weight_read_floor(pshape, b, layers, shape["vocab_size"],
                                                        bw) for b in batches}
    with tempfile.TemporaryDirectory() as tmp:
        model = make_config_only(Path(tmp) / "m", "qwen3_moe",
                                 dtype="float32" if smoke else "bfloat16", **shape)
        raw = json.loads((model / "config.json").read_text())
        if "peer" in setups:
            peer = decode_peer.DecodePeer(pshape, torch.device(device),
                                          dtype=torch.float32 if smoke else torch.bfloat16)
            res["peer"] = {b: decode_peer.measure_peer({}, b, 16, n_tokens, layers,
                                                       shape["vocab_size"], device, peer=peer,
                                                       eager=smoke) for b in batches}
            if args.long and not smoke:
                res["peer_ttft_2048"] = decode_peer.measure_prefill(peer, 2048)
                res["peer_ttft_16"] = decode_peer.measure_prefill(peer, 16)
                res["peer_ctx4096_b32"] = decode_peer.measure_peer(
                    {}, 32, 4096, n_tokens, layers, shape["vocab_size"], device, peer=peer,
                    eager=False)
            del peer
            free_gpu()
            for b in batches:
                r = res["peer"][b]
                print(f"# measured: peer batch {b}: graph {r['graph_ms']} ms, eager "
                      f"{r['eager_ms']} ms", flush=True)
        for name, inv in (("fast", False), ("invariant", True)):
            if name in setups:
                cfg = eaas_cfg(model, invariant=inv, smoke=smoke, max_seqs=max_seqs,
                               max_len=max_len, blocks=blocks)
                res[name] = asyncio.run(bench_eaas(cfg, batches, n_tokens, shape["vocab_size"],
                                                   args.long, args.budget_s))
                free_gpu()  # the engine is gone now: the next setup gets its memory
        if "hf" in setups:
            res["hf"] = bench_hf(raw, batches, args.hf_tokens, shape["vocab_size"], device)
            free_gpu()
    print_table(res, batches)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1, default=str) + "\n")


def print_table(res: dict[str, Any], batches: list[int]) -> None:
    print(f"# bench_decode  {res['machine']}")
    print(f"# command: {res['command']}")
    print(f"# qwen3_moe shape, {res['layers']} layers, dummy weights; 16-token prompts, "
          f"{res['tokens']} greedy tokens; read bandwidth {res['read_bandwidth'] / 1e12:.2f} "
          "TB/s")
    print("| path | " + " | ".join(f"b={b} ms/step (tok/s)" for b in batches) + " |")
    print("|---|" + "---:|" * len(batches))

    def cell(ms: float | None, b: int) -> str:
        return "-" if not ms else f"{ms:.2f} ({1000.0 * b / ms:.0f})"

    rows = []
    for name, label in (("fast", "eaas co-located, batch_invariant false"),
                        ("invariant", "eaas co-located, batch_invariant true")):
        if name in res:
            rows.append((label + f" [{','.join(res[name]['data_path'])}]",
                         [res[name][b]["ms_step"] for b in batches]))
    if "peer" in res:
        key = "graph_ms" if res["peer"][batches[0]]["graph_ms"] else "eager_ms"
        rows.append((f"plain PyTorch step, one CUDA graph ({key})",
                     [res["peer"][b][key] for b in batches]))
    if "hf" in res:
        rows.append(("transformers generate", [res["hf"][b]["ms_step"] for b in batches]))
    rows.append(("weight-read floor", [res["floor_ms"][b] for b in batches]))
    for label, ms in rows:
        print(f"| {label} | " + " | ".join(cell(m, b) for m, b in zip(ms, batches)) + " |")
    for name in ("fast", "invariant"):
        if "peer" in res and name in res:
            peer_ms = [res["peer"][b]["graph_ms"] or res["peer"][b]["eager_ms"] for b in batches]
            print(f"| {name} / peer tok/s | " + " | ".join(
                f"{p / res[name][b]['ms_step']:.2f}x" for p, b in zip(peer_ms, batches)) + " |")
    for name in ("fast", "invariant"):
        if name in res and "ttft_2048_ms" in res[name]:
            r = res[name]
            print(f"# {name}: TTFT 16-token prompt {r['ttft_16_ms']:.1f} ms, 2048-token prompt "
                  f"{r['ttft_2048_ms']:.1f} ms; batch 32 at 4096 context "
                  f"{r['ctx4096_b32']['ms_step']:.2f} ms/step")
    if "peer_ttft_2048" in res:
        print(f"# peer: TTFT 16 {res['peer_ttft_16']['ttft_ms']:.1f} ms (eager prefill), 2048 "
              f"{res['peer_ttft_2048']['ttft_ms']:.1f} ms; batch 32 at 4096 "
              f"{res['peer_ctx4096_b32']['graph_ms']:.2f} ms/step")


if __name__ == "__main__":
    main()
