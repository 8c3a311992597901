"""Benchmark of the expert path on one CUDA GPU: eaas_kernels.fused_moe vs torch._grouped_mm.

Shapes of real layers (bf16): Qwen3-30B-A3B (E=128 K=8 H=2048 F=768) and DeepSeek-V3 (E=256 K=8
H=7168 F=2048), T in 1, 16, 128, 512, 4096, routed by softmax top-8 of random logits.
Measured in the same run: the card's HBM copy bandwidth and bf16 matmul rate, the pure-torch
reference, and the torch._grouped_mm path (sort + gather, two grouped GEMMs with silu*up
between, weighted index_add back), and the same GEMMs alone on pre-sorted rows.

Rates:  TFLOP/s = 2 * (T*K) * 3 * H * F / time          (gate_up 2F*H + down F*H per pair)
        GB/s    = (experts hit) * 3 * H * F * 2 bytes / time   (expert weights, read once)
        copy GB/s = 2 * bytes / time (read + write);  matmul TFLOP/s = 2 * 8192^3 / time
Times are medians of CUDA-graph replays (eager in parentheses) over 4 routings rotated so that
repeated calls do not find one routing's experts in L2.

    PYTHONPATH=... python benchmarks/bench_kernels.py [--tune] [--quick] [--out DIR]
--tune sweeps block configs per (shape, T) and writes <card>.json (eaas_kernels/configs format).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import astuple, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from triton.testing import do_bench

from eaas_kernels import reference as ref
from eaas_kernels import topk_softmax
from eaas_kernels.configs import GemmConfig, MoEConfig, default_config, shape_key
from eaas_kernels.grouped_gemm import fused_moe_triton, launch_down, launch_gate_up, moe_config_for
from eaas_kernels.moe_align import moe_align_block_size_triton

SHAPES = {"qwen3-30b-a3b": (128, 8, 2048, 768), "deepseek-v3": (256, 8, 7168, 2048)}
TOKENS = (1, 16, 128, 512, 4096)
ROTATIONS = 4
DTYPE = torch.bfloat16


@dataclass(frozen=True, slots=True)
class Layer:
    x: torch.Tensor  # [T, H]
    w_gate_up: torch.Tensor  # [E, 2F, H]
    w_down: torch.Tensor  # [E, H, F]
    routings: list[tuple[torch.Tensor, torch.Tensor]]  # ROTATIONS x (topk_ids, topk_weights)


def graph_ms(calls: list, replays_ms: int = 100) -> float:
    """Median time of one call, from CUDA-graph replays of all calls (one each)."""
    for call in calls:
        call()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    ms = do_bench(graph.replay, warmup=10, rep=replays_ms, return_mode="median")
    del graph
    return ms / len(calls)


def eager_ms(calls: list, rep_ms: int = 100) -> float:
    ms = do_bench(lambda: [c() for c in calls], warmup=10, rep=rep_ms, return_mode="median")
    return ms / len(calls)


def card_ceilings() -> tuple[float, float]:
    """(copy GB/s counting read + write, bf16 matmul TFLOP/s) measured on this card."""
    src = torch.randn(1 << 29, device="cuda", dtype=DTYPE)  # 1 GiB
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=10, rep=200, return_mode="median")
    copy_gbs = 2 * src.numel() * src.element_size() / ms / 1e6
    del src, dst
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=DTYPE)
    b = torch.randn(n, n, device="cuda", dtype=DTYPE)
    ms = do_bench(lambda: a @ b, warmup=25, rep=300, return_mode="median")
    return copy_gbs, 2 * n**3 / ms / 1e9


def make_layer(num_experts: int, top_k: int, hidden: int, ffn: int, num_tokens: int,
               weights: tuple[torch.Tensor, torch.Tensor]) -> Layer:
    x = torch.randn(num_tokens, hidden, device="cuda", dtype=DTYPE)
    routings = []
    for _ in range(ROTATIONS):
        logits = torch.randn(num_tokens, num_experts, device="cuda")
        topk_weights, topk_ids = topk_softmax(logits, top_k, True)
        routings.append((topk_ids, topk_weights))
    return Layer(x, weights[0], weights[1], routings)


def grouped_mm_path(layer: Layer, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                    gemms_only: bool = False):
    """torch._grouped_mm peer; returns a closure (pre-sorted inputs when gemms_only)."""
    num_experts = layer.w_gate_up.shape[0]
    num_tokens, top_k = topk_ids.shape
    w1 = layer.w_gate_up.transpose(1, 2)  # [E, H, 2F]
    w2 = layer.w_down.transpose(1, 2)  # [E, F, H]

    def sort():
        flat = topk_ids.reshape(-1)  # [N]
        order = torch.argsort(flat, stable=True)  # [N]
        counts = torch.zeros(num_experts, dtype=torch.int32, device=flat.device)
        counts.scatter_add_(0, flat, torch.ones_like(flat, dtype=torch.int32))
        return order, torch.cumsum(counts, 0, dtype=torch.int32)

    def gemms(rows, offs):
        gate, up = torch._grouped_mm(rows, w1, offs=offs).chunk(2, dim=-1)  # [N, F] each
        return torch._grouped_mm((F.silu(gate) * up).contiguous(), w2, offs=offs)  # [N, H]

    if gemms_only:
        order, offs = sort()
        rows = layer.x[order // top_k]
        return lambda: gemms(rows, offs)

    def full():
        order, offs = sort()
        tokens = order // top_k
        y = gemms(layer.x[tokens], offs)  # [N, H], sorted
        w = topk_weights.reshape(-1)[order].to(y.dtype)[:, None]
        out = torch.zeros_like(layer.x)
        return out.index_add_(0, tokens, y * w)

    return full


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


def candidates(rows_per_expert: float) -> list[tuple[int, list[GemmConfig]]]:
    """(block_m, GEMM tiles) to sweep; tiles are (block_n, block_k, group_m, warps, stages)."""
    small = [GemmConfig(*c) for c in [(32, 128, 1, 4, 4), (64, 128, 1, 4, 4), (64, 64, 1, 4, 5),
                                       (128, 128, 1, 4, 3), (32, 64, 1, 4, 6), (64, 64, 1, 2, 6),
                                       (32, 128, 1, 2, 4), (128, 64, 1, 4, 4)]]
    big = [GemmConfig(*c) for c in [(64, 64, 8, 4, 4), (128, 64, 8, 4, 4), (128, 64, 8, 8, 4),
                                     (128, 64, 8, 8, 3), (128, 64, 8, 8, 5), (256, 64, 8, 8, 3),
                                     (64, 64, 8, 4, 5), (64, 128, 8, 4, 3), (256, 64, 8, 8, 4)]]
    huge = [GemmConfig(*c) for c in [(64, 64, 8, 8, 3), (128, 64, 8, 8, 3), (64, 64, 8, 8, 4)]]
    if rows_per_expert <= 8:
        return [(16, small)]
    if rows_per_expert <= 48:
        return [(16, small), (32, small), (64, big)]
    return [(64, big), (128, big), (256, huge)]


def tune(layer: Layer, top_k: int, deadline: float) -> tuple[MoEConfig, dict]:
    """Best block_m, then the best tile of each GEMM separately (graph-timed, all rotations)."""
    num_experts = layer.w_gate_up.shape[0]
    num_tokens, hidden = layer.x.shape
    ffn = layer.w_down.shape[2]
    best: tuple[float, MoEConfig] | None = None
    log = {}
    for block_m, tiles in candidates(num_tokens * top_k / num_experts):
        if time.time() > deadline:
            break
        aligns = [moe_align_block_size_triton(ids, num_experts, block_m)
                  for ids, _ in layer.routings]
        acts = [torch.empty(a.sorted_ids.numel(), ffn, device="cuda", dtype=DTYPE) for a in aligns]
        y = torch.empty(num_tokens * top_k, hidden, device="cuda", dtype=DTYPE)
        picked = {}
        for stage in ("gate_up", "down"):
            timed = []
            for tile in tiles:
                if stage == "gate_up":
                    calls = [lambda a=a, o=o, t=tile: launch_gate_up(
                                 layer.x, layer.w_gate_up, a, top_k, block_m, t, o)
                             for a, o in zip(aligns, acts)]
                else:
                    calls = [lambda a=a, o=o, t=tile: launch_down(o, layer.w_down, a, block_m, t, y)
                             for a, o in zip(aligns, acts)]
                try:
                    timed.append((graph_ms(calls, 50), tile))
                except Exception as exc:  # a tile that does not fit (shared memory) is skipped
                    print(f"  skip BM={block_m} {stage} {tile}: {type(exc).__name__}",
                          file=sys.stderr)
            ms, tile = min(timed, key=lambda p: p[0])
            picked[stage] = (ms, tile)
            log[f"BM={block_m} {stage}"] = [(round(m, 4), astuple(t)) for m, t in timed]
        total = picked["gate_up"][0] + picked["down"][0]
        cfg = MoEConfig(block_m=block_m, gate_up=picked["gate_up"][1], down=picked["down"][1])
        print(f"  BM={block_m}: gate_up {picked['gate_up'][0]:.4f} ms"
              f" + down {picked['down'][0]:.4f} ms", flush=True)
        if best is None or total < best[0]:
            best = (total, cfg)
    if best is None:
        return default_config(num_tokens * top_k, num_experts), log
    return best[1], log


def profile(calls: list, label: str) -> None:
    """Print each kernel's mean CUDA time over the rotated calls (eager, after warm-up)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    for call in calls:
        call()
    torch.cuda.synchronize()
    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            for call in calls:
                call()
        torch.cuda.synchronize()
    print(f"profile {label} (per call, us):")
    reps = 3 * len(calls)
    for evt in sorted(prof.key_averages(), key=lambda e: -e.device_time_total)[:8]:
        per_call = evt.device_time_total / reps
        print(f"  {evt.key[:60]:60s} {per_call:9.1f} us  x{evt.count / reps:.0f}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tune", action="store_true")
    parser.add_argument("--quick", action="store_true", help="one shape, T in 1 and 128")
    parser.add_argument("--budget-s", type=float, default=420.0, help="stop tuning after this")
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--profile", action="store_true",
                        help="per-kernel CUDA times (torch.profiler) at T=1 and T=4096")
    args = parser.parse_args()
    start = time.time()
    out_dir = Path(args.out)
    card = torch.cuda.get_device_name()
    copy_gbs, mm_tflops = card_ceilings()
    date = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    print(f"card: {card}; torch {torch.__version__}; date {date}")
    print(f"measured HBM copy {copy_gbs:.0f} GB/s (2*bytes/t, 1 GiB); "
          f"bf16 matmul 8192^3 {mm_tflops:.0f} TFLOP/s")
    has_grouped = hasattr(torch, "_grouped_mm")
    shapes = dict(list(SHAPES.items())[:1]) if args.quick else SHAPES
    tokens = (1, 128) if args.quick else TOKENS
    tuned: dict[str, dict[str, dict]] = {}
    rows = []
    for name, (num_experts, top_k, hidden, ffn) in shapes.items():
        gen = torch.Generator(device="cuda").manual_seed(0)
        opts = dict(device="cuda", generator=gen, dtype=DTYPE)
        w_gate_up = torch.randn(num_experts, 2 * ffn, hidden, **opts) / math.sqrt(hidden)
        w_down = torch.randn(num_experts, hidden, ffn, **opts) / math.sqrt(ffn)
        key = shape_key(num_experts, hidden, ffn, "bfloat16")
        for num_tokens in tokens:
            layer = make_layer(num_experts, top_k, hidden, ffn, num_tokens, (w_gate_up, w_down))
            cfg = moe_config_for(layer.x, w_gate_up, num_tokens, top_k)  # JSON or heuristic
            if args.tune and time.time() - start < args.budget_s:
                print(f"tuning {name} T={num_tokens}", flush=True)
                cfg, log = tune(layer, top_k, start + args.budget_s)
                tuned.setdefault(key, {})[str(num_tokens)] = cfg.to_dict()
                entry = {"shape": name, "T": num_tokens, "log": log}
                with (out_dir / "tune_log.jsonl").open("a") as f:
                    f.write(json.dumps(entry) + "\n")
            ours = [lambda r=r: fused_moe_triton(layer.x, w_gate_up, w_down, *r, config=cfg)
                    for r in layer.routings]
            ids0, w0 = layer.routings[0]
            want = ref.fused_moe_ref(layer.x, w_gate_up, w_down, ids0, w0)
            err = rel_err(ours[0](), want)
            t_ours, t_ours_eager = graph_ms(ours), eager_ms(ours)
            t_ref = eager_ms([lambda: ref.fused_moe_ref(layer.x, w_gate_up, w_down, ids0, w0)], 50)
            t_gmm = t_gmm_eager = t_gemms = float("nan")
            gmm_err = float("nan")
            if has_grouped:
                peer = [grouped_mm_path(layer, *r) for r in layer.routings]
                gmm_err = rel_err(peer[0](), want)
                t_gmm_eager = eager_ms(peer)
                try:
                    t_gmm = graph_ms(peer)
                except Exception as exc:
                    print(f"  grouped_mm path not capturable: {type(exc).__name__}: {exc}",
                          file=sys.stderr)
                    t_gmm = t_gmm_eager
                t_gemms = graph_ms([grouped_mm_path(layer, *r, gemms_only=True)
                                    for r in layer.routings])
            hit = sum(int(torch.unique(ids).numel()) for ids, _ in layer.routings) / ROTATIONS
            flops = 2 * num_tokens * top_k * 3 * hidden * ffn
            wbytes = hit * 3 * hidden * ffn * 2
            row = dict(shape=name, T=num_tokens, ours_ms=t_ours, ours_eager_ms=t_ours_eager,
                       gmm_ms=t_gmm, gmm_eager_ms=t_gmm_eager, gmm_gemms_ms=t_gemms, ref_ms=t_ref,
                       err=err, gmm_err=gmm_err, experts_hit=hit,
                       tflops=flops / t_ours / 1e9, gbs=wbytes / t_ours / 1e6, cfg=cfg.to_dict())
            rows.append(row)
            if args.profile and num_tokens in (1, 4096):
                profile(ours, f"{name} T={num_tokens}")
            with (out_dir / "bench_rows.jsonl").open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"{name} T={num_tokens}: ours {t_ours:.4f} ms ({t_ours_eager:.4f}) "
                  f"grouped_mm {t_gmm:.4f} ({t_gmm_eager:.4f}) gemms {t_gemms:.4f} "
                  f"ref {t_ref:.3f} err {err:.1e}/{gmm_err:.1e}", flush=True)
            del layer
        del w_gate_up, w_down
        torch.cuda.empty_cache()
    if tuned:
        path = out_dir / f"{card.replace(' ', '_')}.json"
        path.write_text(json.dumps(tuned, indent=1, sort_keys=True) + "\n")
        print(f"wrote {path}")
    print(f"\n{card}: HBM copy {copy_gbs:.0f} GB/s, bf16 matmul {mm_tflops:.0f} TFLOP/s; "
          f"times in ms, CUDA-graph replay (eager); "
          f"torch._grouped_mm {'present' if has_grouped else 'absent'}")
    print("| shape | T | ours | grouped_mm path | grouped_mm GEMMs only | torch ref | x vs gmm "
          "| TFLOP/s (% mm) | weights GB/s (% copy) | rel err |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['shape']} | {r['T']} | {r['ours_ms']:.4f} ({r['ours_eager_ms']:.4f}) | "
              f"{r['gmm_ms']:.4f} ({r['gmm_eager_ms']:.4f}) | {r['gmm_gemms_ms']:.4f} | "
              f"{r['ref_ms']:.2f} | {r['gmm_ms'] / r['ours_ms']:.2f} | "
              f"{r['tflops']:.0f} ({100 * r['tflops'] / mm_tflops:.0f}%) | "
              f"{r['gbs']:.0f} ({100 * r['gbs'] / copy_gbs:.0f}%) | {r['err']:.1e} |")
    print(f"total {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
