"""Where a co-located decode step's GPU time goes: per-kernel CUDA time of one step of the eaas
captured path (DecodeGraphs, fast and batch-invariant modes) and of the captured plain-PyTorch
peer (benchmarks/decode_peer.py), same shape, same card, same run.

For each mode and batch: the replay time of the step's CUDA graph (CUDA events over N replays),
the host cost of `DecodeGraphs.step` (packing + upload + replay, wall clock, synchronised), and a
torch.profiler table of the eager step's kernels (summed per kernel name, per step), so a miss
against the peer can be named kernel by kernel.

    python benchmarks/profile_decode.py [--layers 48] [--batches 1,32,128,256]
        [--modes fast,invariant,peer] [--context 16] [--top 18] [--json out.json]
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_e2e_gpu as e2e  # noqa: E402  (puts eaas / eaas_kernels on sys.path)
import decode_peer  # noqa: E402
import torch  # noqa: E402

from eaas.engine.decode_graph import DecodeGraphs, DecodeRow  # noqa: E402
from eaas.model import (AttentionBatch, Checkpoint, DecoderModel, PagedKVCache,  # noqa: E402
                        SeqSpan, bank_experts)
from eaas.model.tiny import QWEN3_30B_A3B, make_config_only  # noqa: E402

BLOCK = 16


def kernel_table(fn: Any, steps: int = 3) -> tuple[list[tuple[str, float, int]], float]:
    """(name, us per step, launches per step) of every CUDA kernel `fn` runs, largest first,
    and the sum of kernel time per step in us."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    us: dict[str, float] = defaultdict(float)
    n: dict[str, int] = defaultdict(int)
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            us[ev.name] += ev.device_time / steps
            n[ev.name] += 1
    rows = sorted(((k, v, n[k] // steps) for k, v in us.items()), key=lambda r: -r[1])
    return rows, sum(us.values())


def replay_ms(fn: Any, n: int = 20) -> float:
    fn()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(n):
        fn()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) / n


def profile_eaas(model_dir: Path, invariant: bool, batches: list[int], context: int,
                 prefill: int) -> dict[Any, dict]:
    model = DecoderModel.load(Checkpoint.open(model_dir, "dummy"), dtype=torch.bfloat16,
                              device="cuda:0", batch_invariant=invariant)
    per = -(-max(context + 8, prefill) // BLOCK)
    bmax = max(batches)
    cache = PagedKVCache(model.config, bmax * per + 1, BLOCK, model.dtype, "cuda:0")
    out: dict[Any, dict] = {}
    if prefill:  # one prompt, eagerly (prefill steps are not captured)
        ids = torch.randint(0, model.config.vocab_size, (prefill,), device="cuda:0")
        span = [SeqSpan(list(range(1, 1 + per)), 0, prefill)]

        @torch.inference_mode()
        def fill() -> None:
            batch = AttentionBatch.build(span, BLOCK, "cuda:0")
            h = model.forward_hidden(ids, cache, batch, bank_experts)
            model.lm_head(model.final_norm(h[-1:])).argmax()

        r: dict[str, Any] = {"replay_ms": replay_ms(fill, 3)}
        r["kernels"], r["kernel_us"] = kernel_table(fill, 1)
        out["prefill"] = r
    graphs = DecodeGraphs(model, cache, max_num_seqs=bmax, max_blocks=per,
                          experts=bank_experts, captured=True)
    t0 = time.perf_counter()
    graphs.capture()
    out["capture_s"] = time.perf_counter() - t0  # type: ignore[assignment]
    g = torch.Generator().manual_seed(0)
    for b in batches:
        toks = torch.randint(0, model.config.vocab_size, (b,), generator=g).tolist()
        rows = [DecodeRow(toks[i], context, list(range(1 + i * per, 1 + (i + 1) * per)))
                for i in range(b)]
        graphs.step(rows)
        torch.cuda.synchronize()
        bucket = graphs.bucket(b)
        graph = graphs._graphs[(bucket, False)]
        r: dict[str, Any] = {"replay_ms": replay_ms(graph.replay)}

        def host_step() -> None:
            graphs.step(rows)[0].cpu()

        t = time.perf_counter()
        for _ in range(10):
            host_step()
        r["step_ms"] = (time.perf_counter() - t) * 100.0
        with torch.inference_mode():
            rows_k, total = kernel_table(lambda: graphs._forward(bucket, False))
        r["kernels"], r["kernel_us"] = rows_k, total
        out[b] = r
    return out


def profile_peer(shape: dict, batches: list[int], context: int, prefill: int
                 ) -> dict[Any, dict]:
    pshape = decode_peer.PeerShape.from_dict(shape)
    peer = decode_peer.DecodePeer(pshape, torch.device("cuda:0"), dtype=torch.bfloat16)
    out: dict[Any, dict] = {}
    if prefill:
        st = peer.new_state(1, prefill + 8)
        prompt = torch.randint(10, pshape.vocab_size, (1, prefill), device="cuda:0")

        def fill() -> None:
            peer.prefill(st, prompt)

        r: dict[str, Any] = {"replay_ms": replay_ms(fill, 3)}
        r["kernels"], r["kernel_us"] = kernel_table(fill, 1)
        out["prefill"] = r
    for b in batches:
        st = peer.new_state(b, context + 64)  # room for the 21 + 4 steps below
        decode_peer.fill_context(peer, st, context)
        graph, _, _ = peer.capture(st)
        r: dict[str, Any] = {"replay_ms": replay_ms(graph.replay)}
        st.pos.fill_(context)
        rows_k, total = kernel_table(lambda: peer.decode_step(st))
        r["kernels"], r["kernel_us"] = rows_k, total
        out[b] = r
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=48)
    ap.add_argument("--batches", default="1,32,128,256")
    ap.add_argument("--modes", default="fast,invariant,peer")
    ap.add_argument("--context", type=int, default=16)
    ap.add_argument("--top", type=int, default=18)
    ap.add_argument("--prefill", type=int, default=0, help="also profile one eager prefill of "
                    "this many tokens (0: none)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("profile_decode needs a CUDA GPU")
    batches = [int(x) for x in args.batches.split(",")]
    shape = dict(QWEN3_30B_A3B)
    shape.update(num_hidden_layers=args.layers, vocab_size=151936, max_position_embeddings=8192)
    res: dict[str, Any] = {"machine": e2e.machine_line(), "command": " ".join(sys.argv)}
    print(f"# profile_decode  {res['machine']}\n# command: {res['command']}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_config_only(Path(tmp) / "m", "qwen3_moe", dtype="bfloat16", **shape)
        for mode in args.modes.split(","):
            if mode == "peer":
                res[mode] = profile_peer(shape, batches, args.context, args.prefill)
            else:
                res[mode] = profile_eaas(model_dir, mode == "invariant", batches, args.context,
                                         args.prefill)
            gc.collect()  # the mode's model and graphs are gone: the next gets their memory
            torch.cuda.empty_cache()
            report(res, mode, (["prefill"] if args.prefill else []) + batches, args.top)
            if args.json:
                Path(args.json).write_text(json.dumps(res, indent=1, default=str) + "\n")


def report(res: dict[str, Any], mode: str, batches: list[Any], top: int) -> None:
    for b in batches:
        r = res[mode][b]
        host = f", DecodeGraphs.step {r['step_ms']:.2f} ms" if "step_ms" in r else ""
        what = "prefill" if b == "prefill" else f"b={b}: graph replay"
        print(f"\n## {mode} {what} {r['replay_ms']:.2f} ms{host}, eager kernel "
              f"sum {r['kernel_us'] / 1000:.2f} ms, {sum(k[2] for k in r['kernels'])} "
              "kernels/step")
        for name, us, n in r["kernels"][:top]:
            print(f"  {us:9.1f} us  x{n:<5d} {name[:110]}", flush=True)


if __name__ == "__main__":
    main()
