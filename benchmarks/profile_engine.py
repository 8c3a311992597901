"""Where the engine's wall time goes outside the GPU: the host side of a 2048-token prefill (TTFT)
and of decode steps at 4096 tokens of context, on the co-located engine as a user drives it.

For each case: wall time of the case, the CUDA kernel time inside it (torch.profiler, summed over
kernels: what the GPU was busy with), and a cProfile table of the host functions by own time
(tottime) — so "X ms outside the graph" can be named function by function. cProfile slows Python
down; read its table for shares, the un-profiled wall time for totals.

    python benchmarks/profile_engine.py [--layers 48] [--prompt 2048] [--context 4096]
        [--batch 32] [--tokens 16] [--top 25] [--invariant]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import json
import pstats
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_e2e_gpu as e2e  # noqa: E402  (puts eaas / eaas_kernels on sys.path)
import torch  # noqa: E402

from eaas import AsyncEngine, EngineConfig, SamplingParams  # noqa: E402
from eaas.model.tiny import QWEN3_30B_A3B, make_config_only  # noqa: E402

VOCAB = 151936  # Qwen3-30B-A3B


def kernel_ms(prof: Any) -> float:
    """Summed CUDA kernel time (ms) of a torch.profiler run."""
    total = 0.0
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            total += ev.device_time_total if hasattr(ev, "device_time_total") else ev.cuda_time
    return total / 1e3


async def case(engine: AsyncEngine, batch: list[list[int]], n_tokens: int, top: int,
               label: str) -> dict[str, Any]:
    params = SamplingParams(max_tokens=n_tokens, temperature=0, ignore_eos=True)

    async def run() -> float:
        t = time.perf_counter()
        await asyncio.gather(*(_drain(engine, p, params) for p in batch))
        return time.perf_counter() - t

    await run()  # warm-up: kernels compiled, blocks touched
    wall = await run()
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        await run()
    gpu = kernel_ms(prof)
    pr = cProfile.Profile()
    pr.enable()
    pwall = await run()
    pr.disable()
    s = io.StringIO()
    pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(top)
    print(f"## {label}: wall {wall * 1e3:.1f} ms (profiled {pwall * 1e3:.1f}); CUDA kernels "
          f"{gpu:.1f} ms; host-only at most {wall * 1e3 - gpu:.1f} ms", flush=True)
    print("\n".join(s.getvalue().splitlines()[:top + 12]), flush=True)
    return {"wall_ms": wall * 1e3, "kernel_ms": gpu, "cprofile_wall_ms": pwall * 1e3}


async def _drain(engine: AsyncEngine, prompt: list[int], params: SamplingParams) -> None:
    async for _ in engine.generate(prompt, params):
        pass


async def main_async(args: argparse.Namespace, model: Path) -> dict[str, Any]:
    max_len = args.context + args.tokens + 16
    blocks = args.batch * -(-max_len // 16) + 8
    cfg = EngineConfig.from_dict({
        "model": str(model), "load_format": "dummy", "device": "cuda:0", "dtype": "bfloat16",
        "batch_invariant": args.invariant,
        "placement": {"num_expert_servers": 2, "expert_replicas": 1, "server_mode": "inproc"},
        "scheduler": {"max_num_seqs": args.batch, "max_waiting": 4096, "max_model_len": max_len,
                      "micro_batches": 1},
        "cache": {"num_blocks": blocks}, "fault": {"unit_timeout_s": 60.0}})
    out: dict[str, Any] = {}
    async with AsyncEngine(cfg) as engine:
        vocab = VOCAB
        out["ttft"] = await case(engine, e2e.prompts(1, args.prompt, vocab, seed=5), 1, args.top,
                                 f"TTFT, one {args.prompt}-token prompt")
        long = e2e.prompts(args.batch, args.context, vocab, seed=6)
        out["prefill_long"] = await case(engine, long, 1, args.top,
                                         f"prefill of {args.batch} x {args.context} tokens")
        out["decode_long"] = await case(engine, long, args.tokens, args.top,
                                        f"{args.batch} x {args.context} context + "
                                        f"{args.tokens} tokens")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=48)
    ap.add_argument("--prompt", type=int, default=2048)
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--invariant", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("profile_engine needs a CUDA GPU")
    shape = dict(QWEN3_30B_A3B, num_hidden_layers=args.layers, vocab_size=VOCAB,
                 max_position_embeddings=8192)
    print(f"# profile_engine {e2e.machine_line()}; command: {' '.join(sys.argv)}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        model = make_config_only(Path(tmp) / "m", "qwen3_moe", dtype="bfloat16", **shape)
        res = asyncio.run(main_async(args, model))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
