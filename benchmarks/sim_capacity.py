"""GPUs needed vs load: fixed expert-parallel groups (powers of two) vs fine-grained EaaS.

Runs the capacity simulator (:mod:`eaas.sim`, whose module docstring states the model) over a
grid of load levels for a few Zipf skews, prints a table, and plots
``benchmarks/figures/capacity.png``.

    .venv/bin/python benchmarks/sim_capacity.py [--experts 256] [--slots 16] [--exponents 0,0.2,0.4]

Units: load in GPU-equivalents, ``L / (tokens_per_s * max_util)`` = GPUs a perfectly balanced
placement would need; saving = ``1 - eaas_gpus / ep_gpus``. The peer is the EP baseline,
computed in the same run from the same trace.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import numpy as np

from eaas.sim import CapacityPoint, CapacitySimulator, ServerModel, expert_shares, zipf_trace


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--experts", type=int, default=256, help="routed experts per layer (E)")
    ap.add_argument("--slots", type=int, default=16, help="experts one GPU holds (memory)")
    ap.add_argument("--max-util", type=float, default=1.0, help="target GPU utilization")
    ap.add_argument("--exponents", default="0,0.2,0.4", help="Zipf exponents; first is the table")
    ap.add_argument("--windows", type=int, default=64)
    ap.add_argument("--tokens-per-window", type=int, default=65536)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-ep", type=int, default=64, help="largest EP group on the x range")
    ap.add_argument("--points", type=int, default=200)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "figures" / "capacity.png")
    return ap.parse_args()


def run(exponent: float, args: argparse.Namespace, model: ServerModel
        ) -> tuple[CapacitySimulator, list[CapacityPoint], float]:
    trace = zipf_trace(args.experts, args.windows, args.tokens_per_window, exponent, args.seed)
    sim = CapacitySimulator(expert_shares(trace), model)
    top = model.capacity / sim.ep_max_share(args.max_ep)  # the most max_ep EP GPUs can serve
    loads = np.linspace(top / args.points, top, args.points)
    return sim, sim.curve(loads), top


def main() -> None:
    args = parse_args()
    model = ServerModel(tokens_per_s=1.0, expert_slots=args.slots, max_util=args.max_util)
    exponents = [float(x) for x in args.exponents.split(",")]
    t0 = time.perf_counter()
    runs = {s: run(s, args, model) for s in exponents}
    elapsed = time.perf_counter() - t0
    cpu = platform.processor() or platform.machine()
    print(f"# capacity simulator: E={args.experts}, slots/GPU={args.slots}, max_util="
          f"{args.max_util}, trace {args.windows}x{args.tokens_per_window} seed {args.seed}")
    print(f"# machine: {platform.node()} {cpu}, {os.cpu_count()} CPUs; sim time {elapsed:.2f} s")
    print("# load = L / (tokens_per_s * max_util) [GPU-equivalents]; saving = 1 - eaas/ep")
    s0 = exponents[0]
    sim, points, _ = runs[s0]
    skew = sim.shares.max() * sim.num_experts
    print(f"\n## Zipf exponent {s0} (max/mean expert share {skew:.2f})")
    print(f"{'load':>8} {'EP GPUs':>8} {'EaaS GPUs':>10} {'saving':>7}")
    for p in points[:: max(1, len(points) // 25)]:
        print(f"{p.load / model.capacity:8.2f} {p.ep_gpus:8d} {p.eaas_gpus:10d} {p.saving:7.1%}")
    print(f"\n{'zipf s':>7} {'max/mean':>9} {'EP@top':>7} {'EaaS@top':>9} {'top load':>9} "
          f"{'max saving':>11} {'at load':>8} {'EP':>4} {'EaaS':>5}")
    for s, (sim, points, top) in runs.items():
        best = max(points, key=lambda p: (p.saving, -p.load))
        print(f"{s:7.2f} {sim.shares.max() * sim.num_experts:9.2f} {points[-1].ep_gpus:7d} "
              f"{points[-1].eaas_gpus:9d} {top / model.capacity:9.2f} {best.saving:11.1%} "
              f"{best.load / model.capacity:8.2f} {best.ep_gpus:4d} {best.eaas_gpus:5d}")
        at40 = [p for p in points if p.ep_gpus == 64 and p.eaas_gpus == 40]
        if at40:
            print(f"        EP 64 vs EaaS 40 (saving 37.5%) for loads "
                  f"{at40[0].load / model.capacity:.2f}-{at40[-1].load / model.capacity:.2f}")
    plot(runs, model, args)
    print(f"\nwrote {args.out}")


def plot(runs: dict[float, tuple[CapacitySimulator, list[CapacityPoint], float]],
         model: ServerModel, args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    s0 = next(iter(runs))
    sim, points, _ = runs[s0]
    x = np.array([p.load for p in points]) / model.capacity
    ax = axes[0]
    ax.step(x, [p.ep_gpus for p in points], where="post", label="EP group (power of two)")
    ax.step(x, [p.eaas_gpus for p in points], where="post", label="EaaS (per-GPU scaling)")
    ax.plot(x, np.maximum(x, sim.min_gpus), ":", color="gray",
            label="lower bound max(load, memory)")
    hit = [p for p in points if p.ep_gpus == 64 and p.eaas_gpus == 40]
    if hit:
        ax.annotate("64 vs 40 GPUs (-37.5%)", (hit[0].load / model.capacity, 40),
                    xytext=(0.15, 0.8), textcoords="axes fraction",
                    arrowprops={"arrowstyle": "->"})
    ax.set(xlabel="load [GPU-equivalents = L / per-GPU throughput]", ylabel="expert GPUs",
           title=f"E={args.experts}, {args.slots} experts/GPU, Zipf s={s0}")
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    ax = axes[1]
    for s, (sim_s, pts, _) in runs.items():
        xs = np.array([p.load for p in pts]) / model.capacity
        ax.step(xs, [100 * p.saving for p in pts], where="post",
                label=f"Zipf s={s} (max/mean {sim_s.shares.max() * sim_s.num_experts:.1f})")
    ax.axhline(37.5, color="gray", ls=":", label="paper: up to 37.5%")
    ax.set(xlabel="load [GPU-equivalents]", ylabel="GPUs saved by EaaS [%]",
           title=f"saving = 1 - EaaS/EP (EP up to {args.max_ep} GPUs)")
    ax.legend(loc="upper right", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=120)


if __name__ == "__main__":
    main()
